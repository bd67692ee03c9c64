"""Do inter-layer terms matter? Predictors of the accuracy drop of mixed-precision allocations.

For each model, over ``--allocs`` (60) random allocations with bits drawn per layer from a set
(512 calibration images; per-channel symmetric weights from hawqtool's quantizer; activations
float), Spearman correlation of each predictor with

- the real top-1 drop on the held-out evaluation split (fake-quantized torch model), and
- the measured change of the calibration loss (the ground truth the predictor approximates):

  ``ΣΩ``      HAWQ-V2: Σ avg Tr(H_ii) · ‖Δ_i‖² (Hutchinson traces),
  ``diag``    ½ΣΔ_iᵀH_iiΔ_i (exact diagonal blocks, from the HVPs),
  ``quad``    ½ΔᵀHΔ (cross-layer terms included),
  ``dep``     gᵀΔ + ½ΔᵀHΔ (the second-order prediction, ``DependencyModel.predict``),
  ``score``   hawqtool's ranking score (``DependencyModel.score``: measured single-layer changes in
              context plus rescaled Hessian cross terms) with the single-layer changes measured on
              the torch model, weights fake-quantized (``weights``), and on the exported QDQ model in
              onnxruntime (``exported``: activations quantized too, onnxruntime's kernels;
              ``search.dependency_numerics``), and the measured calibration ΔL itself.

Both scores are also compared, on the same allocations, with the top-1 drop and the calibration ΔL
of the exported models in onnxruntime (what the pipeline's search measures).

Then the search: the exact (BOPs, ΣΩ) Pareto frontier of the same formats, two candidate
sequences handed to bisection — ``ΣΩ`` (the frontier as is), ``rescored`` (frontier points kept
when not dominated in (cost, score); with the one repair probe) — and, per top-1 budget, the
average bits bisection ends at, its evaluations, and the drops on evaluation and test. ``mono``
is the Spearman correlation of position and measured top-1 drop along each sequence (−1: the
sequence is perfectly monotone, which bisection assumes).

Usage: ``python scripts/bench_dependency.py [--allocs 60] [--threads 2] [--models resnet20,cnn,mnist]``
(``--threads`` is torch's and each onnxruntime session's).
"""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy.stats import spearmanr

from hawqtool import zoo
from hawqtool.dependency import (
    DependencyModel,
    build_dependency_model,
    candidates_for_search,
    exported_single_loss,
    make_repair,
    measured_change,
    onnx_loss,
    rescore,
)
from hawqtool.evaluate import evaluate_onnx
from hawqtool.export import QDQExporter
from hawqtool.formats import allocation_key
from hawqtool.frontier import pareto_frontier
from hawqtool.hessian import estimate_traces
from hawqtool.hvp import SplitHessian
from hawqtool.options import build_options
from hawqtool.prepare import PreparedModel, prepare_model, swapped_weights
from hawqtool.quantizer import dequantize_as
from hawqtool.search import bisect
from hawqtool.tasks import top1
from hawqtool.types import Budget, FrontierPoint, SensitivityTable


@dataclass
class Setup:
    name: str
    model: Callable[[], torch.nn.Module]
    data: Callable[[], object]
    bits: tuple[int, ...]


SETUPS = {
    "resnet20": Setup("ResNet-20 digits", zoo.resnet20_digits, lambda: zoo.digits(batch_size=128), (2, 4, 8)),
    "cnn": Setup("small CNN digits", zoo.small_cnn_digits, lambda: zoo.digits(batch_size=128), (2, 3, 4)),
    "mnist": Setup("small CNN MNIST-5k", zoo.small_cnn_mnist, lambda: zoo.mnist5k(batch_size=128), (2, 4, 8)),
}


# --------------------------------------------------------------------------------------------


def traces(prepared: PreparedModel, hessian: SplitHessian, *, seed: int) -> SensitivityTable:
    """HAWQ-V2's per-layer Hutchinson traces, as the pipeline computes them (5 % relative error)."""
    return estimate_traces(
        prepared, hessian.batches, hessian.loss_fn, seed=seed, device="cpu", progress=False
    )


class Evaluator:
    """Top-1 of the fake-quantized torch model on a split (weights cached per layer and format)."""

    def __init__(self, prepared: PreparedModel) -> None:
        self.prepared = prepared
        self.cache: dict[tuple[str, str], torch.Tensor] = {}
        self.calls = 0

    def weights(self, alloc: dict[str, str]) -> dict[str, torch.Tensor]:
        out = {}
        for f, fmt in alloc.items():
            if (f, fmt) not in self.cache:
                w = self.prepared.module(f).weight
                assert isinstance(w, torch.Tensor)
                self.cache[(f, fmt)] = dequantize_as(w, fmt)
            out[f] = self.cache[(f, fmt)]
        return out

    @torch.no_grad()
    def top1(
        self, alloc: dict[str, str] | None, batches: Sequence[tuple[torch.Tensor, torch.Tensor]]
    ) -> float:
        self.calls += 1
        with swapped_weights(self.prepared, self.weights(alloc or {})) as model:
            hits = sum(int((model(x).argmax(1) == y).sum()) for x, y in batches)
        return hits / sum(len(y) for _, y in batches)


