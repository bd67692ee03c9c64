"""The stages in order: load → analyze → frontier → dependencies → search → export → report.

The CLI and the Python API both go through these functions, so there is one code path. Loading and
the checks on the float model live in :mod:`hawqtool.workspace`, the latency refinement in
:mod:`hawqtool.refine`, versions and cache keys in :mod:`hawqtool.environment`.

Example:
    >>> import hawqtool
    >>> result = hawqtool.quantize(recipe="tiny", out="out/tiny")   # doctest: +SKIP
    >>> result.budget_met, result.model_path                        # doctest: +SKIP
    (True, PosixPath('out/tiny/model.onnx'))
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from torch import nn

from hawqtool import distributed
from hawqtool.activations import ActivationTable, estimate_activation_traces
from hawqtool.cache import cache_dir, settings_key
from hawqtool.costs import CostModel
from hawqtool.dependency import (
    DependencyModel,
    build_dependency_model,
    candidates_for_search,
    exported_single_loss,
    make_repair,
    planned_passes,
    rescore,
)
from hawqtool.distributed import is_main
from hawqtool.environment import dependency_key, versions, warn_without_vnni
from hawqtool.errors import BudgetNotMetError, ExportError, UsageError
from hawqtool.evaluate import Evaluation, batchwise, evaluate_onnx, make_session, run_session
from hawqtool.export import QDQExporter
from hawqtool.files import write_json_atomic
from hawqtool.forecast import Forecast, forecast
from hawqtool.formats import quantizes_nothing
from hawqtool.frontier import pareto_frontier, uniform_models
from hawqtool.gauss_newton import loss_kind
from hawqtool.hessian import estimate_traces
from hawqtool.hvp import SplitHessian
from hawqtool.latency import LatencySettings, LatencyTable, measure_latency
from hawqtool.modelio import batch_size
from hawqtool.options import build_options, offered_formats
from hawqtool.plots import plot_search
from hawqtool.recipe import MEASURED_COST, Recipe
from hawqtool.refine import (
    Refined,
    Retime,
    latency_shortlist,
    refine_latency,
    retimer,
    uniform_quantized_points,
)
from hawqtool.report import (
    budget_not_met_message,
    build_report,
    output_folder,
    write_frontier_csv,
    write_report,
    write_sensitivity,
)
from hawqtool.search import Evaluate, Measurement, bisect, max_evaluations, measure_trial
from hawqtool.types import Budget, DataSplits, Frontier, FrontierPoint, OptionTable, SensitivityTable
from hawqtool.workspace import SPLITS, Workspace, check_float_model, load, onnx_teacher
from hawqtool.workspace import uniform_allocation as uniform_allocation  # a stage of the CLI's export

log = logging.getLogger(__name__)

Stage = Workspace | Recipe | str | Path | None


# --------------------------------------------------------------------------------------------
# Stages
# --------------------------------------------------------------------------------------------


def trace_settings(ws: Workspace) -> dict[str, Any]:
    """The recipe's settings that the weight and the activation trace estimators share."""
    return ws.recipe.hessian.model_dump(include={"seed", "rel_tol", "min_probes", "max_probes", "device"})


def analyze(
    recipe: Stage = None, *, progress: bool = True, overrides: Sequence[str] = ()
) -> SensitivityTable:
    """Per-layer Hessian traces by the recipe's estimator (cached by weights, data and settings)."""
    ws = load(recipe, overrides=overrides)
    return estimate_traces(
        ws.prepared,
        ws.calibration,
        ws.loss_fn,
        **trace_settings(ws),
        **ws.recipe.hessian.model_dump(include={"dtype", "sub_batch", "estimator"}),
        targets=ws.recipe.task.targets,
        progress=progress,
        cache_dir=cache_dir() / "hessian",
    )


def activation_table(ws: Workspace, *, progress: bool = True) -> ActivationTable:
    """Hutchinson traces of the Hessian w.r.t. each activation-quantizable layer's input, times its
    uint8 quantization error (cached by fingerprint, like the weight traces)."""
    return estimate_activation_traces(
        ws.prepared,
        ws.calibration,
        ws.loss_fn,
        **trace_settings(ws),
        progress=progress,
        cache_dir=cache_dir() / "activations",
    )


def exporter(ws: Workspace) -> QDQExporter:
    """A QDQ exporter for the workspace's model, built with its export settings and activations
    calibrated on its calibration split (built once per workspace)."""
    if "exporter" not in ws.cache:
        ws.cache["exporter"] = QDQExporter.build(ws.prepared, ws.calibration, settings=ws.export_settings)
    return ws.cache["exporter"]  # type: ignore[no-any-return]


