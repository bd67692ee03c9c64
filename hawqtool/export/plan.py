"""Which activation tensors get uint8 Q→DQ for a set of quantized layers."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from hawqtool.export.locate import FOLDABLE_ACTIVATIONS, LayerSite

if TYPE_CHECKING:
    import onnx
#: Ops that onnxruntime runs directly on uint8 when the Q after them has the same scale and zero
#: point as the DQ before them (it drops the pair): their output shares their input's parameters,
#: which is exact (max, reshape and transpose commute with a monotone per-tensor quantizer).
SHARED_SCALE_OPS = ("MaxPool", "Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze")
#: Ops with a requantizing integer kernel (QLinearAdd, QLinearAveragePool, ...): when all their
#: inputs are quantized, their output gets its own calibrated uint8 parameters.
REQUANT_OPS = ("Add", "AveragePool", "GlobalAveragePool", "Concat")
#: Weight ops whose output is quantized too: onnxruntime's integer kernels for them (QLinearConv,
#: QGemm) want a Q after the op. A MatMul's input alone is quantized: DQ → MatMul runs as
#: MatMulIntegerToFloat with a float output, so a transformer's residual stream, attention scores
#: and softmax inputs stay float (quantizing them too lost fidelity and was slower).
OUTPUT_QUANTIZED_OPS = ("Conv", "Gemm")
#: Part of the dependency stage's cache key for exported numerics: bump when the plan changes.
PLAN_VERSION = 2


def activation_tensors(sites: Iterable[LayerSite]) -> dict[str, None]:
    """The input of every use of ``sites`` that computes with activations (every consuming Conv /
    Gemm / MatMul, not only the first; a Gather's ids are not activations), and the output of the
    Conv and Gemm uses (:data:`OUTPUT_QUANTIZED_OPS`), in order, without repeats."""
    out: dict[str, None] = {}
    for site in sites:
        for use in site.uses:
            if use.computes:
                out.setdefault(use.input)
                if use.op_type in OUTPUT_QUANTIZED_OPS:
                    out.setdefault(use.output)
    return out


def quantization_plan(graph: onnx.GraphProto, sites: Iterable[LayerSite]) -> dict[str, str | None]:
    """The activation tensors that get Q→DQ when ``sites`` are quantized, in graph order.

    Maps each tensor to ``None`` (its own calibrated parameters) or to the tensor whose parameters
    it shares. Quantized layers quantize the input of every use of their weight, and the output of
    a Conv or Gemm use (:func:`activation_tensors`); from
    there the uint8 region grows forward through ops that have integer kernels, as onnxruntime's
    ``quantize_static`` does: without it, a pooling or residual ``Add`` between two quantized
    layers would round-trip through float (DQ → op → Q). Graph outputs are only quantized when a quantized layer produces them (``QGemm`` needs
    its output Q).
    """
    inits = {t.name for t in graph.initializer}
    graph_outputs = {o.name for o in graph.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    plan: dict[str, str | None] = dict.fromkeys(activation_tensors(sites))
    for node in graph.node:
        acts = [i for i in node.input if i and i not in inits]
        if not acts or not node.output:
            continue
        out = node.output[0]
        if node.op_type in SHARED_SCALE_OPS and acts[0] in plan and out not in graph_outputs:
            src = acts[0]
            while plan.get(src) is not None:
                src = plan[src]  # type: ignore[assignment]
            plan[out] = src
        elif node.op_type in REQUANT_OPS and all(a in plan for a in acts):
            nxt = consumers.get(out, [])
            if len(nxt) == 1 and nxt[0].op_type in FOLDABLE_ACTIVATIONS and out not in graph_outputs:
                out = nxt[0].output[0]
            if out not in graph_outputs:
                plan.setdefault(out, None)
    return plan
