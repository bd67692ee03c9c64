"""Loading the user's model and data, and every check the float model can answer before the expensive
stages: garbage in must stop here (exit 2), never come out of minutes of Hessian work as "budget met".

Example:
    >>> ws = load("tiny")                                   # doctest: +SKIP
    >>> metric, values = check_task(ws)                     # doctest: +SKIP
    >>> check_budget_resolvable(ws, metric, values)         # doctest: +SKIP
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from hawqtool import modelio
from hawqtool.confidence import TOLERANCE, is_binary, resolvable_drop, samples_needed
from hawqtool.errors import ExportError, UsageError
from hawqtool.evaluate import batchwise, make_session
from hawqtool.formats import parse_format, supports
from hawqtool.modelio import Batch, ModelIO
from hawqtool.prepare import PreparedModel, prepare_model
from hawqtool.recipe import Recipe, apply_overrides, load_recipe, parse_recipe
from hawqtool.tasks import (
    LossFn,
    MetricFn,
    get_metric,
    import_object,
    per_sample,
    resolve_loss,
    resolve_metric,
)
from hawqtool.types import Budget, DataSplits, ExportSettings

SPLITS = ("calibration", "evaluation", "test")


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

    @property
    def export_settings(self) -> ExportSettings:
        """The one settings object Ω, costs, the dependency terms and the exporter are built with."""
        return self.recipe.export_settings


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


def _call_factory(path: str, kwargs: Mapping[str, Any], *, what: str) -> Any:
    """Import and call the user's ``what`` factory; whatever it raises is a problem with the recipe
    (exit 2), named with the factory; the CLI shows the traceback under -v / --debug."""
    factory = import_object(path, what=f"{what}.factory")
    try:
        inspect.signature(factory).bind(**kwargs)
    except TypeError as e:
        raise UsageError(f"{what}.factory {path!r} rejected {what}.kwargs: {e}") from e
    except ValueError:
        pass  # no signature to check (some builtins): the call below reports a mismatch
    try:
        return factory(**kwargs)
    except Exception as e:  # the user's code: any exception is theirs to fix (see above)
        raise UsageError(f"{what}.factory {path!r} raised {type(e).__name__}: {e}") from e


def _load_model(recipe: Recipe) -> nn.Module:
    if recipe.model is None:
        raise UsageError("the recipe has no model section: give model.factory ('package.module:callable')")
    model = _call_factory(recipe.model.factory, recipe.model.kwargs, what="model")
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
    return _call_factory(recipe.data.factory, recipe.data.kwargs, what="data")


def _as_recipe(recipe: Recipe | str | Path | None, overrides: Sequence[str]) -> Recipe:
    if recipe is None:
        return load_recipe("default", overrides)
    if isinstance(recipe, Recipe):
        return parse_recipe(apply_overrides(recipe.to_dict(), overrides)) if overrides else recipe
    return load_recipe(recipe, overrides)


def load(
    recipe: Workspace | Recipe | str | Path | None = None,
    *,
    model: nn.Module | None = None,
    data: DataSplits | Mapping[str, Any] | None = None,
    overrides: Sequence[str] = (),
) -> Workspace:
    """Resolve a recipe's model, data, loss and metric, and prepare the model (BN folded, layers found).

    ``model`` / ``data`` given here take the place of the recipe's factories; a :class:`Workspace`
    is returned as it is.
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
        # on the float ONNX model (onnx_teacher), so the baseline's fidelity is exactly 1.
        splits = {name: teacher_targets(prepared, splits[name]) for name in SPLITS}
    return Workspace(
        r, prepared, splits["calibration"], splits["evaluation"], splits["test"], loss_fn, metric_fn
    )


def onnx_teacher(ws: Workspace, float_model: Any) -> Workspace:
    """The workspace with evaluation and test targets replaced by the float ONNX model's outputs,
    so that teacher fidelity is measured against what onnxruntime runs (the baseline scores
    exactly 1 on agreement and cosine)."""
    ev = ws.recipe.evaluate
    session = make_session(float_model, threads=ev.threads, provider=ev.provider)

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


# --------------------------------------------------------------------------------------------
# Checks on the float model, before any Hessian work
# --------------------------------------------------------------------------------------------


