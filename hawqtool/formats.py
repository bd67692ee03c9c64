"""Quantization formats as data, and the arithmetic every stage shares about them.

A format is named by a short string in recipes (``int4``, ``int8-w``, ``int8-d``, ``int4-b32``,
``float``); :func:`parse_format` turns it into a :class:`Format`. This module also says how many bits a
format stores, how many scales it keeps, what a layer costs in it (bytes, bit operations), and which
layer kinds can take it. It imports nothing but the standard library and :mod:`hawqtool.errors`, so
every other module may import it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from hawqtool.errors import UsageError

if TYPE_CHECKING:
    from hawqtool.types import LayerInfo

# --------------------------------------------------------------------------------------------
# Formats
# --------------------------------------------------------------------------------------------

FLOAT = "float"
#: The base integer formats: symmetric, per output channel, full signed range [-2^(b-1), 2^(b-1)-1],
#: with uint8 activations around the layer (onnxruntime's integer kernels).
INT_FORMATS = tuple(f"int{b}" for b in range(2, 9))
#: Examples of every format family, for error messages and docs; :func:`parse_format` is the rule.
KNOWN_FORMATS = (
    *INT_FORMATS,
    *(f"{f}-w" for f in INT_FORMATS),
    *(f"{f}-d" for f in INT_FORMATS),
    "int4-b32",
    "int8-b32",
    FLOAT,
)
FORMAT_GRAMMAR = (
    "float, intB (B = 2..8: weights per output channel + uint8 activations), intB-w (weight-only), "
    "intB-d (weights per output channel in int8 + uint8 activations quantized at run time, "
    "MatMul/Gemm layers only), "
    "intB-bK (weight-only, blocks of K input channels, K a power of two >= 16)"
)
_FORMAT_RE = re.compile(r"int([2-8])(?:-(w)|-(d)|-b(\d+))?")

#: How sub-8-bit integers are stored: ``packed`` (ONNX INT2/INT4) or ``container`` (INT8).
STORAGES = ("packed", "container")
#: First opsets with INT4 / INT2 ``DequantizeLinear`` inputs (packed sub-byte storage).
INT4_MIN_OPSET = 21
INT2_MIN_OPSET = 25
#: The exporter's default opset: the lowest that stores int2 packed (onnxruntime 1.32 runs it).
DEFAULT_OPSET = 25


@dataclass(frozen=True)
class Format:
    """A quantization format as data; recipes name it by a short string (:func:`parse_format`).

    Attributes:
        name: the short name (``int8``, ``int4-w``, ``int4-b32``, ``float``).
        bits: weight bits (32 for float).
        activations: the layer's input and output activations are quantized to uint8 (integer
            kernels); otherwise the format is weight-only (weights dequantized, float compute).
        block: block size along the input axis (one scale per output channel and block), or
            ``None`` for one scale per output channel.
        dynamic: the layer's input is quantized to uint8 at run time from each batch's own range
            (``intB-d``: DynamicQuantizeLinear → MatMulInteger, which onnxruntime fuses into
            DynamicQuantizeMatMul); nothing is calibrated, so ``activations`` is false.
        family: the registered format family the name belongs to (``float``, ``intB``, ``intB-w``,
            ``intB-d``, ``intB-bK``): what quantizer and exporter dispatch on.
    """

    name: str
    bits: int
    activations: bool
    block: int | None = None
    dynamic: bool = False
    family: str = field(default="", kw_only=True)

    @property
    def quantized(self) -> bool:
        return self.bits < 32

    @property
    def weight_only(self) -> bool:
        return self.quantized and not self.activations and not self.dynamic


def parse_format(name: str) -> Format:
    """The :class:`Format` a short name stands for.

    Raises:
        UsageError: a name outside :data:`FORMAT_GRAMMAR`, naming it and the allowed forms.

    Example:
        >>> parse_format("int4-b32")
        Format(name='int4-b32', bits=4, activations=False, block=32, dynamic=False, family='intB-bK')
        >>> parse_format("int8").activations, parse_format("int8-w").activations
        (True, False)
        >>> parse_format("int8-d")
        Format(name='int8-d', bits=8, activations=False, block=None, dynamic=True, family='intB-d')
    """
    if name == FLOAT:
        return Format(FLOAT, 32, False, family="float")
    m = _FORMAT_RE.fullmatch(name) if isinstance(name, str) else None
    if m is None:
        raise UsageError(f"unknown format {name!r}; allowed: {FORMAT_GRAMMAR}")
    bits = int(m.group(1))
    if m.group(3) is not None:
        return Format(name, bits, False, dynamic=True, family="intB-d")
    if m.group(4) is not None:
        block = int(m.group(4))
        if block < 16 or block & (block - 1):
            raise UsageError(f"format {name!r}: block size {block} must be a power of two >= 16")
        return Format(name, bits, False, block, family="intB-bK")
    if m.group(2) is not None:
        return Format(name, bits, False, family="intB-w")
    return Format(name, bits, True, family="intB")


def is_format(name: str) -> bool:
    """Whether ``name`` is a valid format name."""
    try:
        parse_format(name)
    except UsageError:
        return False
    return True


def format_bits(fmt: str) -> int:
    """Storage bits per weight of a format: ``int4`` -> 4, ``float`` -> 32.

    Raises:
        UsageError: ``fmt`` is not a format (:data:`FORMAT_GRAMMAR`).
    """
    return parse_format(fmt).bits


def is_quantized(fmt: str) -> bool:
    """Whether a format quantizes the layer (anything but ``float``)."""
    return parse_format(fmt).quantized


def quantizes_nothing(allocation: Mapping[str, str]) -> bool:
    """Whether an allocation keeps every layer float: the float model, not a quantization result.

    Example:
        >>> quantizes_nothing({"a": "float", "b": "float"}), quantizes_nothing({"a": "float", "b": "int8"})
        (True, False)
    """
    return not any(map(is_quantized, allocation.values()))


COST_MODELS = ("size", "bops")
#: Bytes of one per-output-channel scale (float32), stored next to quantized weights.
SCALE_BYTES = 4
#: Bits of the activations a dynamic format (``intB-d``) quantizes at run time (uint8).
DYNAMIC_ACTIVATION_BITS = 8


def check_choice(value: str, allowed: Sequence[str], what: str) -> None:
    """Raise a :class:`UsageError` naming ``value`` and ``allowed`` unless ``value`` is one of them."""
    if value not in allowed:
        raise UsageError(f"unknown {what} {value!r}; allowed: {', '.join(allowed)}")


def storage_bits(fmt: str, *, storage: str = "packed", opset: int = DEFAULT_OPSET) -> int:
    """Bits one weight occupies in the exported model.

    Args:
        fmt: a format of :data:`KNOWN_FORMATS`.
        storage: ``packed`` (2-bit integers as ONNX INT2 from opset 25, 3–4-bit as INT4, 5–8-bit
            as INT8) or ``container`` (every integer format in INT8).
        opset: the exported model's opset; below 25 there is no INT2, so int2 is packed as INT4.

    Every emitter of :mod:`hawqtool.export` stores exactly these bits: DequantizeLinear
    initializers (INT2 / INT4 / INT8), and MatMulNBits / GatherBlockQuantized, which pack the same
    2, 4 or 8 bits per weight into ``uint8`` rows without padding (the exporter uses them only
    where the rows fill whole bytes and the blocks divide them).

    Raises:
        UsageError: unknown format or storage.

    Example:
        >>> storage_bits("int3"), storage_bits("int3", storage="container"), storage_bits("float")
        (4, 8, 32)
        >>> storage_bits("int2"), storage_bits("int2", opset=21)
        (2, 4)
        >>> storage_bits("int4-d")  # dynamic formats are always stored in int8
        8
    """
    bits = format_bits(fmt)
    check_choice(storage, STORAGES, "storage")
    if fmt == FLOAT:
        return 32
    if storage == "container" or parse_format(fmt).dynamic:  # MatMulInteger reads 8-bit integers
        return 8
    if bits <= 2 and opset >= INT2_MIN_OPSET:
        return 2
    return 4 if bits <= 4 else 8


def layer_cost(
    layer: LayerInfo,
    fmt: str,
    *,
    cost: str = "size",
    storage: str = "packed",
    activation_bits: int = 8,
    opset: int = DEFAULT_OPSET,
) -> float:
    """Cost of one layer in one format: bytes (``size``) or bit operations per sample (``bops``).

    ``size`` is what the exported file stores for the layer's weight, once however many nodes read
    it (a tied embedding / lm_head, a weight the ONNX exporter copied in another layout): the
    integers at :func:`storage_bits` plus 4 bytes per :func:`scale_count` scale, or 4 bytes per
    weight for ``float``.

    Args:
        layer: the layer (``params``, ``out_channels`` and, for ``bops``, ``macs``).
        fmt: its format.
        cost: ``size`` or ``bops``.
        storage: ``packed`` or ``container`` (``size`` only; see :func:`storage_bits`).
        activation_bits: bits of a quantized layer's input activations (``bops`` only).
        opset: the exported model's opset (``size`` only; see :func:`storage_bits`).

    Raises:
        UsageError: unknown format, cost model or storage, or ``activation_bits`` not in 1..32.

    Example:
        >>> from hawqtool.types import LayerInfo
        >>> conv = LayerInfo("conv", "conv2d", (32, 16, 3, 3), params=4608, macs=294912)
        >>> layer_cost(conv, "int4"), layer_cost(conv, "float")  # 4608/2 + 32 scales · 4 bytes
        (2432.0, 18432.0)
        >>> layer_cost(conv, "int4", cost="bops") == 294912 * 4 * 8
        True
    """
    bits = format_bits(fmt)
    check_choice(cost, COST_MODELS, "cost model")
    check_choice(storage, STORAGES, "storage")
    if not 1 <= activation_bits <= 32:
        raise UsageError(f"activation_bits must be in 1..32, got {activation_bits}")
    f = parse_format(fmt)
    if cost == "bops":
        act = activation_bits if f.activations else DYNAMIC_ACTIVATION_BITS if f.dynamic else 32
        return float(layer.macs * bits * act)
    if fmt == FLOAT:
        return float(layer.params * 4)
    # Packed int4/int2 hold two/four weights per byte; a partial last byte is padding.
    weight_bytes = math.ceil(layer.params * storage_bits(fmt, storage=storage, opset=opset) / 8)
    return float(weight_bytes + SCALE_BYTES * scale_count(layer, fmt))


def scale_count(layer: LayerInfo, fmt: str) -> int:
    """float32 scales a quantized layer stores: one per output channel, or per channel and block."""
    f = parse_format(fmt)
    if f.block is None:
        return layer.out_channels
    k = layer.params // max(layer.out_channels, 1)
    return layer.out_channels * -(-k // f.block)


def supports(layer: LayerInfo, fmt: str) -> bool:
    """Whether a layer's kind can take a format: an embedding has no activations to quantize (its
    input is ids), block-wise formats are for matrix weights (Linear-like and embeddings), and
    dynamic formats (``intB-d``) for weights that only MatMul / Gemm read (Linear-like kinds).

    Example:
        >>> from hawqtool.types import LayerInfo
        >>> conv = LayerInfo("conv", "conv2d", (32, 16, 3, 3), params=4608)
        >>> fc = LayerInfo("fc", "linear", (10, 64), params=640)
        >>> supports(conv, "int8-d"), supports(fc, "int8-d"), supports(conv, "int8")
        (False, True, True)
    """
    from hawqtool.prepare import ACTIVATION_KINDS, MATMUL_KINDS

    f = parse_format(fmt)
    if not f.quantized:
        return True
    if f.activations and layer.kind not in ACTIVATION_KINDS:
        return False
    if f.dynamic and layer.kind not in MATMUL_KINDS:
        return False
    return not (f.block is not None and len(layer.weight_shape) != 2)
