"""Export a prepared model to ONNX and insert QDQ (QuantizeLinear / DequantizeLinear) per allocation.

The search exports many allocations of one model, so the expensive work happens once in
:meth:`QDQExporter.build`: the BN-folded float model is exported with ``torch.onnx`` (dynamo
exporter, dynamic batch axis), each layer is matched to the ONNX initializer that holds its weight,
and activation ranges are calibrated once with onnxruntime's own calibrators. Each
:meth:`QDQExporter.quantized_model` call is then pure graph surgery on protobufs (milliseconds).

What a quantized layer becomes (the placement onnxruntime 1.32's CPU QDQ fusion turns into
integer kernels; measured, see ``tests/test_export.py`` and ``scripts/bench_export.py``)::

    x ─► Q(u8) ─► DQ ─┐
    W_int ─► DQ(axis) ─┴► Conv / Gemm / MatMul(+bias Add) [─► Relu] ─► Q(u8) ─► DQ ─► ...

- weights: the integers and per-output-channel float32 scales of
  :func:`hawqtool.quantizer.quantize_weight` (the function sensitivity scores), stored as ONNX
  ``INT2`` (``int4_storage="packed"``, b = 2, opset ≥ 25), ``INT4`` (packed, b ≤ 4, opset ≥ 21) or
  ``INT8`` (``"container"`` or b > 4).
  Packed weights pass through a ``Cast`` to INT8 that onnxruntime folds at load time, so they
  fuse into the same integer kernels as int8. No zero point (symmetric), except an all-zero int8
  one on Gemm weights: QGemm fusion needs it. Biases stay float: onnxruntime quantizes them to int32 itself when it fuses.
- activations: the tensor entering the layer and the tensor leaving it (after a Relu/Clip that is
  its only consumer, which onnxruntime folds into the Q) get Q→DQ with a uint8 scale and zero
  point from the calibrated range (onnxruntime's formula). The output Q is what lets onnxruntime
  fuse ``DQ → Conv → Q`` into ``QLinearConv`` (and Gemm into ``QGemm``, even for the logits);
  without it the layer runs in float. From there the uint8 region grows through pooling,
  reshapes and residual adds whose inputs are all quantized (:func:`quantization_plan`), as
  ``quantize_static`` does, so that nothing round-trips through float between integer kernels.
- ``float`` layers keep their float weights; they see quantized activations only where a
  neighbouring quantized layer quantizes the tensor they share (as the integer kernels would).

For uniform int8 the optimized onnxruntime graph is the same, node for node, as that of
onnxruntime's own ``quantize_static`` (QDQ, uint8/int8 per-channel) on the zoo CNNs.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import tempfile
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from hawqtool import __version__
from hawqtool.errors import ExportError, UsageError
from hawqtool.types import (
    DEFAULT_OPSET,
    FLOAT,
    INT4_MIN_OPSET,
    KNOWN_FORMATS,
    STORAGES,
    format_bits,
    is_quantized,
    write_bytes_atomic,
)

if TYPE_CHECKING:
    import onnx
    import torch

    from hawqtool.prepare import PreparedModel

log = logging.getLogger(__name__)

CALIBRATION_METHODS = ("minmax", "percentile", "entropy")
#: Storage modes of sub-5-bit weights (the cost model's own list).
INT4_STORAGES = STORAGES
#: The newest opset torch's dynamo exporter emits; higher opsets are reached with onnx's
#: version converter (measured on ResNet-20: identical outputs and integer kernels at 25).
TORCH_MAX_OPSET = 21
#: Oldest opset the dynamo exporter emits (it silently raises anything lower to 18).
MIN_OPSET = 18
INPUT_NAME = "input"
OUTPUT_NAME = "output"
METADATA_ALLOCATION = "hawqtool.allocation"
METADATA_VERSION = "hawqtool.version"

# Ops whose second input is a layer's weight, and the activation functions onnxruntime folds into a
# following QuantizeLinear (ReluQuantFusion / ClipQuantFusion).
_WEIGHT_OPS = ("Conv", "Gemm", "MatMul")
_FOLDABLE_ACTIVATIONS = ("Relu", "Clip")


def _storage_bits(fmt: str, int4_storage: str, opset: int) -> int:
    """Bits one weight of ``fmt`` occupies in the file: the size cost model's own function."""
    from hawqtool.sensitivity import storage_bits  # imports torch: kept out of ``import hawqtool.export``

    return storage_bits(fmt, storage=int4_storage, opset=opset)


