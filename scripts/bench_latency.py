"""Latency as the cost, and activation precision: every method's latency and accuracy, in one run.

For ResNet-20 and the small CNN on digits and the zoo transformer, formats int2/int4/int7/int8
(uint8 activations; int7 is 7-bit weights in int8, which onnxruntime's u8×s8 kernels cannot
saturate on a CPU without VNNI), int4-w (weight-only) and float (``--formats``), budgets 0.1 % and
1 % relative top-1 on the evaluation split, batches of 1 and 64 images. And (``minilm``) the real
pretrained all-MiniLM-L6-v2 of ``recipes/minilm.yaml`` on real news sentences, budgets relative to
the float ONNX model's cosine fidelity (teacher targets: the float model scores 1), formats suited
to a BERT on CPU: int8 / int7 (uint8 activations), int8-w (weight-only), int4-b32 (MatMulNBits
and GatherBlockQuantized) and float; batches of 1 sentence and of 8 (the first sentences of the
evaluation split, padding columns no sentence uses cut off; 8, not the split's 32: one latency
table is 300 variants, 10 minutes at 8 × 33 tokens with ``--runs 10`` on this machine, ~9× that at
32 × 52); onnxruntime's ``quantize_static`` on its MatMuls, as in ``bench_transformer.py``;
dependency terms as the recipe says (off for MiniLM: too slow). Every model is loaded through its
recipe (``--override`` edits it) and scored with the recipe's metric, loss and model I/O. Measured
(``--models minilm --allocs 0 --fresh --runs 10``): 32 minutes with the traces cached (+7 without).

- ``float``: the BN-folded float export;
- ``ort int8``: onnxruntime's own ``quantize_static`` (QDQ, uint8 / int8 per channel, MinMax);
- ``hawqtool size``: frontier of (bytes, ΣΩ + Ω_act) → dependency re-scoring → bisection;
- ``hawqtool latency@B``: what ``allocation.cost: latency`` does, at batch B: the same on (measured
  latency, ΣΩ + Ω_act), every probe timed, the uniform integer models
  (:func:`hawqtool.refine.uniform_quantized_points`) probed too, the probes within budget
  re-timed together and the fastest chosen (:func:`hawqtool.pipeline.search`, which calls
  :func:`hawqtool.refine.refine_latency`);
- ``HAWQ-V3 ILP@B``: min ΣΩ (weights only) s.t. Σ measured latency ≤ the predicted latency of
  hawqtool latency@B's choice, solved exactly with PuLP; no dependency terms, no bisection: one
  evaluation, whatever it scores.

Latency (``measure_latency``, context ``both``; and the final table, whose last column is each
hawqtool / ILP row's allocation in short) is the median onnxruntime time of one batch (of 1 or 64
images, of 1 or 8 sentences) on ONE intra-op thread, measured as the process's CPU time
(``clock="cpu"``): this machine is a shared 2-core VM whose load average sits at 10–15, where
wall-clock latency of a 2-thread session swings by 3× between identical runs while the CPU time
stays within a few percent (measured); on an idle machine, one thread's CPU time is its latency.
The models of one table are timed in interleaved rounds (:func:`hawqtool.costs.time_interleaved`),
each loaded in two sessions: each latency is the median over rounds of the two sessions' mean ±
its standard error, and each row's difference from ``ort int8`` is the median of the per-round
differences ± its standard error, called resolved when it is more than twice that. A session keeps
its speed for its life, which pairing by round cannot remove; the goal verdicts add that session
effect (estimated from the two sessions of every row) and judge the closest of k rivals at the
family-wise level (Bonferroni), so that identical models are not called resolvably different; a
row with the same allocation as hawqtool's (another search found the same model) is not a rival.

Then, over ``--allocs`` random allocations of int4 / int6 / int4-w / int6-w / float, the Spearman
correlation of ΣΩ (weights only, HAWQ-V2) and ΣΩ + Ω_act (with the activation terms of
:mod:`hawqtool.activations`) with the measured top-1 drop and cross-entropy increase in
onnxruntime on the evaluation split; and of each latency table's prediction with the measured
latency of every model the searches probed.

The Spearman part uses the recipe's metric and loss (top-1 drop and cross-entropy increase for the
image models).

Usage: ``python scripts/bench_latency.py [--models resnet20,cnn,transformer,minilm] [--allocs 40]
[--fresh] [--batches 1,8] [--override data.kwargs.evaluation=128]``
(``--allocs 0`` skips the Spearman part; ``--fresh`` re-measures the latency tables instead of
using cached ones, which may come from a differently loaded machine; ``--formats`` / ``--batches``
replace every model's own; ``--override`` applies to every model's recipe).
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from statistics import NormalDist
from typing import Any

import numpy as np
import torch
from scipy.stats import spearmanr

from hawqtool import modelio, pipeline
from hawqtool.cache import cache_dir
from hawqtool.dependency import candidates_for_search, rescore
from hawqtool.errors import UsageError
from hawqtool.evaluate import evaluate_onnx
from hawqtool.formats import allocation_key, average_bits, parse_format
from hawqtool.frontier import pareto_frontier
from hawqtool.latency import LatencySettings, LatencyTable, Timing, measure_latency, time_interleaved
from hawqtool.options import build_options
from hawqtool.search import Measurement
from hawqtool.types import Budget, FrontierPoint, OptionTable
from hawqtool.workspace import onnx_teacher, uniform_allocation

sys.path.insert(0, str(Path(__file__).parent))
from bench_export import ort_quantize_static

FORMATS = ("int2", "int4", "int7", "int8", "int4-w", "float")
# No 8-bit weights here: on this AVX2 CPU (no VNNI) onnxruntime's fused u8s8 kernels saturate
# int16 pair sums with full-range int8 weights (all-int8 small CNN: 98.67 % unfused vs 97.50 %
# fused; int7 and below lose nothing), an error no second-order score predicts.
SPEARMAN_FORMATS = ("int4", "int6", "int4-w", "int6-w", "float")
BUDGETS = (0.001, 0.01)
THREADS = 1


@dataclass(frozen=True)
class Bench:
    """One model of the bench: its recipe, candidate formats, timed batch sizes and onnxruntime's
    ``quantize_static`` op types (``None``: every one it supports)."""

    recipe: str
    formats: tuple[str, ...] = FORMATS
    batches: tuple[int, ...] = (1, 64)
    ort_op_types: tuple[str, ...] | None = None


MODELS = {
    "resnet20": Bench("resnet20-digits"),
    "cnn": Bench("small-cnn-digits"),
    "transformer": Bench("transformer-digits"),
    # A BERT on CPU: MatMulNBits (int4-b32) and weight-only int8 beside the uint8-activation formats;
    # int7 for this CPU without VNNI (see above). 1 sentence, and 8 (see the module docstring).
    "minilm": Bench("minilm", ("int8", "int7", "int8-w", "int4-b32", "float"), (1, 8), ("MatMul",)),
}


def rho(a: Sequence[float], b: Sequence[float]) -> float:
    return float(spearmanr(a, b).statistic)


class Runner:
    """onnxruntime outputs on a split: the recipe's metric and mean loss (sessions on THREADS
    threads, inputs fed by the workspace's model I/O)."""

    def __init__(self, ws: pipeline.Workspace) -> None:
        self.ws = ws

    def scores(self, model: Any, split: str) -> tuple[float, float]:
        batches = self.ws.split(split)
        ev = evaluate_onnx(
            model,
            batches,
            self.ws.metric_fn,
            io=self.ws.io,
            threads=THREADS,
            latency_runs=1,
            warmup=0,
            keep_outputs=True,
        )
        assert ev.outputs is not None
        loss, i = 0.0, 0
        for _, y in batches:
            y = torch.as_tensor(y)
            n = len(y)
            # Outputs of ragged batches (token sequences) are zero-padded to the longest: cut back.
            out = torch.from_numpy(ev.outputs[i : i + n][tuple(slice(0, s) for s in y.shape)])
            loss += float(self.ws.loss_fn(out, y)) * n
            i += n
        return ev.metric, loss / i


