"""The stages in order: load → analyze → frontier → dependencies → search → export → report.

The CLI and the Python API both go through these functions, so there is one code path.

Example:
    >>> import hawqtool
    >>> result = hawqtool.quantize(recipe="tiny", out="out/tiny")   # doctest: +SKIP
    >>> result.budget_met, result.model_path                        # doctest: +SKIP
    (True, PosixPath('out/tiny/model.onnx'))
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from hawqtool import __version__
from hawqtool.cache import cache_dir, settings_key
from hawqtool.errors import BudgetNotMetError, ExportError, UsageError
from hawqtool.prepare import Batch, PreparedModel, prepare_model
from hawqtool.recipe import Recipe, load_recipe
from hawqtool.tasks import LossFn, MetricFn, import_object, resolve_loss, resolve_metric
from hawqtool.types import (
    FLOAT,
    DataSplits,
    Frontier,
    FrontierPoint,
    OptionTable,
    SensitivityTable,
    write_json_atomic,
)

log = logging.getLogger(__name__)

SPLITS = ("calibration", "evaluation", "test")


# --------------------------------------------------------------------------------------------
# Loading the user's model and data
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Workspace:
    """Everything the stages share: the recipe, the prepared model, the materialised splits."""

    recipe: Recipe
    prepared: PreparedModel
    calibration: list[Batch]
    evaluation: list[Batch]
    test: list[Batch]
    loss_fn: LossFn
    metric_fn: MetricFn

    def split(self, name: str) -> list[Batch]:
        if name not in SPLITS:
            raise UsageError(f"unknown split {name!r}; allowed: {', '.join(SPLITS)}")
        return getattr(self, name)  # type: ignore[no-any-return]


def _as_tensor(x: Any, what: str) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x
    if isinstance(x, np.ndarray):
        return torch.from_numpy(x)
    raise UsageError(f"{what} is a {type(x).__name__}; batches must be (inputs, targets) tensors")


def _materialise(batches: Iterable[Any] | None, name: str) -> list[Batch]:
    if batches is None:
        raise UsageError(f"the data has no {name!r} split; it needs {', '.join(SPLITS)}")
    out = []
    for i, b in enumerate(batches):
        if not isinstance(b, (tuple, list)) or len(b) != 2:
            raise UsageError(f"{name} batch {i} is not an (inputs, targets) pair")
        out.append(
            (_as_tensor(b[0], f"{name} batch {i} inputs"), _as_tensor(b[1], f"{name} batch {i} targets"))
        )
    if not out:
        raise UsageError(f"the {name} split is empty: give at least one (inputs, targets) batch")
    return out


def _split_of(data: Any, name: str) -> Any:
    if isinstance(data, Mapping):
        return data.get(name)
    return getattr(data, name, None)


def _load_model(recipe: Recipe) -> nn.Module:
    if recipe.model is None:
        raise UsageError("the recipe has no model section: give model.factory ('package.module:callable')")
    factory = import_object(recipe.model.factory, what="model.factory")
    try:
        model = factory(**recipe.model.kwargs)
    except TypeError as e:
        raise UsageError(f"model.factory {recipe.model.factory!r} rejected model.kwargs: {e}") from e
    if not isinstance(model, nn.Module):
        raise UsageError(
            f"model.factory {recipe.model.factory!r} returned {type(model).__name__}, not a torch.nn.Module"
        )
    if recipe.model.checkpoint is not None:
        path = recipe.model.checkpoint
        if not path.is_file():
            raise UsageError(f"model.checkpoint {str(path)!r} does not exist")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            model.load_state_dict(state)
        except (RuntimeError, OSError, ValueError) as e:
            raise UsageError(f"model.checkpoint {str(path)!r} does not load into the model: {e}") from e
    return model.eval()


def _load_data(recipe: Recipe) -> Any:
    if recipe.data is None:
        raise UsageError("the recipe has no data section: give data.factory ('package.module:callable')")
    factory = import_object(recipe.data.factory, what="data.factory")
    try:
        return factory(**recipe.data.kwargs)
    except TypeError as e:
        raise UsageError(f"data.factory {recipe.data.factory!r} rejected data.kwargs: {e}") from e


def _as_recipe(recipe: Recipe | str | Path | None, overrides: Sequence[str]) -> Recipe:
    if recipe is None:
        return load_recipe("default", overrides)
    if isinstance(recipe, Recipe):
        if overrides:
            from hawqtool.recipe import apply_overrides, parse_recipe

            return parse_recipe(apply_overrides(recipe.to_dict(), overrides))
        return recipe
    return load_recipe(recipe, overrides)


def load(
    recipe: Recipe | str | Path | None = None,
    *,
    model: nn.Module | None = None,
    data: DataSplits | Mapping[str, Any] | None = None,
    overrides: Sequence[str] = (),
) -> Workspace:
    """Resolve a recipe's model, data, loss and metric, and prepare the model (BN folded, layers found).

    ``model`` / ``data`` given here take the place of the recipe's factories.
    """
    if isinstance(recipe, Workspace):
        return recipe
    r = _as_recipe(recipe, overrides)
    model = model if model is not None else _load_model(r)
    if not isinstance(model, nn.Module):
        raise UsageError(f"model is a {type(model).__name__}, not a torch.nn.Module")
    data = data if data is not None else _load_data(r)
    splits = {name: _materialise(_split_of(data, name), name) for name in SPLITS}
    loss_fn = resolve_loss(r.task.loss)
    metric_fn = resolve_metric(r.task.metric)
    prepared = prepare_model(model, splits["calibration"][0][0], pins=r.allocation.pins)
    return Workspace(
        r, prepared, splits["calibration"], splits["evaluation"], splits["test"], loss_fn, metric_fn
    )


# --------------------------------------------------------------------------------------------
# Stages
# --------------------------------------------------------------------------------------------


def analyze(
    recipe: Workspace | Recipe | str | Path | None = None,
    *,
    progress: bool = True,
    overrides: Sequence[str] = (),
) -> SensitivityTable:
    """Per-layer Hutchinson Hessian traces (cached by a fingerprint of weights, data and settings)."""
    from hawqtool.hessian import estimate_traces

    ws = recipe if isinstance(recipe, Workspace) else load(recipe, overrides=overrides)
    h = ws.recipe.hessian
    return estimate_traces(
        ws.prepared,
        ws.calibration,
        ws.loss_fn,
        seed=h.seed,
        rel_tol=h.rel_tol,
        min_probes=h.min_probes,
        max_probes=h.max_probes,
        device=h.device,
        sub_batch=h.sub_batch,
        progress=progress,
        cache_dir=cache_dir() / "hessian",
    )


def frontier(
    recipe: Workspace | Recipe | str | Path | None = None,
    *,
    table: SensitivityTable | None = None,
    progress: bool = True,
    overrides: Sequence[str] = (),
) -> tuple[OptionTable, Frontier]:
    """Options per layer × format (Ω, cost) and their exact Pareto frontier."""
    from hawqtool.frontier import pareto_frontier
    from hawqtool.sensitivity import build_options

    ws = recipe if isinstance(recipe, Workspace) else load(recipe, overrides=overrides)
    table = table or analyze(ws, progress=progress)
    a = ws.recipe.allocation
    weights = dict(zip(ws.prepared.fqns, ws.prepared.weights(), strict=True))
    options = build_options(
        ws.prepared.layers,
        table,
        weights,
        formats=a.formats,
        cost=a.cost,
        storage=ws.recipe.export.int4_storage,
        clip_search=a.clip_search,
        opset=ws.recipe.export.opset,
    )
    return options, pareto_frontier(options, cost_grid=a.cost_grid, omega_grid=a.omega_grid)


def exporter(ws: Workspace) -> Any:
    """A QDQ exporter for the workspace's model, activations calibrated on its calibration split."""
    from hawqtool.export import QDQExporter

    e = ws.recipe.export
    return QDQExporter.build(
        ws.prepared,
        ws.calibration,
        opset=e.opset,
        calibration_method=e.calibration,
        int4_storage=e.int4_storage,
        clip_search=ws.recipe.allocation.clip_search,
    )


