"""Emitters: what one quantized layer's weight becomes in the ONNX graph, registered per format family.

Every emitter writes the integers and scales of :func:`hawqtool.quantizer.quantize_as` (the one
quantizer, which sensitivity scores), so that the weight each node computes with is exactly
``quantize_as(...).dequantized``, and stores them once per layer, whatever the number of nodes that
read the weight (tied embeddings, copies in another layout). Each format family registers the
emitters it may use, most specific first (:func:`register_emitters`); the first that applies to
the layer emits it:

- :class:`PackedEmitter` with :class:`MatMulNBitsEmitter` / :class:`GatherBlockQuantizedEmitter` —
  weight-only formats whose every use is a ``MatMul`` on ``Wᵀ`` / plain ``Gemm`` with a block format
  (``com.microsoft.MatMulNBits``) or an embedding ``Gather`` (``com.microsoft.GatherBlockQuantized``):
  onnxruntime's fast kernels for them, which it does not always reach by fusing
  ``DequantizeLinear`` itself. Both store the same bytes: the integers as unsigned ``q + 2^(b-1)``
  packed along the input axis, row by row, float32 scales ``(out, blocks)``, and no
  ``zero_points`` for a symmetric format (the ops' default is the midpoint) or, for an asymmetric
  one (``uintB-bK``), its zero points offset the same way and packed row by row ``(out,
  ceil(blocks · b / 8))``; so a tied table stores its integers once.
- :class:`DynamicMatMulEmitter` — a dynamic format (``intB-d``) on MatMul / plain Gemm uses:
  ``DynamicQuantizeLinear → MatMulInteger → Cast → Mul (→ Add bias)``, what onnxruntime's
  ``quantize_dynamic`` writes and fuses into ``DynamicQuantizeMatMul``.
- :class:`DequantizeLinearEmitter` — everything else: ``DequantizeLinear`` on the weight, which
  onnxruntime fuses with the activation Q/DQ into integer kernels (``QLinearConv``, ``QGemm``).

A new format family is one :func:`register_emitters` call (and its quantizer and format rule).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from hawqtool.errors import UsageError
from hawqtool.export.locate import LayerSite, WeightUse, attribute
from hawqtool.export.pack import PACKED_OP_BITS, offset_unsigned, pack_int2, pack_int4, pack_rows
from hawqtool.formats import Format, parse_format
from hawqtool.registry import Registry

if TYPE_CHECKING:
    import onnx

log = logging.getLogger(__name__)

#: ``MatMulNBits.accuracy_level``: what onnxruntime's own DQ → MatMulNBits fusion writes (the session
#: option ``session.qdq_matmulnbits_accuracy_level`` defaults to it); the kernel then quantizes its
#: input to int8 per block on the fly, while the weight stays exactly the quantizer's.
MATMUL_NBITS_ACCURACY_LEVEL = 4
CONTRIB_DOMAIN = "com.microsoft"


@dataclass(frozen=True)
class LayerContext:
    """What an emitter knows about one quantized layer.

    Attributes:
        site: where the layer lives in the float graph.
        fmt: its format.
        bits: bits one stored integer takes (:func:`hawqtool.formats.storage_bits`).
        q: the quantizer's integers, weight-view layout (output channels first), ``int8``.
        scale: the quantizer's float32 scales, ``(out,)`` or ``(out, blocks)``.
        nodes: the float graph's nodes by name.
        initializer_dims: the float graph's initializer shapes by name.
        zero_point: the quantizer's ``int8`` zero points, the shape of ``scale`` (on ``q``'s signed
            grid), or ``None`` for a symmetric format.
    """

    site: LayerSite
    fmt: Format
    bits: int
    q: np.ndarray
    scale: np.ndarray
    nodes: Mapping[str, onnx.NodeProto]
    initializer_dims: Mapping[str, tuple[int, ...]]
    zero_point: np.ndarray | None = None

    @property
    def out_features(self) -> int:
        return int(self.q.shape[0])

    @property
    def in_features(self) -> int:
        return int(np.prod(self.q.shape[1:]))


@dataclass(frozen=True)
class Emission:
    """What one quantized layer becomes in the graph.

    Attributes:
        initializers: the stored integers, scales and the like.
        nodes: new nodes on constants (Cast, Transpose, Reshape, DequantizeLinear), placed before
            the graph's own nodes.
        replace: use node name -> the nodes that take its place (in order).
        drops: float tensors whose definitions (the initializer, the Transposes of
            de-duplication) leave the graph: the emission defines them anew or nothing reads them.
        kinds: use node name -> the emitter that handled it.
    """

    initializers: tuple[onnx.TensorProto, ...]
    nodes: tuple[onnx.NodeProto, ...] = ()
    replace: Mapping[str, tuple[onnx.NodeProto, ...]] = field(default_factory=dict)
    drops: tuple[str, ...] = ()
    kinds: Mapping[str, str] = field(default_factory=dict)


class Emitter(Protocol):
    """What one registered emitter does: the layer's emission, or ``None`` when it does not apply
    to this layer (the next emitter registered for the format's family is tried)."""

    kind: str

    def emit(self, ctx: LayerContext) -> Emission | None: ...


class PackedOp(Protocol):
    """A contrib op that replaces one use of the weight and reads the packed unsigned integers."""

    kind: str

    def applies(self, use: WeightUse, ctx: LayerContext) -> bool: ...

    def block(self, ctx: LayerContext) -> int: ...

    def node(
        self, use: WeightUse, ctx: LayerContext, data: str, blocks: str, scales: str, zero_points: str
    ) -> onnx.NodeProto:
        """The op on ``data`` (packed rows) or ``blocks`` (the same bytes in MatMulNBits' shape),
        ``scales`` and ``zero_points`` (``""``: none, the midpoint)."""
        ...


class MatMulNBitsEmitter:
    """A block format on a MatMul reading ``Wᵀ`` or a plain Gemm → ``com.microsoft.MatMulNBits``."""

    kind = "MatMulNBits"

    def applies(self, use: WeightUse, ctx: LayerContext) -> bool:
        f = ctx.fmt
        if f.block is None or f.activations or ctx.bits not in PACKED_OP_BITS or ctx.q.ndim != 2:
            return False
        if ctx.in_features % f.block:  # a partial last block would store padding
            return False
        if use.op_type == "MatMul":
            return use.transposed
        return use.op_type == "Gemm" and _plain_gemm(use, ctx)

    def block(self, ctx: LayerContext) -> int:
        assert ctx.fmt.block is not None
        return ctx.fmt.block

    def node(
        self, use: WeightUse, ctx: LayerContext, data: str, blocks: str, scales: str, zero_points: str
    ) -> onnx.NodeProto:
        from onnx import helper  # lazy: see hawqtool.export's docstring

        old = ctx.nodes[use.node]
        inputs = [use.input, blocks, scales, zero_points]
        if use.op_type == "Gemm" and len(old.input) > 2 and old.input[2]:
            inputs += ["", old.input[2]]  # g_idx left out, then the bias
        while not inputs[-1]:
            inputs.pop()
        return helper.make_node(
            "MatMulNBits",
            inputs,
            list(old.output),
            name=f"{use.node}_MatMulNBits",
            domain=CONTRIB_DOMAIN,
            K=ctx.in_features,
            N=ctx.out_features,
            bits=ctx.bits,
            block_size=self.block(ctx),
            accuracy_level=MATMUL_NBITS_ACCURACY_LEVEL,
        )


class GatherBlockQuantizedEmitter:
    """A weight-only format on an embedding Gather → ``com.microsoft.GatherBlockQuantized``."""

    kind = "GatherBlockQuantized"

    def applies(self, use: WeightUse, ctx: LayerContext) -> bool:
        return (
            use.op_type == "Gather"
            and not use.transposed
            and not ctx.fmt.activations
            and ctx.bits in PACKED_OP_BITS
            and ctx.q.ndim == 2
            and ctx.in_features * ctx.bits % 8 == 0  # each row packs into whole bytes
        )

    def block(self, ctx: LayerContext) -> int:
        if ctx.fmt.block is not None:
            return ctx.fmt.block
        # One block per row: the op needs a power of two >= 16, and may be longer than the row.
        return max(16, 1 << (ctx.in_features - 1).bit_length())

    def node(
        self, use: WeightUse, ctx: LayerContext, data: str, blocks: str, scales: str, zero_points: str
    ) -> onnx.NodeProto:
        from onnx import helper  # lazy: see hawqtool.export's docstring

        old = ctx.nodes[use.node]
        return helper.make_node(
            "GatherBlockQuantized",
            [data, use.input, scales, *([zero_points] if zero_points else [])],
            list(old.output),
            name=f"{use.node}_GatherBlockQuantized",
            domain=CONTRIB_DOMAIN,
            bits=ctx.bits,
            block_size=self.block(ctx),
            gather_axis=0,
            quantize_axis=1,
        )


class DynamicMatMulEmitter:
    """A dynamic format on a MatMul reading ``Wᵀ`` or a plain Gemm → DynamicQuantizeLinear →
    MatMulInteger → Cast → Mul (→ Add), fused by onnxruntime into DynamicQuantizeMatMul."""

    kind = "MatMulInteger"

    def applies(self, use: WeightUse, ctx: LayerContext) -> bool:
        if not ctx.fmt.dynamic or ctx.bits != 8 or ctx.q.ndim != 2:
            return False
        if use.op_type == "MatMul":
            return use.transposed
        return use.op_type == "Gemm" and _plain_gemm(use, ctx)

    def emit(self, ctx: LayerContext) -> Emission | None:
        from onnx import TensorProto, helper, numpy_helper  # lazy: see hawqtool.export's docstring

        if not (_exclusive(ctx) and all(self.applies(u, ctx) for u in ctx.site.uses)):
            log.warning(
                "layer %r: %s needs every reader of the weight to be a MatMul on Wᵀ or a plain Gemm; "
                "it is emitted weight-only instead (float activations)",
                ctx.site.fqn,
                ctx.fmt.name,
            )
            return None
        w = ctx.site.weight
        q_name, s_name = f"{w}_quantized", f"{w}_scale"
        inits = (
            numpy_helper.from_array(np.ascontiguousarray(ctx.q.T).astype(np.int8), q_name),  # (K, N)
            numpy_helper.from_array(ctx.scale.reshape(-1).astype(np.float32), s_name),
        )
        replace = {}
        for use in ctx.site.uses:
            old = ctx.nodes[use.node]
            p = f"{use.node}_dynamic"
            xq, xs, xz, acc, accf, scale = (
                f"{p}_{t}" for t in ("x_q", "x_scale", "x_zp", "int32", "float", "scale")
            )
            bias = old.input[2] if use.op_type == "Gemm" and len(old.input) > 2 else ""
            out = f"{p}_out" if bias else old.output[0]
            nodes = [
                helper.make_node(
                    "DynamicQuantizeLinear", [use.input], [xq, xs, xz], name=f"{p}_DynamicQuantizeLinear"
                ),
                helper.make_node("MatMulInteger", [xq, q_name, xz], [acc], name=f"{p}_MatMulInteger"),
                helper.make_node("Cast", [acc], [accf], name=f"{p}_Cast", to=TensorProto.FLOAT),
                helper.make_node("Mul", [xs, s_name], [scale], name=f"{p}_ScaleMul"),
                helper.make_node("Mul", [accf, scale], [out], name=f"{p}_Mul"),
            ]
            if bias:
                nodes.append(helper.make_node("Add", [out, bias], [old.output[0]], name=f"{p}_Add"))
            replace[use.node] = tuple(nodes)
        return Emission(
            initializers=inits,
            replace=replace,
            drops=ctx.site.tensors,
            kinds={u.node: self.kind for u in ctx.site.uses},
        )


def _plain_gemm(use: WeightUse, ctx: LayerContext) -> bool:
    """Whether a Gemm use is ``x @ W_view.T (+ bias)``: no transposed input, unit alpha and beta,
    and no bias or a 1-D constant one of ``out`` values (a MatMul plus a broadcast Add)."""
    node = ctx.nodes[use.node]
    plain = (
        attribute(node, "transA", 0) == 0
        and attribute(node, "alpha", 1.0) == 1.0
        and attribute(node, "beta", 1.0) == 1.0
        and bool(attribute(node, "transB", 0)) != use.transposed
    )
    bias = node.input[2] if len(node.input) > 2 else ""
    return plain and (not bias or ctx.initializer_dims.get(bias) == (ctx.out_features,))


class DequantizeLinearEmitter:
    """``DequantizeLinear`` on the weight (every layout a use reads); the nodes stay as they are.

    Integers are stored as ONNX ``INT2`` / ``INT4`` (packed) or ``INT8``; packed ones reach the
    DequantizeLinear through a ``Cast`` to INT8, which onnxruntime folds into an int8 initializer
    when it loads the model: the file keeps the small packed integers and the graph still fuses
    into QLinearConv / QGemm (a direct INT4 DQ runs dequantize + float compute, and a direct INT2
    DQ is fused into a QLinearConv that onnxruntime 1.32 then rejects). A use that reads
    the other layout gets its own DequantizeLinear on a ``Transpose`` of those integers (folded the
    same way). No zero point (symmetric), except one all-zero int8 zero point per output channel
    when an activation format's weight feeds a Gemm: onnxruntime 1.32 fuses ``DQ → Gemm → Q`` into
    QGemm only with it, and an asymmetric format's zero points (stored like its integers).
    """

    kind = "DequantizeLinear"

    def emit(self, ctx: LayerContext) -> Emission:
        from onnx import TensorProto, helper, numpy_helper  # lazy: see hawqtool.export's docstring

        site, f = ctx.site, ctx.fmt
        w = site.weight
        q, scale, zp = ctx.q, ctx.scale, ctx.zero_point
        if site.transposed:
            q, scale = np.ascontiguousarray(q.T), np.ascontiguousarray(scale.T)
            zp = None if zp is None else np.ascontiguousarray(zp.T)
        q_name, s_name, zp_name = f"{w}_quantized", f"{w}_scale", f"{w}_zero_point"
        inits: list[onnx.TensorProto] = []
        nodes: list[onnx.NodeProto] = []

        def integers(values: np.ndarray, name: str) -> str:
            """Store ``values`` in the storage bits; the name of their INT8 view."""
            if ctx.bits not in (2, 4):
                inits.append(numpy_helper.from_array(values.astype(np.int8), name))
                return name
            dtype, packed = (
                (TensorProto.INT4, pack_int4(values))
                if ctx.bits == 4
                else (TensorProto.INT2, pack_int2(values))
            )
            inits.append(helper.make_tensor(name, dtype, values.shape, packed, raw=True))
            nodes.append(
                helper.make_node("Cast", [name], [f"{name}_int8"], name=f"{name}_Cast", to=TensorProto.INT8)
            )
            return f"{name}_int8"

        ints = integers(q, q_name)
        inits.append(numpy_helper.from_array(scale.astype(np.float32), s_name))
        zero_point = ""
        if zp is not None:
            zero_point = integers(zp, zp_name)
        elif f.activations and any(u.op_type == "Gemm" for u in site.uses):
            inits.append(numpy_helper.from_array(np.zeros(ctx.out_features, np.int8), zp_name))
            zero_point = zp_name

        def dequantize(
            ints: str, scales: str, zero_points: str, out: str, channel_axis: int
        ) -> onnx.NodeProto:
            # Blocks run along the input axis: the other axis of a 2-D weight than the channel one.
            attrs: dict[str, Any] = (
                {"axis": channel_axis}
                if f.block is None
                else {"axis": 1 - channel_axis, "block_size": f.block}
            )
            inputs = [ints, scales, zero_points] if zero_points else [ints, scales]
            return helper.make_node(
                "DequantizeLinear", inputs, [out], name=f"{out}_DequantizeLinear", **attrs
            )

        # The DequantizeLinear output takes over the float tensor's name, so every node that read
        # the weight now reads the dequantized weight without any rewiring.
        nodes.append(dequantize(ints, s_name, zero_point, w, site.axis))
        for t in site.tensors[1:]:  # copies in the other layout
            nodes.append(
                helper.make_node("Transpose", [ints], [f"{t}_ints"], name=f"{t}_ints_Transpose", perm=[1, 0])
            )
            scales, zero_points = s_name, zero_point
            if f.block is not None:
                scales = f"{t}_scale"
                nodes.append(
                    helper.make_node("Transpose", [s_name], [scales], name=f"{scales}_Transpose", perm=[1, 0])
                )
                if zero_point:
                    zero_points = f"{t}_zero_point"
                    nodes.append(
                        helper.make_node(
                            "Transpose",
                            [zero_point],
                            [zero_points],
                            name=f"{zero_points}_Transpose",
                            perm=[1, 0],
                        )
                    )
            nodes.append(dequantize(f"{t}_ints", scales, zero_points, t, 1 - site.axis))
        return Emission(
            initializers=tuple(inits),
            nodes=tuple(nodes),
            drops=site.tensors,
            kinds={u.node: self.kind for u in site.uses},
        )


class PackedEmitter:
    """Every use of the weight replaced by a packed contrib op (:class:`PackedOp`, the first of
    ``ops`` that applies to it), all reading one copy of the packed integers; ``None`` unless one
    applies to every use and no other op reads the weight."""

    kind = "packed"

    def __init__(self, ops: Sequence[PackedOp]) -> None:
        self.ops = tuple(ops)

    def emit(self, ctx: LayerContext) -> Emission | None:
        chosen = [next((op for op in self.ops if op.applies(use, ctx)), None) for use in ctx.site.uses]
        ops = [op for op in chosen if op is not None]
        if not _exclusive(ctx) or len(ops) != len(chosen):
            return None
        return _emit_packed(ctx, ops)


def _exclusive(ctx: LayerContext) -> bool:
    """Whether every reader of the layer's weight is one of its uses (an emitter may replace them all)."""
    return ctx.site.exclusive and bool(ctx.site.uses)


def _emit_packed(ctx: LayerContext, ops: Sequence[PackedOp]) -> Emission:
    from onnx import helper, numpy_helper  # lazy: see hawqtool.export's docstring

    w = ctx.site.weight
    n, k = ctx.out_features, ctx.in_features
    blocks = {op.block(ctx) for op in ops}
    assert len(blocks) == 1, blocks  # per-row formats never reach MatMulNBits
    block = blocks.pop()
    data = pack_rows(offset_unsigned(ctx.q, ctx.bits), ctx.bits)  # (N, K · b / 8)
    scales = ctx.scale.reshape(n, -1).astype(np.float32)  # (N, blocks); (N, 1) per row
    data_name, blocks_name, s_name = f"{w}_packed", f"{w}_packed_blocks", f"{w}_scale"
    nbits = any(isinstance(op, MatMulNBitsEmitter) for op in ops)
    gather = any(isinstance(op, GatherBlockQuantizedEmitter) for op in ops)
    blob = (n, k // block, block * ctx.bits // 8) if nbits else None
    nodes: list[onnx.NodeProto] = []
    if blob is not None and not gather:
        # MatMulNBits only: store the integers in its (N, blocks, blob) shape directly.
        inits = [numpy_helper.from_array(data.reshape(blob), data_name)]
        blocks_name = data_name
    else:
        inits = [numpy_helper.from_array(data, data_name)]
        if blob is not None:
            # Tied with a Gather: one copy of the bytes, reshaped for MatMulNBits (folded at load).
            shape = f"{blocks_name}_shape"
            inits.append(numpy_helper.from_array(np.array(blob, np.int64), shape))
            nodes.append(
                helper.make_node("Reshape", [data_name, shape], [blocks_name], name=f"{blocks_name}_Reshape")
            )
    inits.append(numpy_helper.from_array(scales, s_name))
    zp_name = ""
    if ctx.zero_point is not None:
        # One row of zero points per output channel, packed like the integers (a partial last
        # byte padded with zeros), read by MatMulNBits and GatherBlockQuantized alike.
        zp = offset_unsigned(ctx.zero_point.reshape(n, -1), ctx.bits)
        zp = np.pad(zp, ((0, 0), (0, -zp.shape[1] % (8 // ctx.bits))))
        zp_name = f"{w}_zero_point"
        inits.append(numpy_helper.from_array(pack_rows(zp, ctx.bits), zp_name))
    uses = list(zip(ctx.site.uses, ops, strict=True))
    return Emission(
        initializers=tuple(inits),
        nodes=tuple(nodes),
        replace={use.node: (op.node(use, ctx, data_name, blocks_name, s_name, zp_name),) for use, op in uses},
        drops=ctx.site.tensors,
        kinds={use.node: op.kind for use, op in uses},
    )


# --------------------------------------------------------------------------------------------
# The registry: format family -> emitters, most specific first
# --------------------------------------------------------------------------------------------

EMITTERS = Registry[tuple[Emitter, ...]]("emitters of format family")


def register_emitters(family: str, emitters: Sequence[Emitter], *, replace: bool = False) -> None:
    """Say how layers of a format family become ONNX: ``emitters`` are tried in order and the first
    whose :meth:`Emitter.emit` returns an emission emits the layer, so the last one should always
    apply (:class:`DequantizeLinearEmitter` does).

    Args:
        family: the family's name (:attr:`hawqtool.formats.Format.family`).
        emitters: the family's emitters, most specific first.
        replace: allow replacing a family's registered emitters.

    Raises:
        UsageError: no emitters, or a family registered already without ``replace``.
    """
    if not emitters:
        raise UsageError(f"format family {family!r} needs at least one emitter")
    EMITTERS.add(family, tuple(emitters), replace=replace)


def unregister_emitters(family: str) -> None:
    """Remove a format family's emitters (tests and plug-ins).

    Raises:
        UsageError: the family has no registered emitters.
    """
    EMITTERS.remove(family)


def emit(ctx: LayerContext) -> Emission:
    """The emission of one quantized layer: the first of its family's emitters that applies.

    Raises:
        UsageError: the format's family has no registered emitter, naming those that have one.
    """
    family = ctx.fmt.family
    if family not in EMITTERS:
        raise UsageError(
            f"format {ctx.fmt.name!r} (family {family!r}) has no ONNX emitter; "
            f"families with one: {', '.join(EMITTERS)}"
        )
    for emitter in EMITTERS[family]:
        emission = emitter.emit(ctx)
        if emission is not None:
            return emission
    raise UsageError(f"no emitter registered for format family {family!r} applies to layer {ctx.site.fqn!r}")


DEQUANTIZE_LINEAR = DequantizeLinearEmitter()
PACKED = PackedEmitter((MatMulNBitsEmitter(), GatherBlockQuantizedEmitter()))
# Family names come from the formats they parse from, so a renamed family cannot silently lose its
# emitters.
register_emitters(parse_format("int8").family, (DEQUANTIZE_LINEAR,))
register_emitters(parse_format("int8-w").family, (PACKED, DEQUANTIZE_LINEAR))
register_emitters(parse_format("int4-b32").family, (PACKED, DEQUANTIZE_LINEAR))
register_emitters(parse_format("uint4-b32").family, (PACKED, DEQUANTIZE_LINEAR))
register_emitters(parse_format("int8-d").family, (DynamicMatMulEmitter(), DEQUANTIZE_LINEAR))