def time_models(
    models: Mapping[str, bytes], feeds: Mapping[str, np.ndarray], *, rounds: int, runs: int
) -> dict[str, Timing]:
    """CPU time (ms) of one run per model on THREADS threads, in interleaved rounds."""
    return time_interleaved(models, feeds, threads=THREADS, rounds=rounds, runs=runs, clock="cpu")


def time_two_sessions(
    models: Mapping[str, bytes], feeds: Mapping[str, np.ndarray], *, rounds: int, runs: int
) -> tuple[dict[str, Timing], float]:
    """Every model loaded in two sessions, all timed in the same interleaved rounds: each model's
    timing over the mean of its two sessions per round, and the session effect σ_s: how far one
    session's median sits from its model's, as a fraction of it. A session keeps its speed for its
    life (where onnxruntime's arena and the weights land in memory), so pairing by round cannot
    remove it: two sessions of one model differed by 3 standard errors of their paired difference
    here. From the two sessions' paired difference d (± se) of each model of median m:
    E[d²] = 2σ_s²m² + se², pooled over the models."""
    both = {f"{k}#{i}": blob for k, blob in models.items() for i in (0, 1)}
    got = time_models(both, feeds, rounds=rounds, runs=runs)
    out, excess = {}, []
    for k in models:
        a, b = got[f"{k}#0"], got[f"{k}#1"]
        out[k] = Timing.of_rounds([(x + y) / 2 for x, y in zip(a.rounds_ms, b.rounds_ms, strict=True)])
        d, se = a.minus(b)
        excess.append((d * d - se * se) / out[k].median_ms ** 2)
    return out, float(np.sqrt(max(statistics.mean(excess) / 2, 0.0)))