def uniform_allocation(ws: Workspace, fmt: str) -> dict[str, str]:
    """Every layer in ``fmt``, except pinned layers, which keep their pin."""
    return {layer.fqn: layer.pinned or fmt for layer in ws.prepared.layers}


def export(
    recipe: Workspace | Recipe | str | Path | None,
    allocation: Mapping[str, str],
    path: str | Path,
    *,
    overrides: Sequence[str] = (),
) -> Path:
    """Export one allocation (fqn → format) of the recipe's model as QDQ ONNX to ``path``."""
    ws = recipe if isinstance(recipe, Workspace) else load(recipe, overrides=overrides)
    return exporter(ws).export(allocation, Path(path), metadata={"hawqtool.recipe": ws.recipe.name})  # type: ignore[no-any-return]


def evaluate(
    model_path: str | Path,
    recipe: Workspace | Recipe | str | Path | None,
    *,
    split: str = "test",
    overrides: Sequence[str] = (),
) -> Any:
    """Evaluate an ONNX model in onnxruntime on one of the recipe's splits (metric, latency, size)."""
    from hawqtool.evaluate import evaluate_onnx

    ws = recipe if isinstance(recipe, Workspace) else load(recipe, overrides=overrides)
    path = Path(model_path)
    if not path.is_file():
        raise UsageError(f"model {str(path)!r} does not exist")
    ev = ws.recipe.evaluate
    return evaluate_onnx(
        path, ws.split(split), ws.metric_fn, threads=ev.threads, latency_runs=ev.latency_runs
    )


