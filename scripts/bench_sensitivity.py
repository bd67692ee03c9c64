"""0.3's sensitivity (Hutchinson traces + HVP dependency terms) against 0.4's (Gauss–Newton traces +
output-space dependency terms), side by side in one run, on the same data and allocations.

Per model (a built-in recipe, run on the CPU):

- costs: seconds and passes over the calibration split (forward / backward) of the traces by each
  estimator (``hessian.estimator``: ``hutchinson``, ``gauss_newton``) and of the dependency terms by
  each method (``search.dependency_method``: ``hvp`` and ``output`` over every key, as 0.3 and 0.4.1
  computed them, and ``output`` over the interacting keys at ``--tolerance``, the default stage),
  and of the own terms (out of context; onnxruntime under ``--numerics exported``);
- ranking: over ``--allocs`` random allocations (each layer's format drawn uniformly from the recipe's
  formats), the Spearman correlation of each score with the metric drop of the exported QDQ model
  measured in onnxruntime on the evaluation split (paired: the same samples for every allocation):
  ΣΩ from either estimator's traces; the second-order prediction gᵀΔ + ½ΔᵀHΔ of either method
  (``predict``); the own terms alone; and the search's score (``score``: the own terms plus the cross
  terms of either method; the own terms are shared).

Models: ``resnet20`` (ResNet-20 on digits, labels), ``mnist`` (the small CNN on MNIST-5k, labels),
``cnn-digits`` (the small CNN on digits), ``transformer`` (the two-layer transformer on digits rows),
``minilm`` (all-MiniLM-L6-v2 against its own float model, teacher mse; needs ``pip install
'hawqtool[bench]'``, skipped when missing; its calibration split is cut to ``--minilm-calibration``
sentences and its evaluation split to ``--minilm-evaluation``). Both estimators stop at the same probe
cap (``--max-probes``, ``--minilm-max-probes``), so their seconds compare at equal samples and their
standard errors show what each sample is worth; this keeps the default run near 15 minutes on 2 cores.

Usage: ``python scripts/bench_sensitivity.py [--models resnet20,mnist,minilm] [--allocs 60]
[--threads 2] [--numerics weights|exported]``
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from dataclasses import replace
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch
from scipy.stats import spearmanr

from hawqtool import pipeline, quantizer
from hawqtool.dependency import (
    INTERACTION_TOLERANCE,
    DependencyModel,
    build_dependency_model,
    candidates_for_search,
    rescore,
)
from hawqtool.evaluate import evaluate_onnx
from hawqtool.export import QDQExporter
from hawqtool.hessian import estimate_traces
from hawqtool.hvp import SplitHessian
from hawqtool.search import Measurement
from hawqtool.singles import exported_single_loss
from hawqtool.tasks import get_metric
from hawqtool.types import OptionTable, SensitivityTable
from hawqtool.workspace import check_float_model, onnx_teacher

RECIPES = {
    "resnet20": "resnet20-digits",
    "mnist": "small-cnn-mnist",
    "minilm": "minilm",
    "cnn-digits": "small-cnn-digits",
    "transformer": "transformer-digits",
}


def rho(a: list[float], b: list[float]) -> float:
    return float(spearmanr(a, b).statistic)


def workspace(key: str, args: argparse.Namespace) -> Any:
    overrides = ["hessian.device=cpu", f"evaluate.threads={args.threads}"]
    if key == "minilm":
        from hawqtool.errors import UsageError
        from hawqtool.zoo.hf import minilm_path

        try:
            minilm_path()  # the packaged weights
        except (ImportError, UsageError):
            return None
        overrides += [
            f"data.kwargs.calibration={args.minilm_calibration}",
            f"data.kwargs.evaluation={args.minilm_evaluation}",
            f"hessian.max_probes={args.minilm_max_probes}",
        ]
    ws = pipeline.load(RECIPES[key], overrides=overrides)
    # Both estimators stop at the same cap (the recipes' rel_tol would take ~30 min on 2 cores).
    ws.cache["max_probes"] = args.minilm_max_probes if key == "minilm" else args.max_probes
    return ws


def traces(ws: Any, estimator: str) -> SensitivityTable:
    h = ws.recipe.hessian
    return estimate_traces(
        ws.prepared,
        ws.calibration,
        ws.loss_fn,
        seed=h.seed,
        rel_tol=h.rel_tol,
        min_probes=h.min_probes,
        max_probes=min(h.max_probes, ws.cache["max_probes"]),
        sub_batch=h.sub_batch,
        device="cpu",
        estimator=estimator,
        progress=False,
    )


def choices(
    ws: Any, exp: QDQExporter, front: tuple[OptionTable, Any], dep: DependencyModel, args: Any
) -> None:
    """The search's choice at the recipe's budget (cost: size) with the dependency terms off (the
    HAWQ-V2 diagonal: candidates ranked by ΣΩ, no repair) and on (re-scored, repaired), each probe
    evaluated in onnxruntime as the pipeline does; both end on the uniform-model check."""
    options, frontier = front
    checked = check_float_model(ws)
    kept = onnx_teacher(ws, exp.float_model) if ws.recipe.task.targets == "model" else ws

    def evaluation(model: Any) -> Any:
        return evaluate_onnx(
            model, kept.evaluation, kept.metric_fn, io=kept.io, threads=args.threads, latency_runs=1, warmup=0
        )

    base = evaluation(exp.float_model)

    def measure(point: Any) -> Measurement:
        return Measurement.of(evaluation(exp.quantized_model(point.allocation)))

    rescored = rescore(frontier, dep)
    runs = {
        "diagonal (ΣΩ)": dict(candidates=frontier.points, dependency=None, gap_points=frontier.points),
        "dependency": dict(
            candidates=candidates_for_search(rescored, dep, options),
            dependency=dep,
            gap_points=rescored.points,
        ),
    }
    float_size = options.cost({f: "float" for f in options.layers})
    for name, kw in runs.items():
        t0 = time.perf_counter()
        found = pipeline.search(
            kw["candidates"],
            measure,
            options=options,
            budget=checked.budget,
            baseline=base.metric,
            reference=Measurement.of(base),
            dependency=kw["dependency"],
            gap_points=kw["gap_points"],
            seed=ws.recipe.hessian.seed,
            progress=False,
        ).result
        c = found.chosen
        last = next(
            (t for t in reversed(found.trials) if c is not None and dict(t.allocation) == dict(c.allocation)),
            None,
        )
        print(
            f"choice, {name:14s}: "
            + (
                f"{c.cost / 1024:.1f} KiB of {float_size / 1024:.1f} ({c.avg_bits:.2f} bits), drop "
                f"{last.drop:.4f} (bound {last.drop_upper:.4f}, budget {checked.budget.max_drop:.4f}), "
                if c is not None and last is not None
                else "budget not met, "
            )
            + f"{found.evaluations} evaluations, {found.reason}, {time.perf_counter() - t0:.0f} s"
        )


def run(key: str, args: argparse.Namespace) -> None:
    t_model = time.perf_counter()
    ws = workspace(key, args)
    if ws is None:
        print(f"\n## {key}: skipped (pip install 'hawqtool[bench]' for the packaged model)")
        return
    r = ws.recipe
    n_calib = sum(len(y) if hasattr(y, "__len__") else 1 for _, y in ws.calibration)
    print(
        f"\n## {r.name}: {len(ws.prepared.fqns)} layers, formats {list(r.allocation.formats)}, loss "
        f"{r.task.loss_name} on {r.task.targets}, {n_calib} calibration samples"
    )
    tables = {e: traces(ws, e) for e in ("hutchinson", "gauss_newton")}
    fronts = {e: pipeline.frontier(ws, table=t, progress=False) for e, t in tables.items()}
    options = {e: f[0] for e, f in fronts.items()}
    hessian = SplitHessian(ws.prepared, ws.calibration, ws.loss_fn, device="cpu")
    clip = ws.export_settings.clip_search
    exp = QDQExporter.build(ws.prepared, ws.calibration, settings=ws.export_settings)
    onnx = exported_single_loss(lambda: exp, ws.calibration, ws.loss_fn, io=ws.io, threads=args.threads)
    # The stage as the pipeline runs it: interacting keys only, own terms measured.
    stage = build_dependency_model(
        hessian,
        ws.prepared,
        options["gauss_newton"],
        clip_search=clip,
        single_loss=onnx if args.numerics == "exported" else None,
        numerics=args.numerics,
        method="output",
        tolerance=args.tolerance,
        progress=False,
    )
    # Every key's terms, as 0.3 (HVPs) and 0.4.1 (output space) computed them: their stage quantized
    # every weight again (no kept quantizations, hawqtool.quantizer).
    kept_bytes, quantizer.CACHE_BYTES = quantizer.CACHE_BYTES, 0
    terms = {
        m: build_dependency_model(
            hessian,
            ws.prepared,
            options[e],
            clip_search=clip,
            measure_singles=False,
            method=m,
            tolerance=0.0,
            progress=False,
        )
        for m, e in (("hvp", "hutchinson"), ("output", "gauss_newton"))
    }
    quantizer.CACHE_BYTES = kept_bytes
    # The own terms of every key (the stage's where it measured them, else from the full term passes).
    assert stage.measured is not None and terms["output"].own_loss is not None
    own = np.where(
        np.isin(stage.own_source, ("onnxruntime", "torch")), stage.measured, terms["output"].own_loss
    )
    full: dict[str, DependencyModel] = {m: replace(d, measured=own) for m, d in terms.items()}

    print(
        "stage                        |  seconds | fwd passes | bwd passes | HVPs | peak MiB | median rel. stderr"
    )
    for e, t in tables.items():
        c = t.costs
        print(
            f"traces {e:21s} | {t.seconds:8.1f} | {c['forward_passes']:10.0f} | {c['backward_passes']:10.0f} | "
            f"{t.hvps:4d} | {c['peak_memory_mib']:8.0f} | "
            f"{np.median([row.stderr / abs(row.trace) for row in t if row.trace]):.3f}"
        )
    rows = {f"terms {m}, every key": d for m, d in terms.items()}
    for name, d in rows.items():
        c = d.costs
        print(
            f"{name:28s} | {d.seconds:8.1f} | {c['forward_passes']:10.0f} | "
            f"{c['backward_passes']:10.0f} | {d.hvps:4d} | {c['peak_memory_mib']:8.0f}"
        )
    c = stage.costs
    print(
        f"stage: output, tolerance {args.tolerance:<4} | {stage.seconds:8.1f} | {c['forward_passes']:10.0f} | "
        f"{c['backward_passes']:10.0f} | {stage.hvps:4d} | {c['peak_memory_mib']:8.0f} | "
        f"{stage.interacting} of {sum(1 for _, f in stage.keys if f != 'float')} keys interacting; "
        f"{c['term_forward_passes']:.0f} term passes, {c['onnx_passes']:.0f} onnxruntime passes; own terms "
        f"{stage.summary()['own_terms']}"
    )
    t_old = tables["hutchinson"].seconds + terms["hvp"].seconds
    t_terms = tables["gauss_newton"].seconds + c["term_seconds"]
    t_new = tables["gauss_newton"].seconds + stage.seconds
    print(
        f"traces + terms: 0.3 {t_old:.1f} s, this stage {t_terms:.1f} s ({t_old / max(t_terms, 1e-9):.1f}× "
        f"cheaper); with its own terms ({c['own_term_seconds']:.1f} s) {t_new:.1f} s "
        f"({t_old / max(t_new, 1e-9):.1f}× cheaper than 0.3's traces and terms without theirs)"
    )

    # -- ground truth: the exported models in onnxruntime ----------------------------------------
    t0 = time.perf_counter()
    higher = r.task.higher_is_better
    if higher is None:  # the metric's own direction (cosine: higher is better)
        higher = get_metric(r.task.metric_name).higher_is_better

    def metric(model: Any) -> float:
        ev = evaluate_onnx(
            model, ws.evaluation, ws.metric_fn, io=ws.io, threads=args.threads, latency_runs=1, warmup=0
        )
        return float(ev.metric)

    base = metric(exp.float_model)
    rng = np.random.default_rng(args.seed)
    opts = options["gauss_newton"]
    allocs = [
        {f: str(rng.choice([o.format for o in opts.options[f]])) for f in opts.layers}
        for _ in range(args.allocs)
    ]
    drops = []
    for a in allocs:
        got = metric(exp.quantized_model(a))
        drops.append(base - got if higher else got - base)
    t_truth = time.perf_counter() - t0
    scores = {
        "ΣΩ hutchinson": [options["hutchinson"].omega(a) for a in allocs],
        "ΣΩ gauss_newton": [options["gauss_newton"].omega(a) for a in allocs],
        "predict hvp": [terms["hvp"].predict(a) for a in allocs],
        "predict output": [terms["output"].predict(a) for a in allocs],
        "own terms alone": [float(sum(own[stage.index(f, fmt)] for f, fmt in a.items())) for a in allocs],
        "score hvp": [full["hvp"].score(a) for a in allocs],
        "score output": [full["output"].score(a) for a in allocs],
        f"score output, tolerance {args.tolerance} (the search's)": [stage.score(a) for a in allocs],
    }
    print(
        f"ground truth: {len(allocs)} random allocations in onnxruntime ({t_truth:.0f} s); float "
        f"{r.task.metric_name} {base:.4f}, drops {np.min(drops):.4f} to {np.max(drops):.4f} (median "
        f"{np.median(drops):.4f})"
    )
    print("Spearman vs measured drop: " + ", ".join(f"{k} {rho(v, drops):.3f}" for k, v in scores.items()))
    choices(ws, exp, fronts["gauss_newton"], stage, args)
    tr = {e: [row.avg_trace for row in t] for e, t in tables.items()}
    print(
        f"traces: Spearman of the layers' average traces, hutchinson vs gauss_newton "
        f"{rho(tr['hutchinson'], tr['gauss_newton']):.3f}; model total {time.perf_counter() - t_model:.0f} s"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="resnet20,mnist,minilm")
    ap.add_argument("--allocs", type=int, default=60)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--numerics", choices=("weights", "exported"), default="exported")
    ap.add_argument(
        "--tolerance", type=float, default=INTERACTION_TOLERANCE, help="search.dependency_tolerance"
    )
    ap.add_argument("--max-probes", type=int, default=16, help="trace probes per layer, both estimators")
    ap.add_argument("--minilm-calibration", type=int, default=16)
    ap.add_argument("--minilm-evaluation", type=int, default=64)
    ap.add_argument("--minilm-max-probes", type=int, default=16)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    for key in args.models.split(","):
        run(key, args)
    print(f"\ntotal {time.perf_counter() - t0:.0f} s on {args.threads} thread(s)")


if __name__ == "__main__":
    main()