def session_se(sigma: float, a: Timing, b: Timing) -> float:
    """The session effect's share of the standard error of ``a − b``, each the mean of two sessions."""
    return sigma * float(np.sqrt((a.median_ms**2 + b.median_ms**2) / 2))


def pm(t: Timing) -> str:
    return f"{t.median_ms:.3f} ± {t.stderr_ms:.3f}"


def versus(t: Timing, ref: Timing) -> str:
    """``t − ref`` ± its standard error, and whether the difference is resolved (> 2 standard errors)."""
    d, se, verdict = t.compare(ref)
    return f"{d:+.3f} ± {se:.3f} ({'within noise' if verdict == 'within noise' else 'resolved'})"


def batch_feeds(ws: pipeline.Workspace, size: int) -> dict[str, np.ndarray]:
    """The feeds of the first ``size`` samples of the evaluation split. Token inputs with an
    ``attention_mask`` lose the padding columns none of those samples uses: one sentence is timed
    at its own length, a batch at its longest sentence's."""
    xs, n = [], 0
    for x, _ in ws.evaluation:
        xs.append(x)
        n += modelio.batch_size(x)
        if n >= size:
            break
    if n < size:
        raise UsageError(f"batch {size}: the evaluation split has only {n} samples")
    try:
        x = modelio.take(modelio.concat(xs), torch.arange(size))
    except UsageError as e:
        raise UsageError(
            f"batch {size} spans evaluation batches that do not concatenate ({e}); "
            "give --batches within the split's batch size"
        ) from e
    feeds = ws.io.feeds(x)
    mask = feeds.get("attention_mask")
    if mask is not None and mask.ndim == 2:
        used = int(np.flatnonzero(mask.any(0)).max()) + 1
        feeds = {
            k: np.ascontiguousarray(v[:, :used]) if v.shape[:2] == mask.shape else v for k, v in feeds.items()
        }
    return feeds


def shape_of(feeds: Mapping[str, np.ndarray]) -> str:
    return " × ".join(str(d) for d in next(iter(feeds.values())).shape)


def ilp(options: OptionTable, max_cost: float) -> dict[str, str] | None:
    """HAWQ-V3: min Σ Ω subject to Σ cost ≤ max_cost, one format per layer (PuLP / CBC)."""
    import pulp

    prob = pulp.LpProblem("hawq_v3", pulp.LpMinimize)
    x = {
        (f, o.format): pulp.LpVariable(f"x_{i}_{j}", cat="Binary")
        for i, f in enumerate(options.layers)
        for j, o in enumerate(options.options[f])
    }
    prob += pulp.lpSum(o.omega * x[(f, o.format)] for f in options.layers for o in options.options[f])
    for f in options.layers:
        prob += pulp.lpSum(x[(f, o.format)] for o in options.options[f]) == 1
    prob += (
        pulp.lpSum(o.cost * x[(f, o.format)] for f in options.layers for o in options.options[f]) <= max_cost
    )
    status = prob.solve(pulp.PULP_CBC_CMD(msg=False))
    if pulp.LpStatus[status] != "Optimal":
        return None
    return {f: fmt for (f, fmt), v in x.items() if v.value() is not None and v.value() > 0.5}


