"""Float export: the prepared torch model to ONNX with torch's dynamo exporter, through the
model-I/O contract (named inputs with dynamic axes, one output named ``output``)."""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch

from hawqtool import modelio
from hawqtool.errors import ExportError
from hawqtool.modelio import ModelIO

if TYPE_CHECKING:
    import onnx

#: The newest opset torch's dynamo exporter emits; higher opsets are reached with onnx's
#: version converter.
TORCH_MAX_OPSET = 21
#: Oldest opset the dynamo exporter emits (it silently raises anything lower to 18).
MIN_OPSET = 18
INPUT_NAME = "input"
OUTPUT_NAME = "output"


def export_float_onnx(
    model: torch.nn.Module, example_input: Any, *, opset: int, io: ModelIO | None = None
) -> onnx.ModelProto:
    """Export ``model`` with torch's dynamo exporter at ``opset``, through the model-I/O contract.

    The graph's inputs are the leaves of the input pytree, named by ``io`` (``input`` for a lone
    tensor, ``input_ids`` / ``attention_mask`` for a dict), with the batch axis and ``io``'s other
    dynamic axes (token axes, axes that vary in the data) left dynamic; its one output, ``output``,
    is the tensor ``task.output`` selects.

    Why dynamo: it is torch's supported exporter and emits opset 21 (INT4 ``DequantizeLinear``)
    natively; the TorchScript exporter is deprecated. It costs ~1.5–3 s per model here, paid once per
    :meth:`QDQExporter.build`, not per allocation.

    Raises:
        ExportError: torch.onnx fails, or the result is not at ``opset``.
    """
    io = io or ModelIO.from_batches([(example_input, None)])
    flat = [x.detach() for x in io.flatten(example_input)]
    if modelio.batch_size(example_input) < 2:
        # torch.export specializes a dimension of size 1; trace with 2 to keep the batch dynamic.
        flat = [torch.cat([x, x]) for x in flat]
    # Dim.AUTO lets torch.export find which axes are equal (the batch of every input, the token axis
    # of ids and mask) instead of us naming and relating them.
    # forward(*flat) takes one varargs tuple: the shapes are nested in it.
    dynamic = (tuple({a: torch.export.Dim.AUTO for a in io.dynamic_axes[n]} for n in io.input_names),)
    with _quiet_torch_onnx(), torch.no_grad():
        try:
            program = torch.onnx.export(
                io.flat_module(model),
                tuple(flat),
                dynamo=True,
                opset_version=min(opset, TORCH_MAX_OPSET),
                input_names=list(io.input_names),
                output_names=[OUTPUT_NAME],
                dynamic_shapes=dynamic,
                external_data=False,
                verbose=False,
            )
        except Exception as e:  # torch.export / onnxscript raise dozens of unrelated types
            raise ExportError(f"torch.onnx.export failed for {type(model).__name__}: {e}") from e
    if program is None:
        raise ExportError("torch.onnx.export returned no program")
    proto = program.model_proto
    got = {o.domain: o.version for o in proto.opset_import}.get("")
    if got != min(opset, TORCH_MAX_OPSET):
        raise ExportError(f"torch.onnx exported opset {got}, asked for {min(opset, TORCH_MAX_OPSET)}")
    if opset > TORCH_MAX_OPSET:
        try:
            proto = convert_opset(proto, opset)
        except Exception as e:  # the converter raises bare RuntimeError/ValidationError per adapter
            raise ExportError(f"cannot convert the exported model from opset {got} to {opset}: {e}") from e
    _name_nodes(proto)
    _strip_debug_info(proto)
    return proto


#: Where :func:`convert_opset` says an initializer's bytes are while the converter runs (nowhere).
_SET_ASIDE = "hawqtool-set-aside"


def convert_opset(model: onnx.ModelProto, opset: int) -> onnx.ModelProto:
    """``onnx.version_converter.convert_version`` for a model of any size.

    The converter serializes the model, which protobuf refuses past 2 GiB, so it gets the graph with
    the initializers' bytes set aside (marked external, the data left out of the message) and the
    bytes go back, by name, into the converted model: the weights are neither copied nor touched.
    ``model``'s initializers are left without their bytes: pass a model you do not need afterwards.
    """
    from onnx import TensorProto, version_converter  # lazy: see hawqtool.export's docstring

    aside: dict[str, bytes] = {}
    for t in model.graph.initializer:
        if t.HasField("raw_data") and t.name not in aside:
            aside[t.name] = t.raw_data
            t.ClearField("raw_data")
            t.data_location = TensorProto.EXTERNAL
            del t.external_data[:]
            t.external_data.add(key="location", value=_SET_ASIDE)
    converted = version_converter.convert_version(model, opset)
    for t in converted.graph.initializer:
        if t.data_location == TensorProto.EXTERNAL and t.name in aside:
            del t.external_data[:]
            t.data_location = TensorProto.DEFAULT
            t.raw_data = aside[t.name]
    left = [t.name for t in converted.graph.initializer if t.data_location == TensorProto.EXTERNAL]
    assert not left, f"initializers the converter renamed: {left}"
    return converted


def _strip_debug_info(model: onnx.ModelProto) -> None:
    # The dynamo exporter annotates every node with its Python stack trace and FX node (5 % of a
    # ResNet-20 file, with local paths in it) and records value_info that onnxruntime re-infers.
    # Neither belongs in a deployed file, and the file size should be weights + graph.
    for node in model.graph.node:
        del node.metadata_props[:]
        node.doc_string = ""
    for init in model.graph.initializer:
        del init.metadata_props[:]
    del model.graph.value_info[:]
    model.graph.doc_string = ""


@contextlib.contextmanager
def _quiet_torch_onnx() -> Iterator[None]:
    # The dynamo exporter prints progress lines on stdout, warns that torchvision's ops are not
    # registered and logs its optimizer passes at INFO: none of it is news to a hawqtool user.
    noisy = [logging.getLogger(n) for n in ("torch.onnx", "onnxscript", "onnx_ir")]
    levels = [lg.level for lg in noisy]
    try:
        for lg in noisy:
            lg.setLevel(logging.ERROR)
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            yield
    finally:
        for lg, level in zip(noisy, levels, strict=True):
            lg.setLevel(level)


def _name_nodes(model: onnx.ModelProto) -> None:
    seen: set[str] = set()
    for i, node in enumerate(model.graph.node):
        if not node.name or node.name in seen:
            node.name = f"{node.op_type}_{i}"
        seen.add(node.name)