def declared_binary(ws: Workspace, output_ndim: int | None = None) -> bool | None:
    """Whether the recipe's metric is 0/1 per sample as declared: ``task.binary``, else the registered
    metric's kind on outputs of ``output_ndim`` axes (per-token agreement is a fraction per sample);
    ``None`` when nothing declares it (then it is read off the float model's values)."""
    task = ws.recipe.task
    if task.binary is not None:
        return task.binary
    metric = get_metric(task.metric_name)
    return metric.binary if output_ndim is None else metric.binary_for(output_ndim)


def chance_level(ws: Workspace, targets: np.ndarray) -> float | None:
    """What a model that ignores its inputs scores on ``targets`` by the registered metric's chance
    level (``top1`` on class labels: the most frequent class's share); ``None`` where it has none."""
    metric = get_metric(ws.recipe.task.metric_name)
    if ws.recipe.task.targets != "labels" or metric.chance is None:
        return None
    return metric.chance(targets)


def _check_binary(ws: Workspace, outputs: np.ndarray, targets: np.ndarray, per: np.ndarray) -> None:
    """A metric declared binary must give 0 or 1 per sample, on the float model's outputs and on
    outputs that disagree with the targets (each sample paired with the next one's outputs): a
    teacher metric scores the float model exactly 1 everywhere, so only the second shows per-sample
    fractions (per-token agreement on a language model)."""
    name = ws.recipe.task.metric_name
    probes = [per]
    if len(outputs) > 1:
        shifted = ws.metric_fn(np.roll(outputs, 1, axis=0), targets)
        values = per_sample(shifted, len(outputs), name=name)
        if values is not None:
            probes.append(values)
    if not all(is_binary(v) for v in probes):
        raise UsageError(
            f"the metric {name!r} is declared binary (task.binary or the built-in metric) but its "
            "per-sample values are not all 0 or 1 on the float model's outputs, or on outputs that differ "
            "from its targets (each sample scored with another sample's outputs), e.g. a fraction of "
            "positions per sample; declare task.binary: false for a continuous metric"
        )


def check_task(ws: Workspace) -> tuple[float, np.ndarray | None]:
    """Run the float torch model over the evaluation split and check that targets, outputs and the
    metric make sense together; returns the float model's metric there and its per-sample values
    (``None`` when the metric gives one number per split).

    Raises:
        UsageError: (exit 2) outputs that are NaN/Inf, targets whose batch size, shape or class
            range cannot match the outputs, a metric that is NaN, a metric declared binary whose
            per-sample values are not 0 or 1, or a float baseline at or below the metric's chance
            level (an accuracy against labels: the most frequent class's share), which means the
            targets or the model are not what the recipe says.
    """
    metric, values, _ = _check_task(ws)
    return metric, values


@torch.no_grad()
def _check_task(ws: Workspace) -> tuple[float, np.ndarray | None, int]:
    """:func:`check_task`, and the number of axes of the model's outputs (batch axis included).

    A metric scored batch by batch (:func:`hawqtool.evaluate.batchwise`) keeps only its per-sample
    values and the first batch's outputs (an LM's logits are vocabulary × tokens per sample: a whole
    split's would be gigabytes); any other metric needs the whole split's outputs at once.
    """
    task = ws.recipe.task
    stream = batchwise(task.metric_name)
    outputs: list[np.ndarray] = []
    targets: list[np.ndarray] = []
    parts: list[np.ndarray] = []
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
        o, t = out.float().cpu().numpy(), yt.cpu().numpy()
        _check_label_range(ws, o, t)
        if stream:
            got = per_sample(ws.metric_fn(o, t), len(o), name=task.metric_name)
            if got is None and parts:
                raise UsageError("the metric gave per-sample values on one batch and one number on another")
            stream = got is not None  # one number per batch: score the whole split at once
            if got is not None:
                parts.append(got)
        if not outputs or not stream:
            outputs.append(o)
        targets.append(t)
    if stream:
        try:
            every: np.ndarray | None = np.concatenate(targets)
        except ValueError:  # ragged token targets: no class shares to compare with
            every = None
        return _judge_float_metric(ws, outputs[0], targets[0], np.concatenate(parts), all_targets=every)
    try:
        out_np, tgt_np = np.concatenate(outputs), np.concatenate(targets)
    except ValueError:
        # Ragged token outputs: the ONNX evaluation pads and checks them.
        return float("nan"), None, outputs[0].ndim
    values = ws.metric_fn(out_np, tgt_np)
    per = per_sample(values, len(out_np), name=task.metric_name)
    return _judge_float_metric(
        ws, out_np, tgt_np, per, all_targets=tgt_np, split_value=None if per is not None else values
    )