def latency_table(ws: Workspace, *, progress: bool = True) -> LatencyTable:
    """Per layer and format, the latency the format adds on the recipe's execution provider,
    measured on the exported model at the evaluation batch shape and thread count (cached)."""
    if "latency" not in ws.cache:
        ev = ws.recipe.evaluate
        ws.cache["latency"] = measure_latency(
            exporter(ws),
            ws.io.feeds(ws.evaluation[0][0]),
            formats=offered_formats(ws.prepared.layers, ws.recipe.allocation.formats, provider=ev.provider),
            settings=LatencySettings(provider=ev.provider, threads=ev.threads),
            cache_dir=cache_dir() / "latency",
            progress=progress,
        )
    return ws.cache["latency"]  # type: ignore[no-any-return]


def frontier(
    recipe: Stage = None,
    *,
    table: SensitivityTable | None = None,
    progress: bool = True,
    overrides: Sequence[str] = (),
) -> tuple[OptionTable, Frontier]:
    """Options per layer × format (Ω, cost) and their exact Pareto frontier."""
    ws = load(recipe, overrides=overrides)
    table = table or analyze(ws, progress=progress)
    a, s = ws.recipe.allocation, ws.export_settings
    cost: str | CostModel = a.cost
    recorded: dict[str, Any] = {**asdict(s), "cost": a.cost}
    if a.cost == MEASURED_COST:
        lat = latency_table(ws, progress=progress)
        cost, recorded["cost"] = lat.cost_model(), f"latency:{lat.fingerprint}"
    act = activation_table(ws, progress=progress) if ws.recipe.hessian.activations else None
    if act is not None:
        recorded["activation_traces"] = True
    options = build_options(
        ws.prepared.layers,
        table,
        dict(zip(ws.prepared.fqns, ws.prepared.weights(), strict=True)),
        formats=a.formats,
        provider=ws.recipe.evaluate.provider,
        cost=cost,
        settings=s,
        activation_omega=act.omegas() if act is not None else None,
        dynamic_activation_omega=act.dynamic_omegas() if act is not None else None,
    )
    # Recorded in the option table (and so in the dependency cache key): what the options assumed.
    options = replace(options, settings=recorded)
    return options, pareto_frontier(options, cost_grid=a.cost_grid, omega_grid=a.omega_grid)


def dependency_method(ws: Workspace) -> str:
    """The dependency terms' method the recipe runs: ``auto`` is ``output`` for a loss with a known
    output curvature (mse, kl, cross_entropy), else ``hvp``."""
    method = ws.recipe.search.dependency_method
    if method == "auto":
        method = "output" if loss_kind(ws.loss_fn) is not None else "hvp"
    return method


def _dependency_cache(ws: Workspace, options: OptionTable, table: SensitivityTable, method: str) -> Path:
    """Where the dependency terms of these options, by ``method`` and the recipe's interaction
    tolerance, are cached (:func:`hawqtool.environment.dependency_key`)."""
    key = dependency_key(ws.recipe, options, table, settings=ws.export_settings)
    settings = {"dependency_method": method, "tolerance": ws.recipe.search.dependency_tolerance}
    return cache_dir() / "dependency" / f"{settings_key(key, settings)}.json"


def dependencies(
    ws: Workspace, options: OptionTable, table: SensitivityTable, *, progress: bool = True
) -> DependencyModel:
    """Inter-layer second-order terms of the options (cached by :func:`hawqtool.environment.dependency_key`),
    built with the workspace's export settings, as the options and the exporter are."""
    settings = ws.export_settings
    method = dependency_method(ws)
    path = _dependency_cache(ws, options, table, method)
    # Every rank must take the same branch: one computing alone would wait in its collectives.
    if distributed.all_agree(path.is_file(), what="the dependency cache check"):
        log.info("dependency terms: cached (%s)", path)
        return DependencyModel.from_dict(json.loads(path.read_text()))
    hessian = SplitHessian(ws.prepared, ws.calibration, ws.loss_fn, device=ws.recipe.hessian.device)
    numerics = ws.recipe.search.dependency_numerics
    single_loss = None
    if numerics == "exported":
        ev = ws.recipe.evaluate
        # The exporter is built on the first measurement, inside the stage's failure handling, and
        # kept in the workspace for the search.
        data, io = ws.calibration, ws.io
        single_loss = exported_single_loss(
            lambda: exporter(ws), data, ws.loss_fn, io=io, threads=ev.threads, provider=ev.provider
        )
    dep = build_dependency_model(
        hessian,
        ws.prepared,
        options,
        clip_search=settings.clip_search,
        single_loss=single_loss,
        numerics=numerics,
        method=method,
        tolerance=ws.recipe.search.dependency_tolerance,
        seed=ws.recipe.hessian.seed,
        progress=progress,
    )
    if is_main():
        write_json_atomic(path, dep.to_dict())
    return dep