# --------------------------------------------------------------------------------------------
# The main job
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class QuantizeResult:
    """What :func:`quantize` returns: where the model and report are, and the report itself."""

    out: Path
    model_path: Path | None  # None when the budget was not met
    report_path: Path
    budget_met: bool
    report: Mapping[str, Any] = field(repr=False)


def _versions() -> dict[str, str]:
    import onnx
    import onnxruntime

    return {
        "hawqtool": __version__,
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
    }


def _dependency_model(ws: Workspace, options: OptionTable, table: SensitivityTable, progress: bool) -> Any:
    from hawqtool.dependency import DependencyModel, build_dependency_model
    from hawqtool.hvp import SplitHessian

    key = settings_key(table.fingerprint, options.to_dict(), ws.recipe.allocation.clip_search, "dep-v2")
    path = cache_dir() / "dependency" / f"{key}.json"
    if path.is_file():
        log.info("dependency terms: cached (%s)", path)
        return DependencyModel.from_dict(json.loads(path.read_text()))
    hessian = SplitHessian(ws.prepared, ws.calibration, ws.loss_fn, device=ws.recipe.hessian.device)
    dep = build_dependency_model(
        hessian, ws.prepared, options, clip_search=ws.recipe.allocation.clip_search, progress=progress
    )
    write_json_atomic(path, dep.to_dict())
    return dep