@dataclass(frozen=True)
class LayerSite:
    """Where one quantizable layer lives in the float ONNX graph.

    Attributes:
        fqn: the layer's module name.
        weight: name of the initializer holding its weight.
        axis: output-channel axis of that initializer (1 where the exporter stored ``Wᵀ``).
        transposed: the initializer is the 2-D transpose of the torch weight (MatMul, Gemm
            without ``transB``).
        op_type: the node that consumes the weight (``Conv``, ``Gemm`` or ``MatMul``).
        input: the activation tensor entering the layer.
        output: the tensor leaving it (after the bias ``Add`` of a MatMul and a Relu/Clip that is
            its only consumer), quantized so that onnxruntime can fuse an integer kernel.
    """

    fqn: str
    weight: str
    axis: int
    transposed: bool
    op_type: str
    input: str
    output: str


@dataclass(frozen=True)
class ActivationQuant:
    """uint8 affine quantization of one activation tensor: ``x ≈ scale · (q − zero_point)``."""

    scale: float
    zero_point: int
    rmin: float
    rmax: float


def uint8_qparams(rmin: float, rmax: float) -> tuple[np.float32, np.uint8]:
    """Scale and zero point of a uint8 tensor covering ``[rmin, rmax]``, as onnxruntime computes them.

    The range is widened to include 0 (so 0 is exact, as padding needs); the scale is
    ``(rmax − rmin) / 255`` stored in float32 and the zero point ``round(−rmin / scale)``, the
    formula of ``onnxruntime.quantization.quant_utils.compute_scale_zp`` (asymmetric, qmin = 0).
    A degenerate range (all zeros) gets scale 1, zero point 0.

    Example:
        >>> s, z = uint8_qparams(0.0, 2.55)
        >>> round(float(s), 6), int(z)
        (0.01, 0)
    """
    lo = min(float(rmin), 0.0)
    hi = max(float(rmax), 0.0)
    scale = (np.float64(hi) - np.float64(lo)) / 255.0
    if scale < np.finfo(np.float32).tiny:
        return np.float32(1.0), np.uint8(0)
    zero_point = np.uint8(np.clip(np.round(0.0 - lo / scale), 0, 255))
    return np.float32(scale), zero_point