def rho(a: Sequence[float], b: Sequence[float]) -> float:
    return float(spearmanr(a, b).statistic)


# --------------------------------------------------------------------------------------------


def run(key: str, n_allocs: int, seed: int, budgets: Sequence[float], threads: int) -> dict[str, object]:
    s = SETUPS[key]
    formats = tuple(f"int{b}" for b in s.bits)
    model, splits = s.model(), s.data()
    calib = splits.calibration  # type: ignore[attr-defined]
    ev_b, te_b = splits.evaluation, splits.test  # type: ignore[attr-defined]
    prepared = prepare_model(model, calib[0][0][:4])
    hessian = SplitHessian(prepared, calib, F.cross_entropy, device="cpu")

    table = traces(prepared, hessian, seed=seed)
    weights = {f: w.detach() for f, w in zip(prepared.fqns, prepared.weights(), strict=True)}
    # BOPs (MACs × weight bits × 8): packed size would not tell int2 from int4 (both ONNX int4).
    options = build_options(prepared.layers, table, weights, formats=formats, cost="bops")
    dep: DependencyModel = build_dependency_model(hessian, prepared, options, method="hvp", progress=False)
    # The same terms with the single-layer changes measured on the exported model in onnxruntime
    # (build_options' defaults: packed storage, clipping search, minmax activation calibration).
    t0 = time.perf_counter()
    exp = QDQExporter.build(prepared, calib)
    t_export = time.perf_counter() - t0
    dep_x = build_dependency_model(
        hessian,
        prepared,
        options,
        single_loss=exported_single_loss(lambda: exp, calib, F.cross_entropy, threads=threads),
        numerics="exported",
        method="hvp",
        progress=False,
    )

    ev = Evaluator(prepared)
    base_eval, base_test = ev.top1(None, ev_b), ev.top1(None, te_b)
    rng = np.random.default_rng(seed)
    allocs = [{f: str(rng.choice(formats)) for f in prepared.fqns} for _ in range(n_allocs)]
    t0 = time.perf_counter()
    drop = [base_eval - ev.top1(a, ev_b) for a in allocs]
    meas = [measured_change(hessian, prepared, a, base_loss=dep.base_loss) for a in allocs]
    t_meas = time.perf_counter() - t0
    # The exported models in onnxruntime: top-1 drop on evaluation and calibration ΔL.
    t0 = time.perf_counter()
    ort_base = evaluate_onnx(exp.float_model, ev_b, top1, threads=threads, latency_runs=1, warmup=0).metric
    ort_calib = onnx_loss(exp.float_model, calib, F.cross_entropy, threads=threads)
    ort_drop, ort_meas = [], []
    for a in allocs:
        model = exp.quantized_model(a)
        ort_drop.append(
            ort_base - evaluate_onnx(model, ev_b, top1, threads=threads, latency_runs=1, warmup=0).metric
        )
        ort_meas.append(onnx_loss(model, calib, F.cross_entropy, threads=threads) - ort_calib)
    t_ort = time.perf_counter() - t0
    preds = {
        "ΣΩ": [options.omega(a) for a in allocs],
        "diag": [dep.diagonal(a) for a in allocs],
        "quad": [dep.quadratic(a) for a in allocs],
        "dep": [dep.predict(a) for a in allocs],
        "score": [dep.score(a) for a in allocs],
        "score_x": [dep_x.score(a) for a in allocs],
    }
    ratio = np.array(meas) / np.array(preds["dep"])

    print(f"\n## {s.name}: {len(prepared.fqns)} layers, bits {set(s.bits)}, {n_allocs} random allocations")
    print(
        f"float top-1: evaluation {base_eval:.4f}, test {base_test:.4f}; calibration loss {dep.base_loss:.4f}"
    )
    print(f"float in onnxruntime: top-1 evaluation {ort_base:.4f}, calibration loss {ort_calib:.4f}")
    print(
        f"traces: {table.hvps} HVPs, {table.seconds:.1f} s | dependency terms: {dep.hvps} HVPs "
        f"+ 1 gradient + {dep.forward_passes} calibration passes: weights {dep.seconds:.1f} s, "
        f"exported {dep_x.seconds:.1f} s (+ exporter build {t_export:.1f} s) | ground truth for "
        f"{n_allocs} allocations: torch {t_meas:.1f} s, onnxruntime {t_ort:.1f} s"
    )
    print(
        "Spearman vs                 | ΣΩ    | ½ΣΔᵢᵀHᵢᵢΔᵢ | ½ΔᵀHΔ | gᵀΔ+½ΔᵀHΔ | score weights | "
        "score exported | measured calib ΔL (same numerics)"
    )
    rows = (
        (drop, meas, "top-1 drop, torch weights  "),
        (meas, None, "calib ΔL, torch weights    "),
        (ort_drop, ort_meas, "top-1 drop, ONNX exported  "),
        (ort_meas, None, "calib ΔL, ONNX exported    "),
    )
    for target, truth, label in rows:
        cells = " | ".join(
            f"{rho(preds[k], target):.3f}" for k in ("ΣΩ", "diag", "quad", "dep", "score", "score_x")
        )
        last = f"{rho(truth, target):.3f}" if truth is not None else ""
        print(f"{label} | {cells} | {last}")
    print(
        f"gᵀΔ+½ΔᵀHΔ vs measured calib ΔL: measured / predicted median {np.median(ratio):.1f}× "
        f"(10–90 %: {np.percentile(ratio, 10):.1f}–{np.percentile(ratio, 90):.1f}×), "
        f"Pearson {np.corrcoef(preds['dep'], meas)[0, 1]:.3f}"
    )

    # -- the search --------------------------------------------------------------------------
    t0 = time.perf_counter()
    front = pareto_frontier(options)
    t_front = time.perf_counter() - t0
    t0 = time.perf_counter()
    rescored = candidates_for_search(front, dep, options)
    t_cand = time.perf_counter() - t0
    seqs: dict[str, Sequence[FrontierPoint]] = {"ΣΩ": rescore(front, dep).points, "rescored": rescored}
    print(
        f"\nfrontier: {len(front)} points ({t_front:.1f} s); candidates: rescored {len(rescored)} ({t_cand:.1f} s)"
    )
    memo: dict[tuple[tuple[str, str], ...], float] = {}

    def measure(p: FrontierPoint) -> float:
        k = allocation_key(p.allocation)
        if k not in memo:
            memo[k] = ev.top1(dict(p.allocation), ev_b)
        return memo[k]

    mono = {}
    for name, seq in seqs.items():
        idx = sorted(set(np.linspace(0, len(seq) - 1, min(40, len(seq))).round().astype(int).tolist()))
        mono[name] = rho(idx, [base_eval - measure(seq[i]) for i in idx])
    print(
        "mono (Spearman of position vs top-1 drop, ≤ 40 points; −1 = monotone): "
        + ", ".join(f"{k} {v:.3f}" for k, v in mono.items())
    )
    pts = front.points
    idx = sorted(set(np.linspace(0, len(pts) - 1, min(40, len(pts))).round().astype(int).tolist()))
    fdrop = [base_eval - measure(pts[i]) for i in idx]
    print(
        "frontier points (docs/design.md §5 bar), Spearman vs top-1 drop: "
        f"ΣΩ {rho([pts[i].omega for i in idx], fdrop):.3f}, "
        f"gᵀΔ+½ΔᵀHΔ {rho([dep.predict(pts[i].allocation) for i in idx], fdrop):.3f}, "
        f"score {rho([dep.score(pts[i].allocation) for i in idx], fdrop):.3f}, "
        f"score exported {rho([dep_x.score(pts[i].allocation) for i in idx], fdrop):.3f}"
    )
    print("budget (abs top-1) | sequence | avg bits |  GBOPs | evals | eval drop | test drop | stop")
    for b in budgets:
        budget = Budget(b)
        for name, seq in seqs.items():
            rep = make_repair(seq, dep, options) if name != "ΣΩ" else None
            r = bisect(seq, measure, baseline=base_eval, budget=budget, repair=rep, progress=False)
            if r.chosen is None:
                print(f"{b:18.3f} | {name:8s} | budget impossible ({r.evaluations} evals)")
                continue
            c = r.chosen
            test_drop = base_test - ev.top1(dict(c.allocation), te_b)
            print(
                f"{b:18.3f} | {name:8s} | {c.avg_bits:8.3f} | {c.cost / 1e9:6.3f} | {r.evaluations:5d} | "
                f"{base_eval - measure(c):9.4f} | {test_drop:9.4f} | {r.reason}"
            )
    return {"name": s.name}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--allocs", type=int, default=60)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--models", default="resnet20,cnn,mnist")
    ap.add_argument("--budgets", default="0.005,0.01,0.02,0.05")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    for key in args.models.split(","):
        run(key, args.allocs, args.seed, [float(b) for b in args.budgets.split(",")], args.threads)
    print(f"\ntotal {time.perf_counter() - t0:.0f} s on {args.threads} torch thread(s)")


if __name__ == "__main__":
    main()
