"""Benchmark the whole search against the alternatives a user has, side by side in one run.

For each model (ResNet-20 and the small CNN on digits, the small CNN on MNIST-5k), formats
[int2, int4, int8, float] and a 1-point absolute top-1 budget:

- hawqtool: dependency-aware candidates + bisection (the default pipeline);
- hawq-v2: the diagonal-only ΣΩ frontier with the same bisection (search.dependency=false);
- fallback: Hessian-ordered one-at-a-time promotion from all-lowest-bits to int8, evaluating after
  each step (as Intel Neural Compressor's hawq_v2 strategy does);
- uniform int8;
- random: random allocations drawn at hawqtool's chosen size (±3 %), the mean over draws.

Printed per method: average weight bits, file size, onnxruntime latency ratio to float, top-1 on the
evaluation split (used by the search) and on the test split, evaluations, wall time.

    python scripts/bench_quantize.py [--models resnet20-digits small-cnn-digits small-cnn-mnist]
"""

from __future__ import annotations

import argparse
import logging
import random
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from hawqtool import pipeline
from hawqtool.evaluate import evaluate_onnx
from hawqtool.formats import average_bits, format_bits

OVERRIDES = ["allocation.formats=[int2, int4, int8, float]", "budget.max_drop=0.01", "budget.mode=absolute"]


def measure(ws: pipeline.Workspace, exp: Any, alloc: dict[str, str], base: Any) -> dict[str, float]:
    model = exp.quantized_model(alloc)
    ev = evaluate_onnx(model, ws.evaluation, ws.metric_fn, threads=2, latency_runs=30)
    te = evaluate_onnx(model, ws.test, ws.metric_fn, threads=2, latency_runs=1)
    return {
        "bits": average_bits(alloc, {f.fqn: f.params for f in ws.prepared.layers}),
        "kib": ev.size_bytes / 1024,
        "lat": base.latency_ms / ev.latency_ms,
        "eval": ev.metric,
        "test": te.metric,
    }


def fallback(
    ws: pipeline.Workspace, exp: Any, options: Any, base_metric: float, budget: Any
) -> tuple[dict, int]:
    """Promote layers from the lowest format to int8 in descending Ω, one evaluation per step."""
    low = min(ws.recipe.allocation.formats, key=format_bits)
    alloc = pipeline.uniform_allocation(ws, low)
    order = sorted(alloc, key=lambda f: options.option(f, alloc[f]).omega, reverse=True)
    evaluations = 0
    for step in range(len(order) + 1):
        if step:
            fqn = order[step - 1]
            if alloc[fqn] == low:
                alloc[fqn] = "int8"
        metric = evaluate_onnx(exp.quantized_model(alloc), ws.evaluation, ws.metric_fn, latency_runs=1).metric
        evaluations += 1
        if budget.meets(base_metric, metric):
            break
    return dict(alloc), evaluations


def random_at_cost(
    options: Any, target: float, rng: random.Random, tol: float = 0.03
) -> dict[str, str] | None:
    """A random allocation whose cost is within ``tol`` of ``target`` (random walk on formats)."""
    layers = list(options.layers)
    alloc = {f: rng.choice(options.options[f]).format for f in layers}
    for _ in range(20000):
        cost = options.cost(alloc)
        if abs(cost - target) <= tol * target:
            return alloc
        f = rng.choice(layers)
        opts = sorted(options.options[f], key=lambda o: o.cost)
        i = [o.format for o in opts].index(alloc[f])
        j = max(0, i - 1) if cost > target else min(len(opts) - 1, i + 1)
        alloc[f] = opts[j].format
    return None


def bench(name: str, draws: int) -> None:
    t0 = time.perf_counter()
    ws = pipeline.load(name, overrides=OVERRIDES)
    table = pipeline.analyze(ws, progress=False)
    options, front = pipeline.frontier(ws, table=table, progress=False)
    t_hessian = time.perf_counter() - t0
    exp = pipeline.exporter(ws)
    base = evaluate_onnx(exp.float_model, ws.evaluation, ws.metric_fn, threads=2, latency_runs=30)
    base_test = evaluate_onnx(exp.float_model, ws.test, ws.metric_fn, latency_runs=1)
    budget = ws.recipe.budget_spec
    rows: list[tuple[str, dict[str, float], int, float]] = []
    hawqtool_alloc: dict[str, str] = {}

    with tempfile.TemporaryDirectory() as tmp:
        for label, dep in (("hawqtool", True), ("hawq-v2 diag", False)):
            t = time.perf_counter()
            res = pipeline.quantize(
                recipe=name,
                out=Path(tmp) / label,
                overrides=[*OVERRIDES, f"search.dependency={str(dep).lower()}"],
                progress=False,
            )
            wall = time.perf_counter() - t
            alloc = dict(res.report["result"]["allocation"])
            if dep:
                hawqtool_alloc = alloc
            rows.append((label, measure(ws, exp, alloc, base), res.report["search"]["evaluations"], wall))

    t = time.perf_counter()
    alloc, n = fallback(ws, exp, options, base.metric, budget)
    rows.append(("fallback (Ω order)", measure(ws, exp, alloc, base), n, time.perf_counter() - t))

    t = time.perf_counter()
    rows.append(
        (
            "uniform int8",
            measure(ws, exp, pipeline.uniform_allocation(ws, "int8"), base),
            1,
            time.perf_counter() - t,
        )
    )

    rng = random.Random(0)
    t = time.perf_counter()
    samples = []
    for _ in range(draws):
        a = random_at_cost(options, options.cost(hawqtool_alloc), rng)
        if a is not None:
            samples.append(measure(ws, exp, a, base))
    if samples:
        mean = {k: sum(s[k] for s in samples) / len(samples) for k in samples[0]}
        met = sum(budget.meets(base.metric, s["eval"]) for s in samples)
        rows.append(
            (f"random equal size ({met}/{len(samples)} met)", mean, len(samples), time.perf_counter() - t)
        )

    print(
        f"\n== {name}: float top-1 eval {base.metric:.4f} test {base_test.metric:.4f}, "
        f"{base.size_bytes / 1024:.1f} KiB, {base.latency_ms:.3f} ms/batch; "
        f"Hessian+frontier {t_hessian:.1f} s ({table.hvps} HVPs), frontier {len(front)} points"
    )
    print(
        f"{'method':<28} {'avg bits':>8} {'KiB':>8} {'speed×':>7} {'eval':>7} {'test':>7} "
        f"{'meets(test)':>11} {'evals':>6} {'wall s':>7}"
    )
    for label, m, n, wall in rows:
        ok = budget.meets(base_test.metric, m["test"])
        print(
            f"{label:<28} {m['bits']:>8.2f} {m['kib']:>8.1f} {m['lat']:>7.2f} {m['eval']:>7.4f} "
            f"{m['test']:>7.4f} {'yes' if ok else 'no':>11} {n:>6} {wall:>7.1f}"
        )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["resnet20-digits", "small-cnn-digits", "small-cnn-mnist"])
    p.add_argument("--draws", type=int, default=5, help="random allocations per model")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(2)
    for name in args.models:
        bench(name, args.draws)


if __name__ == "__main__":
    main()