def search(
    candidates: Sequence[FrontierPoint],
    evaluate: Evaluate,
    *,
    options: OptionTable,
    budget: Budget,
    baseline: float,
    reference: Measurement | None = None,
    dependency: DependencyModel | None = None,
    repair: bool = True,
    gap_points: Sequence[FrontierPoint] = (),
    seed: int = 0,
    latency: LatencyTable | None = None,
    retime: Retime | None = None,
    progress: bool = True,
    cost_tolerance: float = 0.0,
) -> Refined:
    """The cheapest candidate whose metric, ``evaluate``\\ d (a QDQ export scored in onnxruntime), meets
    ``budget``: bisection along ``candidates`` (failing probes repaired with the ``dependency``
    terms when ``repair``), then, with a ``latency`` table (every probe's measurement timed), the
    latency refinement (:func:`hawqtool.refine.refine_latency`: the uniform integer models probed
    too, the choice made on measured latency, re-timed together by ``retime``). A choice that keeps
    every layer float is no quantization result: it is dropped (``reason`` ``only-float``).

    Example:
        >>> from hawqtool.types import LayerOption
        >>> row = (LayerOption("int4", 1.0, 2.0, 2.0), LayerOption("int8", 2.0, 1.0, 1.0),
        ...        LayerOption("float", 4.0, 0.0, 0.0))
        >>> opts = OptionTable(("fc",), {"fc": row}, "size")
        >>> points = pareto_frontier(opts).points
        >>> budget = Budget(0.05, "absolute", confidence=0.0)
        >>> metric = {"int4": 0.80, "int8": 0.88, "float": 0.90}
        >>> found = search(points, lambda p: metric[p.allocation["fc"]], options=opts, budget=budget,
        ...                baseline=0.90, progress=False)
        >>> dict(found.result.chosen.allocation), found.result.budget_met
        ({'fc': 'int8'}, True)
    """
    result = bisect(
        candidates,
        evaluate,
        baseline=baseline,
        budget=budget,
        repair=make_repair(candidates, dependency, options) if dependency is not None and repair else None,
        progress=progress,
        reference=reference,
        gap_points=gap_points,
        seed=seed,
        # The uniform integer models are timed too: latency is not additive, and they share one
        # integer region with no requantize boundaries, which per-layer deltas under-credit.
        extra=uniform_quantized_points(options) if latency is not None else {},
        # Never costlier than a one-line uniform model that meets the budget (latency: timed above).
        uniform=uniform_models(options) if latency is None else {},
        cost_tolerance=cost_tolerance,
    )
    refined = Refined(result)
    if latency is not None:

        def check(point: FrontierPoint) -> Any:
            index = candidates.index(point) if point in candidates else -1
            return measure_trial(
                point,
                evaluate,
                baseline=baseline,
                budget=budget,
                reference=reference,
                seed=seed,
                index=index,
                note="shortlist",
            )

        shortlist = latency_shortlist(candidates, result, options=options)
        refined = refine_latency(result, latency, options, retime, shortlist=shortlist, check=check)
    chosen = refined.result.chosen
    if chosen is not None and quantizes_nothing(chosen.allocation):
        dropped = replace(
            refined.result, chosen=None, chosen_index=None, budget_met=False, reason="only-float"
        )
        refined = replace(refined, result=dropped)
    return refined


def export(
    recipe: Stage, allocation: Mapping[str, str], path: str | Path, *, overrides: Sequence[str] = ()
) -> Path:
    """Export one allocation (fqn → format) of the recipe's model as QDQ ONNX to ``path``."""
    ws = load(recipe, overrides=overrides)
    return exporter(ws).export(allocation, Path(path), metadata={"hawqtool.recipe": ws.recipe.name})


