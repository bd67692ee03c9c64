"""Does a budget met on the evaluation split hold on unseen data? The point rule against the bound (issue 9).

For each zoo model and budget, the evaluation and test splits are pooled and re-dealt at random into
two halves, many times; the model, its calibration split, Hessian traces, frontier and dependency
terms stay fixed. On every re-deal the real :func:`hawqtool.search.bisect` (repair and gap fill
included, as ``hawqtool quantize`` runs it) searches on the first half under each rule:

- ``point``: the observed drop on the evaluation half is within ``max_drop`` (confidence 0);
- ``bound 0.9`` / ``bound 0.95``: the one-sided upper confidence bound of the paired drop is
  within ``max_drop`` (:func:`hawqtool.confidence.paired_drop`).

"Kept on test" means the chosen model's *observed* drop on the other half, against the float model
on the same half, is within ``max_drop`` (``Budget.drop(float_test_mean, cand_test_mean)``, relative
budgets divide by the float model's test-half mean). A rule that works keeps it on ≥ 95 % of
re-deals at confidence 0.95.

A search is refused as ``unresolvable`` when ``max_drop`` is below
:func:`hawqtool.confidence.resolvable_drop` for the half size (what ``hawqtool quantize`` refuses
with exit 2; the point rule is never refused, as in the pipeline), and fails as ``impossible``
(the most precise candidate misses) or ``only-float`` (the chosen point keeps every layer float,
which the pipeline does not count as a result).

Cost: each allocation the searches probe is exported and run in onnxruntime once, on the pooled
samples, and its per-sample metric kept; a re-deal is then only two index sets, and ``evaluate``
returns ``Measurement(mean, values[eval_idx])``. Allocations are evaluated the first time any search
asks for them, so the frontier points no search reaches are never exported (the results are the
same as evaluating the whole frontier up front).

    python scripts/bench_budget.py                     # all models, 100 re-deals
    python scripts/bench_budget.py --quick             # small CNN on digits, 5 re-deals
    python scripts/bench_budget.py --models small-cnn-mnist --redeals 40
    python scripts/bench_budget.py --models resnet20-digits --json redeals.json   # every outcome
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from hawqtool import pipeline
from hawqtool.confidence import TOLERANCE, is_binary, resolvable_drop
from hawqtool.dependency import candidates_for_search, make_repair, rescore
from hawqtool.evaluate import evaluate_onnx
from hawqtool.formats import allocation_key, quantizes_nothing
from hawqtool.search import Measurement, bisect
from hawqtool.types import FrontierPoint

log = logging.getLogger("bench_budget")

#: name → (recipe, overrides). The digits recipes pool 600 + 600 images (1797 in all; the model
#: trains on the rest), MNIST-5k pools 1000 + 1000; the model factories get the same sizes.
MODELS: dict[str, tuple[str, list[str]]] = {
    "resnet20-digits": ("resnet20-digits", []),
    "small-cnn-digits": ("small-cnn-digits", []),
    "small-cnn-mnist": (
        "small-cnn-mnist",
        [
            "model.kwargs={evaluation_size: 1000, test_size: 1000}",
            "data.kwargs={batch_size: 128, calibration_size: 512, evaluation_size: 1000, test_size: 1000}",
        ],
    ),
    "mlp-digits": ("small-cnn-digits", ["name=mlp-digits", "model.factory=hawqtool.zoo:mlp_digits"]),
}
DEFAULT_MODELS = ("resnet20-digits", "small-cnn-digits", "small-cnn-mnist")
#: (label, max_drop, mode)
BUDGETS = (("1 pt abs", 0.01, "absolute"), ("0.5 % rel", 0.005, "relative"))
#: (label, confidence)
RULES = (("point", 0.0), ("bound 0.9", 0.9), ("bound 0.95", 0.95))


class PooledEvaluator:
    """Per-sample metric of each allocation on the pooled samples, each measured once in onnxruntime."""

    def __init__(self, ws: pipeline.Workspace, exp: Any) -> None:
        self.ws = ws
        self.exp = exp
        self.pooled = ws.evaluation + ws.test
        self.memo: dict[tuple[tuple[str, str], ...], np.ndarray] = {}
        self.seconds = 0.0
        self.float_values = self._run(exp.float_model)

    def _run(self, model: Any) -> np.ndarray:
        t = time.perf_counter()
        ev = evaluate_onnx(
            model,
            self.pooled,
            self.ws.metric_fn,
            io=self.ws.io,
            threads=self.ws.recipe.evaluate.threads,
            latency_runs=1,
        )
        self.seconds += time.perf_counter() - t
        if ev.values is None:
            raise SystemExit(f"{self.ws.recipe.name}: the metric gives no per-sample values to re-deal")
        return np.asarray(ev.values, dtype=np.float64)

    def values(self, point: FrontierPoint) -> np.ndarray:
        key = allocation_key(point.allocation)
        if key not in self.memo:
            self.memo[key] = self._run(self.exp.quantized_model(point.allocation))
        return self.memo[key]


@dataclass
class Cell:
    """One (model, budget, rule) row: what happened over the re-deals."""

    model: str
    budget: str
    rule: str
    redeals: int = 0
    refused: dict[str, int] = field(default_factory=dict)
    kept: list[bool] = field(default_factory=list)
    bits: dict[int, float] = field(default_factory=dict)  # re-deal → avg bits of the chosen model
    test_drops: list[float] = field(default_factory=list)
    evaluations: list[int] = field(default_factory=list)
    records: list[dict[str, Any]] = field(default_factory=list)  # one per re-deal, for --json


def clopper_pearson(k: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Exact two-sided binomial interval for k successes in n (by bisection on the tails)."""
    alpha = 1 - level

    def tail_ge(p: float) -> float:  # P(X >= k)
        return sum(math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(k, n + 1))

    def tail_le(p: float) -> float:  # P(X <= k)
        return sum(math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(0, k + 1))

    def solve(f: Any, rising: bool) -> float:
        lo, hi = 0.0, 1.0
        for _ in range(60):
            mid = 0.5 * (lo + hi)
            if (f(mid) < alpha / 2) == rising:
                lo = mid
            else:
                hi = mid
        return 0.5 * (lo + hi)

    lower = 0.0 if k == 0 else solve(tail_ge, rising=True)
    upper = 1.0 if k == n else solve(tail_le, rising=False)
    return lower, upper