def format_scales(table: LatencyTable, allocs: Sequence[Mapping[str, str]], measured: Sequence[float]) -> str:
    """Is the table off by format? Least squares of the measured latencies on a constant plus, per
    format, the table's deltas summed over the layers in it (a scale of 1 is the table's own
    prediction); and the prediction of that fit left out one model at a time, against the table's.
    """
    fmts = sorted({f for a in allocs for f in a.values() if f != "float"})
    X = np.array(
        [[1.0] + [sum(table.delta(k, f) for k, g in a.items() if g == f) for f in fmts] for a in allocs]
    )
    y = np.asarray(measured, dtype=float)
    if len(y) <= X.shape[1] + 2:
        return f"per-format scales: too few probed models ({len(y)})"
    coef, *_ = np.linalg.lstsq(X, y, rcond=None)
    resid = y - X @ coef
    sigma2 = float(resid @ resid) / (len(y) - X.shape[1])
    cov = sigma2 * np.linalg.pinv(X.T @ X)
    hat = np.einsum("ij,jk,ik->i", X, np.linalg.pinv(X.T @ X), X)
    loo = y - resid / np.clip(1.0 - hat, 1e-9, None)  # leave-one-out predictions
    raw = [table.predict(a) for a in allocs]
    med = statistics.median
    return (
        "per-format scales of the table's deltas (measured ≈ c + Σ scale × Σ deltas; 1 = the table): "
        + ", ".join(
            f"{f} {c:.2f} ± {np.sqrt(v):.2f}"
            for f, c, v in zip(fmts, coef[1:], np.diag(cov)[1:], strict=True)
        )
        + f"; c {coef[0]:.3f} ms (table float {table.float_ms:.3f})"
        + f" | leave-one-out: Spearman {rho(list(loo), list(y)):.3f}, median |error| "
        + f"{100 * med(np.abs(loo - y) / y):.1f} % (table: {rho(raw, list(y)):.3f}, "
        + f"{100 * med(np.abs(np.asarray(raw) - y) / y):.1f} %)"
    )


def describe_ratios(ratios: Sequence[float]) -> str:
    if not ratios:
        return "(no layer)"
    return f"median {statistics.median(ratios):.2g}, min {min(ratios):.2g}, max {max(ratios):.2g}"


def describe(alloc: Mapping[str, str]) -> str:
    """An allocation in short: how many layers take each format."""
    counts: dict[str, int] = {}
    for fmt in alloc.values():
        counts[fmt] = counts.get(fmt, 0) + 1
    return ", ".join(f"{n}×{fmt}" for fmt, n in sorted(counts.items(), key=lambda kv: -kv[1]))