def _check_label_range(ws: Workspace, outputs: np.ndarray, targets: np.ndarray) -> None:
    """Integer labels must index the model's classes (its last output axis)."""
    if ws.recipe.task.targets == "labels" and np.issubdtype(targets.dtype, np.integer) and outputs.ndim >= 2:
        classes = outputs.shape[-1]
        lo, hi = int(targets.min()), int(targets.max())
        if lo < 0 or hi >= classes:
            raise UsageError(
                f"targets range over [{lo}, {hi}] but the model's output has {classes} classes "
                f"(targets must lie in [0, {classes - 1}]); check the data factory's labels"
            )


def _judge_float_metric(
    ws: Workspace,
    outputs: np.ndarray,
    targets: np.ndarray,
    per: np.ndarray | None,
    *,
    all_targets: np.ndarray | None,
    split_value: Any = None,
) -> tuple[float, np.ndarray | None, int]:
    """The float model's metric (the mean of its per-sample values ``per``, else ``split_value``),
    checked finite, of its declared kind (on ``outputs`` and their ``targets``: the whole split's or
    the first batch's) and above chance (on ``all_targets``, the split's; ``None``: not checked)."""
    task = ws.recipe.task
    metric = float(np.mean(per)) if per is not None else float(split_value)
    if not np.isfinite(metric):
        raise UsageError(
            f"the metric {task.metric_name!r} of the float model is {metric} on the evaluation split"
        )
    if per is not None and declared_binary(ws, outputs.ndim):
        _check_binary(ws, outputs, targets, per)
    chance = chance_level(ws, all_targets) if all_targets is not None else None
    if chance is not None and metric <= chance + 1e-12:
        raise UsageError(
            f"the float model's {task.metric_name} on the evaluation split is {metric:.4f}, at or below "
            f"chance ({chance:.4f}, the most frequent class's share): the targets do not match the model"
        )
    return metric, per, outputs.ndim


def budget_for(ws: Workspace, values: np.ndarray | None, *, output_ndim: int | None = None) -> Budget:
    """The recipe's budget with the metric's kind settled: binary (0/1 per sample) as declared
    (:func:`declared_binary`, on outputs of ``output_ndim`` axes), else read once off the float torch
    model's per-sample ``values`` on the evaluation split (:func:`check_task`), so that every later
    judgement of this run bounds drops the same way, whatever float rounding does to the ONNX
    model's values."""
    budget = replace(ws.recipe.budget_spec, binary=declared_binary(ws, output_ndim))
    if budget.binary is None and values is not None:
        budget = replace(budget, binary=is_binary(values))
    return budget


def check_budget_resolvable(
    ws: Workspace, baseline: float, values: np.ndarray | None, *, output_ndim: int | None = None
) -> None:
    """Refuse a budget the evaluation split cannot resolve at the recipe's confidence.

    Args:
        ws: the workspace.
        baseline: the float model's metric on the evaluation split (for relative budgets).
        values: its per-sample values. A binary metric (0/1 per sample, as top-1; see
            :func:`budget_for`) has a smallest resolvable drop, a continuous one does not.

    Raises:
        UsageError: (exit 2) saying how many evaluation samples the budget needs.
    """
    b = ws.recipe.budget
    if b.confidence <= 0 or values is None or not budget_for(ws, values, output_ndim=output_ndim).binary:
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


@dataclass(frozen=True)
class FloatCheck:
    """What the checks on the float torch model found (:func:`check_float_model`).

    Attributes:
        metric: the float model's metric on the evaluation split (NaN for ragged token outputs).
        values: its per-sample values, ``None`` for a metric with one value per split.
        budget: the recipe's budget with the metric's kind (binary or continuous) settled.
    """

    metric: float
    values: np.ndarray | None = field(repr=False)
    budget: Budget


def check_float_model(ws: Workspace) -> FloatCheck:
    """Every check the float model can answer, before any Hessian work: :func:`check_task` (outputs,
    targets, the metric, its declared kind, chance) and :func:`check_budget_resolvable`.

    Raises:
        UsageError: (exit 2) as those two do.
    """
    metric, values, ndim = _check_task(ws)
    check_budget_resolvable(ws, metric, values, output_ndim=ndim)
    return FloatCheck(metric, values, budget_for(ws, values, output_ndim=ndim))