def bench_model(name: str, redeals: int, seed: int) -> list[Cell]:
    recipe, overrides = MODELS[name]
    t0 = time.perf_counter()
    ws = pipeline.load(recipe, overrides=overrides)
    table = pipeline.analyze(ws, progress=False)
    options, front = pipeline.frontier(ws, table=table, progress=False)
    dep = pipeline.dependencies(ws, options, table, progress=False)
    front = rescore(front, dep)
    candidates = candidates_for_search(front, dep, options)
    repair_memo: dict[tuple[tuple[str, str], ...], FrontierPoint | None] = {}
    make = make_repair(candidates, dep, options) if ws.recipe.search.repair else None

    def repair(point: FrontierPoint) -> FrontierPoint | None:
        assert make is not None
        key = allocation_key(point.allocation)
        if key not in repair_memo:
            repair_memo[key] = make(point)
        return repair_memo[key]

    exp = pipeline.exporter(ws)
    pool = PooledEvaluator(ws, exp)
    base = pool.float_values
    n = base.size
    half = n // 2
    binary = is_binary(base)
    log.info(
        "%s: %d pooled samples (halves of %d), float top-1 %.4f, %d frontier points, %d candidates, "
        "setup %.0f s",
        name,
        n,
        half,
        base.mean(),
        len(front.points),
        len(candidates),
        time.perf_counter() - t0,
    )
    spec = ws.recipe.budget_spec
    cells = {(b, r): Cell(name, b, r) for b, _, _ in BUDGETS for r, _ in RULES}
    for k in range(redeals):
        perm = np.random.default_rng([seed, k]).permutation(n)
        ev_idx, te_idx = np.sort(perm[:half]), np.sort(perm[half : 2 * half])
        ref = Measurement(float(base[ev_idx].mean()), base[ev_idx])
        base_test = float(base[te_idx].mean())

        def evaluate(point: FrontierPoint, ev_idx: np.ndarray = ev_idx) -> Measurement:
            v = pool.values(point)[ev_idx]
            return Measurement(float(v.mean()), v)

        for b_label, max_drop, mode in BUDGETS:
            for r_label, confidence in RULES:
                budget = replace(spec, max_drop=max_drop, mode=mode, min_drop=None, confidence=confidence)
                cell = cells[(b_label, r_label)]
                cell.redeals += 1
                if confidence > 0 and binary:
                    smallest = resolvable_drop(
                        half,
                        confidence=confidence,
                        mode=mode,
                        baseline=ref.metric if mode == "relative" else None,
                    )
                    if max_drop < smallest - TOLERANCE:
                        cell.refused["unresolvable"] = cell.refused.get("unresolvable", 0) + 1
                        cell.records.append({"redeal": k, "outcome": "unresolvable"})
                        continue
                result = bisect(
                    candidates,
                    evaluate,
                    baseline=ref.metric,
                    budget=budget,
                    repair=repair if make is not None else None,
                    progress=False,
                    reference=ref,
                    gap_points=front.points,
                    seed=k,
                )
                cell.evaluations.append(result.evaluations)
                chosen = result.chosen
                reason = result.reason
                if chosen is not None and quantizes_nothing(chosen.allocation):
                    chosen, reason = None, "only-float"
                if chosen is None:
                    cell.refused[reason] = cell.refused.get(reason, 0) + 1
                    cell.records.append({"redeal": k, "outcome": reason, "evaluations": result.evaluations})
                    continue
                drop = budget.drop(base_test, float(pool.values(chosen)[te_idx].mean()))
                cell.kept.append(drop <= max_drop + TOLERANCE)
                cell.test_drops.append(drop)
                cell.bits[k] = chosen.avg_bits
                trial = next(t for t in result.trials if dict(t.allocation) == dict(chosen.allocation))
                cell.records.append(
                    {
                        "redeal": k,
                        "outcome": reason,
                        "evaluations": result.evaluations,
                        "avg_bits": chosen.avg_bits,
                        "eval_drop": trial.drop,
                        "eval_upper": trial.drop_upper,
                        "test_drop": drop,
                        "pooled_drop": budget.drop(float(base.mean()), float(pool.values(chosen).mean())),
                        "kept": bool(cell.kept[-1]),
                    }
                )
        if (k + 1) % 10 == 0 or k + 1 == redeals:
            log.info(
                "%s: re-deal %d/%d done, %d allocations evaluated (%.0f s in onnxruntime)",
                name,
                k + 1,
                redeals,
                len(pool.memo),
                pool.seconds,
            )
    log.info(
        "%s: %d of %d frontier points (+ repairs) evaluated on the pool; %.0f s in all",
        name,
        len(pool.memo),
        len(front.points),
        time.perf_counter() - t0,
    )
    return list(cells.values())


