"""Emitters: what one quantized layer's weight becomes in the ONNX graph, one emitter per kind.

Every emitter writes the integers and scales of :func:`hawqtool.quantizer.quantize_as` (the one
quantizer, which sensitivity scores), so that the weight each node computes with is exactly
``quantize_as(...).dequantized``, and stores them once per layer, whatever the number of nodes that
read the weight (tied embeddings, copies in another layout):

- :class:`MatMulNBitsEmitter` — a block format (``intB-bK``) on a ``MatMul`` that reads ``Wᵀ`` or a
  ``Gemm`` (``transA = 0``, ``alpha = beta = 1``, 1-D or no bias), when the block divides K: the
  node becomes ``com.microsoft.MatMulNBits``. Measured on a 768 → 3072 layer, 2 threads (a loaded
  2-core VM: trust the ratios): onnxruntime 1.32 already fuses a blocked ``DequantizeLinear →
  MatMul`` (and ``→ Gemm`` with ``transB = 0``) into MatMulNBits when it loads the model, so there
  the file (1.47 MB at int4-b32, 2.65 MB at int8-b32, vs 9.4 MB float) and the speed are the same;
  it does not fuse ``Gemm`` with ``transB = 1`` (a Linear on a 2-D input), which as DQ + Gemm
  took 200 ms instead of 0.4 ms for one row and 1.3× longer for 1216 rows. Emitting the op makes
  the fast kernel independent of that fusion. ``accuracy_level = 4`` is what onnxruntime's own
  fusion writes (the session option ``session.qdq_matmulnbits_accuracy_level`` defaults to 4);
  level 0 was 5–500× slower (500× for 8-bit weights at one row). At level 4 the kernel quantizes
  its *input* to int8 per block on the fly; the weight is still exactly the quantizer's.
- :class:`GatherBlockQuantizedEmitter` — a weight-only format on an embedding ``Gather``: the node
  becomes ``com.microsoft.GatherBlockQuantized`` with ``uint8`` data. Measured on a 30 000 × 384
  table: the same bytes as ``DequantizeLinear → Gather`` (11.6 MB at int8 per row, 7.2 MB at
  int4-b32, vs 46 MB float), and 80–700× faster, because onnxruntime does not constant-fold that
  DequantizeLinear and dequantizes the whole table on every run (64 × 19 ids: 1.1 ms vs 94 ms at
  int8 per row, 1.7 ms vs 425 ms at int4-b32; float Gather 0.9 ms); ``int4`` data was 20× slower
  than ``uint8`` data, so the integers are stored as ``uint8``. A per-row format uses one block
  of the smallest power of two ≥ the row length (onnxruntime accepts a block longer than the
  row, and the padding is not stored).
- :class:`DynamicMatMulEmitter` — a dynamic format (``intB-d``) on a ``MatMul`` that reads ``Wᵀ``
  or a plain ``Gemm``: the node becomes ``DynamicQuantizeLinear(x) → MatMulInteger(x_q, W_q, x_zp)
  → Cast(float) → Mul(x_scale · w_scales)`` (``→ Add(bias)`` for a Gemm), what onnxruntime's
  ``quantize_dynamic`` writes; onnxruntime fuses it into ``com.microsoft.DynamicQuantizeMatMul``
  when it loads the model. The input is quantized per tensor to uint8 from each run's own range
  (including 0); the weight is stored once as int8 ``(K, N)`` (MatMulInteger's B layout) with no
  zero point and float32 scales ``(N,)``: the bytes the size cost counts for an int8 weight.
- :class:`DequantizeLinearEmitter` — everything else (Conv, per-channel formats on MatMul / Gemm,
  activation formats, a block size that does not divide K, a weight that some other op reads):
  ``DequantizeLinear`` on the weight, which onnxruntime fuses with the activation Q/DQ into integer
  kernels (``QLinearConv``, ``QGemm``, ``QLinearMatMul``).

MatMulNBits and GatherBlockQuantized store the same bytes: the integers as unsigned
``q + 2^(b-1)`` packed along the input axis, row by row, one row per output channel, with no
``zero_points`` (both ops then use the midpoint ``2^(b-1)``), and float32 scales ``(out, blocks)``.
So a tied table (GPT-2's ``wte`` / ``lm_head``) stores its integers once, read by the
GatherBlockQuantized directly and by the MatMulNBits through a ``Reshape`` to
``(N, blocks, block · b / 8)`` that onnxruntime folds. A layer takes these packed emitters only when
one applies to every use; otherwise all its uses go through DequantizeLinear.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from hawqtool.export.locate import LayerSite, WeightUse, attribute
from hawqtool.export.pack import PACKED_OP_BITS, offset_unsigned, pack_int2, pack_int4, pack_rows
from hawqtool.formats import Format

if TYPE_CHECKING:
    import onnx

log = logging.getLogger(__name__)

#: ``MatMulNBits.accuracy_level``: what onnxruntime's own DQ → MatMulNBits fusion writes (see the
#: module docstring for the measurements).
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
    """

    site: LayerSite
    fmt: Format
    bits: int
    q: np.ndarray
    scale: np.ndarray
    nodes: Mapping[str, onnx.NodeProto]
    initializer_dims: Mapping[str, tuple[int, ...]]

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