def evaluate(
    model_path: str | Path, recipe: Stage, *, split: str = "test", overrides: Sequence[str] = ()
) -> Evaluation:
    """Evaluate an ONNX model in onnxruntime on one of the recipe's splits (metric, latency, size)."""
    ws = load(recipe, overrides=overrides)
    path = Path(model_path)
    if not path.is_file():
        raise UsageError(f"model {str(path)!r} does not exist")
    return _run(ws, path, split, timed=True)


def _run(ws: Workspace, model: Any, split: str, *, timed: bool = False) -> Evaluation:
    """``model`` (a path or ModelProto) scored on ``split``; latency timed only when ``timed``: search
    probes and test-split checks need the metric, so they skip the repeated timing runs."""
    ev = ws.recipe.evaluate
    return evaluate_onnx(
        model,
        ws.split(split),
        ws.metric_fn,
        io=ws.io,
        threads=ev.threads,
        latency_runs=ev.latency_runs if timed else 1,
        provider=ev.provider,
        per_batch=batchwise(ws.recipe.task.metric_name),
    )


def _baseline(ws: Workspace, exp: QDQExporter) -> tuple[Workspace, Evaluation, Evaluation]:
    """The float ONNX model on the evaluation (timed) and test splits; with teacher targets the
    workspace is re-targeted on it first (:func:`hawqtool.workspace.onnx_teacher`)."""
    if ws.recipe.task.targets == "model":
        ws = onnx_teacher(ws, exp.float_model)
    return ws, _run(ws, exp.float_model, "evaluation", timed=True), _run(ws, exp.float_model, "test")


def _measure(ws: Workspace, exp: QDQExporter, *, timed: bool, float_model: Evaluation) -> Evaluate:
    """A probe's measurement: its QDQ model scored on the evaluation split (and timed, if ``timed``).
    A point that quantizes nothing is the float model, already measured (``float_model``): on a large
    model the search's first probe is often that, and an evaluation can take minutes."""

    def measure(point: FrontierPoint) -> Measurement:
        if quantizes_nothing(point.allocation) and not timed:
            return Measurement.of(float_model)
        e = _run(ws, exp.quantized_model(point.allocation), "evaluation", timed=timed)
        return replace(Measurement.of(e), latency_ms=e.latency_ms if timed else None)

    return measure


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
    re-score it → search (bisection, each probe a QDQ export evaluated in onnxruntime on the
    evaluation split) → the chosen model re-checked on the test split → ``model.onnx`` and the
    reports in ``out``.

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
    timings: dict[str, float] = {}
    clock = functools.partial(_timed, timings)
    t0 = time.perf_counter()
    ws = load(recipe, model=model, data=data, overrides=overrides)
    r = ws.recipe
    checked = check_float_model(ws)  # garbage in stops here, before minutes of Hessian work
    out = output_folder(Path(out))
    with clock("hessian"):
        table = analyze(ws, progress=progress)
    if is_main():
        write_sensitivity(table, out)
    with clock("frontier"):
        options, front = frontier(ws, table=table, progress=progress)
    if is_main():
        write_frontier_csv(front, out)
    with clock("forecast"):  # builds the exporter every later stage uses, and times one pass
        fc = _forecast(ws, table, options, front) if is_main() else None
    if fc is not None:
        log.info(
            "forecast (%.3g s per torch pass over the calibration split, %.3g ms per sample in onnxruntime): %s",
            fc.pass_seconds,
            1e3 * fc.onnx_seconds_per_sample,
            fc.describe(),
        )
    dep, candidates = None, front.points
    if r.search.dependency:
        with clock("dependency"):
            dep = dependencies(ws, options, table, progress=progress)
            front = rescore(front, dep)
            candidates = candidates_for_search(front, dep, options)
        if is_main():
            write_frontier_csv(front, out)
    if not is_main():
        # Under torchrun the other ranks only share the Hessian stages; rank 0 searches and writes.
        return QuantizeResult(out, None, out / "report.json", False, {})
    offered = offered_formats(ws.prepared.layers, r.allocation.formats, provider=r.evaluate.provider)
    warn_without_vnni(offered)
    with clock("baseline"):
        exp = exporter(ws)
        ws, base_eval, base_test = _baseline(ws, exp)
    # With the latency cost every probe is timed: latency is not exactly additive, so the choice
    # among the candidates within budget is made on measured, not predicted, latency.
    timed = r.allocation.cost == MEASURED_COST
    with clock("search"):
        refined = search(
            candidates,
            _measure(ws, exp, timed=timed, float_model=base_eval),
            options=options,
            budget=checked.budget,
            baseline=base_eval.metric,
            reference=Measurement.of(base_eval),
            dependency=dep,
            repair=r.search.repair,
            gap_points=front.points,
            seed=r.hessian.seed,
            latency=latency_table(ws) if timed else None,
            retime=retimer(exp, ws.io.feeds(ws.evaluation[0][0]), settings=r.evaluate),
            progress=progress,
            cost_tolerance=r.search.cost_tolerance,
        )
    result, chosen = refined.result, refined.result.chosen
    final = model_path = None
    if chosen is not None:
        with clock("final"):
            meta = {"hawqtool.recipe": r.name, "hawqtool.budget": json.dumps(r.budget.model_dump())}
            model_path = exp.export(chosen.allocation, out / "model.onnx", metadata=meta)
            final = (_run(ws, model_path, "evaluation", timed=True), _run(ws, model_path, "test"))
    timings["total"] = time.perf_counter() - t0
    report = build_report(
        recipe=r,
        budget=checked.budget,
        prepared=ws.prepared,
        table=table,
        front=front,
        result=result,
        baseline=(base_eval, base_test),
        final=final,
        chosen=chosen,
        candidates=len(candidates),
        dependency=dep is not None,
        dependency_stage=dep.summary() if dep is not None else None,
        timings=timings,
        versions=versions(),
        model_path=model_path,
        latency=refined if timed else None,
        options=options,
    )
    plot_search(
        front,
        out / "frontier.png",
        options=options,
        result=result,
        latency=refined.latency,
        title=f"{r.name}: Pareto frontier ({front.cost_model} vs ΣΩ)",
        formats=offered,
    )
    if fc is not None:
        report["forecast_s"] = fc.to_dict()
    write_report(report, out)
    if not result.budget_met:
        raise BudgetNotMetError(budget_not_met_message(report, out / "report.md"))
    assert model_path is not None
    return QuantizeResult(out, model_path, out / "report.json", True, report)