def table(cells: Sequence[Cell]) -> str:
    head = (
        "| model | budget | rule | re-deals | chosen | refused / failed | kept on test [95 % CI] "
        "| mean test drop | mean avg bits | Δbits vs point | mean evaluations |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|"
    )
    rows = [head]
    point_bits = {(c.model, c.budget): c.bits for c in cells if c.rule == "point"}
    for c in cells:
        chosen = len(c.kept)
        refused = ", ".join(f"{v} {k}" for k, v in sorted(c.refused.items())) or "—"
        if chosen:
            kept = sum(c.kept)
            lo, hi = clopper_pearson(kept, chosen)
            kept_s = f"{kept}/{chosen} = {kept / chosen:.2f} [{lo:.2f}, {hi:.2f}]"
            unit = "pt" if "abs" in c.budget else "%"
            drop_s = f"{100 * float(np.mean(c.test_drops)):.2f} {unit}"
            bits_s = f"{float(np.mean(list(c.bits.values()))):.2f}"
            pb = point_bits[(c.model, c.budget)]
            both = [k for k in c.bits if k in pb]
            delta = float(np.mean([c.bits[k] - pb[k] for k in both])) if both else float("nan")
            delta_s = "—" if c.rule == "point" or not both else f"{delta:+.2f} ({len(both)} paired)"
        else:
            kept_s = drop_s = bits_s = delta_s = "—"
        evals = f"{float(np.mean(c.evaluations)):.1f}" if c.evaluations else "—"
        rows.append(
            f"| {c.model} | {c.budget} | {c.rule} | {c.redeals} | {chosen} | {refused} | {kept_s} "
            f"| {drop_s} | {bits_s} | {delta_s} | {evals} |"
        )
    return "\n".join(rows)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", choices=sorted(MODELS), default=None)
    p.add_argument("--redeals", type=int, default=None, help="random re-deals per model (default 100)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None, help="also write every re-deal's outcome here")
    p.add_argument("--quick", action="store_true", help="small CNN on digits, 5 re-deals (smoke run)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    # bisect warns on every impossible search; those are counted in the table instead.
    for noisy in ("hawqtool", "onnxruntime"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    models = args.models or (["small-cnn-digits"] if args.quick else list(DEFAULT_MODELS))
    redeals = args.redeals if args.redeals is not None else (5 if args.quick else 100)
    if redeals < 1:
        p.error("--redeals must be at least 1")
    cells: list[Cell] = []
    for name in models:
        cells.extend(bench_model(name, redeals, args.seed))
        log.info("so far:\n%s", table(cells))  # in case a later model fails
    print(table(cells))
    if args.json is not None:
        rows = [{"model": c.model, "budget": c.budget, "rule": c.rule, **r} for c in cells for r in c.records]
        args.json.write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
