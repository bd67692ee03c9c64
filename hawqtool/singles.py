"""Single-layer loss measurements of the dependency stage: the calibration loss of the model with some
layers quantized, in torch (weights fake-quantized) or in onnxruntime (the exported QDQ model).

Each quantized (layer, format) key's own term of :meth:`hawqtool.dependency.DependencyModel.score` is the
change of this loss when the layer is quantized while the others sit at their middle candidate format.
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
from hawqtool.formats import format_bits, is_quantized
from hawqtool.hvp import SplitHessian
from hawqtool.prepare import PreparedModel
from hawqtool.quantizer import dequantize_as
from hawqtool.types import OptionTable

if TYPE_CHECKING:
    import onnx

    from hawqtool.export import QDQExporter
    from hawqtool.modelio import ModelIO
    from hawqtool.tasks import LossFn

Allocation = Mapping[str, str]
#: The calibration loss of the model with some layers quantized (``fqn -> format``), the rest float.
SingleLoss = Callable[[Allocation], float]


def measure_jobs(
    jobs: Sequence[dict[str, str]],
    slots: Sequence[tuple[int, int, int]],
    measure: SingleLoss,
    n_keys: int,
    *,
    local: bool,
    device: torch.device,
    bar: Any = None,
) -> np.ndarray:
    """Each quantized key's measured loss change in context (its job's loss minus its reference
    job's). A rank-local ``measure`` (onnxruntime) runs this rank's share of the jobs and the losses
    are summed over the ranks; the torch default is itself a collective step and runs them all."""
    what = "the dependency stage's loss passes"
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
    measured = np.zeros(n_keys)
    for row, ref, job in slots:
        measured[row] = values[job] - values[ref]
    return measured


def weights_single_loss(
    hessian: SplitHessian, prepared: PreparedModel, deltas: Mapping[tuple[str, str], torch.Tensor]
) -> SingleLoss:
    """The default ``single_loss``: ``hessian.loss`` with the allocation's weights fake-quantized
    (W + Δ), activations float. A collective step under a process group (it shards the batches)."""
    weights = {f: prepared.weight(f).to(hessian.device) for f, _ in deltas}

    def loss(allocation: Allocation) -> float:
        return hessian.loss(
            weights={f: weights[f] + deltas[(f, fmt)] for f, fmt in allocation.items() if is_quantized(fmt)}
        )

    return loss


def single_jobs(
    options: OptionTable,
    context: Mapping[str, str],
    deltas: Mapping[tuple[str, str], torch.Tensor],
    index: Mapping[tuple[str, str], int],
) -> tuple[list[dict[str, str]], list[tuple[int, int, int]]]:
    """The allocations whose losses give the measured single-layer changes, and per quantized key
    ``(row of the key, job of its reference, job of the key)``: for each layer, the other layers in
    ``context`` (the reference), then the layer in each of its quantized formats on top."""
    background = {f: fmt for f, fmt in context.items() if is_quantized(fmt)}
    jobs: list[dict[str, str]] = []
    slots: list[tuple[int, int, int]] = []
    for f in options.layers:
        others = {g: fmt for g, fmt in background.items() if g != f}
        ref = len(jobs)
        jobs.append(others)
        for fmt in (o.format for o in options.options[f]):
            if (f, fmt) in deltas:
                slots.append((index[(f, fmt)], ref, len(jobs)))
                jobs.append({**others, f: fmt})
    return jobs, slots


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


def middle_format(options: OptionTable, fqn: str) -> str:
    """The median-bits candidate of a layer ({2,4,8} → int4, {4,8,float} → int8)."""
    fmts = sorted((o.format for o in options.options[fqn]), key=format_bits)
    return fmts[len(fmts) // 2]


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