class QDQExporter:
    """Float ONNX export + calibrated activation ranges of one model; QDQ models per allocation.

    Build it once with :meth:`build`, then call :meth:`quantized_model` / :meth:`export` for as
    many allocations as the search needs (quantized weights are cached per layer and format).

    Attributes:
        float_model: the BN-folded float model, dynamic batch axis, input ``input``.
        layer_weights: ``fqn -> name`` of the initializer holding the layer's weight.
        sites: ``fqn ->`` :class:`LayerSite` (weight layout, activation tensors).
        activations: calibrated :class:`ActivationQuant` of every tensor an allocation can
            quantize.
        prepared: the model the exporter was built from.

    Example:
        >>> exporter = QDQExporter.build(prepared, splits.calibration)   # doctest: +SKIP
        >>> exporter.export({fqn: "int8" for fqn in prepared.fqns}, Path("m.onnx"))  # doctest: +SKIP
    """

    def __init__(
        self,
        *,
        float_model: onnx.ModelProto,
        prepared: PreparedModel,
        sites: Mapping[str, LayerSite],
        activations: Mapping[str, ActivationQuant],
        opset: int,
        int4_storage: str,
        clip_search: bool,
        calibration_method: str,
        calibration_batches: int,
    ) -> None:
        self.float_model = float_model
        self.prepared = prepared
        self.sites = dict(sites)
        self.activations = dict(activations)
        self.opset = opset
        self.int4_storage = int4_storage
        self.clip_search = clip_search
        self.calibration_method = calibration_method
        self.calibration_batches = calibration_batches
        self.layer_weights: Mapping[str, str] = {f: s.weight for f, s in self.sites.items()}
        self._weight_cache: dict[tuple[str, int, int], tuple[onnx.TensorProto, ...]] = {}

    # ----------------------------------------------------------------------------------------
    # Construction
    # ----------------------------------------------------------------------------------------

    @classmethod
    def build(
        cls,
        prepared: PreparedModel,
        calibration: Sequence[tuple[torch.Tensor, torch.Tensor]],
        *,
        opset: int = DEFAULT_OPSET,
        calibration_method: str = "minmax",
        int4_storage: str = "packed",
        clip_search: bool = True,
        max_calibration_batches: int | None = None,
    ) -> QDQExporter:
        """Export the float model, locate every layer's weight and calibrate activation ranges.

        Args:
            prepared: the BN-folded model from :func:`hawqtool.prepare.prepare_model`.
            calibration: ``(inputs, targets)`` batches; only the inputs are used.
            opset: ONNX opset of the exported model (≥ 18; packed int4 weights need 21, packed
                int2 weights 25, below which int2 is packed as INT4).
            calibration_method: ``minmax``, ``percentile`` or ``entropy`` (onnxruntime's
                ``CalibrationMethod``; percentile at 99.999 %, asymmetric).
            int4_storage: ``packed`` stores b ≤ 4-bit weights as ONNX INT4 (half the bytes,
                float kernels in onnxruntime on CPU); ``container`` keeps them in INT8 (integer
                kernels, same size as int8).
            clip_search: passed to :func:`hawqtool.quantizer.quantize_weight`; must match what
                sensitivity used.
            max_calibration_batches: use at most this many calibration batches.

        Raises:
            UsageError: a bad option or an empty calibration split.
            ExportError: torch.onnx cannot export the model, a layer's weight cannot be found in
                the graph, or onnxruntime fails during calibration.
        """
        if calibration_method not in CALIBRATION_METHODS:
            raise UsageError(
                f"unknown calibration_method {calibration_method!r}; "
                f"allowed: {', '.join(CALIBRATION_METHODS)}"
            )
        if int4_storage not in INT4_STORAGES:
            raise UsageError(f"unknown int4_storage {int4_storage!r}; allowed: {', '.join(INT4_STORAGES)}")
        if not isinstance(opset, int) or opset < MIN_OPSET:
            raise UsageError(f"opset {opset!r} is not supported; use an integer >= {MIN_OPSET}")
        if max_calibration_batches is not None and max_calibration_batches < 1:
            raise UsageError(f"max_calibration_batches must be >= 1, got {max_calibration_batches}")
        inputs = _calibration_inputs(calibration, max_calibration_batches)
        start = time.perf_counter()
        float_model = export_float_onnx(prepared.model, prepared.example_input, opset=opset)
        sites = _locate_layers(float_model, prepared)
        # Every tensor any allocation can quantize: the plan of the all-quantized allocation is a
        # superset of every other plan (propagation only grows with more quantized layers).
        plan = quantization_plan(float_model.graph, sites.values())
        needed = {t for s in sites.values() for t in (s.input, s.output)}
        needed |= {t for t, src in plan.items() if src is None}
        ranges = _calibrate(float_model, sorted(needed), inputs, calibration_method)
        activations = {}
        for name in needed:
            rmin, rmax = ranges[name]
            scale, zp = uint8_qparams(rmin, rmax)
            activations[name] = ActivationQuant(float(scale), int(zp), rmin, rmax)
        log.info(
            "exported %d layers at opset %d, calibrated %d activations (%s, %d batches) in %.1f s",
            len(sites),
            opset,
            len(needed),
            calibration_method,
            len(inputs),
            time.perf_counter() - start,
        )
        return cls(
            float_model=float_model,
            prepared=prepared,
            sites=sites,
            activations=activations,
            opset=opset,
            int4_storage=int4_storage,
            clip_search=clip_search,
            calibration_method=calibration_method,
            calibration_batches=len(inputs),
        )

    def with_int4_storage(self, int4_storage: str) -> QDQExporter:
        """The same exporter (float model and calibration shared) with another int4 storage mode.

        Raises:
            UsageError: an unknown storage mode.
        """
        if int4_storage not in INT4_STORAGES:
            raise UsageError(f"unknown int4_storage {int4_storage!r}; allowed: {', '.join(INT4_STORAGES)}")
        return QDQExporter(
            float_model=self.float_model,
            prepared=self.prepared,
            sites=self.sites,
            activations=self.activations,
            opset=self.opset,
            int4_storage=int4_storage,
            clip_search=self.clip_search,
            calibration_method=self.calibration_method,
            calibration_batches=self.calibration_batches,
        )

    # ----------------------------------------------------------------------------------------
    # Per-allocation models
    # ----------------------------------------------------------------------------------------

    @property
    def fqns(self) -> tuple[str, ...]:
        """The quantizable layers, in model order."""
        return tuple(self.sites)

    def full_allocation(self, allocation: Mapping[str, str]) -> dict[str, str]:
        """Check ``allocation`` and complete it: layers it does not name stay ``float``.

        Raises:
            UsageError: an unknown layer or format, or packed int4 below opset 21.
        """
        unknown = [f for f in allocation if f not in self.sites]
        if unknown:
            raise UsageError(
                f"allocation names unknown layer(s) {', '.join(map(repr, unknown))}; "
                f"layers are: {', '.join(self.sites)}"
            )
        for fqn, fmt in allocation.items():
            if fmt not in KNOWN_FORMATS:
                raise UsageError(
                    f"layer {fqn!r}: unknown format {fmt!r}; allowed: {', '.join(KNOWN_FORMATS)}"
                )
            if self.opset < INT4_MIN_OPSET and _storage_bits(fmt, self.int4_storage, self.opset) == 4:
                raise UsageError(
                    f"layer {fqn!r}: {fmt} weights stored packed as ONNX INT4 need opset >= "
                    f"{INT4_MIN_OPSET}, the exporter was built with opset {self.opset}; "
                    "build with opset=21 or int4_storage='container'"
                )
        return {f: allocation.get(f, FLOAT) for f in self.sites}

    def weight_bytes(self, allocation: Mapping[str, str]) -> int:
        """Bytes of the weight tensors the exported model stores for ``allocation``.

        The size cost model (:func:`hawqtool.sensitivity.layer_cost`: ``ceil(params ·
        storage_bits / 8)`` integers + ``4 · out_channels`` float32 scales per quantized layer,
        ``4 · params`` per float one) plus ``out_channels`` bytes of int8 zero point for a quantized
        Gemm, which onnxruntime needs to fuse QGemm. Biases, activation scales and
        zero points and the graph itself are the rest of the file.
        """
        from hawqtool.sensitivity import layer_cost

        full = self.full_allocation(allocation)
        total = 0
        for info in self.prepared.layers:
            fmt = full[info.fqn]
            total += int(layer_cost(info, fmt, cost="size", storage=self.int4_storage, opset=self.opset))
            if self.sites[info.fqn].op_type == "Gemm" and is_quantized(fmt):
                total += info.out_channels
        return total

    def quantized_model(
        self, allocation: Mapping[str, str], *, metadata: Mapping[str, str] | None = None
    ) -> onnx.ModelProto:
        """The float model with QDQ inserted for the quantized layers of ``allocation``.

        Args:
            allocation: ``fqn -> format`` (``int2``..``int8`` or ``float``); layers not named stay
                float.
            metadata: extra ``metadata_props`` (string keys and values).

        Raises:
            UsageError: an unknown layer or format, packed int4 below opset 21, or metadata that
                would overwrite hawqtool's own keys.
        """
        import onnx
        from onnx import TensorProto, helper

        full = self.full_allocation(allocation)
        extra = dict(metadata or {})
        for key in (METADATA_ALLOCATION, METADATA_VERSION):
            if key in extra:
                raise UsageError(f"metadata key {key!r} is reserved for hawqtool")

        quantized = [self.sites[f] for f, fmt in full.items() if is_quantized(fmt)]
        replaced: set[str] = set()
        new_inits: list[onnx.TensorProto] = []
        head_nodes: list[onnx.NodeProto] = []
        for site in quantized:
            inits = self._quantized_weight(site, format_bits(full[site.fqn]))
            new_inits += inits
            replaced.add(site.weight)
            dq_inputs = [t.name for t in inits]
            if inits[0].data_type in (TensorProto.INT2, TensorProto.INT4):
                # Packed weights reach DequantizeLinear through a Cast to INT8, which onnxruntime
                # folds into an int8 initializer when it loads the model: the file keeps the small
                # packed integers and the graph still fuses into QLinearConv / QGemm. A direct INT4
                # DQ runs dequantize + float compute (FACTS.md: 4–16× slower), and a direct INT2
                # DQ is fused into a QLinearConv that onnxruntime 1.32 then rejects.
                dq_inputs[0] = f"{inits[0].name}_int8"
                head_nodes.append(
                    helper.make_node(
                        "Cast",
                        [inits[0].name],
                        [dq_inputs[0]],
                        name=f"{inits[0].name}_Cast",
                        to=TensorProto.INT8,
                    )
                )
            # The DequantizeLinear output takes over the float initializer's name, so every node
            # that read the weight now reads the dequantized weight without any rewiring.
            head_nodes.append(
                helper.make_node(
                    "DequantizeLinear",
                    dq_inputs,
                    [site.weight],
                    name=f"{site.weight}_DequantizeLinear",
                    axis=site.axis,
                )
            )

        graph = self.float_model.graph
        plan = quantization_plan(graph, quantized)
        graph_outputs = {o.name for o in graph.output}
        # Consumers of a quantized tensor read its DequantizeLinear output instead. A graph output
        # keeps its name: its producer writes ``T_prequant`` and the DequantizeLinear writes ``T``.
        rename = {t: f"{t}_DequantizeLinear_Output" for t in plan if t not in graph_outputs}
        produce = {t: f"{t}_prequant" for t in plan if t in graph_outputs}
        qdq_after: dict[str, list[onnx.NodeProto]] = {}
        for t, src in plan.items():
            s_name, z_name = f"{src or t}_scale", f"{src or t}_zero_point"
            if src is None:
                aq = self.activations[t]
                new_inits.append(helper.make_tensor(s_name, TensorProto.FLOAT, [], [aq.scale]))
                new_inits.append(helper.make_tensor(z_name, TensorProto.UINT8, [], [aq.zero_point]))
            q_out = f"{t}_QuantizeLinear_Output"
            qdq_after[t] = [
                helper.make_node(
                    "QuantizeLinear", [produce.get(t, t), s_name, z_name], [q_out], name=f"{t}_QuantizeLinear"
                ),
                helper.make_node(
                    "DequantizeLinear",
                    [q_out, s_name, z_name],
                    [rename.get(t, t)],
                    name=f"{t}_DequantizeLinear",
                ),
            ]

        nodes: list[onnx.NodeProto] = list(head_nodes)
        for inp in graph.input:
            nodes += qdq_after.get(inp.name, [])
        for node in graph.node:
            new = onnx.NodeProto()
            new.CopyFrom(node)
            for i, name in enumerate(new.input):
                if name in rename:
                    new.input[i] = rename[name]
            for i, name in enumerate(new.output):
                if name in produce:
                    new.output[i] = produce[name]
            nodes.append(new)
            for out in node.output:
                nodes += qdq_after.get(out, [])

        initializers = [t for t in graph.initializer if t.name not in replaced] + new_inits
        new_graph = helper.make_graph(
            nodes,
            graph.name,
            list(graph.input),
            list(graph.output),
            initializer=initializers,
            value_info=[v for v in graph.value_info if v.name not in replaced],
        )
        model = helper.make_model(
            new_graph,
            opset_imports=list(self.float_model.opset_import),
            ir_version=self.float_model.ir_version,
            producer_name="hawqtool",
            producer_version=__version__,
        )
        props = {
            METADATA_ALLOCATION: json.dumps(full),
            METADATA_VERSION: __version__,
            **{str(k): str(v) for k, v in extra.items()},
        }
        helper.set_model_props(model, props)
        return model

    def export(
        self, allocation: Mapping[str, str], path: str | Path, *, metadata: Mapping[str, str] | None = None
    ) -> Path:
        """Write the QDQ model of ``allocation`` to ``path`` after ``onnx.checker`` (full check).

        The file is written atomically: a failure leaves nothing at ``path``.

        Raises:
            UsageError: see :meth:`quantized_model`.
            ExportError: the model fails validation or ``path`` cannot be written.
        """
        return _write_model(self.quantized_model(allocation, metadata=metadata), Path(path))

    def export_float(self, path: str | Path, *, metadata: Mapping[str, str] | None = None) -> Path:
        """Write the float (BN-folded) model to ``path``, checked and atomically, like :meth:`export`."""
        return self.export({}, path, metadata=metadata)

    # ----------------------------------------------------------------------------------------

    def _quantized_weight(self, site: LayerSite, bits: int) -> tuple[onnx.TensorProto, ...]:
        storage = _storage_bits(f"int{bits}", self.int4_storage, self.opset)
        key = (site.fqn, bits, storage)
        if key not in self._weight_cache:
            with _torch_threads(1):
                self._weight_cache[key] = _weight_initializers(
                    site, self.prepared.weight(site.fqn), bits, storage, clip_search=self.clip_search
                )
        return self._weight_cache[key]


