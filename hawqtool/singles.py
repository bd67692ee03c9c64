"""Single-layer loss measurements of the dependency stage: the calibration loss of the model with some
layers quantized, in torch (weights fake-quantized) or in onnxruntime (the exported QDQ model).

Each quantized (layer, format) key's own term of :meth:`hawqtool.dependency.DependencyModel.score` is the
change of this loss when the layer alone is quantized, every other layer float (out of context).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from hawqtool import distributed
from hawqtool.errors import UsageError
from hawqtool.formats import is_quantized, parse_format
from hawqtool.hvp import SplitHessian
from hawqtool.prepare import PreparedModel
from hawqtool.quantizer import dequantize_as

if TYPE_CHECKING:
    import onnx

    from hawqtool.export import QDQExporter
    from hawqtool.modelio import ModelIO
    from hawqtool.tasks import LossFn

Allocation = Mapping[str, str]
#: The calibration loss of the model with some layers quantized (``fqn -> format``), the rest float.
SingleLoss = Callable[[Allocation], float]


def measured_own_terms(
    keys: Sequence[tuple[str, str]],
    measure: SingleLoss,
    *,
    local: bool,
    device: torch.device,
    base: float | None = None,
    bar: Any = None,
) -> np.ndarray:
    """Each key's own term: the loss change with only its layer quantized in its format, every other
    layer float (out of context), one pass per key and one for the all-float reference unless
    ``base`` gives it. A rank-local ``measure`` (onnxruntime) runs this rank's share of the passes
    and the losses are summed over the ranks; the torch default is itself a collective step and runs
    them all.

    Example:
        >>> loss = lambda alloc: 1.0 + sum(0.25 for fmt in alloc.values() if fmt != "float")
        >>> measured_own_terms([("a", "int4"), ("b", "int8")], loss, local=False, device=torch.device("cpu"))
        array([0.25, 0.25])
    """
    what = "the dependency stage's loss passes"
    jobs: list[dict[str, str]] = ([] if base is not None else [{}]) + [{f: fmt} for f, fmt in keys]
    mine = distributed.shard(len(jobs)) if local else range(len(jobs))
    losses = torch.zeros(len(jobs), dtype=torch.float64, device=device)
    with distributed.shared_failure(what) if local else contextlib.nullcontext():
        for j in mine:
            losses[j] = measure(jobs[j])
            if bar is not None:
                bar.update(1)
    if local:
        distributed.all_reduce_sum([losses], what=what)
    values = losses.cpu().numpy()
    return values[len(jobs) - len(keys) :] - (values[0] if base is None else base)


def weights_single_loss(
    hessian: SplitHessian, prepared: PreparedModel, deltas: Mapping[tuple[str, str], torch.Tensor]
) -> SingleLoss:
    """The torch ``single_loss``: ``hessian.loss`` with the allocation's weights fake-quantized
    (W + Δ), activations float. A collective step under a process group (it shards the batches)."""
    weights = {f: prepared.weight(f).to(hessian.device) for f, _ in deltas}

    def loss(allocation: Allocation) -> float:
        return hessian.loss(
            weights={f: weights[f] + deltas[(f, fmt)] for f, fmt in allocation.items() if is_quantized(fmt)}
        )

    return loss


def torch_models(fmt: str) -> bool:
    """Whether torch's fake-quantized weights (W + Δ, activations float) model what the exported
    model computes with the quantized format ``fmt``: every weight-only format
    (:attr:`hawqtool.formats.Format.weight_only`). Formats that quantize activations (``intB``,
    calibrated uint8; ``intB-d``, at run time) are measured on the exported model.

    Example:
        >>> torch_models("int4-w"), torch_models("int4-b32"), torch_models("int8"), torch_models("int8-d")
        (True, True, False, False)
    """
    return parse_format(fmt).weight_only


def onnx_loss(
    model: onnx.ModelProto,
    batches: Sequence[tuple[Any, Any]],
    loss_fn: LossFn,
    *,
    io: ModelIO | None = None,
    threads: int = 2,
    provider: str = "cpu",
) -> float:
    """Mean of ``loss_fn`` (a batch-mean loss) over ``batches``, weighted by batch size, of an ONNX
    model run in onnxruntime: one session, dropped after.

    Args:
        model: an ``onnx.ModelProto``.
        batches: ``(inputs, targets)`` pairs, e.g. the calibration split.
        loss_fn: ``fn(outputs, targets)`` on torch tensors (the first model output).
        io: the model-I/O contract for the feeds (:func:`hawqtool.evaluate.session_feeds`).
        threads: onnxruntime intra-op threads.
        provider: the execution provider (:func:`hawqtool.evaluate.make_session`).

    Raises:
        UsageError: the loss is NaN or infinite on a batch, or there are no batches.
        ExportError: onnxruntime fails to load or run the model.
    """
    from hawqtool.evaluate import make_session, run_session, session_feeds
    from hawqtool.modelio import batch_size

    session = make_session(model, threads=threads, provider=provider)
    total, n = 0.0, 0
    for i, (x, y) in enumerate(batches):
        out = torch.from_numpy(run_session(session, session_feeds(session, x, io)))
        loss = float(loss_fn(out, y))
        if not math.isfinite(loss):
            raise UsageError(f"the onnxruntime model's loss is {loss} on calibration batch {i}")
        size = batch_size(x)
        total += loss * size
        n += size
    if n == 0:
        raise UsageError("cannot measure a loss on an empty split")
    return total / n


def exported_single_loss(
    exporter: Callable[[], QDQExporter],
    batches: Sequence[tuple[Any, Any]],
    loss_fn: LossFn,
    *,
    io: ModelIO | None = None,
    threads: int = 2,
    provider: str = "cpu",
) -> SingleLoss:
    """A ``single_loss`` for :func:`build_dependency_model` with the exported numerics: each
    allocation's QDQ model (``exporter().quantized_model``; activations quantized as the ONNX model
    will quantize them) run in onnxruntime over ``batches`` (:func:`onnx_loss`).

    ``exporter`` returns a :class:`hawqtool.export.QDQExporter`; it is called on the first
    measurement, so a process with no measurements to take never builds one.
    """

    def loss(allocation: Allocation) -> float:
        model = exporter().quantized_model(allocation)
        return onnx_loss(model, batches, loss_fn, io=io, threads=threads, provider=provider)

    return loss


def measured_change(
    hessian: SplitHessian,
    prepared: PreparedModel,
    allocation: Allocation,
    *,
    clip_search: bool = True,
    base_loss: float | None = None,
) -> float:
    """The real change of the calibration loss when every layer is fake-quantized per ``allocation``.

    The ground truth :meth:`DependencyModel.predict` approximates. ``base_loss`` (e.g.
    :attr:`DependencyModel.base_loss`) saves one pass over the split.
    """
    weights = {
        f: dequantize_as(prepared.weight(f), fmt, clip_search=clip_search)
        for f, fmt in allocation.items()
        if is_quantized(fmt)
    }
    base = hessian.loss() if base_loss is None else base_loss
    return hessian.loss(weights=weights) - base
