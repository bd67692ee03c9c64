"""The QDQ exporter: one float export and calibration per model, then a quantized graph per allocation."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from hawqtool import __version__
from hawqtool.errors import UsageError
from hawqtool.export.calibrate import (
    CALIBRATION_METHODS,
    ActivationQuant,
    calibrate,
    calibration_inputs,
    uint8_qparams,
)
from hawqtool.export.emitters import EMITTERS, Emission, LayerContext, emit
from hawqtool.export.locate import LayerSite, locate_layers
from hawqtool.export.plan import activation_tensors, quantization_plan
from hawqtool.export.torch_export import MIN_OPSET, export_float_onnx
from hawqtool.export.writer import PROTOBUF_LIMIT, write_model
from hawqtool.formats import (
    FLOAT,
    INT4_MIN_OPSET,
    STORAGES,
    format_grammar,
    is_format,
    is_quantized,
    layer_cost,
    parse_format,
    storage_bits,
    unsupported_reason,
)
from hawqtool.modelio import Batch
from hawqtool.prepare import PreparedModel
from hawqtool.quantizer import quantize_as
from hawqtool.types import ExportSettings

if TYPE_CHECKING:
    import onnx

log = logging.getLogger(__name__)

#: Storage modes of sub-5-bit weights (the cost model's own list).
INT4_STORAGES = STORAGES
_DEFAULT_SETTINGS = ExportSettings()
METADATA_ALLOCATION = "hawqtool.allocation"
METADATA_VERSION = "hawqtool.version"
#: Input positions of zero points, per op an emitter writes: their values can pick a kernel.
_ZERO_POINT_INPUTS = {
    "DequantizeLinear": (2,),
    "QuantizeLinear": (2,),
    "MatMulInteger": (2, 3),
    "ConvInteger": (2, 3),
    "MatMulNBits": (3,),
    "GatherBlockQuantized": (3,),
}


class QDQExporter:
    """Float ONNX export + calibrated activation ranges of one model; quantized models per allocation.

    Build it once with :meth:`build`, then call :meth:`quantized_model` / :meth:`export` for as
    many allocations as the search needs (each layer's emission is cached per format).

    Attributes:
        float_model: the BN-folded float model, dynamic batch axis, each layer's weight stored once
            (:func:`hawqtool.export.locate.locate_layers`).
        layer_weights: ``fqn -> name`` of the initializer holding the layer's weight.
        sites: ``fqn ->`` :class:`~hawqtool.export.locate.LayerSite` (weight layout, every use).
        activations: calibrated :class:`~hawqtool.export.calibrate.ActivationQuant` of every tensor
            an allocation can quantize.
        prepared: the model the exporter was built from.
        settings: the :class:`hawqtool.types.ExportSettings` it was built with.

    Example:
        >>> exporter = QDQExporter.build(prepared, splits.calibration, settings=ExportSettings())  # doctest: +SKIP
        >>> exporter.export({fqn: "int8" for fqn in prepared.fqns}, Path("m.onnx"))  # doctest: +SKIP
    """

    def __init__(
        self,
        *,
        float_model: onnx.ModelProto,
        prepared: PreparedModel,
        sites: Mapping[str, LayerSite],
        activations: Mapping[str, ActivationQuant],
        settings: ExportSettings,
        calibration_batches: int,
    ) -> None:
        self.float_model = float_model
        self.prepared = prepared
        self.sites = dict(sites)
        self.activations = dict(activations)
        self.settings = settings
        self.calibration_batches = calibration_batches
        self.layer_weights: Mapping[str, str] = {f: s.weight for f, s in self.sites.items()}
        self._emissions: dict[tuple[str, str, int], Emission] = {}
        self._nodes = {n.name: n for n in float_model.graph.node}
        self._initializer_dims = {t.name: tuple(t.dims) for t in float_model.graph.initializer}

    # ----------------------------------------------------------------------------------------
    # Construction
    # ----------------------------------------------------------------------------------------

    @classmethod
    def build(
        cls,
        prepared: PreparedModel,
        calibration: Sequence[Batch],
        *,
        settings: ExportSettings = _DEFAULT_SETTINGS,
        max_calibration_batches: int | None = None,
    ) -> QDQExporter:
        """Export the float model, locate every layer's weight and calibrate activation ranges.

        Args:
            prepared: the BN-folded model from :func:`hawqtool.prepare.prepare_model`.
            calibration: ``(inputs, targets)`` batches; only the inputs are used (targets may be ``None``).
            settings: the opset (≥ 18; packed int4 weights need 21, packed int2 weights 25, below
                which int2 is packed as INT4), the storage of sub-8-bit weights, the quantizer's
                clip search (as sensitivity used it) and the calibration method (``minmax``,
                ``percentile`` at 99.999 % or ``entropy``: onnxruntime's calibrators).
            max_calibration_batches: use at most this many calibration batches.

        Raises:
            UsageError: a bad setting or an empty calibration split.
            ExportError: torch.onnx cannot export the model, a layer's weight cannot be found in
                the graph, or onnxruntime fails during calibration.
        """
        method, opset = settings.calibration, settings.opset
        if method not in CALIBRATION_METHODS:
            raise UsageError(
                f"unknown calibration method {method!r}; allowed: {', '.join(CALIBRATION_METHODS)}"
            )
        if not isinstance(opset, int) or opset < MIN_OPSET:
            raise UsageError(f"opset {opset!r} is not supported; use an integer >= {MIN_OPSET}")
        if max_calibration_batches is not None and max_calibration_batches < 1:
            raise UsageError(f"max_calibration_batches must be >= 1, got {max_calibration_batches}")
        inputs = calibration_inputs(calibration, max_calibration_batches, prepared.io)
        start = time.perf_counter()
        exported = export_float_onnx(prepared.model, prepared.example_input, opset=opset, io=prepared.io)
        float_model, sites = locate_layers(exported, prepared)
        # Every tensor any allocation can quantize: the plan of the all-quantized allocation is a
        # superset of every other plan (propagation only grows with more quantized layers).
        act_sites = [s for s in sites.values() if s.activations]
        plan = quantization_plan(float_model.graph, act_sites)
        needed = set(activation_tensors(act_sites)) | {t for t, src in plan.items() if src is None}
        ranges = calibrate(float_model, sorted(needed), inputs, method)
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
            method,
            len(inputs),
            time.perf_counter() - start,
        )
        return cls(
            float_model=float_model,
            prepared=prepared,
            sites=sites,
            activations=activations,
            settings=settings,
            calibration_batches=len(inputs),
        )

    def with_int4_storage(self, int4_storage: str) -> QDQExporter:
        """The same exporter (float model and calibration shared) with another int4 storage mode.

        Raises:
            UsageError: an unknown storage mode.
        """
        return QDQExporter(
            float_model=self.float_model,
            prepared=self.prepared,
            sites=self.sites,
            activations=self.activations,
            settings=dataclasses.replace(self.settings, int4_storage=int4_storage),
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
            UsageError: an unknown layer or format, a format the layer's kind cannot take
                (:func:`hawqtool.formats.supports`), or packed int4 below opset 21.
        """
        unknown = [f for f in allocation if f not in self.sites]
        if unknown:
            raise UsageError(
                f"allocation names unknown layer(s) {', '.join(map(repr, unknown))}; "
                f"layers are: {', '.join(self.sites)}"
            )
        for fqn, fmt in allocation.items():
            if not is_format(fmt):
                raise UsageError(f"layer {fqn!r}: unknown format {fmt!r}; allowed: {format_grammar()}")
            info = self.prepared.info(fqn)
            why = unsupported_reason(info, fmt)
            if why is not None:
                raise UsageError(f"layer {fqn!r} ({info.kind}) cannot take format {fmt!r}: {why}")
            family = parse_format(fmt).family
            if is_quantized(fmt) and family not in EMITTERS:
                raise UsageError(
                    f"layer {fqn!r}: format {fmt!r} (family {family!r}) has no ONNX emitter; "
                    f"families with one: {', '.join(EMITTERS)}"
                )
            if self.settings.opset < INT4_MIN_OPSET and self._storage_bits(fmt) == 4:
                raise UsageError(
                    f"layer {fqn!r}: {fmt} weights stored packed as ONNX INT4 need opset >= "
                    f"{INT4_MIN_OPSET}, the exporter was built with opset {self.settings.opset}; "
                    "build with opset=21 or int4_storage='container'"
                )
        return {f: allocation.get(f, FLOAT) for f in self.sites}

    def weight_bytes(self, allocation: Mapping[str, str]) -> int:
        """Bytes of the weight tensors the exported model stores for ``allocation``.

        The size cost model (:func:`hawqtool.formats.layer_cost`: ``ceil(params ·
        storage_bits / 8)`` integers + ``4 · scales`` float32 scales per quantized layer,
        ``4 · params`` per float one; every layer's weight stored once, however many nodes read
        it) plus ``out_channels`` bytes of int8 zero point for an activation format on a weight
        that a Gemm reads, which onnxruntime needs to fuse QGemm. Biases, activation scales and
        zero points and the graph itself are the rest of the file.
        """
        full = self.full_allocation(allocation)
        total = 0
        for info in self.prepared.layers:
            fmt = full[info.fqn]
            total += int(
                layer_cost(
                    info, fmt, cost="size", storage=self.settings.int4_storage, opset=self.settings.opset
                )
            )
            if parse_format(fmt).activations and any(u.op_type == "Gemm" for u in self.sites[info.fqn].uses):
                total += info.out_channels
        return total

    def emitters(self, allocation: Mapping[str, str]) -> dict[str, dict[str, str]]:
        """``fqn -> {use node: emitter kind}`` for the quantized layers of ``allocation``
        (``MatMulNBits``, ``GatherBlockQuantized``, ``MatMulInteger`` or ``DequantizeLinear``).

        Raises:
            UsageError: see :meth:`full_allocation`.
        """
        full = self.full_allocation(allocation)
        return {
            fqn: dict(self._emission(self.sites[fqn], fmt).kinds)
            for fqn, fmt in full.items()
            if is_quantized(fmt)
        }

    def structure(self, fqn: str, fmt: str) -> str:
        """A digest of the graph ``fmt`` makes of layer ``fqn``, blind to the weights' and scales'
        values: its nodes (ops, attributes, wiring), the shapes and types of its initializers, the
        values of its zero points, and whether its activations are quantized. Two formats with one
        digest emit the same kernels on the same shapes: ``int7`` and ``int8`` (both stored in
        int8), every ``intB-d``. On a CPU execution provider the speed of such kernels does not
        depend on the values, so a latency measured for one holds for the other.

        Raises:
            UsageError: an unknown layer or a format it cannot take.

        Example:
            >>> exp.structure(fqn, "int7") == exp.structure(fqn, "int8")    # doctest: +SKIP
            True
        """
        from onnx import numpy_helper  # lazy: see hawqtool.export's docstring

        full = self.full_allocation({fqn: fmt})
        if not is_quantized(full[fqn]):
            return FLOAT
        spec = parse_format(full[fqn])
        emission = self._emission(self.sites[fqn], full[fqn])
        nodes = [*emission.nodes, *(n for name in sorted(emission.replace) for n in emission.replace[name])]
        zero_points = {
            node.input[i]
            for node in nodes
            for i in _ZERO_POINT_INPUTS.get(node.op_type, ())
            if i < len(node.input) and node.input[i]
        }
        h = hashlib.sha256(repr((spec.activations, spec.dynamic, sorted(emission.drops))).encode())
        for node in nodes:
            attrs = [
                (
                    a.name,
                    a.type,
                    a.i,
                    a.f,
                    a.s,
                    tuple(a.ints),
                    tuple(a.floats),
                    a.t.data_type,
                    tuple(a.t.dims),
                )
                for a in node.attribute
            ]
            h.update(repr((node.op_type, node.domain, tuple(node.input), tuple(node.output), attrs)).encode())
        for t in emission.initializers:
            h.update(repr((t.name, t.data_type, tuple(t.dims))).encode())
            if t.name in zero_points:
                h.update(numpy_helper.to_array(t).tobytes())
        return h.hexdigest()[:16]

    def quantized_model(
        self, allocation: Mapping[str, str], *, metadata: Mapping[str, str] | None = None
    ) -> onnx.ModelProto:
        """The float model with the quantized layers of ``allocation`` emitted and QDQ inserted.

        Each quantized layer's weight goes through its emitter (:mod:`hawqtool.export.emitters`);
        for activation formats (``intB``) the input and output of every node that computes with
        the weight get uint8 Q→DQ (:func:`hawqtool.export.plan.quantization_plan`); dynamic
        formats (``intB-d``) quantize their input at run time instead (no calibrated range).

        Args:
            allocation: ``fqn -> format``; layers not named stay float.
            metadata: extra ``metadata_props`` (string keys and values).

        Raises:
            UsageError: an unknown layer or format, a format the layer cannot take, packed int4
                below opset 21, or metadata that would overwrite hawqtool's own keys.
        """
        import onnx  # lazy: see hawqtool.export's docstring
        from onnx import TensorProto, helper

        full = self.full_allocation(allocation)
        extra = dict(metadata or {})
        for key in (METADATA_ALLOCATION, METADATA_VERSION):
            if key in extra:
                raise UsageError(f"metadata key {key!r} is reserved for hawqtool")

        quantized = [self.sites[f] for f, fmt in full.items() if is_quantized(fmt)]
        # Weight-only formats leave the activations float.
        act_quantized = [s for s in quantized if parse_format(full[s.fqn]).activations]
        emissions = [self._emission(site, full[site.fqn]) for site in quantized]
        drops = {t for e in emissions for t in e.drops}
        replace = {name: node for e in emissions for name, node in e.replace.items()}
        new_inits = [t for e in emissions for t in e.initializers]
        head_nodes = [n for e in emissions for n in e.nodes]

        graph = self.float_model.graph
        plan = quantization_plan(graph, act_quantized)
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
            if any(o in drops for o in node.output):
                continue  # a Transpose of de-duplication: its output is emitted anew or unused
            for src in replace.get(node.name, (node,)):
                new = onnx.NodeProto()
                new.CopyFrom(src)
                for i, name in enumerate(new.input):
                    if name in rename:
                        new.input[i] = rename[name]
                for i, name in enumerate(new.output):
                    if name in produce:
                        new.output[i] = produce[name]
                nodes.append(new)
            for out in node.output:
                nodes += qdq_after.get(out, [])

        initializers = [t for t in graph.initializer if t.name not in drops] + new_inits
        opsets = list(self.float_model.opset_import)
        if any(n.domain == "com.microsoft" for n in nodes) and all(
            o.domain != "com.microsoft" for o in opsets
        ):
            opsets.append(helper.make_opsetid("com.microsoft", 1))
        new_graph = helper.make_graph(
            nodes,
            graph.name,
            list(graph.input),
            list(graph.output),
            initializer=initializers,
            value_info=[v for v in graph.value_info if v.name not in drops],
        )
        model = helper.make_model(
            new_graph,
            opset_imports=opsets,
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
        self,
        allocation: Mapping[str, str],
        path: str | Path,
        *,
        metadata: Mapping[str, str] | None = None,
        max_inline_bytes: int = PROTOBUF_LIMIT,
    ) -> Path:
        """Write the quantized model of ``allocation`` to ``path`` after ``onnx.checker`` (full check).

        The file is written atomically: a failure leaves nothing at ``path``. A model past
        protobuf's 2 GiB limit (``max_inline_bytes``) keeps its tensors in ``path`` + ``.data``
        (:func:`hawqtool.export.writer.write_model`); open it by its path.

        Raises:
            UsageError: see :meth:`quantized_model`.
            ExportError: the model fails validation or ``path`` cannot be written.
        """
        model = self.quantized_model(allocation, metadata=metadata)
        return write_model(model, Path(path), max_inline_bytes=max_inline_bytes)

    def export_float(
        self,
        path: str | Path,
        *,
        metadata: Mapping[str, str] | None = None,
        max_inline_bytes: int = PROTOBUF_LIMIT,
    ) -> Path:
        """Write the float (BN-folded) model to ``path``, checked and atomically, like :meth:`export`."""
        return self.export({}, path, metadata=metadata, max_inline_bytes=max_inline_bytes)

    # ----------------------------------------------------------------------------------------

    def _storage_bits(self, fmt: str) -> int:
        return storage_bits(fmt, storage=self.settings.int4_storage, opset=self.settings.opset)

    def _emission(self, site: LayerSite, fmt: str) -> Emission:
        bits = self._storage_bits(fmt)
        key = (site.fqn, fmt, bits)
        if key not in self._emissions:
            with _torch_threads(1):
                qw = quantize_as(self.prepared.weight(site.fqn), fmt, clip_search=self.settings.clip_search)
            ctx = LayerContext(
                site=site,
                fmt=parse_format(fmt),
                bits=bits,
                q=qw.q.cpu().numpy(),
                scale=qw.scale.cpu().numpy(),
                nodes=self._nodes,
                initializer_dims=self._initializer_dims,
                zero_point=None if qw.zero_point is None else qw.zero_point.cpu().numpy(),
            )
            self._emissions[key] = emit(ctx)
        return self._emissions[key]


@contextlib.contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    """Run torch on ``n`` threads for a while. The quantizer's per-channel search is hundreds of
    tiny ops; with 2 OpenMP threads on a busy 2-core machine each op waits for a core, on 1 thread
    it never does."""
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)
