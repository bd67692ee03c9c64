"""0.3's sensitivity (Hutchinson traces + HVP dependency terms) against 0.4's (Gauss–Newton traces +
output-space dependency terms), side by side in one run, on the same data and allocations.

Per model (a built-in recipe, run on the CPU):

- costs: seconds and passes over the calibration split (forward / backward) of the traces by each
  estimator (``hessian.estimator``: ``hutchinson``, ``gauss_newton``) and of the dependency terms by
  each method (``search.dependency_method``: ``hvp``, ``output``);
- ranking: over ``--allocs`` random allocations (each layer's format drawn uniformly from the recipe's
  formats), the Spearman correlation of each score with the metric drop of the exported QDQ model
  measured in onnxruntime on the evaluation split (paired: the same samples for every allocation):
  ΣΩ from either estimator's traces; the second-order prediction gᵀΔ + ½ΔᵀHΔ of either method
  (``predict``); and the search's score (``score``: measured single-layer changes in context plus the
  rescaled cross terms of either method; the measurements are shared, ``--numerics``).

Models: ``resnet20`` (ResNet-20 on digits, labels), ``mnist`` (the small CNN on MNIST-5k, labels),
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

from hawqtool import pipeline
from hawqtool.dependency import DependencyModel, build_dependency_model, candidates_for_search, rescore
from hawqtool.evaluate import evaluate_onnx
from hawqtool.export import QDQExporter
from hawqtool.hessian import estimate_traces
from hawqtool.hvp import SplitHessian
from hawqtool.quantizer import quant_error
from hawqtool.search import Measurement
from hawqtool.singles import (
    exported_single_loss,
    measure_jobs,
    middle_format,
    single_jobs,
    weights_single_loss,
)
from hawqtool.tasks import get_metric
from hawqtool.types import OptionTable, SensitivityTable
from hawqtool.workspace import check_float_model, onnx_teacher

RECIPES = {"resnet20": "resnet20-digits", "mnist": "small-cnn-mnist", "minilm": "minilm"}


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


def measured_singles(
    ws: Any, hessian: SplitHessian, options: OptionTable, numerics: str, exp: QDQExporter, threads: int
) -> tuple[np.ndarray, np.ndarray | None, dict[str, str], int]:
    """The single-layer changes in context the score uses (shared by both methods), as the
    dependency stage measures them; and the passes they took."""
    keys = tuple((f, o.format) for f in options.layers for o in options.options[f])
    index = {k: i for i, k in enumerate(keys)}
    clip = ws.export_settings.clip_search
    deltas = {
        (f, fmt): quant_error(ws.prepared.weight(f), fmt, clip_search=clip)
        for f, fmt in keys
        if fmt != "float"
    }
    context = {f: middle_format(options, f) for f in options.layers}
    jobs, slots = single_jobs(options, context, deltas, index)
    torch_loss = weights_single_loss(hessian, ws.prepared, deltas)
    weights = measure_jobs(jobs, slots, torch_loss, len(keys), local=False, device=hessian.device)
    if numerics == "weights":
        return weights, None, context, len(jobs)
    onnx = exported_single_loss(lambda: exp, ws.calibration, ws.loss_fn, io=ws.io, threads=threads)
    exported = measure_jobs(jobs, slots, onnx, len(keys), local=True, device=hessian.device)
    return exported, weights, context, 2 * len(jobs)


def exported_excess(
    ws: Any, options: OptionTable, exp: QDQExporter, dep: DependencyModel, args: Any
) -> dict[tuple[str, str], float]:
    """Per quantized key, out of context (every other layer float): the exported model's calibration
    loss change minus the weight-only one of the output terms' own passes (``own_loss``): what
    activation quantization and the kernels add. Empty under ``--numerics weights``."""
    if args.numerics != "exported" or dep.own_loss is None:
        return {}
    loss = exported_single_loss(lambda: exp, ws.calibration, ws.loss_fn, io=ws.io, threads=args.threads)
    t0 = time.perf_counter()
    base = loss({})
    out = {
        (f, o.format): loss({f: o.format}) - base - float(dep.own_loss[dep.index(f, o.format)])
        for f in options.layers
        for o in options.options[f]
        if o.format != "float"
    }
    print(
        f"exported single-layer changes out of context: {len(out) + 1} onnxruntime passes, {time.perf_counter() - t0:.1f} s"
    )
    return out


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
    terms = {
        m: build_dependency_model(
            hessian,
            ws.prepared,
            options[e],
            clip_search=clip,
            measure_singles=False,
            method=m,
            progress=False,
        )
        for m, e in (("hvp", "hutchinson"), ("output", "gauss_newton"))
    }
    exp = QDQExporter.build(ws.prepared, ws.calibration, settings=ws.export_settings)
    t0 = time.perf_counter()
    measured, scale, context, passes = measured_singles(
        ws, hessian, options["gauss_newton"], args.numerics, exp, args.threads
    )
    t_singles = time.perf_counter() - t0
    full: dict[str, DependencyModel] = {
        # Exported numerics: the HVP terms take their scale from the torch singles, the output terms
        # from their own passes (as the dependency stage does).
        m: replace(
            d,
            measured=measured,
            scale_measured=d.own_loss if m == "output" and scale is not None else scale,
            context=context,
        )
        for m, d in terms.items()
    }

    print(
        "stage                     |  seconds | fwd passes | bwd passes | HVPs | peak MiB | median rel. stderr"
    )
    for e, t in tables.items():
        c = t.costs
        print(
            f"traces {e:18s} | {t.seconds:8.1f} | {c['forward_passes']:10.0f} | {c['backward_passes']:10.0f} | "
            f"{t.hvps:4d} | {c['peak_memory_mib']:8.0f} | "
            f"{np.median([row.stderr / abs(row.trace) for row in t if row.trace]):.3f}"
        )
    for m, d in terms.items():
        c = d.costs
        print(
            f"dependency terms {m:8s} | {d.seconds:8.1f} | {c['forward_passes']:10.0f} | "
            f"{c['backward_passes']:10.0f} | {d.hvps:4d} | {c['peak_memory_mib']:8.0f}"
        )
    print(f"singles ({args.numerics}, shared) | {t_singles:8.1f} | {passes:10d} |          0 |    0 |")
    t_old = tables["hutchinson"].seconds + terms["hvp"].seconds
    t_new = tables["gauss_newton"].seconds + terms["output"].seconds
    print(f"traces + terms: 0.3 {t_old:.1f} s, 0.4 {t_new:.1f} s ({t_old / max(t_new, 1e-9):.1f}× cheaper)")

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
        "score hvp": [full["hvp"].score(a) for a in allocs],
        "score output": [full["output"].score(a) for a in allocs],
        **(
            {
                # Candidate score: the output-space prediction (weights) plus each key's excess loss
                # in the exported model, measured out of context (1 + keys onnxruntime passes).
                "predict output + exported excess": [
                    terms["output"].predict(a) + sum(excess.get((f, fmt), 0.0) for f, fmt in a.items())
                    for a in allocs
                ]
            }
            if (excess := exported_excess(ws, options["gauss_newton"], exp, terms["output"], args))
            else {}
        ),
    }
    print(
        f"ground truth: {len(allocs)} random allocations in onnxruntime ({t_truth:.0f} s); float "
        f"{r.task.metric_name} {base:.4f}, drops {np.min(drops):.4f} to {np.max(drops):.4f} (median "
        f"{np.median(drops):.4f})"
    )
    print("Spearman vs measured drop: " + ", ".join(f"{k} {rho(v, drops):.3f}" for k, v in scores.items()))
    choices(ws, exp, fronts["gauss_newton"], full["output"], args)
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
    ap.add_argument("--numerics", choices=("weights", "exported"), default="weights")
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
