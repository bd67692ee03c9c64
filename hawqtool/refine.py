"""The latency refinement stage (``allocation.cost: latency``): after the bisection, the choice is
made on measured, not predicted, latency.

Latency is not exactly additive, so the probes within budget are timed again together with float,
a shortlist of unprobed candidates and the uniform integer models; then format swaps and one-layer
moves off the choice that measure resolvably faster are evaluated. :func:`refine_latency` is the
stage; the other functions propose the models it times.

Example:
    >>> from hawqtool.types import LayerOption
    >>> row = (LayerOption("int8", 1.0, 1.0, 3.0), LayerOption("float", 2.0, 0.0, 0.0))
    >>> opts = OptionTable(("a", "b"), {"a": row, "b": row}, "latency")
    >>> [dict(p.allocation) for p in latency_moves(opts, {"a": "float", "b": "float"})]
    [{'a': 'int8', 'b': 'float'}, {'a': 'float', 'b': 'int8'}]
    >>> dict(nearest_float(opts).allocation)
    {'a': 'int8', 'b': 'float'}
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from hawqtool.export import QDQExporter
from hawqtool.formats import allocation_key, is_quantized, parse_format, quantizes_nothing
from hawqtool.frontier import point_of, uniform_models
from hawqtool.latency import LatencyTable, Timing, predicted_latency, time_interleaved
from hawqtool.recipe import EvaluateSection
from hawqtool.search import SearchResult
from hawqtool.types import FrontierPoint, OptionTable, Trial

log = logging.getLogger(__name__)


def uniform_quantized_points(options: OptionTable) -> dict[str, FrontierPoint]:
    """The uniform models (:func:`hawqtool.frontier.uniform_models`) of the formats that run on
    integer kernels (static ``intB`` or dynamic ``intB-d`` activations): the models onnxruntime's own
    static (or dynamic) quantization resembles, often the fastest on integer kernels, and a frontier
    ordered by predicted latency need not contain them: under ``cost: latency`` the search times them too.

    Example:
        >>> from hawqtool.types import LayerOption
        >>> row = (LayerOption("int4", 1.0, 2.0, 5.0), LayerOption("int4-w", 3.0, 1.0, 4.0),
        ...        LayerOption("float", 4.0, 0.0, 0.0))
        >>> opts = OptionTable(("a", "b"), {"a": row, "b": row[1:]}, "latency")
        >>> {k: dict(p.allocation) for k, p in uniform_quantized_points(opts).items()}
        {'uniform int4': {'a': 'int4', 'b': 'float'}}
    """
    out = {}
    for name, point in uniform_models(options).items():
        fmt = parse_format(name.removeprefix("uniform "))
        if fmt.activations or fmt.dynamic:
            out[name] = point
    return out


#: Times allocations together in interleaved rounds ({} is the float model), one Timing each.
Retime = Callable[[Sequence[Mapping[str, str]]], Sequence[Timing]]
#: Evaluates one point and judges it against the budget (:func:`hawqtool.search.measure_trial`).
Check = Callable[[FrontierPoint], Trial]
#: Under ``cost: latency``: how many unprobed candidates more precise than the search's choice are
#: timed with the probes within budget (:func:`latency_shortlist`), and how many of them, fastest
#: first, may be evaluated when one measures faster than every probe within budget.
LATENCY_SHORTLIST = 8
LATENCY_SHORTLIST_CHECKS = 2
#: Under ``cost: latency``: how many one-layer changes of the choice are timed against it
#: (:func:`latency_moves`), and how many of those that measure resolvably faster may be evaluated.
LATENCY_MOVES = 6
LATENCY_MOVE_CHECKS = 2
#: Under ``cost: latency``: how many format swaps of the choice (:func:`format_swaps`) are timed
#: with its one-layer moves.
LATENCY_SWAPS = 2


def retimer(exporter: QDQExporter, feeds: Mapping[str, np.ndarray], *, settings: EvaluateSection) -> Retime:
    """A :data:`Retime` that times the exporter's models of the allocations together, in five
    interleaved rounds on ``feeds``, with the recipe's ``evaluate`` threads and provider (a fifth
    of its ``latency_runs`` per round)."""

    def retime(allocations: Sequence[Mapping[str, str]]) -> list[Timing]:
        models = {str(i): exporter.quantized_model(a) for i, a in enumerate(allocations)}
        runs = max(1, settings.latency_runs // 5)
        got = time_interleaved(
            models, feeds, threads=settings.threads, provider=settings.provider, rounds=5, runs=runs
        )
        return [got[str(i)] for i in range(len(allocations))]

    return retime


def latency_moves(
    options: OptionTable,
    allocation: Mapping[str, str],
    *,
    exclude: Collection[tuple[tuple[str, str], ...]] = (),
    k: int = LATENCY_MOVES,
) -> list[FrontierPoint]:
    """Up to ``k`` allocations that each change one layer of ``allocation`` to a format predicted
    faster (one per layer: the one adding the least ΣΩ per predicted millisecond saved), least ΣΩ
    added per millisecond first; allocations in ``exclude`` (:func:`hawqtool.formats.allocation_key`)
    and all-float ones are skipped. A bisection ends between two frontier points, and neighbouring
    frontier points differ in many layers; the fastest model within budget can lie off the
    frontier, one layer away from the choice (on MiniLM at batch 1, one more layer on integer
    kernels was 0.1 ms faster within budget).

    Example:
        >>> from hawqtool.types import LayerOption
        >>> row = (LayerOption("int8", 1.0, 1.0, 3.0), LayerOption("int4", 0.5, 2.0, 9.0),
        ...        LayerOption("float", 2.0, 0.0, 0.0))
        >>> opts = OptionTable(("a", "b"), {"a": row, "b": row}, "latency")
        >>> [dict(p.allocation) for p in latency_moves(opts, {"a": "float", "b": "int8"})]
        [{'a': 'int8', 'b': 'int8'}, {'a': 'float', 'b': 'int4'}]
    """
    skip = set(exclude)
    best: dict[str, tuple[float, str]] = {}
    for fqn in options.layers:
        now = options.option(fqn, allocation[fqn])
        for o in options.options[fqn]:
            saved = now.cost - o.cost
            moved = {**allocation, fqn: o.format}
            if saved <= 0 or allocation_key(moved) in skip or quantizes_nothing(moved):
                continue  # not faster, probed already, or float (no quantization result)
            ratio = (o.omega - now.omega) / saved
            if fqn not in best or ratio < best[fqn][0]:
                best[fqn] = (ratio, o.format)
    order = sorted(best, key=lambda f: best[f][0])[: max(k, 0)]
    return [point_of(options, {**allocation, f: best[f][1]}) for f in order]


def format_swaps(
    options: OptionTable,
    allocation: Mapping[str, str],
    table: LatencyTable | None = None,
    *,
    exclude: Collection[tuple[tuple[str, str], ...]] = (),
    k: int = LATENCY_SWAPS,
) -> list[FrontierPoint]:
    """Up to ``k`` allocations that each move every layer of ``allocation`` in one format ``a`` to
    one other format ``b``, on the layers where ``b`` adds no Ω (say static ``int8`` → dynamic
    ``int8-d``, whose per-batch ranges lose no more than the calibrated one), most predicted ms
    saved first; only swaps whose predicted change the latency ``table`` cannot resolve from zero
    or a gain (saved > −2 standard errors, its entries' errors added in quadrature; without a
    table, saved > 0) and that change some layer's predicted cost (formats timed as one graph
    share their entry, so swapping between them gains nothing). Allocations in ``exclude`` and
    all-float ones are skipped.

    An additive table prices a layer in isolation; a few layers whose format differs from their
    neighbours' (two static layers among dynamic ones on MiniLM at batch 1) pay the boundaries
    between kernels, which the table cannot see and a one-layer move predicted no faster never
    tries. A swap adds no ΣΩ, so it is the likeliest change to stay within budget.

    Example:
        >>> from hawqtool.types import LayerOption
        >>> row = (LayerOption("int8", 1.0, 1.0, 3.0), LayerOption("int8-d", 1.0, 1.0, 2.0),
        ...        LayerOption("float", 2.0, 0.0, 0.0))
        >>> opts = OptionTable(("a", "b", "c"), {"a": row, "b": row, "c": row}, "latency")
        >>> [dict(p.allocation) for p in format_swaps(opts, {"a": "int8", "b": "int8", "c": "int8-d"})]
        []
        >>> row = (LayerOption("int8", 1.0, 1.0, 3.0), LayerOption("int8-d", 0.9, 1.0, 2.0),
        ...        LayerOption("float", 2.0, 0.0, 0.0))
        >>> opts = OptionTable(("a", "b", "c"), {"a": row, "b": row, "c": row}, "latency")
        >>> [dict(p.allocation) for p in format_swaps(opts, {"a": "int8", "b": "int8", "c": "int8-d"})]
        [{'a': 'int8-d', 'b': 'int8-d', 'c': 'int8-d'}]
    """
    skip = set(exclude)
    ranked: list[tuple[float, dict[str, str]]] = []
    for a in sorted(set(allocation.values())):
        now = {f: options.option(f, a) for f in options.layers if allocation[f] == a}
        for b in sorted({o.format for f in now for o in options.options[f]} - {a}):
            pairs = [
                (f, now[f], o)
                for f in now
                for o in options.options[f]
                if o.format == b and o.omega <= now[f].omega
            ]
            if not pairs or all(was.cost == o.cost for _, was, o in pairs):
                continue  # nothing moves, or only between formats timed as one graph
            saved = sum(was.cost - o.cost for _, was, o in pairs)
            if table is None:
                floor = 0.0
            else:
                var = sum(
                    table.entry(f, a).stderr_ms ** 2 + table.entry(f, b).stderr_ms ** 2 for f, _, _ in pairs
                )
                floor = -2.0 * float(np.sqrt(var))
            moved = {**allocation, **{f: b for f, _, _ in pairs}}
            if saved <= floor or allocation_key(moved) in skip or quantizes_nothing(moved):
                continue  # resolvably slower, probed already, or float (no quantization result)
            ranked.append((saved, moved))
    ranked.sort(key=lambda r: -r[0])
    return [point_of(options, moved) for _, moved in ranked[: max(k, 0)]]


def nearest_float(options: OptionTable) -> FrontierPoint | None:
    """The quantization result closest to the float model: every layer at its most precise option
    (float where offered) and, if that quantizes nothing, the one layer and format that add the
    least cost quantized (least Ω on ties); ``None`` when no layer can be quantized.

    Under a latency cost where float is the fastest model (small layers at batch 1: the Q/DQ nodes
    cost more than the integer kernels save), float dominates every point with its Ω of 0, so the
    frontier holds no model close to it, and the search's probes are all far slower than float.
    The fastest model within budget that still quantizes something is then this one.

    Example:
        >>> from hawqtool.types import LayerOption
        >>> def row(int8_ms):
        ...     return (LayerOption("float", 1.0, 0.0, 0.0), LayerOption("int8", int8_ms, 1.0, 1.0))
        >>> opts = OptionTable(("a", "b"), {"a": row(1.5), "b": row(1.2)}, "latency")
        >>> dict(nearest_float(opts).allocation)
        {'a': 'float', 'b': 'int8'}
    """
    closest = {f: min(options.options[f], key=lambda o: (o.omega, o.cost)) for f in options.layers}
    allocation = {f: o.format for f, o in closest.items()}
    if not quantizes_nothing(allocation):
        return point_of(options, allocation)  # a layer pinned to a quantized format
    steps = [
        (o.cost - closest[f].cost, o.omega, f, o.format)
        for f in options.layers
        for o in options.options[f]
        if is_quantized(o.format)
    ]
    if not steps:
        return None
    _, _, fqn, fmt = min(steps)
    return point_of(options, {**allocation, fqn: fmt})


def latency_shortlist(
    candidates: Sequence[FrontierPoint],
    result: SearchResult,
    k: int = LATENCY_SHORTLIST,
    *,
    options: OptionTable | None = None,
) -> list[FrontierPoint]:
    """Up to ``k`` candidates costlier (by predicted latency) than the search's choice that no trial
    probed, spread evenly from the choice to the most precise, and with ``options`` the
    :func:`nearest_float` model (unless probed or listed). Along a frontier a costlier point has a
    lower ΣΩ, so the monotonicity bisection relies on expects them within budget; predicted latency
    can still order them wrongly (on small layers at batch 1 a mostly-float model can be the fastest
    within budget, and where float is the fastest model the frontier holds none close to it), and
    timing a model costs far less than evaluating it.

    Example:
        >>> from hawqtool.search import SearchResult
        >>> pts = [FrontierPoint(c, 10.0 - c, {"a": f"int{c}"}, c) for c in (2, 4, 6, 8)]
        >>> res = SearchResult(pts[0], 0, (), True, 1.0, "converged")
        >>> [p.cost for p in latency_shortlist(pts, res, k=2)]
        [4, 8]
    """
    if result.chosen is None or k < 1:
        return []
    probed = {allocation_key(t.allocation) for t in result.trials}
    above = [
        p
        for p in candidates
        if p.cost > result.chosen.cost
        and allocation_key(p.allocation) not in probed
        and not quantizes_nothing(p.allocation)
    ]
    if len(above) > k:
        above = [above[i] for i in np.unique(np.linspace(0, len(above) - 1, k).round().astype(int))]
    near = nearest_float(options) if options is not None else None
    listed = probed | {allocation_key(p.allocation) for p in above}
    if near is not None and allocation_key(near.allocation) not in listed:
        above.append(near)
    return above


@dataclass(frozen=True)
class Refined:
    """What :func:`refine_latency` returns.

    Attributes:
        result: the search result, its choice the fastest measured model within budget, the trials
            it evaluated appended (``source`` ``timed`` or ``move``).
        latency: per trial, its predicted against its measured (and re-timed) latency: the report's
            ``search.latency``; empty when nothing was timed.
        versus_float: the choice against float, timed in the same rounds (the report's
            ``search.latency_vs_float``); ``None`` without re-timing.
    """

    result: SearchResult
    latency: tuple[dict[str, Any], ...] = field(default=(), repr=False)
    versus_float: Mapping[str, Any] | None = None


def refine_latency(
    result: SearchResult,
    table: LatencyTable,
    options: OptionTable,
    retime: Retime | None = None,
    *,
    shortlist: Sequence[FrontierPoint] = (),
    check: Check | None = None,
) -> Refined:
    """The choice among the timed probes that met the budget (and quantize something): the one with
    the lowest measured latency; with every probe's predicted vs measured latency, and the choice
    against float.

    Probes are timed one after another, minutes apart on a busy machine, so with ``retime`` (given
    the allocations, their :class:`hawqtool.costs.Timing` from rounds interleaved with each other)
    the probes within budget are timed again together, with the float model and the ``shortlist``
    (:func:`latency_shortlist`) in the same rounds, and the choice is made on those medians: the
    fastest probe within budget, unless a shortlisted point measures faster; then ``check``
    (evaluate and judge one point, :func:`hawqtool.search.measure_trial`) is called on those, fastest
    first, at most :data:`LATENCY_SHORTLIST_CHECKS` times, and the first that meets the budget is
    chosen (its trial is appended, ``source="timed"``). Then the choice's format swaps
    (:func:`format_swaps`) and one-layer moves (:func:`latency_moves`) are timed against it and
    float; those resolvably faster (beyond twice the paired standard error) are evaluated, swaps
    (no ΣΩ added) first, then least ΣΩ added per predicted ms, and the first
    that meets the budget becomes the choice, from which the moves start again, until
    :data:`LATENCY_MOVE_CHECKS` evaluations are spent or no move is faster (trials
    ``source="move"``, ``index`` −1). :attr:`Refined.versus_float` (``None`` without
    ``retime``) compares the choice with float, paired by round: on small layers or at batch 1 the
    Q/DQ nodes can cost more than the integer kernels save, and then no quantized model within
    budget is faster than float (``verdict`` ``slower``), which the report says.
    """

    def row(t: Trial) -> dict[str, Any]:
        return {
            "index": t.index,
            "note": t.note,
            "met": t.met,
            "predicted_ms": predicted_latency(table, t.allocation),
            "measured_ms": t.latency_ms,
            "source": t.source,
            "retimed_ms": None,
            "retimed_stderr_ms": None,
        }

    rows = [row(t) for t in result.trials]
    ok = [
        i
        for i, t in enumerate(result.trials)
        if t.met and t.latency_ms is not None and not quantizes_nothing(t.allocation)
    ]
    if not ok:
        return Refined(result, tuple(rows))
    if retime is None:
        fastest = result.trials[min(ok, key=lambda i: result.trials[i].latency_ms or 0.0)]
        return Refined(_choose(result, fastest, options), tuple(rows))
    shortlist = list(shortlist) if check is not None else []
    float_timing, *timings = retime(
        [{}, *(result.trials[i].allocation for i in ok), *(p.allocation for p in shortlist)]
    )
    for i, timing in zip(ok, timings[: len(ok)], strict=True):
        rows[i].update(retimed_ms=timing.median_ms, retimed_stderr_ms=timing.stderr_ms)
    best: Trial | None = None
    best_timing: Timing | None = None
    added: list[Trial] = []
    checks = 0
    for k in sorted(range(len(timings)), key=lambda k: timings[k].median_ms):
        if k < len(ok):
            best, best_timing = result.trials[ok[k]], timings[k]
            break
        if check is None or checks >= LATENCY_SHORTLIST_CHECKS:
            continue
        checks += 1
        trial = replace(check(shortlist[k - len(ok)]), source="timed")
        added.append(trial)
        rows.append(
            {**row(trial), "retimed_ms": timings[k].median_ms, "retimed_stderr_ms": timings[k].stderr_ms}
        )
        if trial.met:
            best, best_timing = trial, timings[k]
            break
    assert best is not None and best_timing is not None  # the probes within budget are in the loop
    # Format swaps and one-layer moves off the choice: timed against it (and float) in rounds of
    # their own; one resolvably faster is evaluated (swaps first, then least ΣΩ per ms) and taken
    # if it meets the budget.
    moved = 0
    while check is not None and moved < LATENCY_MOVE_CHECKS:
        seen = [allocation_key(t.allocation) for t in (*result.trials, *added)]
        moves = format_swaps(options, best.allocation, table, exclude=seen)
        seen += [allocation_key(m.allocation) for m in moves]
        moves += latency_moves(options, best.allocation, exclude=seen)
        if not moves:
            break
        t_best, t_float, *t_moves = retime([best.allocation, {}, *(m.allocation for m in moves)])
        faster = [k for k, t in enumerate(t_moves) if t.compare(t_best)[2] == "faster"]
        taken = False
        for k in faster[: LATENCY_MOVE_CHECKS - moved]:
            moved += 1
            note = _move_note(best.allocation, moves[k].allocation)
            trial = replace(check(moves[k]), source="move", note=note, index=-1)
            added.append(trial)
            rows.append(
                {**row(trial), "retimed_ms": t_moves[k].median_ms, "retimed_stderr_ms": t_moves[k].stderr_ms}
            )
            if trial.met:  # compared with float in these rounds from now on
                best, best_timing, float_timing, taken = trial, t_moves[k], t_float, True
                break
        if not taken:
            break
    if added:
        result = replace(result, trials=(*result.trials, *added))
    diff, se, verdict = best_timing.compare(float_timing)
    versus_float = {
        "float_ms": float_timing.median_ms,
        "float_stderr_ms": float_timing.stderr_ms,
        "chosen_ms": best_timing.median_ms,
        "chosen_stderr_ms": best_timing.stderr_ms,
        "difference_ms": diff,
        "difference_stderr_ms": se,
        "verdict": verdict,
    }
    if verdict == "slower":
        log.warning(
            "no quantized model within budget is faster than float here: the fastest is %+.3f ± %.3f ms "
            "slower (%.3f vs %.3f ms, timed in the same rounds)",
            diff,
            se,
            best_timing.median_ms,
            float_timing.median_ms,
        )
    return Refined(_choose(result, best, options), tuple(rows), versus_float)


def _move_note(before: Mapping[str, str], after: Mapping[str, str]) -> str:
    """``move <layer>: a → b`` for a one-layer move, ``swap a → b on N layers`` for a format swap.

    Example:
        >>> _move_note({"x": "int8", "y": "int8"}, {"x": "int8-d", "y": "int8"})
        'move x: int8 → int8-d'
        >>> _move_note({"x": "int8", "y": "int8"}, {"x": "int8-d", "y": "int8-d"})
        'swap int8 → int8-d on 2 layers'
    """
    changed = [f for f in before if after[f] != before[f]]
    a, b = before[changed[0]], after[changed[0]]
    return (
        f"move {changed[0]}: {a} → {b}" if len(changed) == 1 else f"swap {a} → {b} on {len(changed)} layers"
    )


def _choose(result: SearchResult, best: Trial, options: OptionTable) -> SearchResult:
    """``result`` with ``best`` (a trial) as its choice, unless it is the choice already."""
    if result.chosen is not None and dict(result.chosen.allocation) == dict(best.allocation):
        return result
    point = FrontierPoint(
        cost=best.cost,
        omega=options.omega(best.allocation),
        allocation=dict(best.allocation),
        avg_bits=best.avg_bits,
    )
    log.info("fastest measured model within budget: %s #%d (%s)", best.note, best.index, best.source)
    return replace(result, chosen=point, chosen_index=None, reason="fastest-measured")
