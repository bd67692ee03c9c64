"""Bisection along cost-ordered candidates under an accuracy budget (docs/design.md §6).

Each probe is expensive in the real pipeline (export a QDQ ONNX model, evaluate it in onnxruntime),
so the search spends at most ⌈log2 N⌉ + 1 evaluations on N candidates, plus one optional repair
probe (and the named ``extra`` points the caller asks for), and never evaluates the same
allocation twice.

Order of probes: the most precise (most expensive) candidate first. If even it misses the budget,
no candidate can be trusted to meet it: the search stops with ``budget_met = False`` and the
trial that proves it. Otherwise it keeps an interval (lo, hi] with hi known to pass and lo known to
fail (or −1), and halves it. With a ``min_drop`` range it stops at the first probe inside the range.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from types import MappingProxyType
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from hawqtool.confidence import DropEstimate, paired_drop, paired_drop_batches
from hawqtool.errors import UsageError
from hawqtool.formats import allocation_key
from hawqtool.types import Budget, FrontierPoint, Trial

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Measurement:
    """What one model measured on a split: the metric, its per-sample values when the metric gives
    them, else its values on fixed chunks of the split (``(values, sizes)``), and latency if timed."""

    metric: float
    values: np.ndarray | None = None
    latency_ms: float | None = None
    chunks: tuple[np.ndarray, np.ndarray] | None = None

    @classmethod
    def of(cls, evaluation: Any) -> Measurement:
        """From a :class:`hawqtool.evaluate.Evaluation`."""
        return cls(evaluation.metric, evaluation.values, None, evaluation.chunks)


def judge(budget: Budget, reference: Measurement, candidate: Measurement, *, seed: int = 0) -> Any:
    """The candidate's drop from the reference on the same samples, as a
    :class:`hawqtool.confidence.DropEstimate` at ``budget.confidence``: paired per-sample bounds, or
    a paired bootstrap over chunks for a metric that is one number per split, or the point
    estimate (``confidence == 0``, or nothing to pair)."""
    c, mode, hib = budget.confidence, budget.mode, budget.higher_is_better
    if c > 0 and reference.values is not None and candidate.values is not None:
        return paired_drop(
            reference.values,
            candidate.values,
            confidence=c,
            mode=mode,
            higher_is_better=hib,
            binary=budget.binary,
            seed=seed,
        )
    if c > 0 and reference.chunks is not None and candidate.chunks is not None:
        return paired_drop_batches(
            reference.chunks[0],
            candidate.chunks[0],
            reference.chunks[1],
            confidence=c,
            mode=mode,
            higher_is_better=hib,
            seed=seed,
        )
    d = budget.drop(reference.metric, candidate.metric)
    n = len(candidate.values) if candidate.values is not None else 0
    return DropEstimate(d, d, d, 0.0, 0.0, "point", n)


Evaluate = Callable[[FrontierPoint], "float | Measurement"]
Repair = Callable[[FrontierPoint], FrontierPoint | None]


@dataclass(frozen=True)
class SearchResult:
    """What the search found.

    Attributes:
        chosen: the cheapest point found that meets the budget (``None`` when none does).
        chosen_index: its index in the candidates; ``None`` when nothing was chosen or the chosen
            point is a repaired allocation that is not among the candidates.
        trials: every evaluation, in order.
        budget_met: whether ``chosen`` meets ``max_drop``.
        baseline: the reference metric the drops are measured from.
        reason: why the search stopped: ``impossible`` (the most precise candidate fails),
            ``in_range`` (a probe fell inside ``[min_drop, max_drop]``), ``converged`` or
            ``repaired`` (the repair probe passed and is cheaper) or ``uniform`` (a uniform model
            cheaper than the search's choice met the budget; see :func:`bisect`).
    """

    chosen: FrontierPoint | None
    chosen_index: int | None
    trials: tuple[Trial, ...]
    budget_met: bool
    baseline: float
    reason: str = ""

    @property
    def evaluations(self) -> int:
        return len(self.trials)

    def to_dict(self) -> dict[str, Any]:
        chosen = None
        if self.chosen is not None:
            chosen = {**asdict(self.chosen), "allocation": dict(self.chosen.allocation)}
        return {
            "chosen": chosen,
            "chosen_index": self.chosen_index,
            "budget_met": self.budget_met,
            "baseline": self.baseline,
            "reason": self.reason,
            "evaluations": self.evaluations,
            "trials": [{**asdict(t), "allocation": dict(t.allocation)} for t in self.trials],
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SearchResult:
        chosen = FrontierPoint(**d["chosen"]) if d.get("chosen") is not None else None
        return cls(
            chosen=chosen,
            chosen_index=d.get("chosen_index"),
            trials=tuple(Trial(**t) for t in d["trials"]),
            budget_met=bool(d["budget_met"]),
            baseline=float(d["baseline"]),
            reason=str(d.get("reason", "")),
        )


def max_evaluations(n: int, *, repair: bool = True) -> int:
    """The most evaluations :func:`bisect` spends on ``n`` candidates: ⌈log2 n⌉ + 1 (+1 repair)."""
    return (math.ceil(math.log2(n)) if n > 1 else 0) + 1 + int(repair)


def measure_trial(
    point: FrontierPoint,
    evaluate: Evaluate,
    *,
    baseline: float,
    budget: Budget,
    reference: Measurement | None = None,
    seed: int = 0,
    index: int = 0,
    note: str = "",
    source: str = "candidates",
) -> Trial:
    """Evaluate one point and judge it against ``budget`` as :func:`bisect` does (a confidence bound
    on the drop when ``reference`` has per-sample values, the point drop otherwise; a non-finite
    metric is a miss). ``index``, ``note`` and ``source`` are recorded in the :class:`Trial`."""
    t0 = time.perf_counter()
    got = evaluate(point)
    seconds = time.perf_counter() - t0
    m = got if isinstance(got, Measurement) else Measurement(float(got))
    metric = float(m.metric)
    if not math.isfinite(metric):
        log.warning("candidate #%d has a non-finite metric (%s); counted as a miss", index, metric)
    drop = budget.drop(baseline, metric)
    lower = upper = drop
    bound = "point"
    if reference is not None and math.isfinite(metric):
        est = judge(budget, reference, m, seed=seed)
        drop, lower, upper, bound = est.drop, est.lower, est.upper, est.method
    met = math.isfinite(metric) and upper <= budget.max_drop + 1e-12
    trial = Trial(
        index=index,
        cost=point.cost,
        avg_bits=point.avg_bits,
        metric=metric,
        drop=drop,
        met=met,
        seconds=seconds,
        allocation=dict(point.allocation),
        note=note,
        drop_lower=lower,
        drop_upper=upper,
        confidence=budget.confidence if bound != "point" else 0.0,
        bound=bound,
        source=source,
        latency_ms=m.latency_ms,
    )
    log.info(
        "search probe #%d (%s): cost %.6g, %.2f avg bits, metric %.6g, drop %.4g (bound %.4g) -> %s",
        index,
        note,
        point.cost,
        point.avg_bits,
        metric,
        drop,
        upper,
        "meets" if trial.met else "misses",
    )
    return trial


def bisect(
    candidates: Sequence[FrontierPoint] | Iterable[FrontierPoint],
    evaluate: Evaluate,
    *,
    baseline: float,
    budget: Budget,
    repair: Repair | None = None,
    progress: bool = True,
    reference: Measurement | None = None,
    gap_points: Sequence[FrontierPoint] = (),
    seed: int = 0,
    extra: Mapping[str, FrontierPoint] = MappingProxyType({}),
    uniform: Mapping[str, FrontierPoint] = MappingProxyType({}),
    cost_tolerance: float = 0.0,
) -> SearchResult:
    """Find the cheapest candidate whose measured metric meets ``budget``, by bisection.

    Assumes the metric is (roughly) monotone along the candidates; whatever it returns was measured
    to meet the budget. A non-finite metric counts as a miss.

    With ``budget.confidence > 0`` and per-sample (or per-chunk) values of the baseline
    (``reference``) and of each probe (:class:`Measurement`), a candidate meets the budget when the one-sided upper confidence bound of
    its drop, paired against the baseline on the same samples, is within ``max_drop``
    (:func:`hawqtool.confidence.paired_drop`); a ``min_drop`` range uses the lower bound.

    Args:
        candidates: points sorted by increasing cost (cheapest first), e.g. a frontier.
        evaluate: measures a point's metric (export + ORT in the pipeline); called once per
            distinct allocation.
        baseline: the metric of the unquantized model.
        budget: the allowed drop (and optional range).
        repair: optional; given the failing candidate just below the chosen one, returns a
            promoted allocation (or ``None``). It is evaluated once, and chosen if it passes and
            costs less than the chosen candidate.
        progress: show a tqdm bar over the evaluations.
        reference: the baseline's measurement on the same samples (for paired bounds).
        gap_points: the unfiltered frontier. When bisection ends with a missing candidate and a
            meeting one next to each other in ``candidates`` but the frontier has points between
            their costs, the search goes on among those (their trials say ``source="frontier"``).
        seed: seeds the bootstrap of the bounds.
        extra: named points probed after the search, whatever it chose, unless the most precise
            candidate missed the budget (``impossible``). They do not change ``chosen``: they are
            there for a choice made afterwards on something the trials measured (under the latency
            cost, the fastest measured model within budget). A point already probed is not
            evaluated again. Their trials say ``source="extra"``, the name in ``note`` and their
            position in ``extra`` in ``index``.
        uniform: named models the choice must never be costlier than when they meet the budget
            (:func:`hawqtool.frontier.uniform_models`): after the search, those cheaper than its
            choice are probed from the most expensive down while they meet, and the cheapest that
            meets becomes the choice (``reason`` ``uniform``; trials ``source="uniform"``). The
            candidates come from predictions, which can be wrong where a one-line model is right.
        cost_tolerance: stop once the meeting candidate costs at most this fraction more than the
            missing one below it (or than the cheapest candidate, before any miss): the last
            bisection steps between points a fraction of a percent apart cost an evaluation each
            and buy nothing the metric can resolve. Gap filling and repair are skipped then too.

    Returns:
        A :class:`SearchResult` with every trial.

    Raises:
        UsageError: no candidates, or candidates not sorted by cost.

    Example:
        >>> pts = [FrontierPoint(cost=c, omega=0.0, allocation={"fc": f"int{c}"}) for c in (2, 4, 8)]
        >>> acc = {2: 0.5, 4: 0.95, 8: 0.97}
        >>> r = bisect(pts, lambda p: acc[int(p.cost)], baseline=0.97, budget=Budget(0.03),
        ...            progress=False)
        >>> r.chosen_index, r.evaluations
        (1, 3)
    """
    candidates = tuple(candidates)  # any sized iterable of points (a Frontier too)
    n = len(candidates)
    if n == 0:
        raise UsageError("the search got no candidates: the frontier is empty")
    costs = [p.cost for p in candidates]
    bad = next((i for i in range(1, n) if costs[i] < costs[i - 1]), None)
    if bad is not None:
        raise UsageError(
            f"candidates must be sorted by increasing cost; #{bad} costs {costs[bad]} < "
            f"#{bad - 1} at {costs[bad - 1]}"
        )

    trials: list[Trial] = []
    memo: dict[tuple[tuple[str, str], ...], Trial] = {}
    bar = tqdm(
        total=max_evaluations(n, repair=repair is not None) + len(extra) + len(uniform),
        desc="search",
        unit="eval",
        disable=not progress,
        leave=False,
    )

    def probe(index: int, point: FrontierPoint, note: str, source: str = "candidates") -> Trial:
        key = allocation_key(point.allocation)
        if key in memo:
            return memo[key]
        trial = measure_trial(
            point,
            evaluate,
            baseline=baseline,
            budget=budget,
            reference=reference,
            seed=seed,
            index=index,
            note=note,
            source=source,
        )
        memo[key] = trial
        trials.append(trial)
        bar.update(1)
        bar.set_postfix(index=index, metric=f"{trial.metric:.4g}", met=trial.met)
        return trial

    def in_range(t: Trial) -> bool:
        lower = t.drop if t.drop_lower is None else t.drop_lower
        return budget.min_drop is not None and t.met and lower >= budget.min_drop - 1e-12

    def done(chosen: int | None, reason: str, point: FrontierPoint | None = None) -> SearchResult:
        if point is None and chosen is not None:
            point = candidates[chosen]
        return SearchResult(
            chosen=point,
            chosen_index=chosen,
            trials=tuple(trials),
            budget_met=point is not None,
            baseline=baseline,
            reason=reason,
        )

    def search() -> SearchResult:
        top = probe(n - 1, candidates[n - 1], "most precise")
        if not top.met:
            log.warning(
                "budget impossible: the most precise candidate drops %.4g (> max_drop %.4g)",
                top.drop,
                budget.max_drop,
            )
            return done(None, "impossible")
        if in_range(top):
            return done(n - 1, "in_range")

        lo, hi = -1, n - 1  # candidates[hi] passes; candidates[lo] fails (-1: nothing cheaper is known)

        def resolved(below: float, above: float) -> bool:
            return above <= below * (1 + cost_tolerance) if cost_tolerance > 0 else False

        def close(lo: int, hi: int) -> bool:
            return resolved(candidates[max(lo, 0)].cost, candidates[hi].cost)

        while hi - lo > 1 and not close(lo, hi):
            mid = (lo + hi) // 2
            t = probe(mid, candidates[mid], "bisect")
            if t.met:
                hi = mid
                if in_range(t):
                    return done(hi, "in_range")
            else:
                lo = mid

        if lo >= 0 and gap_points and not close(lo, hi):
            # The filtered candidates leave nothing between a miss and a meet; the frontier may.
            c_lo, c_hi = candidates[lo].cost, candidates[hi].cost
            gap = sorted((p for p in gap_points if c_lo < p.cost < c_hi), key=lambda p: p.cost)
            g_lo, g_hi = -1, len(gap)
            while g_hi - g_lo > 1:
                below = gap[g_lo].cost if g_lo >= 0 else c_lo
                if resolved(below, gap[g_hi].cost if g_hi < len(gap) else c_hi):
                    break
                mid = (g_lo + g_hi) // 2
                t = probe(mid, gap[mid], "gap fill", source="frontier")
                if t.met:
                    g_hi = mid
                    if in_range(t):
                        return done(None, "in_range", gap[g_hi])
                else:
                    g_lo = mid
            if g_hi < len(gap):
                return done(None, "gap", gap[g_hi])

        if repair is not None and lo >= 0 and not close(lo, hi):
            fixed = repair(candidates[lo])
            if fixed is not None and fixed.cost < candidates[hi].cost:
                t = probe(lo, fixed, f"repair of #{lo}")
                if t.met:
                    return done(None, "repaired", fixed)
        return done(hi, "converged")

    def at_most_uniform(result: SearchResult) -> SearchResult:
        if result.chosen is None:
            return result
        limit = result.chosen.cost * (1 - 1e-12)
        cheaper = sorted(
            ((name, p) for name, p in uniform.items() if p.cost < limit), key=lambda item: -item[1].cost
        )
        best = None
        for i, (name, point) in enumerate(cheaper):
            if not probe(i, point, name, source="uniform").met:
                break  # a cheaper uniform model drops at least as much, as the search assumes
            best = point
        if best is None:
            return replace(result, trials=tuple(trials))
        log.info("a uniform model meets the budget for less than the search's choice: taking it")
        return done(None, "uniform", best)

    try:
        result = at_most_uniform(search())
        if not extra or result.reason == "impossible":
            return result
        for i, (name, point) in enumerate(extra.items()):
            probe(i, point, name, source="extra")
        return replace(result, trials=tuple(trials))
    finally:
        bar.close()