def quantize(
    model: nn.Module | None = None,
    data: DataSplits | Mapping[str, Any] | None = None,
    *,
    recipe: Recipe | str | Path | None = None,
    out: str | Path = "hawqtool-out",
    overrides: Sequence[str] = (),
    progress: bool = True,
) -> QuantizeResult:
    """The main job: the cheapest mixed-precision ONNX model whose metric stays within the budget.

    analyze (Hessian traces) → exact Pareto frontier of (cost, ΣΩ) → inter-layer dependency terms
    re-score it → bisection, each probe a QDQ export evaluated in onnxruntime on the evaluation
    split → the chosen model re-checked on the test split → ``model.onnx`` and the reports in
    ``out``.

    Args:
        model: a trained module (else the recipe's ``model.factory``).
        data: splits ``calibration``, ``evaluation``, ``test`` (else the recipe's ``data.factory``).
        recipe: a :class:`Recipe`, a YAML path or a built-in name (default: ``default``).
        out: output folder.
        overrides: ``dotted.key=value`` recipe overrides.
        progress: tqdm progress bars.

    Raises:
        UsageError: bad recipe, model or data (exit 2).
        BudgetNotMetError: even the most precise candidate misses the budget (exit 3); the
            reports are written first, without a model.
        ExportError: export or onnxruntime failure (exit 4).
    """
    from hawqtool.dependency import make_repair
    from hawqtool.evaluate import evaluate_onnx
    from hawqtool.frontier import uniform_points
    from hawqtool.plots import plot_frontier
    from hawqtool.report import (
        frontier_rows,
        sensitivity_rows,
        write_frontier_csv,
        write_report,
        write_sensitivity,
    )
    from hawqtool.search import bisect

    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    ws = load(recipe, model=model, data=data, overrides=overrides)
    r = ws.recipe
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ExportError(f"cannot create output folder {str(out)!r}: {e}") from e
    # A stale model from an earlier run must never pass for this run's result.
    (out / "model.onnx").unlink(missing_ok=True)

    t = time.perf_counter()
    table = analyze(ws, progress=progress)
    timings["hessian"] = time.perf_counter() - t
    write_sensitivity(table, out)

    t = time.perf_counter()
    options, front = frontier(ws, table=table, progress=progress)
    timings["frontier"] = time.perf_counter() - t
    write_frontier_csv(front, out)

    candidates: Sequence[FrontierPoint] = front.points
    dep = None
    if r.search.dependency:
        from hawqtool.dependency import candidates_for_search, rescore

        t = time.perf_counter()
        dep = _dependency_model(ws, options, table, progress)
        front = rescore(front, dep)
        candidates = candidates_for_search(front, dep, options)
        timings["dependency"] = time.perf_counter() - t
        write_frontier_csv(front, out)

    t = time.perf_counter()
    exp = exporter(ws)
    ev = r.evaluate

    def run(model_or_path: Any, split: str, *, timed: bool = False) -> Any:
        # Latency is reported for the baseline and the result only; search probes and test-split
        # checks need the metric, so they skip the repeated timing runs.
        runs = ev.latency_runs if timed else 1
        return evaluate_onnx(
            model_or_path, ws.split(split), ws.metric_fn, threads=ev.threads, latency_runs=runs
        )

    base_eval = run(exp.float_model, "evaluation", timed=True)
    base_test = run(exp.float_model, "test")
    timings["baseline"] = time.perf_counter() - t
    budget = r.budget_spec

    def measure(point: FrontierPoint) -> float:
        return float(run(exp.quantized_model(point.allocation), "evaluation").metric)

    repair_fn = make_repair(candidates, dep, options) if dep is not None and r.search.repair else None

    t = time.perf_counter()
    result = bisect(
        candidates, measure, baseline=base_eval.metric, budget=budget, repair=repair_fn, progress=progress
    )
    timings["search"] = time.perf_counter() - t

    chosen = result.chosen
    res: dict[str, Any] = {
        "metric": None,
        "test_metric": None,
        "latency_ms": None,
        "size_bytes": None,
        "allocation": None,
    }
    model_path = None
    if chosen is not None:
        t = time.perf_counter()
        model_path = exp.export(
            chosen.allocation,
            out / "model.onnx",
            metadata={"hawqtool.recipe": r.name, "hawqtool.budget": json.dumps(r.budget.model_dump())},
        )
        final_eval = run(model_path, "evaluation", timed=True)
        final_test = run(model_path, "test")
        timings["final"] = time.perf_counter() - t
        res = {
            "metric": final_eval.metric,
            "test_metric": final_test.metric,
            "drop": budget.drop(base_eval.metric, final_eval.metric),
            "test_drop": budget.drop(base_test.metric, final_test.metric),
            "test_budget_met": budget.meets(base_test.metric, final_test.metric),
            "latency_ms": final_eval.latency_ms,
            "size_bytes": model_path.stat().st_size,
            "cost": chosen.cost,
            "avg_bits": chosen.avg_bits,
            "sum_omega": chosen.omega,
            "score": chosen.score,
            "allocation": dict(chosen.allocation),
            "formats": {
                f: sum(1 for v in chosen.allocation.values() if v == f)
                for f in (*r.allocation.formats, FLOAT)
                if f in chosen.allocation.values()
            },
        }
    timings["total"] = time.perf_counter() - t0

    report: dict[str, Any] = {
        "name": r.name,
        "baseline": {
            "metric": base_eval.metric,
            "test_metric": base_test.metric,
            "latency_ms": base_eval.latency_ms,
            "size_bytes": base_eval.size_bytes,
        },
        "result": res,
        "budget": {
            **r.budget.model_dump(),
            "higher_is_better": r.task.higher_is_better,
            "metric": r.task.metric,
            "split": "evaluation",
        },
        "budget_met": result.budget_met,
        "search": {
            **result.to_dict(),
            "evaluations": len(result.trials),
            "candidates": len(candidates),
            "dependency": dep is not None,
        },
        "sensitivity": sensitivity_rows(table),
        "hessian": {
            "hvps": table.hvps,
            "seconds": table.seconds,
            "device": table.device,
            "fingerprint": table.fingerprint,
            "rel_tol": table.rel_tol,
        },
        "frontier": frontier_rows(front),
        "cost_model": front.cost_model,
        "seed": r.hessian.seed,
        "timings_s": {k: round(v, 3) for k, v in timings.items()},
        "recipe": r.to_dict(),
        "versions": _versions(),
    }
    uniform = uniform_points(options, r.allocation.formats)
    trials = [(t.cost, options.omega(t.allocation), t.met) for t in result.trials]
    plot_frontier(
        front,
        out / "frontier.png",
        uniform=uniform,
        trials=trials,
        chosen=(chosen.cost, chosen.omega) if chosen is not None else None,
        title=f"{r.name}: Pareto frontier ({front.cost_model} vs ΣΩ)",
    )
    write_report(report, out)
    if not result.budget_met:
        worst = result.trials[0] if result.trials else None
        raise BudgetNotMetError(
            f"budget not met: the most precise candidate drops {r.task.metric} by "
            f"{worst.drop:.4f} ({r.budget.mode}) > max_drop {r.budget.max_drop}; "
            f"baseline {base_eval.metric:.4f}, best {worst.metric:.4f}. Report: {out / 'report.md'}"
            if worst
            else "budget not met"
        )
    assert model_path is not None
    return QuantizeResult(out, model_path, out / "report.json", True, report)