class PackedEmitter(Protocol):
    """An emitter that replaces a use by a contrib op reading the packed unsigned integers."""

    kind: str

    def applies(self, use: WeightUse, ctx: LayerContext) -> bool: ...

    def block(self, ctx: LayerContext) -> int: ...

    def node(
        self, use: WeightUse, ctx: LayerContext, data: str, blocks: str, scales: str
    ) -> onnx.NodeProto: ...


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

    def node(self, use: WeightUse, ctx: LayerContext, data: str, blocks: str, scales: str) -> onnx.NodeProto:
        from onnx import helper

        old = ctx.nodes[use.node]
        inputs = [use.input, blocks, scales]
        if use.op_type == "Gemm" and len(old.input) > 2 and old.input[2]:
            inputs += ["", "", old.input[2]]  # zero_points and g_idx left out, then the bias
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

    def node(self, use: WeightUse, ctx: LayerContext, data: str, blocks: str, scales: str) -> onnx.NodeProto:
        from onnx import helper

        old = ctx.nodes[use.node]
        return helper.make_node(
            "GatherBlockQuantized",
            [data, use.input, scales],
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

    def emit(self, ctx: LayerContext) -> Emission:
        from onnx import TensorProto, helper, numpy_helper

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
    into QLinearConv / QGemm (a direct INT4 DQ runs dequantize + float compute, 4–16× slower, and a
    direct INT2 DQ is fused into a QLinearConv that onnxruntime 1.32 then rejects). A use that reads
    the other layout gets its own DequantizeLinear on a ``Transpose`` of those integers (folded the
    same way). No zero point (symmetric), except one all-zero int8 zero point per output channel
    when an activation format's weight feeds a Gemm: onnxruntime 1.32 fuses ``DQ → Gemm → Q`` into
    QGemm only with it (measured: 0 of 3 Gemms fused without, 3 of 3 with).
    """

    kind = "DequantizeLinear"

    def emit(self, ctx: LayerContext) -> Emission:
        from onnx import TensorProto, helper, numpy_helper

        site, f = ctx.site, ctx.fmt
        w = site.weight
        q, scale = ctx.q, ctx.scale
        if site.transposed:
            q, scale = np.ascontiguousarray(q.T), np.ascontiguousarray(scale.T)
        q_name, s_name, zp_name = f"{w}_quantized", f"{w}_scale", f"{w}_zero_point"
        nodes: list[onnx.NodeProto] = []
        if ctx.bits in (2, 4):
            dtype, packed = (
                (TensorProto.INT4, pack_int4(q)) if ctx.bits == 4 else (TensorProto.INT2, pack_int2(q))
            )
            inits = [helper.make_tensor(q_name, dtype, q.shape, packed, raw=True)]
            ints = f"{q_name}_int8"
            nodes.append(
                helper.make_node("Cast", [q_name], [ints], name=f"{q_name}_Cast", to=TensorProto.INT8)
            )
        else:
            inits = [numpy_helper.from_array(q.astype(np.int8), q_name)]
            ints = q_name
        inits.append(numpy_helper.from_array(scale.astype(np.float32), s_name))
        zero_point = f.activations and any(u.op_type == "Gemm" for u in site.uses)
        if zero_point:
            inits.append(numpy_helper.from_array(np.zeros(ctx.out_features, np.int8), zp_name))

        def dequantize(ints: str, scales: str, out: str, channel_axis: int) -> onnx.NodeProto:
            # Blocks run along the input axis: the other axis of a 2-D weight than the channel one.
            attrs: dict[str, Any] = (
                {"axis": channel_axis}
                if f.block is None
                else {"axis": 1 - channel_axis, "block_size": f.block}
            )
            inputs = [ints, scales, zp_name] if zero_point else [ints, scales]
            return helper.make_node(
                "DequantizeLinear", inputs, [out], name=f"{out}_DequantizeLinear", **attrs
            )

        # The DequantizeLinear output takes over the float tensor's name, so every node that read
        # the weight now reads the dequantized weight without any rewiring.
        nodes.append(dequantize(ints, s_name, w, site.axis))
        for t in site.tensors[1:]:  # copies in the other layout
            nodes.append(
                helper.make_node("Transpose", [ints], [f"{t}_ints"], name=f"{t}_ints_Transpose", perm=[1, 0])
            )
            scales = s_name
            if f.block is not None:
                scales = f"{t}_scale"
                nodes.append(
                    helper.make_node("Transpose", [s_name], [scales], name=f"{scales}_Transpose", perm=[1, 0])
                )
            nodes.append(dequantize(f"{t}_ints", scales, t, 1 - site.axis))
        return Emission(
            initializers=tuple(inits),
            nodes=tuple(nodes),
            drops=site.tensors,
            kinds={u.node: self.kind for u in site.uses},
        )


#: Emitters that replace a use by a contrib op on packed unsigned integers, tried in order.
PACKED_EMITTERS: tuple[PackedEmitter, ...] = (MatMulNBitsEmitter(), GatherBlockQuantizedEmitter())
DEQUANTIZE_EMITTER = DequantizeLinearEmitter()
DYNAMIC_EMITTER = DynamicMatMulEmitter()


def emit(ctx: LayerContext) -> Emission:
    """The emission of one quantized layer: MatMulInteger for a dynamic format, or packed contrib
    ops, when it applies to every use (and no other op reads the weight), else DequantizeLinear on
    the weight (for a dynamic format: weight-only, the same integers and bytes, a warning)."""
    exclusive = ctx.site.exclusive and bool(ctx.site.uses)
    if ctx.fmt.dynamic:
        if exclusive and all(DYNAMIC_EMITTER.applies(u, ctx) for u in ctx.site.uses):
            return DYNAMIC_EMITTER.emit(ctx)
        log.warning(
            "layer %r: %s needs every reader of the weight to be a MatMul on Wᵀ or a plain Gemm; "
            "its weight goes through DequantizeLinear instead (float activations)",
            ctx.site.fqn,
            ctx.fmt.name,
        )
        return DEQUANTIZE_EMITTER.emit(ctx)
    chosen: list[PackedEmitter] = []
    for use in ctx.site.uses:
        e = next((e for e in PACKED_EMITTERS if e.applies(use, ctx)), None)
        if e is None:
            break
        chosen.append(e)
    if exclusive and len(chosen) == len(ctx.site.uses):
        return _emit_packed(ctx, chosen)
    return DEQUANTIZE_EMITTER.emit(ctx)


def _emit_packed(ctx: LayerContext, emitters: Sequence[PackedEmitter]) -> Emission:
    from onnx import helper, numpy_helper

    w = ctx.site.weight
    n, k = ctx.out_features, ctx.in_features
    blocks = {e.block(ctx) for e in emitters}
    assert len(blocks) == 1, blocks  # per-row formats never reach MatMulNBits
    block = blocks.pop()
    data = pack_rows(offset_unsigned(ctx.q, ctx.bits), ctx.bits)  # (N, K · b / 8)
    scales = ctx.scale.reshape(n, -1).astype(np.float32)  # (N, blocks); (N, 1) per row
    data_name, blocks_name, s_name = f"{w}_packed", f"{w}_packed_blocks", f"{w}_scale"
    nbits = any(isinstance(e, MatMulNBitsEmitter) for e in emitters)
    gather = any(isinstance(e, GatherBlockQuantizedEmitter) for e in emitters)
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
    replace = {
        use.node: (e.node(use, ctx, data_name, blocks_name, s_name),)
        for use, e in zip(ctx.site.uses, emitters, strict=True)
    }
    return Emission(
        initializers=tuple(inits),
        nodes=tuple(nodes),
        replace=replace,
        drops=ctx.site.tensors,
        kinds={use.node: e.kind for use, e in zip(ctx.site.uses, emitters, strict=True)},
    )