def _forecast(
    ws: Workspace, table: SensitivityTable, options: OptionTable, front: Frontier
) -> Forecast | None:
    """The rest of the run forecast from the trace stage's pass time and one onnxruntime pass of the
    float model (:mod:`hawqtool.forecast`); the exporter it builds for that is the one every later
    stage uses (built once per workspace)."""
    r = ws.recipe
    dependency, method = r.search.dependency, dependency_method(ws)
    cached = dependency and _dependency_cache(ws, options, table, method).is_file()
    samples = {name: sum(batch_size(x) for x, _ in ws.split(name)) for name in SPLITS}
    torch_passes, onnx_passes = (
        planned_passes(
            options,
            method=method,
            exported=r.search.dependency_numerics == "exported",
            tolerance=r.search.dependency_tolerance,
        )
        if dependency and not cached
        else (0, 0)
    )
    return forecast(
        table.costs,
        calibration=samples["calibration"],
        evaluation=samples["evaluation"],
        test=samples["test"],
        torch_passes=torch_passes,
        onnx_passes=onnx_passes,
        # Bisection (and repair), a frontier gap's own bisection, the uniform models below the choice.
        evaluations=max_evaluations(len(front.points), repair=dependency and r.search.repair)
        + math.ceil(math.log2(len(front.points) + 1))
        + len(uniform_models(options)),
        onnx_seconds_per_sample=_onnx_seconds_per_sample(ws),
    )


def _onnx_seconds_per_sample(ws: Workspace) -> float | None:
    """onnxruntime's seconds per sample on the float model: the second run of the first calibration
    batch (the first warms the session up). ``None`` if the export or the run fails: the stage that
    needs them reports that failure, under torch.distributed to every rank."""
    try:
        ev = ws.recipe.evaluate
        session = make_session(exporter(ws).float_model, threads=ev.threads, provider=ev.provider)
        x = ws.calibration[0][0]
        feed = ws.io.feeds(x)
        run_session(session, feed)
        t = time.perf_counter()
        run_session(session, feed)
        return (time.perf_counter() - t) / batch_size(x)
    except (ExportError, UsageError) as e:
        log.debug("forecast: no onnxruntime timing (%s)", e)
        return None


@contextlib.contextmanager
def _timed(timings: dict[str, float], stage: str) -> Iterator[None]:
    """``with _timed(timings, stage):`` adds the stage's wall time to ``timings[stage]``."""
    t = time.perf_counter()
    try:
        yield
    finally:
        timings[stage] = timings.get(stage, 0.0) + time.perf_counter() - t
