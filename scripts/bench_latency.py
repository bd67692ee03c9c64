"""Latency as the cost, and activation precision: every method's latency and accuracy, in one run.

For ResNet-20 and the small CNN on digits and the zoo transformer, formats int2/int4/int7/int8
(uint8 activations; int7 is 7-bit weights in int8, which onnxruntime's u8×s8 kernels cannot
saturate on a CPU without VNNI), int4-w (weight-only) and float (``--formats``), budgets 0.1 % and
1 % relative top-1 on the evaluation split:

- ``float``: the BN-folded float export;
- ``ort int8``: onnxruntime's own ``quantize_static`` (QDQ, uint8 / int8 per channel, MinMax);
- ``hawqtool size``: frontier of (bytes, ΣΩ + Ω_act) → dependency re-scoring → bisection;
- ``hawqtool latency@B``: what ``allocation.cost: latency`` does, at batch B: the same on (measured
  latency, ΣΩ + Ω_act), every probe timed, the uniform integer models
  (:func:`hawqtool.pipeline.uniform_quantized_points`) probed too, the probes within budget
  re-timed together and the fastest chosen (:func:`hawqtool.pipeline._fastest_within_budget`);
- ``HAWQ-V3 ILP@B``: min ΣΩ (weights only) s.t. Σ measured latency ≤ the predicted latency of
  hawqtool latency@B's choice, solved exactly with PuLP; no dependency terms, no bisection: one
  evaluation, whatever it scores.

Latency (``measure_latency``, context ``both``; and the final table) is the median onnxruntime
time of one batch of 1 or 64 images on ONE intra-op thread, measured as the process's CPU time
(``clock="cpu"``): this machine is a shared 2-core VM whose load average sits at 10–15, where
wall-clock latency of a 2-thread session swings by 3× between identical runs while the CPU time
stays within a few percent (measured); on an idle machine, one thread's CPU time is its latency.
The models of one table are timed in interleaved rounds (:func:`hawqtool.costs.time_interleaved`):
each latency is the median over rounds ± its standard error, and each row's difference from
``ort int8`` is the median of the per-round differences ± its standard error, called resolved when
it is more than twice that.

Then, over ``--allocs`` random allocations of int4 / int6 / int4-w / int6-w / float, the Spearman
correlation of ΣΩ (weights only, HAWQ-V2) and ΣΩ + Ω_act (with the activation terms of
:mod:`hawqtool.activations`) with the measured top-1 drop and cross-entropy increase in
onnxruntime on the evaluation split; and of each latency table's prediction with the measured
latency of every model the searches probed.

Usage: ``python scripts/bench_latency.py [--models resnet20,cnn,transformer] [--allocs 40] [--fresh]``
(``--allocs 0`` skips the Spearman part; ``--fresh`` re-measures the latency tables instead of
using cached ones, which may come from a differently loaded machine).
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.stats import spearmanr

from hawqtool import pipeline
from hawqtool.activations import estimate_activation_traces
from hawqtool.cache import cache_dir
from hawqtool.costs import LatencyTable, Timing, measure_latency, time_interleaved
from hawqtool.dependency import candidates_for_search, make_repair, rescore
from hawqtool.evaluate import make_session
from hawqtool.frontier import pareto_frontier
from hawqtool.search import Measurement, bisect
from hawqtool.sensitivity import build_options
from hawqtool.types import Budget, FrontierPoint, OptionTable, average_bits

sys.path.insert(0, str(Path(__file__).parent))
from bench_export import ort_quantize_static

MODELS = {"resnet20": "resnet20-digits", "cnn": "small-cnn-digits", "transformer": "transformer-digits"}
FORMATS = ("int2", "int4", "int7", "int8", "int4-w", "float")
# No 8-bit weights here: on this AVX2 CPU (no VNNI) onnxruntime's fused u8s8 kernels saturate
# int16 pair sums with full-range int8 weights (all-int8 small CNN: 98.67 % unfused vs 97.50 %
# fused; int7 and below lose nothing), an error no second-order score predicts.
SPEARMAN_FORMATS = ("int4", "int6", "int4-w", "int6-w", "float")
BUDGETS = (0.001, 0.01)
BATCHES = (1, 64)
THREADS = 1


def rho(a: Sequence[float], b: Sequence[float]) -> float:
    return float(spearmanr(a, b).statistic)


class Runner:
    """onnxruntime outputs on a split: top-1 and mean cross-entropy (sessions on THREADS threads)."""

    def __init__(self, ws: pipeline.Workspace) -> None:
        self.ws = ws

    def scores(self, model: Any, split: str) -> tuple[float, float]:
        session = make_session(model.SerializeToString(), threads=THREADS)
        hits, ce, n = 0, 0.0, 0
        for x, y in self.ws.split(split):
            logits = torch.from_numpy(np.asarray(session.run(None, self.ws.io.feeds(x))[0]))
            hits += int((logits.argmax(1) == y).sum())
            ce += float(torch.nn.functional.cross_entropy(logits, y, reduction="sum"))
            n += len(y)
        return hits / n, ce / n


def time_models(
    models: Mapping[str, bytes], feeds: Mapping[str, np.ndarray], *, rounds: int, runs: int
) -> dict[str, Timing]:
    """CPU time (ms) of one run per model on THREADS threads, in interleaved rounds."""
    return time_interleaved(models, feeds, threads=THREADS, rounds=rounds, runs=runs, clock="cpu")


def pm(t: Timing) -> str:
    return f"{t.median_ms:.3f} ± {t.stderr_ms:.3f}"


def versus(t: Timing, ref: Timing) -> str:
    """``t − ref`` ± its standard error, and whether the difference is resolved (> 2 standard errors)."""
    d, se = t.minus(ref)
    return f"{d:+.3f} ± {se:.3f} ({'resolved' if abs(d) > 2 * se else 'within noise'})"


def batch_feeds(ws: pipeline.Workspace, size: int) -> dict[str, np.ndarray]:
    x = torch.cat([b[0] for b in ws.evaluation])[:size]
    return ws.io.feeds(x)


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


def run(key: str, args: argparse.Namespace) -> None:
    t_start = time.perf_counter()
    ws = pipeline.load(MODELS[key])
    r = ws.recipe
    prepared = ws.prepared
    fqns = prepared.fqns
    runner = Runner(ws)
    table = pipeline.analyze(ws, progress=False)
    t0 = time.perf_counter()
    act = estimate_activation_traces(
        prepared,
        ws.calibration,
        ws.loss_fn,
        seed=r.hessian.seed,
        progress=False,
        cache_dir=cache_dir() / "activations",
    )
    t_act = time.perf_counter() - t0
    exp = pipeline.exporter(ws)
    weights = dict(zip(fqns, prepared.weights(), strict=True))
    params = {x.fqn: x.params for x in prepared.layers}

    def options(formats: Sequence[str], cost: Any, *, activations: bool) -> OptionTable:
        # The settings the pipeline records for the exporter and dependency stages to check.
        settings = {**pipeline.stage_settings(r), "cost": getattr(cost, "name", cost)}
        return replace(
            build_options(
                prepared.layers,
                table,
                weights,
                formats=formats,
                cost=cost,
                storage=r.export.int4_storage,
                clip_search=r.allocation.clip_search,
                opset=r.export.opset,
                activation_omega=act.omegas() if activations else None,
            ),
            settings=settings,
        )

    feeds = {b: batch_feeds(ws, b) for b in BATCHES}
    lat: dict[int, LatencyTable] = {}
    formats = tuple(args.formats.split(","))
    for b in BATCHES:
        lat[b] = measure_latency(
            exp,
            feeds[b],
            formats=formats,
            threads=THREADS,
            clock="cpu",
            runs=args.runs,
            cache_dir=None if args.fresh else cache_dir() / "latency",
            progress=False,
        )
    base_eval, base_ce = runner.scores(exp.float_model, "evaluation")
    base_test, _ = runner.scores(exp.float_model, "test")
    print(
        f"\n## {key} ({MODELS[key]}): {len(fqns)} layers; float top-1 eval {base_eval:.4f}, test {base_test:.4f}"
    )
    print(
        f"Hessian traces {table.seconds:.1f} s | activation traces {act.hvps} HVPs, {t_act:.1f} s "
        f"({sum(x.converged for x in act.layers)}/{len(act.layers)} converged) | latency tables: "
        + ", ".join(f"batch {b} {lat[b].seconds:.0f} s (float {lat[b].float_ms:.3f} ms)" for b in BATCHES)
    )
    w8 = options(("int8",), "size", activations=False)
    ratio = [x.omega / max(w8.option(x.layer, "int8").omega, 1e-30) for x in act.layers]
    print(
        f"Ω_act / Ω_weights(int8) over layers: median {statistics.median(ratio):.2g}, "
        f"min {min(ratio):.2g}, max {max(ratio):.2g}"
    )

    # -- searches ------------------------------------------------------------------------------
    memo: dict[tuple[tuple[str, str], ...], float] = {}

    def measure(p: FrontierPoint) -> float:
        k = tuple(sorted(p.allocation.items()))
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
    dep = pipeline._dependency_model(ws, opts_size, table, progress=False)
    tables = {
        "size": opts_size,
        **{f"latency@{b}": options(formats, lat[b].cost_model(), activations=True) for b in BATCHES},
    }
    rows: dict[str, dict[str, str]] = {}
    notes: dict[str, str] = {}
    probes: list[dict[str, str]] = []
    for budget_value in BUDGETS:
        budget = Budget(budget_value, "relative", higher_is_better=True)
        for name, opts in tables.items():
            front = rescore(pareto_frontier(opts), dep)
            cands = candidates_for_search(front, dep, opts)
            b = int(name.partition("@")[2] or 0)
            res = bisect(
                cands,
                timed(b) if b else measure,
                baseline=base_eval,
                budget=budget,
                repair=make_repair(cands, dep, opts),
                progress=False,
                extra=pipeline.uniform_quantized_points(opts) if b else {},
            )
            if b:
                res, _ = pipeline._fastest_within_budget(res, lat[b], opts, retime(b))
            probes += [dict(t.allocation) for t in res.trials]
            label = f"hawqtool {name} {budget_value:.1%}"
            if res.chosen is None:
                notes[label] = f"budget impossible ({res.evaluations} evals)"
                continue
            rows[label] = dict(res.chosen.allocation)
            notes[label] = f"{res.evaluations} evals" + (f", {res.reason}" if b else "")
            if b:
                uniform = ", ".join(
                    f"{t.note} {'meets' if t.met else 'misses'}" for t in res.trials if t.source == "extra"
                )
                print(f"{label}: chose {res.reason} {rows[label]} | uniform probes: {uniform or 'none new'}")
        opts_w = {b: options(formats, lat[b].cost_model(), activations=False) for b in BATCHES}
        for b in BATCHES:
            ref = rows.get(f"hawqtool latency@{b} {budget_value:.1%}")
            target = (
                lat[b].predict(ref)
                if ref
                else lat[b].predict({x.fqn: x.pinned or "int8" for x in prepared.layers})
            )
            # Σ layer costs = float latency + Σ deltas = the predicted latency.
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
        qs = ort_quantize_static(exp.float_model, ws.calibration, Path(tmp))
    models: dict[str, bytes] = {
        "float": exp.float_model.SerializeToString(),
        "ort int8": qs.SerializeToString(),
    }
    for label, alloc in rows.items():
        models[label] = exp.quantized_model(alloc).SerializeToString()
    lat_meas = {b: time_models(models, feeds[b], rounds=args.rounds, runs=args.timing_runs) for b in BATCHES}
    import onnx

    print(
        f"\nCPU ms of one batch, median over {args.rounds} interleaved rounds ± standard error; "
        "Δ ort: the row minus ort int8, paired by round"
    )
    print(
        "\n| method | budget | ms @1 | ms @64 | Δ ort @1 | Δ ort @64 | pred @1 | pred @64 | KiB | avg bits "
        "| top-1 eval | top-1 test | note |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for label, blob in models.items():
        model = onnx.load_from_string(blob)
        ev, _ = runner.scores(model, "evaluation")
        te, _ = runner.scores(model, "test")
        alloc = rows.get(label)
        if label == "float":
            alloc = dict.fromkeys(fqns, "float")
        pred = [f"{lat[b].predict(alloc):.3f}" if alloc else "" for b in BATCHES]
        bits = average_bits(alloc, params) if alloc else 8.0
        method, _, budget_label = (
            label.rpartition(" ") if label not in ("float", "ort int8") else (label, "", "")
        )
        vs = [
            "" if label == "ort int8" else versus(lat_meas[b][label], lat_meas[b]["ort int8"])
            for b in BATCHES
        ]
        print(
            f"| {method} | {budget_label} | {pm(lat_meas[1][label])} | {pm(lat_meas[64][label])} | {vs[0]} | "
            f"{vs[1]} | {pred[0]} | {pred[1]} | {len(blob) / 1024:.1f} | {bits:.2f} | {100 * ev:.2f} | "
            f"{100 * te:.2f} | {notes.get(label, '')} |"
        )

    # -- predicted vs measured latency on every probed model -------------------------------------
    uniq = {tuple(sorted(a.items())): a for a in probes}
    probe_models = {str(i): exp.quantized_model(a).SerializeToString() for i, a in enumerate(uniq.values())}
    for b in BATCHES:
        meas = time_models(probe_models, feeds[b], rounds=5, runs=args.timing_runs)
        predicted = [lat[b].predict(a) for a in uniq.values()]
        m = [meas[str(i)].median_ms for i in range(len(uniq))]
        err = [abs(p - q) / q for p, q in zip(predicted, m, strict=True)]
        print(
            f"predicted vs measured latency, batch {b}, {len(m)} probed models: Spearman {rho(predicted, m):.3f}, "
            f"median |error| {100 * statistics.median(err):.1f} %, max {100 * max(err):.1f} %"
        )

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
    drops, dce = [], []
    for a in allocs:
        top1, ce = runner.scores(exp.quantized_model(a), "evaluation")
        drops.append(base_eval - top1)
        dce.append(ce - base_ce)
    w = [sp_w.omega(a) for a in allocs]
    wa = [sp_wa.omega(a) for a in allocs]
    print(
        f"Spearman over {args.allocs} random allocations ({'/'.join(SPEARMAN_FORMATS)}): "
        f"ΣΩ vs top-1 drop {rho(w, drops):.3f}, vs CE increase {rho(w, dce):.3f} | "
        f"ΣΩ + Ω_act vs top-1 drop {rho(wa, drops):.3f}, vs CE increase {rho(wa, dce):.3f}"
    )
    # Weight error held fixed (each layer int6 or int6-w): only the activation terms vary.
    fixed = [{f: str(rng.choice(["int6", "int6-w"])) for f in fqns} for _ in range(args.allocs // 2)]
    f_ce = [runner.scores(exp.quantized_model(a), "evaluation")[1] - base_ce for a in fixed]
    print(
        f"Spearman over {len(fixed)} random int6 / int6-w allocations (ΣΩ_weights fixed): "
        f"Σ Ω_act vs CE increase {rho([sp_wa.omega(a) for a in fixed], f_ce):.3f}, "
        f"number of activation-quantized layers vs CE increase "
        f"{rho([sum(v == 'int6' for v in a.values()) for a in fixed], f_ce):.3f}"
    )
    print(f"({key}: {time.perf_counter() - t_start:.0f} s)", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="resnet20,cnn,transformer")
    ap.add_argument("--allocs", type=int, default=40)
    ap.add_argument("--runs", type=int, default=20, help="paired runs per latency-table variant")
    ap.add_argument("--rounds", type=int, default=20, help="interleaved rounds of the final table")
    ap.add_argument("--timing-runs", type=int, default=5, help="runs per model per round")
    ap.add_argument("--formats", default=",".join(FORMATS))
    ap.add_argument("--fresh", action="store_true", help="measure the latency tables again (no cache)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(2)
    for key in args.models.split(","):
        run(key, args)


if __name__ == "__main__":
    main()