@contextlib.contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    """Run torch on ``n`` threads for a while. The quantizer's per-channel search is hundreds of
    tiny ops; with 2 OpenMP threads on a busy 2-core machine each op waits for a core (measured:
    3.5 s instead of 3 ms for one 64×64×3×3 weight), on 1 thread it never does."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


# --------------------------------------------------------------------------------------------
# Float export
# --------------------------------------------------------------------------------------------


def export_float_onnx(model: torch.nn.Module, example_input: torch.Tensor, *, opset: int) -> onnx.ModelProto:
    """Export ``model`` with torch's dynamo exporter at ``opset``, batch axis dynamic.

    Why dynamo: it is torch's supported exporter and emits opset 21 (INT4 ``DequantizeLinear``)
    natively; the TorchScript exporter is deprecated. It costs ~1.5–3 s per model here, paid once per
    :meth:`QDQExporter.build`, not per allocation.

    Raises:
        ExportError: torch.onnx fails, or the result is not at ``opset``.
    """
    import torch

    x = example_input.detach()
    if x.shape[0] < 2:
        # torch.export specializes a dimension of size 1; trace with 2 to keep the batch dynamic.
        x = torch.cat([x, x]) if x.shape[0] == 1 else x
    batch = torch.export.Dim("batch")
    with _quiet_torch_onnx(), torch.no_grad():
        try:
            program = torch.onnx.export(
                model,
                (x,),
                dynamo=True,
                opset_version=min(opset, TORCH_MAX_OPSET),
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamic_shapes=({0: batch},),
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
        from onnx import version_converter

        try:
            proto = version_converter.convert_version(proto, opset)
        except Exception as e:  # the converter raises bare RuntimeError/ValidationError per adapter
            raise ExportError(f"cannot convert the exported model from opset {got} to {opset}: {e}") from e
    _name_nodes(proto)
    _strip_debug_info(proto)
    return proto


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
    import warnings

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


# --------------------------------------------------------------------------------------------
# Locating layers in the graph
# --------------------------------------------------------------------------------------------


def _locate_layers(model: onnx.ModelProto, prepared: PreparedModel) -> dict[str, LayerSite]:
    """Match each quantizable layer to the initializer holding its weight, by name then by value.

    Exporters keep ``fqn.weight`` for Conv and Gemm, but the dynamo exporter stores the Linear of a
    3-D input as ``MatMul`` with a pre-transposed, renamed constant (``val_6``). A candidate is any
    initializer read as input 1 of a Conv / Gemm / MatMul; it matches a layer when it equals the
    layer's weight in that op's layout (bit-for-bit, constant folding only moves values).
    """
    from onnx import numpy_helper

    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    graph_outputs = {o.name for o in graph.output}

    candidates: dict[str, tuple[onnx.NodeProto, bool]] = {}  # initializer -> (node, transposed)
    for node in graph.node:
        if node.op_type in _WEIGHT_OPS and len(node.input) > 1 and node.input[1] in inits:
            transposed = node.op_type == "MatMul" or (node.op_type == "Gemm" and not _attr(node, "transB", 0))
            candidates.setdefault(node.input[1], (node, transposed))
    arrays: dict[str, np.ndarray] = {}

    def array(name: str) -> np.ndarray:
        if name not in arrays:
            arrays[name] = numpy_helper.to_array(inits[name])
        return arrays[name]

    sites: dict[str, LayerSite] = {}
    taken: set[str] = set()
    for info in prepared.layers:
        w = prepared.weight(info.fqn).detach().cpu().numpy()

        def matches(name: str, w: np.ndarray = w) -> bool:
            transposed = candidates[name][1]
            ref = w.T if transposed else w
            a = array(name)
            return a.shape == ref.shape and a.dtype == ref.dtype and np.array_equal(a, ref)

        preferred = f"{info.fqn}.weight"
        if preferred in candidates and matches(preferred):
            name = preferred
        else:
            hits = [n for n in candidates if n not in taken and matches(n)]
            if not hits:
                raise ExportError(
                    f"layer {info.fqn!r}: no Conv/Gemm/MatMul weight in the exported graph equals its "
                    "weight; the exporter rewrote it in a way hawqtool does not understand"
                )
            name = hits[0]
        taken.add(name)
        node, transposed = candidates[name]
        if node.op_type == "MatMul" and array(name).ndim != 2:
            raise ExportError(
                f"layer {info.fqn!r}: MatMul weight of rank {array(name).ndim} is not supported"
            )
        sites[info.fqn] = LayerSite(
            fqn=info.fqn,
            weight=name,
            axis=1 if transposed else 0,
            transposed=transposed,
            op_type=node.op_type,
            input=node.input[0],
            output=_layer_output(node, consumers, inits, graph_outputs),
        )
    return sites


def _layer_output(
    node: onnx.NodeProto,
    consumers: Mapping[str, list[onnx.NodeProto]],
    inits: Mapping[str, Any],
    graph_outputs: set[str],
) -> str:
    out = node.output[0]
    nxt = consumers.get(out, [])
    if (
        node.op_type == "MatMul"
        and len(nxt) == 1
        and nxt[0].op_type == "Add"
        and out not in graph_outputs
        and any(i in inits for i in nxt[0].input if i != out)
    ):
        # Linear = MatMul + bias Add: the layer's output is after the bias.
        out = nxt[0].output[0]
        nxt = consumers.get(out, [])
    if len(nxt) == 1 and nxt[0].op_type in _FOLDABLE_ACTIVATIONS and out not in graph_outputs:
        out = nxt[0].output[0]
    return out


def _attr(node: onnx.NodeProto, name: str, default: Any) -> Any:
    from onnx import helper

    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


# --------------------------------------------------------------------------------------------
# Which activations to quantize
# --------------------------------------------------------------------------------------------

#: Ops that onnxruntime runs directly on uint8 when the Q after them has the same scale and zero
#: point as the DQ before them (it drops the pair): their output shares their input's parameters,
#: which is exact (max, reshape and transpose commute with a monotone per-tensor quantizer).
SHARED_SCALE_OPS = ("MaxPool", "Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze")
#: Ops with a requantizing integer kernel (QLinearAdd, QLinearAveragePool, ...): when all their
#: inputs are quantized, their output gets its own calibrated uint8 parameters.
REQUANT_OPS = ("Add", "AveragePool", "GlobalAveragePool", "Concat")


def quantization_plan(graph: onnx.GraphProto, sites: Iterable[LayerSite]) -> dict[str, str | None]:
    """The activation tensors that get Q→DQ when ``sites`` are quantized, in graph order.

    Maps each tensor to ``None`` (its own calibrated parameters) or to the tensor whose parameters
    it shares. Quantized layers quantize their input and output; from there the uint8 region
    grows forward through ops that have integer kernels, as onnxruntime's ``quantize_static``
    does: without it, a pooling or residual ``Add`` between two quantized layers would round-trip
    through float (DQ → op → Q), which cost 10–15 % latency on the zoo CNNs. Graph outputs are
    only quantized when a quantized layer produces them (``QGemm`` needs its output Q).
    """
    inits = {t.name for t in graph.initializer}
    graph_outputs = {o.name for o in graph.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    plan: dict[str, str | None] = {}
    for site in sites:
        plan.setdefault(site.input, None)
        plan.setdefault(site.output, None)
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
            if len(nxt) == 1 and nxt[0].op_type in _FOLDABLE_ACTIVATIONS and out not in graph_outputs:
                out = nxt[0].output[0]
            if out not in graph_outputs:
                plan.setdefault(out, None)
    return plan


# --------------------------------------------------------------------------------------------
# Weights
# --------------------------------------------------------------------------------------------


def _weight_initializers(
    site: LayerSite, weight: torch.Tensor, bits: int, storage_bits: int, *, clip_search: bool
) -> tuple[onnx.TensorProto, ...]:
    """``DequantizeLinear`` inputs of one layer's weight, in the layout its node reads: integers,
    per-channel scales and, for a Gemm weight only, an all-zero int8 zero point.

    The zero point is redundant (symmetric weights) but onnxruntime 1.32 fuses ``DQ → Gemm → Q``
    into ``QGemm`` only when the weight's DequantizeLinear has one (measured: 0 of 3 Gemms fused
    without, 3 of 3 with); Conv and MatMul fuse without it, so they do not pay its byte per channel.
    """
    from onnx import TensorProto, helper, numpy_helper

    from hawqtool.quantizer import quantize_weight

    qw = quantize_weight(weight, bits, clip_search=clip_search)
    q = qw.q.cpu().numpy().astype(np.int8)
    if site.transposed:
        q = np.ascontiguousarray(q.T)
    q_name, s_name = f"{site.weight}_quantized", f"{site.weight}_scale"
    if storage_bits == 4:
        q_init = helper.make_tensor(q_name, TensorProto.INT4, q.shape, pack_int4(q), raw=True)
    elif storage_bits == 2:
        q_init = helper.make_tensor(q_name, TensorProto.INT2, q.shape, pack_int2(q), raw=True)
    else:
        q_init = numpy_helper.from_array(q, q_name)
    s_init = numpy_helper.from_array(qw.scale.cpu().numpy().astype(np.float32), s_name)
    if site.op_type == "Gemm":
        zp = numpy_helper.from_array(np.zeros(q.shape[site.axis], np.int8), f"{site.weight}_zero_point")
        return q_init, s_init, zp
    return q_init, s_init


def pack_int2(values: np.ndarray) -> bytes:
    """Pack signed 2-bit integers four per byte, first element in the lowest two bits (ONNX INT2).

    Example:
        >>> pack_int2(np.array([1, -2, 0, -1, 1], dtype=np.int8)).hex()
        'c901'
    """
    flat = np.asarray(values, dtype=np.int8).reshape(-1)
    if flat.size and (flat.min() < -2 or flat.max() > 1):
        raise ValueError("int2 values must lie in [-2, 1]")
    flat = np.concatenate([flat, np.zeros(-flat.size % 4, np.int8)]).view(np.uint8) & 0x03
    crumbs = flat.reshape(-1, 4)
    return (
        (crumbs[:, 0] | crumbs[:, 1] << 2 | crumbs[:, 2] << 4 | crumbs[:, 3] << 6).astype(np.uint8).tobytes()
    )


def pack_int4(values: np.ndarray) -> bytes:
    """Pack signed 4-bit integers two per byte, first element in the low nibble (ONNX INT4 raw data).

    Example:
        >>> pack_int4(np.array([1, -2, 7], dtype=np.int8)).hex()
        'e107'
    """
    flat = np.asarray(values, dtype=np.int8).reshape(-1)
    if flat.size and (flat.min() < -8 or flat.max() > 7):
        raise ValueError("int4 values must lie in [-8, 7]")
    if flat.size % 2:
        flat = np.concatenate([flat, np.zeros(1, np.int8)])
    nib = flat.view(np.uint8) & 0x0F
    return (nib[0::2] | (nib[1::2] << 4)).astype(np.uint8).tobytes()


# --------------------------------------------------------------------------------------------
# Calibration
# --------------------------------------------------------------------------------------------


def _calibration_inputs(calibration: Any, limit: int | None) -> list[np.ndarray]:
    inputs: list[np.ndarray] = []
    for batch in calibration:
        if limit is not None and len(inputs) >= limit:
            break
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        inputs.append(x.detach().cpu().numpy().astype(np.float32) if hasattr(x, "detach") else np.asarray(x))
    if not inputs:
        raise UsageError("the calibration split is empty: give at least one (inputs, targets) batch")
    return inputs


def _calibrate(
    model: onnx.ModelProto, tensors: Sequence[str], inputs: Sequence[np.ndarray], method: str
) -> dict[str, tuple[float, float]]:
    """Calibrated ``(rmin, rmax)`` of ``tensors`` on ``inputs``, by onnxruntime's own calibrator."""
    import onnx
    from onnxruntime.quantization.calibrate import CalibrationMethod, create_calibrator

    methods = {
        "minmax": (CalibrationMethod.MinMax, {}),
        # Asymmetric: a symmetric range would waste half the uint8 grid on post-ReLU tensors.
        "percentile": (CalibrationMethod.Percentile, {"symmetric": False}),
        "entropy": (CalibrationMethod.Entropy, {}),
    }
    calib_method, options = methods[method]
    # The calibrator adds graph outputs for every input/output of nodes of these types; restricting
    # the types keeps that to (a small superset of) the tensors QDQ needs.
    producers = {o: n.op_type for n in model.graph.node for o in n.output}
    wanted = set(tensors)
    op_types = {n.op_type for n in model.graph.node if wanted & set(n.input)}
    op_types |= {producers[t] for t in wanted if t in producers}
    with tempfile.TemporaryDirectory(prefix="hawqtool-calib-") as tmp:
        float_path = Path(tmp) / "float.onnx"
        onnx.save(model, float_path)
        try:
            with contextlib.redirect_stdout(io.StringIO()):  # the histogram calibrators print
                calibrator = create_calibrator(
                    float_path,
                    sorted(op_types),
                    augmented_model_path=str(Path(tmp) / "augmented.onnx"),
                    calibrate_method=calib_method,
                    extra_options=options,
                )
                calibrator.collect_data(_Reader(inputs))
                data = calibrator.compute_data()
        except Exception as e:  # onnxruntime's pybind errors share no base class but Exception
            raise ExportError(f"onnxruntime calibration failed: {e}") from e
    out: dict[str, tuple[float, float]] = {}
    for name in tensors:
        if name not in data:
            raise ExportError(f"calibration produced no range for tensor {name!r}")
        lo, hi = data[name].range_value
        out[name] = (float(np.min(lo)), float(np.max(hi)))
    return out


class _Reader:
    """The ``CalibrationDataReader`` protocol over in-memory input batches."""

    def __init__(self, inputs: Sequence[np.ndarray]) -> None:
        self._it = iter(inputs)

    def get_next(self) -> dict[str, np.ndarray] | None:
        x = next(self._it, None)
        return None if x is None else {INPUT_NAME: x}


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


def _write_model(model: onnx.ModelProto, path: Path) -> Path:
    import onnx

    try:
        onnx.checker.check_model(model, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        raise ExportError(f"the exported model is not valid ONNX: {e}") from e
    data = model.SerializeToString()
    try:
        write_bytes_atomic(path, data)
    except OSError as e:
        raise ExportError(f"cannot write {path}: {e}") from e
    return path