def run(key: str, args: argparse.Namespace) -> None:
    t_start = time.perf_counter()
    bench = MODELS[key]
    formats = tuple(args.formats.split(",")) if args.formats else bench.formats
    batches = tuple(int(b) for b in args.batches.split(",")) if args.batches else bench.batches
    ws = pipeline.load(bench.recipe, overrides=args.override)
    r = ws.recipe
    metric_name = r.task.metric_name
    top1 = metric_name == "top1"
    hib = r.task.higher_is_better_resolved

    def fmt_metric(v: float) -> str:
        return f"{100 * v:.2f}" if top1 else f"{v:.5f}"

    prepared = ws.prepared
    fqns = prepared.fqns
    table = pipeline.analyze(ws, progress=False)
    t0 = time.perf_counter()
    act = pipeline.activation_table(ws, progress=False)
    t_act = time.perf_counter() - t0
    exp = pipeline.exporter(ws)
    if r.task.targets == "model":
        # Teacher fidelity against the float ONNX model, as quantize() measures it.
        ws = onnx_teacher(ws, exp.float_model)
    runner = Runner(ws)
    weights = dict(zip(fqns, prepared.weights(), strict=True))
    params = {x.fqn: x.params for x in prepared.layers}

    def options(formats: Sequence[str], cost: Any, *, activations: bool) -> OptionTable:
        # Built with the recipe's export settings, which the exporter and dependency stage share,
        # and recorded in the table as pipeline.frontier records them.
        s = r.export_settings
        return replace(
            build_options(
                prepared.layers,
                table,
                weights,
                formats=formats,
                cost=cost,
                settings=s,
                activation_omega=act.omegas() if activations else None,
                dynamic_activation_omega=act.dynamic_omegas() if activations else None,
            ),
            settings={**asdict(s), "cost": getattr(cost, "name", cost)},
        )

    feeds = {b: batch_feeds(ws, b) for b in batches}
    lat: dict[int, LatencyTable] = {}
    for b in batches:
        lat[b] = measure_latency(
            exp,
            feeds[b],
            formats=formats,
            settings=LatencySettings(threads=THREADS, clock="cpu", runs=args.runs),
            cache_dir=None if args.fresh else cache_dir() / "latency",
            progress=False,
        )
    base_eval, base_loss = runner.scores(exp.float_model, "evaluation")
    base_test, _ = runner.scores(exp.float_model, "test")
    h = r.hessian
    print(
        f"\n## {key} ({bench.recipe}): {len(fqns)} layers; formats {'/'.join(formats)}; float {metric_name} "
        f"eval {fmt_metric(base_eval)}, test {fmt_metric(base_test)} "
        f"({sum(modelio.batch_size(x) for x, _ in ws.evaluation)} / "
        f"{sum(modelio.batch_size(x) for x, _ in ws.test)} samples)"
    )
    print(
        f"Hessian traces {table.seconds:.1f} s (rel_tol {h.rel_tol}, sub_batch {h.sub_batch}) | activation "
        f"traces {act.hvps} HVPs, {t_act:.1f} s ({sum(x.converged for x in act.layers)}/{len(act.layers)} "
        "converged) | latency tables: "
        + ", ".join(
            f"batch {b} ({shape_of(feeds[b])}) {lat[b].seconds:.0f} s (float {lat[b].float_ms:.3f} ms)"
            for b in batches
        )
    )
    ref_fmt = max((f for f in formats if parse_format(f).activations), key=lambda f: parse_format(f).bits)
    w8 = options((ref_fmt,), "size", activations=False)
    ratio = [x.omega / max(w8.option(x.layer, ref_fmt).omega, 1e-30) for x in act.layers]
    print(
        f"Ω_act / Ω_weights({ref_fmt}) over layers: {describe_ratios(ratio)}"
        + "; dynamic (per-batch range) / static (calibrated range): "
        + describe_ratios([x.omega_dynamic / x.omega for x in act.layers if x.omega > 0])
    )

    # -- searches ------------------------------------------------------------------------------
    memo: dict[tuple[tuple[str, str], ...], float] = {}

    def measure(p: FrontierPoint) -> float:
        k = allocation_key(p.allocation)
        if k not in memo:
            memo[k] = runner.scores(exp.quantized_model(p.allocation), "evaluation")[0]
        return memo[k]

    def timed(b: int) -> Any:
        """Under the latency cost every probe is timed, here at batch b (CPU time, THREADS)."""

        def evaluate(p: FrontierPoint) -> Measurement:
            blob = exp.quantized_model(p.allocation).SerializeToString()
            t = time_models({"m": blob}, feeds[b], rounds=3, runs=args.timing_runs)["m"]
            return Measurement(measure(p), latency_ms=t.median_ms)

        return evaluate

    def retime(b: int) -> Any:
        def again(allocations: Sequence[Mapping[str, str]]) -> list[Timing]:
            blobs = {str(i): exp.quantized_model(a).SerializeToString() for i, a in enumerate(allocations)}
            got = time_models(blobs, feeds[b], rounds=max(3, args.rounds // 2), runs=args.timing_runs)
            return [got[str(i)] for i in range(len(allocations))]

        return again

    opts_size = options(formats, "size", activations=True)
    dep = None
    if r.search.dependency:
        dep = pipeline.dependencies(ws, opts_size, table, progress=False)
    else:
        print(
            "dependency terms: off (the recipe's search.dependency: false): plain bisection on the frontier"
        )
    tables = {
        "size": opts_size,
        **{f"latency@{b}": options(formats, lat[b].cost_model(), activations=True) for b in batches},
    }
    rows: dict[str, dict[str, str]] = {}
    notes: dict[str, str] = {}
    probes: list[dict[str, str]] = []
    a = r.allocation
    for budget_value in BUDGETS:
        budget = Budget(budget_value, "relative", higher_is_better=hib)
        for name, opts in tables.items():
            front = pareto_frontier(opts, cost_grid=a.cost_grid, omega_grid=a.omega_grid)
            if dep is not None:
                front = rescore(front, dep)
                cands = candidates_for_search(front, dep, opts)
            else:
                cands = front.points
            b = int(name.partition("@")[2] or 0)
            # The search quantize() runs: bisection, then (latency@B) the latency refinement.
            res = pipeline.search(
                cands,
                timed(b) if b else measure,
                options=opts,
                budget=budget,
                baseline=base_eval,
                dependency=dep,
                latency=lat[b] if b else None,
                retime=retime(b),
                progress=False,
            ).result
            probes += [dict(t.allocation) for t in res.trials]
            label = f"hawqtool {name} {budget_value:.1%}"
            if res.chosen is None:
                notes[label] = f"budget impossible ({res.evaluations} evals)"
                continue
            rows[label] = dict(res.chosen.allocation)
            notes[label] = f"{res.evaluations} evals" + (f", {res.reason}" if b else "")
            if b:
                uniform = ", ".join(
                    f"{t.note} {fmt_metric(t.metric)} {'meets' if t.met else 'misses'}"
                    for t in res.trials
                    if t.source == "extra"
                )
                checked = [
                    f"{fmt_metric(t.metric)} {'meets' if t.met else 'misses'}"
                    for t in res.trials
                    if t.source == "timed"
                ]
                moves = [
                    f"{t.note} {'meets' if t.met else 'misses'}" for t in res.trials if t.source == "move"
                ]
                print(
                    f"{label}: chose {res.reason} {describe(rows[label])} | uniform probes: {uniform or 'none new'}"
                    f" | shortlist evaluated: {', '.join(checked) or 'none'}"
                    f" | moves evaluated: {', '.join(moves) or 'none'}"
                )
        opts_w = {b: options(formats, lat[b].cost_model(), activations=False) for b in batches}
        for b in batches:
            ref = rows.get(f"hawqtool latency@{b} {budget_value:.1%}")
            # Σ layer costs = float latency + Σ deltas = the predicted latency.
            target = lat[b].predict(ref or uniform_allocation(ws, ref_fmt))
            alloc = ilp(opts_w[b], target)
            label = f"HAWQ-V3 ILP@{b} {budget_value:.1%}"
            if alloc is None:
                notes[label] = "ILP infeasible"
                continue
            rows[label] = alloc
            met = budget.meets(base_eval, measure(FrontierPoint(0.0, 0.0, alloc)))
            notes[label] = f"1 eval, {'meets' if met else 'MISSES'} budget"

    # -- the table -----------------------------------------------------------------------------
    with tempfile.TemporaryDirectory() as tmp:
        qs = ort_quantize_static(
            exp.float_model, ws.calibration, Path(tmp), feeds=ws.io.feeds, op_types=bench.ort_op_types
        )
    models: dict[str, bytes] = {
        "float": exp.float_model.SerializeToString(),
        "ort int8": qs.SerializeToString(),
    }
    for label, alloc in rows.items():
        models[label] = exp.quantized_model(alloc).SerializeToString()
    lat_meas, session_sd = {}, {}
    for b in batches:
        lat_meas[b], session_sd[b] = time_two_sessions(
            models, feeds[b], rounds=args.rounds, runs=args.timing_runs
        )
    import onnx

    print(
        f"\nCPU ms of one batch, median over {args.rounds} interleaved rounds of the mean of two sessions "
        f"± standard error; Δ ort: the row minus ort int8, paired by round; {metric_name}"
        f"{' %' if top1 else ''} relative budgets vs the float model. Session effect σ_s (one session's "
        "median around its model's, pooled over the rows; the goal verdicts below add it): "
        + ", ".join(f"batch {b} {100 * session_sd[b]:.1f} %" for b in batches)
    )
    cols = (
        [f"ms @{b}" for b in batches]
        + [f"Δ ort @{b}" for b in batches]
        + [f"pred @{b}" for b in batches]
        + ["KiB", "avg bits", f"{metric_name} eval", f"{metric_name} test", "note", "allocation"]
    )
    within: dict[float, list[str]] = {}  # budget -> rows that meet it on the evaluation split
    print("\n| method | budget | " + " | ".join(cols) + " |")
    print("|---" * (len(cols) + 2) + "|")
    for label, blob in models.items():
        model = onnx.load_from_string(blob)
        ev, _ = runner.scores(model, "evaluation")
        te, _ = runner.scores(model, "test")
        alloc = rows.get(label)
        if label == "float":
            alloc = dict.fromkeys(fqns, "float")
        pred = [f"{lat[b].predict(alloc):.3f}" if alloc else "" for b in batches]
        bits = average_bits(alloc, params) if alloc else 8.0
        method, _, budget_label = (
            label.rpartition(" ") if label not in ("float", "ort int8") else (label, "", "")
        )
        ms = [pm(lat_meas[b][label]) for b in batches]
        vs = [
            "" if label == "ort int8" else versus(lat_meas[b][label], lat_meas[b]["ort int8"])
            for b in batches
        ]
        chosen = describe(rows[label]) if label in rows else ""
        if label == "ort int8":
            verdicts = [
                f"{'meets' if Budget(v, 'relative', higher_is_better=hib).meets(base_eval, ev) else 'MISSES'} {v:.1%}"
                for v in BUDGETS
            ]
            notes[label] = ", ".join(verdicts) + (
                f" ({'/'.join(bench.ort_op_types)} only)" if bench.ort_op_types else ""
            )
        cells = [*ms, *vs, *pred, f"{len(blob) / 1024:.1f}", f"{bits:.2f}", fmt_metric(ev), fmt_metric(te)]
        cells += [notes.get(label, ""), chosen]
        print(f"| {method} | {budget_label} | " + " | ".join(cells) + " |")
        for v in BUDGETS:
            if Budget(v, "relative", higher_is_better=hib).meets(base_eval, ev):
                within.setdefault(v, []).append(label)

    # -- the goal: is cost: latency at batch B the fastest model within budget at batch B? --------
    for v in BUDGETS:
        for b in batches:
            ours = f"hawqtool latency@{b} {v:.1%}"
            if ours not in within.get(v, []):
                print(f"{v:.1%}, batch {b}: {ours} is not within budget")
                continue
            # The rival: the model within budget that ours loses to most, paired by round (medians
            # of models timed with different noise can order them otherwise). Its standard error
            # adds the session effect (each side a mean of two sessions: session_se). Picking the
            # worst of k comparisons, one 2-standard-error test per rival calls ours "slower" by
            # chance with probability up to k × 2.3 %; the family-wise verdict keeps that at 2.3 %
            # (Bonferroni). A row with our allocation is the same model (another search found it
            # too): not a rival, and its measured difference from ours is measurement noise, printed.
            t = lat_meas[b]
            same = [k for k in within[v] if k != ours and rows.get(k) == rows[ours]]
            others = [k for k in within[v] if k != ours and k not in same]
            best = max(others, key=lambda k: t[ours].minus(t[k])[0], default=ours)
            d, se_rounds = t[ours].minus(t[best])
            se_sessions = session_se(session_sd[b], t[ours], t[best])
            se = float(np.hypot(se_rounds, se_sessions))
            z_k = NormalDist().inv_cdf(1 - (1 - NormalDist().cdf(2.0)) / max(len(others), 1))
            verdicts = [
                "the fastest" if best == ours or d <= 0 else "slower" if d > z * s else "tied (within noise)"
                for z, s in ((2.0, se_rounds), (2.0, se), (z_k, se))
            ]
            print(
                f"{v:.1%}, batch {b}: closest rival within budget {best} ({pm(lat_meas[b][best])} ms); "
                f"latency@{b} − it {d:+.3f} ± {se:.3f} ms (rounds ± {se_rounds:.3f}, sessions ± {se_sessions:.3f}): "
                f"{verdicts[2]} (beyond {z_k:.2f} se, family-wise over {len(others)} rivals; beyond 2 se: "
                f"{verdicts[1]}; beyond 2 se of the rounds alone: {verdicts[0]}); "
                f"vs float {100 * (lat_meas[b][ours].median_ms / lat_meas[b]['float'].median_ms - 1):+.1f} %"
                + "".join(
                    "; the same model as {}: {:+.3f} ± {:.3f} ms".format(k, *t[ours].minus(t[k]))
                    for k in same
                )
            )

    # -- predicted vs measured latency on every probed model -------------------------------------
    uniq = {allocation_key(a): a for a in probes}
    probe_models = {str(i): exp.quantized_model(a).SerializeToString() for i, a in enumerate(uniq.values())}
    for b in batches:
        meas = time_models(probe_models, feeds[b], rounds=5, runs=args.timing_runs)
        predicted = [lat[b].predict(a) for a in uniq.values()]
        m = [meas[str(i)].median_ms for i in range(len(uniq))]
        err = [abs(p - q) / q for p, q in zip(predicted, m, strict=True)]
        print(
            f"predicted vs measured latency, batch {b}, {len(m)} probed models: Spearman {rho(predicted, m):.3f}, "
            f"median |error| {100 * statistics.median(err):.1f} %, max {100 * max(err):.1f} %"
        )
        print(format_scales(lat[b], list(uniq.values()), m))

    # -- Spearman: ΣΩ with and without activation terms vs measured drops ------------------------
    if args.allocs < 4:
        print(f"({key}: {time.perf_counter() - t_start:.0f} s; Spearman skipped: --allocs {args.allocs})")
        return
    sp_w = options(SPEARMAN_FORMATS, "size", activations=False)
    sp_wa = options(SPEARMAN_FORMATS, "size", activations=True)
    rng = np.random.default_rng(args.seed)
    allocs = [
        {f: str(rng.choice([o.format for o in sp_w.options[f]])) for f in fqns} for _ in range(args.allocs)
    ]
    drops, dloss = [], []
    for alloc in allocs:
        metric, loss = runner.scores(exp.quantized_model(alloc), "evaluation")
        drops.append(Budget(0.0, higher_is_better=hib).drop(base_eval, metric))
        dloss.append(loss - base_loss)
    w = [sp_w.omega(x) for x in allocs]
    wa = [sp_wa.omega(x) for x in allocs]
    print(
        f"Spearman over {args.allocs} random allocations ({'/'.join(SPEARMAN_FORMATS)}): "
        f"ΣΩ vs {metric_name} drop {rho(w, drops):.3f}, vs loss increase {rho(w, dloss):.3f} | "
        f"ΣΩ + Ω_act vs {metric_name} drop {rho(wa, drops):.3f}, vs loss increase {rho(wa, dloss):.3f}"
    )
    # Weight error held fixed (each layer int6 or int6-w, where it can take both): only the
    # activation terms vary.
    six = {f: [o.format for o in sp_w.options[f] if o.format in ("int6", "int6-w")] for f in fqns}
    fixed = [{f: str(rng.choice(six[f])) for f in fqns if six[f]} for _ in range(args.allocs // 2)]
    f_loss = [runner.scores(exp.quantized_model(x), "evaluation")[1] - base_loss for x in fixed]
    print(
        f"Spearman over {len(fixed)} random int6 / int6-w allocations (ΣΩ_weights fixed): "
        f"Σ Ω_act vs loss increase {rho([sp_wa.omega(x) for x in fixed], f_loss):.3f}, "
        f"number of activation-quantized layers vs loss increase "
        f"{rho([sum(v == 'int6' for v in x.values()) for x in fixed], f_loss):.3f}"
    )
    print(f"({key}: {time.perf_counter() - t_start:.0f} s)", flush=True)


def setup(ap: argparse.ArgumentParser, models: str) -> list[str]:
    """The bench's process settings, and the model keys of ``--models`` (an unknown one exits 2)."""
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(2)
    keys = models.split(",")
    for key in keys:
        if key not in MODELS:
            ap.error(f"unknown model {key!r}; allowed: {', '.join(MODELS)}")
    return keys


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="resnet20,cnn,transformer", help=f"of {', '.join(MODELS)}")
    ap.add_argument("--allocs", type=int, default=40)
    ap.add_argument("--runs", type=int, default=20, help="paired runs per latency-table variant")
    ap.add_argument("--rounds", type=int, default=20, help="interleaved rounds of the final table")
    ap.add_argument("--timing-runs", type=int, default=5, help="runs per model per round")
    ap.add_argument("--formats", default=None, help="candidate formats (default: each model's own)")
    ap.add_argument(
        "--batches", default=None, help="timed batch sizes, e.g. 1,64 (default: each model's own)"
    )
    ap.add_argument(
        "--override",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="recipe override, for every model",
    )
    ap.add_argument("--fresh", action="store_true", help="measure the latency tables again (no cache)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    for key in setup(ap, args.models):
        run(key, args)


if __name__ == "__main__":
    main()
