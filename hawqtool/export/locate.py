"""Layer sites: where each quantizable layer's weight lives in the float ONNX graph, and who uses it.

The dynamo exporter renames and re-lays-out weights: the Linear of a 3-D input becomes a ``MatMul``
on a pre-transposed constant (``val_6``), a tied weight (GPT-2's ``wte`` / ``lm_head``) becomes
one constant read by a ``Gather`` and a second, transposed constant read by a ``MatMul``, and a
Linear called on both a 2-D and a 3-D tensor gets a ``Gemm`` on ``W`` and a ``MatMul`` on a copy
of ``Wᵀ``. So layers are found by value: every initializer that a Conv / Gemm / MatMul reads as
its weight, or a ``Gather`` reads as its table, and that equals the layer's weight in either
layout, is a copy of it; every node that reads a copy is a use.

:func:`locate_layers` then rewrites the graph so that each layer's weight is stored once: another
copy in the same layout is replaced by the stored one, one in the other layout by a ``Transpose`` of
it (onnxruntime folds it when it loads the model). Every format then stores one set of integers
per layer, which is what the size cost model counts.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from hawqtool.errors import ExportError
from hawqtool.formats import ACTIVATION_KINDS
from hawqtool.prepare import PreparedModel

if TYPE_CHECKING:
    import onnx

#: Ops that read a layer's weight as their second input.
WEIGHT_OPS = ("Conv", "Gemm", "MatMul")
#: Activation functions onnxruntime folds into a following QuantizeLinear (ReluQuantFusion /
#: ClipQuantFusion): a layer's output is taken after one that is its only consumer.
FOLDABLE_ACTIVATIONS = ("Relu", "Clip")


@dataclass(frozen=True)
class WeightUse:
    """One node that reads a layer's weight.

    Attributes:
        node: the node's name (unique in the graph).
        op_type: ``Conv``, ``Gemm``, ``MatMul`` or ``Gather``.
        tensor: the tensor it reads as its weight: the stored initializer, or a ``Transpose`` of it.
        transposed: that tensor is the 2-D transpose of the weight view (``(in, out)``).
        input: the activation entering the node (a ``Gather``'s ids).
        output: the tensor leaving the layer: after the bias ``Add`` of a MatMul and a Relu/Clip
            that is its only consumer (what onnxruntime fuses into an integer kernel's output Q).
    """

    node: str
    op_type: str
    tensor: str
    transposed: bool
    input: str
    output: str

    @property
    def computes(self) -> bool:
        """Whether the node computes with its input (not a lookup): its activations can be quantized."""
        return self.op_type in WEIGHT_OPS


@dataclass(frozen=True)
class LayerSite:
    """Where one quantizable layer lives in the float ONNX graph.

    Attributes:
        fqn: the layer's name.
        weight: the one initializer that stores its weight.
        transposed: that initializer is the 2-D transpose of the weight view (MatMul layout).
        uses: every node that reads the weight, in graph order.
        activations: the layer's input can be quantized (not an embedding's ids).
        exclusive: every node that reads the weight (or a copy) is one of ``uses``: no other op
            reads it as data, so an emitter that replaces every use may drop the float tensor.
    """

    fqn: str
    weight: str
    transposed: bool
    uses: tuple[WeightUse, ...]
    activations: bool = True
    exclusive: bool = True

    @property
    def axis(self) -> int:
        """The output-channel axis of the stored initializer."""
        return 1 if self.transposed else 0

    @property
    def op_type(self) -> str:
        """The first use's op."""
        return self.uses[0].op_type

    @property
    def input(self) -> str:
        """The first use's input."""
        return self.uses[0].input

    @property
    def output(self) -> str:
        """The first use's output."""
        return self.uses[0].output

    @property
    def tensors(self) -> tuple[str, ...]:
        """The stored weight and every transposed copy of it that a use reads."""
        return tuple(dict.fromkeys([self.weight, *(u.tensor for u in self.uses)]))


def locate_layers(
    model: onnx.ModelProto, prepared: PreparedModel
) -> tuple[onnx.ModelProto, dict[str, LayerSite]]:
    """Find every copy and every use of each layer's weight, and store each weight once.

    Args:
        model: the float model from :func:`hawqtool.export.torch_export.export_float_onnx` (not
            modified).
        prepared: the prepared model whose layers to find.

    Returns:
        A copy of ``model`` in which each layer's weight is one initializer (other copies are
        read through a ``Transpose`` of it, or replaced by it), and ``fqn ->`` :class:`LayerSite`.

    Raises:
        ExportError: a layer has no copy in the graph (the exporter rewrote it in a way hawqtool
            does not understand), shares its only copy with another layer (equal weights that the
            exporter merged), or is read by a MatMul as a tensor of rank other than 2.
    """
    import onnx  # lazy: see hawqtool.export's docstring
    from onnx import helper, numpy_helper

    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    inits = {t.name: t for t in graph.initializer}
    consumers: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
    for node in graph.node:
        for pos, name in enumerate(node.input):
            consumers.setdefault(name, []).append((node, pos))
    graph_outputs = {o.name for o in graph.output}

    # Candidate copies, in the order the graph first reads them.
    candidates: dict[str, None] = {}
    for node in graph.node:
        if node.op_type in WEIGHT_OPS and len(node.input) > 1 and node.input[1] in inits:
            candidates.setdefault(node.input[1])
        elif node.op_type == "Gather" and node.input[0] in inits and attribute(node, "axis", 0) == 0:
            candidates.setdefault(node.input[0])
    arrays: dict[str, np.ndarray] = {}

    def array(name: str) -> np.ndarray:
        if name not in arrays:
            t = inits[name]
            if t.data_type == onnx.TensorProto.FLOAT and t.raw_data:
                # A read-only view of the raw bytes, without numpy_helper's second copy.
                arrays[name] = np.frombuffer(t.raw_data, np.float32).reshape(tuple(t.dims))
            else:
                arrays[name] = numpy_helper.to_array(t)
        return arrays[name]

    dims = {name: tuple(inits[name].dims) for name in candidates}
    # Initializers named after a parameter (``model.fc.weight``) belong to that layer, even when
    # another layer has equal values (untied copies, e.g. freshly initialised layers).
    params = {info.param: info.fqn for info in prepared.layers}
    named = {c: params[c.partition(".")[2]] for c in candidates if c.partition(".")[2] in params}
    named.update({c: params[c] for c in candidates if c in params})

    sites: dict[str, LayerSite] = {}
    owner: dict[str, str] = {}  # candidate -> the layer it was matched to
    head: list[onnx.NodeProto] = []
    for info in prepared.layers:
        w = prepared.weight(info.fqn).detach().cpu().numpy()
        copies: list[tuple[str, bool]] = []
        merged = []
        for name in candidates:
            if dims[name] == w.shape and np.array_equal(array(name), w):
                layout = False
            elif w.ndim == 2 and dims[name] == w.shape[::-1] and np.array_equal(array(name), w.T):
                layout = True
            else:
                continue
            other = owner.get(name) or named.get(name, info.fqn)
            if other != info.fqn:
                merged.append(other)
            else:
                copies.append((name, layout))
        if not copies:
            why = (
                f"its weight equals that of layer {merged[0]!r} and the exporter stored them as one "
                "tensor, which cannot take two formats (make the weights differ, or tie them in "
                "the model)"
                if merged
                else "no Conv/Gemm/MatMul/Gather weight in the exported graph equals its weight; "
                "the exporter rewrote it in a way hawqtool does not understand (pin the layer to "
                "float to skip it)"
            )
            raise ExportError(f"layer {info.fqn!r} ({info.kind}): {why}")
        weight, transposed = copies[0]
        tensor_of: dict[str, str] = {}  # copy -> what its readers read after de-duplication
        for name, layout in copies:
            owner[name] = info.fqn
            if name == weight:
                tensor_of[name] = name
                continue
            graph.initializer.remove(inits[name])
            if layout == transposed:
                tensor_of[name] = weight
                for node, pos in consumers.get(name, []):
                    node.input[pos] = weight
            else:
                tensor_of[name] = name  # same name, now a Transpose output: readers unchanged
                head.append(
                    helper.make_node("Transpose", [weight], [name], name=f"{name}_Transpose", perm=[1, 0])
                )
        uses = []
        exclusive = True
        for name, layout in copies:
            for node, pos in consumers.get(name, []):
                if node.op_type == "Gather" and pos == 0:
                    uses.append(
                        WeightUse(node.name, "Gather", tensor_of[name], layout, node.input[1], node.output[0])
                    )
                elif node.op_type in WEIGHT_OPS and pos == 1:
                    if node.op_type == "MatMul" and array(name).ndim != 2:
                        raise ExportError(
                            f"layer {info.fqn!r}: MatMul weight of rank {array(name).ndim} is not supported"
                        )
                    output = _layer_output(node, consumers, inits, graph_outputs)
                    uses.append(
                        WeightUse(node.name, node.op_type, tensor_of[name], layout, node.input[0], output)
                    )
                else:
                    exclusive = False
        order = {n.name: i for i, n in enumerate(graph.node)}
        sites[info.fqn] = LayerSite(
            fqn=info.fqn,
            weight=weight,
            transposed=transposed,
            uses=tuple(sorted(uses, key=lambda u: order[u.node])),
            activations=info.kind in ACTIVATION_KINDS,
            exclusive=exclusive,
        )
    if head:
        nodes = [*head, *graph.node]
        del graph.node[:]
        graph.node.extend(nodes)
    return out, sites


def _layer_output(
    node: onnx.NodeProto,
    consumers: Mapping[str, list[tuple[onnx.NodeProto, int]]],
    inits: Mapping[str, Any],
    graph_outputs: set[str],
) -> str:
    out = node.output[0]
    nxt = [n for n, _ in consumers.get(out, [])]
    if (
        node.op_type == "MatMul"
        and len(nxt) == 1
        and nxt[0].op_type == "Add"
        and out not in graph_outputs
        and any(i in inits for i in nxt[0].input if i != out)
    ):
        # Linear = MatMul + bias Add: the layer's output is after the bias.
        out = nxt[0].output[0]
        nxt = [n for n, _ in consumers.get(out, [])]
    if len(nxt) == 1 and nxt[0].op_type in FOLDABLE_ACTIVATIONS and out not in graph_outputs:
        out = nxt[0].output[0]
    return out


def attribute(node: onnx.NodeProto, name: str, default: Any) -> Any:
    """The value of a node's attribute, or ``default`` when the node does not set it."""
    from onnx import helper  # lazy: see hawqtool.export's docstring

    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default
