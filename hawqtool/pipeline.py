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
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from hawqtool import __version__, modelio
from hawqtool.cache import cache_dir, settings_key
from hawqtool.distributed import is_main
from hawqtool.errors import BudgetNotMetError, ExportError, UsageError
from hawqtool.files import write_json_atomic
from hawqtool.formats import is_quantized, parse_format, quantizes_nothing
from hawqtool.modelio import Batch, ModelIO
from hawqtool.prepare import PreparedModel, prepare_model
from hawqtool.recipe import Recipe, load_recipe
from hawqtool.tasks import LossFn, MetricFn, import_object, resolve_loss, resolve_metric
from hawqtool.types import (
    Budget,
    DataSplits,
    Frontier,
    FrontierPoint,
    OptionTable,
    SensitivityTable,
    Trial,
    allocation_key,
    average_bits,
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
    #: Built once, shared by the stages that need them (the exporter, the latency table).
    cache: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def split(self, name: str) -> list[Batch]:
        if name not in SPLITS:
            raise UsageError(f"unknown split {name!r}; allowed: {', '.join(SPLITS)}")
        return getattr(self, name)  # type: ignore[no-any-return]

    @property
    def io(self) -> ModelIO:
        assert self.prepared.io is not None
        return self.prepared.io


def _materialise(batches: Iterable[Any] | None, name: str, *, labels: bool) -> list[Batch]:
    """The split as a list of ``(inputs, targets)``; inputs any pytree of tensors / arrays.

    With ``labels`` every batch must be an ``(inputs, targets)`` pair. Without (``task.targets:
    model``), a batch is the model's inputs, or an ``(inputs, None)`` pair; targets come later.
    """
    if batches is None:
        raise UsageError(f"the data has no {name!r} split; it needs {', '.join(SPLITS)}")
    out: list[Batch] = []
    for i, b in enumerate(batches):
        what = f"{name} batch {i}"
        if labels:
            if not isinstance(b, (tuple, list)) or len(b) != 2:
                raise UsageError(
                    f"{what} is not an (inputs, targets) pair; unlabelled data needs task.targets: model"
                )
            x, y = b
            out.append(
                (modelio.as_tensors(x, what=f"{what} inputs"), modelio.as_tensors(y, what=f"{what} targets"))
            )
        else:
            x = b[0] if isinstance(b, (tuple, list)) and len(b) == 2 and b[1] is None else b
            out.append((modelio.as_tensors(x, what=f"{what} inputs"), None))
        modelio.batch_size(out[-1][0], what=f"{what} inputs")
    if not out:
        raise UsageError(f"the {name} split is empty: give at least one (inputs, targets) batch")
    return out


@torch.no_grad()
def teacher_targets(prepared: PreparedModel, batches: Sequence[Batch]) -> list[Batch]:
    """The batches with the float model's selected outputs as targets (``task.targets: model``)."""
    return [(x, prepared.forward(x).detach()) for x, _ in batches]


def _split_of(data: Any, name: str) -> Any:
    if isinstance(data, Mapping):
        return data.get(name)
    return getattr(data, name, None)


def _load_model(recipe: Recipe) -> nn.Module:
    if recipe.model is None:
        raise UsageError("the recipe has no model section: give model.factory ('package.module:callable')")
    import inspect

    factory = import_object(recipe.model.factory, what="model.factory")
    try:
        inspect.signature(factory).bind(**recipe.model.kwargs)
    except TypeError as e:
        raise UsageError(f"model.factory {recipe.model.factory!r} rejected model.kwargs: {e}") from e
    except ValueError:
        pass  # no signature to check (some builtins): the call below reports a mismatch
    try:
        model = factory(**recipe.model.kwargs)
    # The factory is the user's code: whatever it raises is a problem with the recipe's model
    # (exit 2), named with the factory; the CLI shows the traceback under -v / --debug.
    except Exception as e:
        raise UsageError(f"model.factory {recipe.model.factory!r} raised {type(e).__name__}: {e}") from e
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
    import inspect

    factory = import_object(recipe.data.factory, what="data.factory")
    try:
        inspect.signature(factory).bind(**recipe.data.kwargs)
    except TypeError as e:
        raise UsageError(f"data.factory {recipe.data.factory!r} rejected data.kwargs: {e}") from e
    except ValueError:
        pass  # no signature to check (some builtins): the call below reports a mismatch
    try:
        return factory(**recipe.data.kwargs)
    # As for the model factory: anything the user's data code raises is exit 2, named.
    except Exception as e:
        raise UsageError(f"data.factory {recipe.data.factory!r} raised {type(e).__name__}: {e}") from e


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
    labels = r.task.targets == "labels"
    splits = {name: _materialise(_split_of(data, name), name, labels=labels) for name in SPLITS}
    loss_fn = resolve_loss(r.task.loss_name)
    metric_fn = resolve_metric(r.task.metric_name)
    io = ModelIO.from_batches([b for name in SPLITS for b in splits[name]], output=r.task.output)
    prepared = prepare_model(model, splits["calibration"][0][0], pins=r.allocation.pins, io=io)
    if not labels:
        # The torch float model is the teacher for the Hessian; evaluation and test are re-targeted
        # on the float ONNX model in quantize(), so the baseline's fidelity is exactly 1.
        splits = {name: teacher_targets(prepared, splits[name]) for name in SPLITS}
    return Workspace(
        r, prepared, splits["calibration"], splits["evaluation"], splits["test"], loss_fn, metric_fn
    )


# --------------------------------------------------------------------------------------------
# Checks before any Hessian work: garbage in must never come out as "budget met"
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def check_task(ws: Workspace) -> tuple[float, np.ndarray | None]:
    """Run the float torch model over the evaluation split and check that targets, outputs and the
    metric make sense together; returns the float model's metric there and its per-sample values
    (``None`` when the metric gives one number per split).

    Raises:
        UsageError: (exit 2) outputs that are NaN/Inf, targets whose batch size, shape or class
            range cannot match the outputs, a metric that is NaN, or (labels, ``top1``) a float
            baseline at or below chance (the most frequent class's share), which means the
            targets or the model are not what the recipe says.
    """
    from hawqtool.tasks import per_sample

    outputs, targets = [], []
    for i, (x, y) in enumerate(ws.evaluation):
        out = ws.prepared.forward(x)
        if not torch.isfinite(out).all():
            raise UsageError(f"the float model's outputs on evaluation batch {i} contain NaN or Inf")
        yt = torch.as_tensor(y)
        if yt.shape[:1] != out.shape[:1]:
            raise UsageError(
                f"evaluation batch {i}: {yt.shape[0] if yt.ndim else 'scalar'} targets for "
                f"{out.shape[0]} outputs; targets need one row per sample"
            )
        outputs.append(out.float().cpu().numpy())
        targets.append(yt.cpu().numpy())
    try:
        out_np, tgt_np = np.concatenate(outputs), np.concatenate(targets)
    except ValueError:
        return float("nan"), None  # ragged token outputs: the ONNX evaluation pads and checks them
    task = ws.recipe.task
    if task.targets == "labels" and np.issubdtype(tgt_np.dtype, np.integer) and out_np.ndim >= 2:
        classes = out_np.shape[-1]
        lo, hi = int(tgt_np.min()), int(tgt_np.max())
        if lo < 0 or hi >= classes:
            raise UsageError(
                f"targets range over [{lo}, {hi}] but the model's output has {classes} classes "
                f"(targets must lie in [0, {classes - 1}]); check the data factory's labels"
            )
    values = ws.metric_fn(out_np, tgt_np)
    per = per_sample(values, len(out_np))
    metric = float(np.mean(per)) if per is not None else float(values)  # type: ignore[arg-type]
    if not np.isfinite(metric):
        raise UsageError(
            f"the metric {task.metric_name!r} of the float model is {metric} on the evaluation split"
        )
    if task.targets == "labels" and task.metric_name == "top1" and np.issubdtype(tgt_np.dtype, np.integer):
        chance = float(np.bincount(tgt_np.reshape(-1).astype(np.int64)).max() / tgt_np.size)
        if metric <= chance + 1e-12:
            raise UsageError(
                f"the float model's top1 on the evaluation split is {metric:.4f}, at or below chance "
                f"({chance:.4f}, the most frequent class's share): the targets do not match the model"
            )
    return metric, per


def budget_for(ws: Workspace, values: np.ndarray | None) -> Budget:
    """The recipe's budget with the metric's kind settled: binary (0/1 per sample) as declared
    (``task.binary`` or the built-in metric), else read once off the float torch model's per-sample
    ``values`` on the evaluation split (:func:`check_task`), so that every later judgement of this
    run bounds drops the same way, whatever float rounding does to the ONNX model's values."""
    from hawqtool.confidence import is_binary

    budget = ws.recipe.budget_spec
    if budget.binary is None and values is not None:
        budget = replace(budget, binary=is_binary(values))
    return budget


def check_budget_resolvable(ws: Workspace, baseline: float, values: np.ndarray | None) -> None:
    """Refuse a budget the evaluation split cannot resolve at the recipe's confidence.

    Args:
        ws: the workspace.
        baseline: the float model's metric on the evaluation split (for relative budgets).
        values: its per-sample values. A binary metric (0/1 per sample, as top-1; see
            :func:`budget_for`) has a smallest resolvable drop, a continuous one does not.

    Raises:
        UsageError: (exit 2) saying how many evaluation samples the budget needs.
    """
    from hawqtool.confidence import TOLERANCE, resolvable_drop, samples_needed

    b = ws.recipe.budget
    if b.confidence <= 0 or values is None or not budget_for(ws, values).binary:
        return  # the point rule, or a metric with no granularity to resolve
    n = len(values)
    if b.max_drop <= 0:
        raise UsageError(
            f"budget.max_drop 0 cannot be met at confidence {b.confidence}: the upper bound of any drop "
            "measured on a finite split is above 0. Give a positive max_drop, or budget.confidence: 0 "
            "to accept candidates whose observed drop is 0"
        )
    base = baseline if b.mode == "relative" else None
    smallest = resolvable_drop(n, confidence=b.confidence, mode=b.mode, baseline=base)
    if b.max_drop < smallest - TOLERANCE:
        need = samples_needed(b.max_drop, confidence=b.confidence, mode=b.mode, baseline=base)
        raise UsageError(
            f"budget.max_drop {b.max_drop} ({b.mode}) cannot be resolved with {n} evaluation samples at "
            f"confidence {b.confidence}: the smallest drop they resolve is {smallest:.4g}; it needs at "
            f"least {need} samples (or a larger max_drop, or budget.confidence: 0 for the point rule)"
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
        **trace_settings(ws),
        dtype=h.dtype,
        sub_batch=h.sub_batch,
        progress=progress,
        cache_dir=cache_dir() / "hessian",
    )


def trace_settings(ws: Workspace) -> dict[str, Any]:
    """The recipe's settings that the weight and the activation trace estimators share."""
    h = ws.recipe.hessian
    return {
        "seed": h.seed,
        "rel_tol": h.rel_tol,
        "min_probes": h.min_probes,
        "max_probes": h.max_probes,
        "device": h.device,
    }


def frontier(
    recipe: Workspace | Recipe | str | Path | None = None,
    *,
    table: SensitivityTable | None = None,
    progress: bool = True,
    overrides: Sequence[str] = (),
) -> tuple[OptionTable, Frontier]:
    """Options per layer × format (Ω, cost) and their exact Pareto frontier."""
    from hawqtool.frontier import pareto_frontier
    from hawqtool.options import build_options

    ws = recipe if isinstance(recipe, Workspace) else load(recipe, overrides=overrides)
    table = table or analyze(ws, progress=progress)
    a = ws.recipe.allocation
    s = stage_settings(ws.recipe)
    cost: Any = a.cost
    if a.cost == "latency":
        lat = latency_table(ws, progress=progress)
        cost = lat.cost_model()
        s["cost"] = f"latency:{lat.fingerprint}"
    activation_omega = dynamic_omega = None
    if ws.recipe.hessian.activations:
        act = activation_table(ws, progress=progress)
        activation_omega, dynamic_omega = act.omegas(), act.dynamic_omegas()
        s["activation_traces"] = True
    weights = dict(zip(ws.prepared.fqns, ws.prepared.weights(), strict=True))
    options = build_options(
        ws.prepared.layers,
        table,
        weights,
        formats=a.formats,
        cost=cost,
        storage=s["int4_storage"],
        clip_search=s["clip_search"],
        opset=s["opset"],
        activation_omega=activation_omega,
        dynamic_activation_omega=dynamic_omega,
    )
    options = replace(options, settings=s)
    return options, pareto_frontier(options, cost_grid=a.cost_grid, omega_grid=a.omega_grid)


def stage_settings(recipe: Recipe) -> dict[str, Any]:
    """The export settings that costs, Ω, the dependency terms and the exporter must share: one
    source, recorded in the option table so that a mismatch is caught where the stages meet."""
    e, a = recipe.export, recipe.allocation
    return {
        "int4_storage": e.int4_storage,
        "opset": e.opset,
        "clip_search": a.clip_search,
        "calibration": e.calibration,
        "cost": a.cost,
    }


def uniform_quantized_points(options: OptionTable) -> dict[str, FrontierPoint]:
    """Per format that runs on integer kernels (static ``intB`` or dynamic ``intB-d`` activations)
    among the options (most bits first), the uniform integer model: every layer that offers the
    format takes it, every other layer keeps its most precise option (float where offered; a pin is
    a layer's only option). These are the models onnxruntime's own static (or dynamic) quantization
    resembles, often the fastest on integer kernels, and a frontier ordered by predicted latency
    need not contain them: under ``cost: latency`` the search times them too.

    Example:
        >>> from hawqtool.types import LayerOption
        >>> row = (LayerOption("int4", 1.0, 2.0, 5.0), LayerOption("int4-w", 3.0, 1.0, 4.0),
        ...        LayerOption("float", 4.0, 0.0, 0.0))
        >>> opts = OptionTable(("a", "b"), {"a": row, "b": row[1:]}, "latency")
        >>> {k: dict(p.allocation) for k, p in uniform_quantized_points(opts).items()}
        {'uniform int4': {'a': 'int4', 'b': 'float'}}
    """
    offered = {o.format for row in options.options.values() for o in row}
    integer = [f for f in offered if parse_format(f).activations or parse_format(f).dynamic]
    formats = sorted(integer, key=lambda f: (-parse_format(f).bits, f))
    out = {}
    for fmt in formats:
        alloc = {}
        for fqn in options.layers:
            row = options.options[fqn]
            alloc[fqn] = fmt if any(o.format == fmt for o in row) else min(row, key=lambda o: o.omega).format
        out[f"uniform {fmt}"] = _point(options, alloc)
    return out


def _point(options: OptionTable, allocation: Mapping[str, str]) -> FrontierPoint:
    """``allocation`` as a point of ``options`` (its cost, ΣΩ and average bits)."""
    alloc = dict(allocation)
    bits = average_bits(alloc, options.params) if set(options.params) >= set(alloc) else 0.0
    return FrontierPoint(options.cost(alloc), options.omega(alloc), alloc, bits)


Retime = Callable[[Sequence[Mapping[str, str]]], Sequence[Any]]
Check = Callable[[FrontierPoint], Any]
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


def latency_moves(
    options: OptionTable,
    allocation: Mapping[str, str],
    *,
    exclude: Collection[tuple[tuple[str, str], ...]] = (),
    k: int = LATENCY_MOVES,
) -> list[FrontierPoint]:
    """Up to ``k`` allocations that each change one layer of ``allocation`` to a format predicted
    faster (one per layer: the one adding the least ΣΩ per predicted millisecond saved), least ΣΩ
    added per millisecond first; allocations in ``exclude`` (:func:`hawqtool.types.allocation_key`)
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
    return [_point(options, {**allocation, f: best[f][1]}) for f in order]


def format_swaps(
    options: OptionTable,
    allocation: Mapping[str, str],
    table: Any = None,
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
    return [_point(options, moved) for _, moved in ranked[: max(k, 0)]]


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
        return _point(options, allocation)  # a layer pinned to a quantized format
    steps = [
        (o.cost - closest[f].cost, o.omega, f, o.format)
        for f in options.layers
        for o in options.options[f]
        if is_quantized(o.format)
    ]
    if not steps:
        return None
    _, _, fqn, fmt = min(steps)
    return _point(options, {**allocation, fqn: fmt})


def latency_shortlist(
    candidates: Sequence[FrontierPoint],
    result: Any,
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


def _fastest_within_budget(
    result: Any,
    table: Any,
    options: OptionTable,
    retime: Retime | None = None,
    *,
    shortlist: Sequence[FrontierPoint] = (),
    check: Check | None = None,
) -> tuple[Any, list[dict[str, Any]], dict[str, Any] | None]:
    """Among the timed probes that met the budget (and quantize something), the one with the lowest
    measured latency; every probe's predicted vs measured latency; and the choice against float.

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
    ``source="move"``, ``index`` −1). The third value (``None`` without
    ``retime``) compares the choice with float, paired by round: on small layers or at batch 1 the
    Q/DQ nodes can cost more than the integer kernels save, and then no quantized model within
    budget is faster than float (``verdict`` ``slower``), which the report says.
    """
    from hawqtool.costs import predicted_latency

    def row(t: Any) -> dict[str, Any]:
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
        return result, rows, None
    if retime is None:
        best = result.trials[min(ok, key=lambda i: result.trials[i].latency_ms)]
        return _choose(result, best, options), rows, None
    shortlist = list(shortlist) if check is not None else []
    float_timing, *timings = retime(
        [{}, *(result.trials[i].allocation for i in ok), *(p.allocation for p in shortlist)]
    )
    for i, timing in zip(ok, timings[: len(ok)], strict=True):
        rows[i].update(retimed_ms=timing.median_ms, retimed_stderr_ms=timing.stderr_ms)
    best, best_timing, added, checks = None, None, [], 0
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
    return _choose(result, best, options), rows, versus_float


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


def _choose(result: Any, best: Any, options: OptionTable) -> Any:
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


def check_assumptions(options: OptionTable, exp: Any, dep: Any | None) -> None:
    """Check that the exporter and the dependency model assume what the option table assumed.

    Raises:
        UsageError: a setting differs (e.g. a cached artifact from other settings, or an exporter
            built by hand with another storage), naming the setting and both values.
    """
    s = options.settings
    seen = {
        "exporter.int4_storage": (s.get("int4_storage"), exp.int4_storage),
        "exporter.opset": (s.get("opset"), exp.opset),
        "exporter.clip_search": (s.get("clip_search"), exp.clip_search),
    }
    if dep is not None:
        seen["dependency.clip_search"] = (s.get("clip_search"), dep.clip_search)
    bad = [f"{k}: options assumed {a!r}, got {b!r}" for k, (a, b) in seen.items() if a is not None and a != b]
    if bad:
        raise UsageError("stages disagree on their settings: " + "; ".join(bad))


def exporter(ws: Workspace) -> Any:
    """A QDQ exporter for the workspace's model, activations calibrated on its calibration split
    (built once per workspace)."""
    from hawqtool.export import QDQExporter

    if "exporter" not in ws.cache:
        s = stage_settings(ws.recipe)
        ws.cache["exporter"] = QDQExporter.build(
            ws.prepared,
            ws.calibration,
            opset=s["opset"],
            calibration_method=s["calibration"],
            int4_storage=s["int4_storage"],
            clip_search=s["clip_search"],
        )
    return ws.cache["exporter"]


def activation_table(ws: Workspace, *, progress: bool = True) -> Any:
    """Hutchinson traces of the Hessian w.r.t. each activation-quantizable layer's input, times its
    uint8 quantization error (cached by fingerprint, like the weight traces)."""
    from hawqtool.activations import estimate_activation_traces

    return estimate_activation_traces(
        ws.prepared,
        ws.calibration,
        ws.loss_fn,
        **trace_settings(ws),
        progress=progress,
        cache_dir=cache_dir() / "activations",
    )


def latency_table(ws: Workspace, *, progress: bool = True) -> Any:
    """Per layer and format, the latency the format adds on the recipe's execution provider,
    measured on the exported model at the evaluation batch shape and thread count (cached)."""
    from hawqtool.costs import measure_latency

    if "latency" not in ws.cache:
        ev = ws.recipe.evaluate
        ws.cache["latency"] = measure_latency(
            exporter(ws),
            ws.io.feeds(ws.evaluation[0][0]),
            formats=ws.recipe.allocation.formats,
            provider=ev.provider,
            threads=ev.threads,
            cache_dir=cache_dir() / "latency",
            progress=progress,
        )
    return ws.cache["latency"]


def onnx_teacher(ws: Workspace, float_model: Any) -> Workspace:
    """The workspace with evaluation and test targets replaced by the float ONNX model's outputs,
    so that teacher fidelity is measured against what onnxruntime runs (the baseline scores
    exactly 1 on agreement and cosine)."""
    from hawqtool.evaluate import make_session

    ev = ws.recipe.evaluate
    session = make_session(float_model.SerializeToString(), threads=ev.threads, provider=ev.provider)

    def retarget(batches: list[Batch]) -> list[Batch]:
        out = []
        for x, _ in batches:
            try:
                y = session.run(None, ws.io.feeds(x))[0]
            except Exception as e:  # onnxruntime's pybind errors share only Exception
                raise ExportError(f"onnxruntime failed to run the float model: {e}") from e
            out.append((x, torch.from_numpy(np.asarray(y))))
        return out

    return replace(ws, evaluation=retarget(ws.evaluation), test=retarget(ws.test))


def uniform_allocation(ws: Workspace, fmt: str) -> dict[str, str]:
    """Every layer in ``fmt``, except pinned layers, which keep their pin, and layers whose kind
    cannot take ``fmt``: an embedding given ``int8`` (weights + activations) gets ``int8-w``, a
    conv given a block or dynamic format gets the per-channel weight-only format of the same bits."""
    from hawqtool.formats import supports

    f = parse_format(fmt)
    out = {}
    for layer in ws.prepared.layers:
        if layer.pinned is not None:
            out[layer.fqn] = layer.pinned
        elif supports(layer, fmt) or not f.quantized:
            out[layer.fqn] = fmt
        else:
            out[layer.fqn] = f"int{f.bits}-w"
    return out


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
        path,
        ws.split(split),
        ws.metric_fn,
        io=ws.io,
        threads=ev.threads,
        latency_runs=ev.latency_runs,
        provider=ev.provider,
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
        "cpu": _cpu(),
    }


def _cpu() -> str:
    """The CPU the onnxruntime numbers were measured on, and whether it has VNNI: without it,
    onnxruntime's u8 x s8 integer kernels saturate on full-range int8 weights, so the measured
    accuracy of int8 formats differs between machines (docs/facts.md)."""
    import platform

    name, vnni = platform.machine(), False
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return name
    for line in info.splitlines():
        if line.startswith("model name"):
            name = line.split(":", 1)[1].strip()
            break
    vnni = "vnni" in info
    return f"{name} ({'VNNI' if vnni else 'no VNNI'})"


def dependency_key(ws: Workspace, options: OptionTable, table: SensitivityTable) -> str:
    """The dependency cache key: the traces, the options and, for exported numerics
    (``search.dependency_numerics``), what onnxruntime's numbers depend on: the export settings,
    the execution provider, the onnxruntime version and the CPU (kernels differ per CPU)."""
    parts: list[Any] = [table.fingerprint, options.to_dict(), "dep-v3"]
    if ws.recipe.search.dependency_numerics == "exported":
        import onnxruntime

        from hawqtool.export.plan import PLAN_VERSION

        parts.append(
            {
                "numerics": "exported",
                "cross_term_scale": "weights",
                "plan": PLAN_VERSION,
                "export": dict(options.settings),
                "provider": ws.recipe.evaluate.provider,
                "onnxruntime": onnxruntime.__version__,
                "cpu": _cpu(),
            }
        )
    # weights: the key of the caches written before the setting existed (the same computation).
    return settings_key(*parts)


def _dependency_model(ws: Workspace, options: OptionTable, table: SensitivityTable, progress: bool) -> Any:
    from hawqtool import distributed
    from hawqtool.dependency import DependencyModel, build_dependency_model, exported_single_loss
    from hawqtool.hvp import SplitHessian

    path = cache_dir() / "dependency" / f"{dependency_key(ws, options, table)}.json"
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
        single_loss = exported_single_loss(
            lambda: exporter(ws),
            ws.calibration,
            ws.loss_fn,
            io=ws.io,
            threads=ev.threads,
            provider=ev.provider,
        )
    dep = build_dependency_model(
        hessian,
        ws.prepared,
        options,
        clip_search=options.settings["clip_search"],
        single_loss=single_loss,
        numerics=numerics,
        progress=progress,
    )
    if is_main():
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
        budget_not_met_message,
        build_report,
        write_frontier_csv,
        write_report,
        write_sensitivity,
    )
    from hawqtool.search import Measurement, bisect, measure_trial

    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    ws = load(recipe, model=model, data=data, overrides=overrides)
    r = ws.recipe
    # Garbage in must stop here, before minutes of Hessian work, never end as "budget met".
    base_metric, base_values = check_task(ws)
    check_budget_resolvable(ws, base_metric, base_values)
    budget = budget_for(ws, base_values)
    out = Path(out)
    if is_main():
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ExportError(f"cannot create output folder {str(out)!r}: {e}") from e
        # A stale model from an earlier run must never pass for this run's result.
        (out / "model.onnx").unlink(missing_ok=True)

    t = time.perf_counter()
    table = analyze(ws, progress=progress)
    timings["hessian"] = time.perf_counter() - t
    if is_main():
        write_sensitivity(table, out)

    t = time.perf_counter()
    options, front = frontier(ws, table=table, progress=progress)
    timings["frontier"] = time.perf_counter() - t
    if is_main():
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
        if is_main():
            write_frontier_csv(front, out)
    if not is_main():
        # Under torchrun the other ranks only share the Hessian stages; rank 0 searches and writes.
        return QuantizeResult(out, None, out / "report.json", False, {})

    if "no VNNI" in _cpu() and any(
        (parse_format(f).activations or parse_format(f).dynamic) and parse_format(f).bits == 8
        for f in r.allocation.formats
    ):
        log.warning(
            "this CPU has no VNNI: onnxruntime's uint8 x int8 kernels can saturate on full-range int8 "
            "weights, so int8 (and int8-d) layers may measure worse here than on a VNNI CPU; int7 "
            "(int7-d: 7-bit values in int8, onnxruntime's reduce_range) avoids it"
        )
    t = time.perf_counter()
    exp = exporter(ws)
    check_assumptions(options, exp, dep)
    ev = r.evaluate

    def run(model_or_path: Any, split: str, *, timed: bool = False) -> Any:
        # Latency is reported for the baseline and the result only; search probes and test-split
        # checks need the metric, so they skip the repeated timing runs.
        runs = ev.latency_runs if timed else 1
        return evaluate_onnx(
            model_or_path,
            ws.split(split),
            ws.metric_fn,
            io=ws.io,
            threads=ev.threads,
            latency_runs=runs,
            provider=ev.provider,
        )

    if r.task.targets == "model":
        ws = onnx_teacher(ws, exp.float_model)
    base_eval = run(exp.float_model, "evaluation", timed=True)
    base_test = run(exp.float_model, "test")
    timings["baseline"] = time.perf_counter() - t

    # With the latency cost every probe is timed: latency is not exactly additive, so the choice
    # among the candidates within budget is made on measured, not predicted, latency.
    timed_probes = r.allocation.cost == "latency"

    def measure(point: FrontierPoint) -> Measurement:
        e = run(exp.quantized_model(point.allocation), "evaluation", timed=timed_probes)
        return replace(Measurement.of(e), latency_ms=e.latency_ms if timed_probes else None)

    repair_fn = make_repair(candidates, dep, options) if dep is not None and r.search.repair else None

    t = time.perf_counter()
    result = bisect(
        candidates,
        measure,
        baseline=base_eval.metric,
        budget=budget,
        repair=repair_fn,
        progress=progress,
        reference=Measurement.of(base_eval),
        gap_points=front.points,
        seed=r.hessian.seed,
        # The uniform integer models are timed too: latency is not additive, and they share one
        # integer region with no requantize boundaries, which per-layer deltas under-credit.
        extra=uniform_quantized_points(options) if timed_probes else {},
    )
    timings["search"] = time.perf_counter() - t
    latency_check = versus_float = None
    if timed_probes:
        from hawqtool.costs import time_interleaved

        def retime(allocations: Sequence[Mapping[str, str]]) -> list[Any]:
            models = {str(i): exp.quantized_model(a).SerializeToString() for i, a in enumerate(allocations)}
            got = time_interleaved(
                models,
                ws.io.feeds(ws.evaluation[0][0]),
                threads=ev.threads,
                provider=ev.provider,
                rounds=5,
                runs=max(1, ev.latency_runs // 5),
            )
            return [got[str(i)] for i in range(len(allocations))]

        t = time.perf_counter()

        def check(point: FrontierPoint) -> Trial:
            return measure_trial(
                point,
                measure,
                baseline=base_eval.metric,
                budget=budget,
                reference=Measurement.of(base_eval),
                seed=r.hessian.seed,
                index=candidates.index(point) if point in candidates else -1,
                note="shortlist",
            )

        result, latency_check, versus_float = _fastest_within_budget(
            result,
            latency_table(ws),
            options,
            retime,
            shortlist=latency_shortlist(candidates, result, options=options),
            check=check,
        )
        timings["search"] += time.perf_counter() - t
    chosen = result.chosen
    if chosen is not None and quantizes_nothing(chosen.allocation):
        # Keeping every layer float is not a quantization result: say so (exit 3).
        result = replace(result, chosen=None, chosen_index=None, budget_met=False, reason="only-float")
        chosen = None

    final = None
    model_path = None
    if chosen is not None:
        t = time.perf_counter()
        model_path = exp.export(
            chosen.allocation,
            out / "model.onnx",
            metadata={"hawqtool.recipe": r.name, "hawqtool.budget": json.dumps(r.budget.model_dump())},
        )
        final = (run(model_path, "evaluation", timed=True), run(model_path, "test"))
        timings["final"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - t0

    report = build_report(
        recipe=r,
        budget=budget,
        prepared=ws.prepared,
        table=table,
        front=front,
        result=result,
        baseline=(base_eval, base_test),
        final=final,
        chosen=chosen,
        candidates=len(candidates),
        dependency=dep is not None,
        timings=timings,
        versions=_versions(),
        model_path=model_path,
    )
    if latency_check is not None:
        report["search"]["latency"] = latency_check
        report["search"]["latency_vs_float"] = versus_float
    uniform = uniform_points(options, r.allocation.formats)
    trials = [(t.cost, options.omega(t.allocation), t.met) for t in result.trials]
    # Under the latency cost: each timed probe's predicted against its measured latency.
    rows = zip(latency_check, result.trials, strict=True) if latency_check else ()
    timed = [(row, t) for row, t in rows if row["measured_ms"]]
    chosen_latency = next(
        (
            (row["predicted_ms"], row["measured_ms"])
            for row, t in timed
            if chosen is not None and dict(t.allocation) == dict(chosen.allocation)
        ),
        None,
    )
    plot_frontier(
        front,
        out / "frontier.png",
        uniform=uniform,
        trials=trials,
        chosen=(chosen.cost, chosen.omega) if chosen is not None else None,
        title=f"{r.name}: Pareto frontier ({front.cost_model} vs ΣΩ)",
        latency=[(row["predicted_ms"], row["measured_ms"], row["met"]) for row, _ in timed],
        chosen_latency=chosen_latency,
    )
    write_report(report, out)
    if not result.budget_met:
        raise BudgetNotMetError(budget_not_met_message(report, out / "report.md"))
    assert model_path is not None
    return QuantizeResult(out, model_path, out / "report.json", True, report)
