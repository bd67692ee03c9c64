"""Quantization formats and layer kinds as data, and the arithmetic every stage shares about them.

A format is named by a short string in recipes (``int4``, ``int8-w``, ``int8-d``, ``int4-b32``,
``uint4-b32``, ``float``); :func:`parse_format` turns it into a :class:`Format` through the registered
:class:`FormatFamily` whose pattern matches it. A family carries its facts (activations quantized,
dynamic, block-wise, packed storage, scale rule), so a new family is one :func:`register_family` here,
plus its quantizer (:func:`hawqtool.quantizer.register`) and its ONNX emitters
(:func:`hawqtool.export.emitters.register_emitters`), which need torch and onnx. Layer kinds
(:class:`LayerKind`, one :func:`register_kind` each) say what a layer can take; :func:`supports` reads
both tables. This module also says how many bits a format stores, how many scales it keeps and what
a layer costs in it (bytes, bit operations). It imports nothing but the standard library and
:mod:`hawqtool.errors`, so every other module may import it.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from hawqtool.errors import UsageError
from hawqtool.registry import Registry

if TYPE_CHECKING:
    from hawqtool.types import LayerInfo

FLOAT = "float"
#: ``allocation.formats: auto``: each layer is offered the formats its kind runs well
#: (:func:`hawqtool.options.auto_formats`) instead of one list for every layer.
AUTO: Literal["auto"] = "auto"
#: How sub-8-bit integers are stored: ``packed`` (ONNX INT2/INT4) or ``container`` (INT8).
STORAGES = ("packed", "container")
#: First opsets with INT4 / INT2 ``DequantizeLinear`` inputs (packed sub-byte storage).
INT4_MIN_OPSET = 21
INT2_MIN_OPSET = 25
#: The exporter's default opset: the lowest that stores int2 packed (onnxruntime 1.32 runs it).
DEFAULT_OPSET = 25
COST_MODELS = ("size", "bops")
#: Bytes of one scale (float32), stored next to quantized weights.
SCALE_BYTES = 4
#: Bits of the activations a dynamic format (``intB-d``) quantizes at run time (uint8).
DYNAMIC_ACTIVATION_BITS = 8


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
            ``intB-d``, ``intB-bK``, ``uintB-bK``): what quantizer and exporter dispatch on.
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


# --------------------------------------------------------------------------------------------
# Layer kinds: what a layer can take
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LayerKind:
    """What a kind of layer can take; :attr:`hawqtool.types.LayerInfo.kind` names one.

    Attributes:
        name: the kind's name (``linear``, ``conv2d``, ...).
        activations: its input is an activation that integer kernels can quantize (an embedding's
            input is ids: it takes weight-only formats only).
        matmul_only: only MatMul / Gemm read its weight (Linear-like), so dynamic formats fit.
        matrix: its weight view is a matrix ``(out, in)``, so block-wise formats fit.
    """

    name: str
    activations: bool
    matmul_only: bool
    matrix: bool


_KINDS = Registry[LayerKind]("layer kind", same_ok=True)


def register_kind(kind: LayerKind, *, replace: bool = False) -> None:
    """Add a layer kind to the table (registering an equal record again does nothing).

    Raises:
        UsageError: an empty name, or a different record under a registered name without ``replace``.
    """
    _KINDS.add(kind.name, kind, replace=replace)


def unregister_kind(name: str) -> None:
    """Remove a layer kind (tests; a kind still used by a handler leaves its layers unusable)."""
    _KINDS.remove(name, missing_ok=True)


def layer_kind(name: str) -> LayerKind:
    """The registered kind ``name``.

    Raises:
        UsageError: an unknown kind, naming the registered ones.
    """
    return _KINDS[name]


def kinds() -> tuple[LayerKind, ...]:
    """The registered layer kinds, in registration order."""
    return tuple(_KINDS.values())


class KindNames(AbstractSet[str]):
    """The names of the registered kinds with one capability, read from the table when asked (so a
    kind registered later is in it).

    Example:
        >>> "linear" in ACTIVATION_KINDS, "embedding" in ACTIVATION_KINDS, "conv2d" in MATMUL_KINDS
        (True, False, False)
    """

    def __init__(self, test: Callable[[LayerKind], bool]) -> None:
        self._test = test

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name in _KINDS and self._test(_KINDS[name])

    def __iter__(self) -> Iterator[str]:
        return iter([k.name for k in _KINDS.values() if self._test(k)])

    def __len__(self) -> int:
        return sum(1 for _ in self)

    def __repr__(self) -> str:
        return f"KindNames({sorted(self)})"


#: Kinds whose input activations can be quantized (integer kernels); the others are weight-only.
ACTIVATION_KINDS = KindNames(lambda k: k.activations)
#: Kinds whose weight only a MatMul / Gemm reads: the ones a dynamic format can take.
MATMUL_KINDS = KindNames(lambda k: k.activations and k.matmul_only)

for _kind in (
    LayerKind("linear", activations=True, matmul_only=True, matrix=True),
    LayerKind("conv1d", activations=True, matmul_only=False, matrix=False),
    LayerKind("conv2d", activations=True, matmul_only=False, matrix=False),
    LayerKind("mha_in_proj", activations=True, matmul_only=True, matrix=True),
    LayerKind("embedding", activations=False, matmul_only=False, matrix=True),
    LayerKind("hf_conv1d", activations=True, matmul_only=True, matrix=True),
):
    register_kind(_kind)


# --------------------------------------------------------------------------------------------
# Format families
# --------------------------------------------------------------------------------------------


def channel_scales(layer: LayerInfo, fmt: Format) -> int:
    """float32 scales a layer keeps: one per output channel, or per output channel and block."""
    if fmt.block is None:
        return layer.out_channels
    k = layer.params // max(layer.out_channels, 1)
    return layer.out_channels * -(-k // fmt.block)


@dataclass(frozen=True)
class FormatFamily:
    """One family of formats: how its names read and what its formats are.

    Attributes:
        name: the family's name, recorded in :attr:`Format.family` (``intB-bK``).
        pattern: a regular expression its names match in full, with a group ``bits`` (weight bits,
            2 to 8) and, for a block-wise family, a group ``block`` (a power of two >= 16).
        grammar: the family's entry in :data:`FORMAT_GRAMMAR`, for error messages.
        examples: names for :data:`KNOWN_FORMATS`; each must parse to this family alone.
        bits: the weight bits when ``pattern`` has no ``bits`` group (32 for ``float``).
        activations: its formats quantize the layer's input and output to uint8 (calibrated).
        dynamic: its formats quantize the layer's input to uint8 at run time (MatMul / Gemm only).
        packed: sub-byte integers may be stored packed (ONNX INT2 / INT4); otherwise always INT8.
        scales: the number of float32 scales a layer stores in one of its formats.
        layer_kinds: the only kinds it suits, or ``None`` for every kind whose capabilities fit.
        zero_points: its formats store one zero point per scale, in the weights' storage bits
            (asymmetric grids: ``uintB-bK``); :func:`layer_cost` counts them.
    """

    name: str
    pattern: str
    grammar: str
    examples: tuple[str, ...] = ()
    bits: int | None = None
    activations: bool = False
    dynamic: bool = False
    packed: bool = True
    scales: Callable[[LayerInfo, Format], int] = channel_scales
    layer_kinds: frozenset[str] | None = None
    zero_points: bool = False

    @property
    def block_wise(self) -> bool:
        return "block" in re.compile(self.pattern).groupindex

    def parse(self, name: str) -> Format | None:
        """The format ``name`` names in this family, or ``None`` when it is not one of its names.

        Raises:
            UsageError: a block size that is not a power of two >= 16.
        """
        m = re.fullmatch(self.pattern, name)
        if m is None:
            return None
        groups = m.groupdict()
        bits = int(groups["bits"]) if groups.get("bits") is not None else self.bits
        assert bits is not None  # checked by register_family
        block = int(groups["block"]) if groups.get("block") is not None else None
        if block is not None and (block < 16 or block & (block - 1)):
            raise UsageError(f"format {name!r}: block size {block} must be a power of two >= 16")
        return Format(name, bits, self.activations, block, self.dynamic, family=self.name)


_FAMILIES = Registry[FormatFamily]("format family")
#: The grammar of every registered family, for error messages (kept in step with the registry).
FORMAT_GRAMMAR = ""
#: Examples of every registered family, quantized ones first (kept in step with the registry).
KNOWN_FORMATS: tuple[str, ...] = ()


def _refresh() -> None:
    global FORMAT_GRAMMAR, KNOWN_FORMATS
    FORMAT_GRAMMAR = ", ".join(f.grammar for f in _FAMILIES.values())
    fams = list(_FAMILIES.values())
    quantized = [f for f in fams if f.bits is None or f.bits < 32]
    KNOWN_FORMATS = tuple(
        e for f in (*quantized, *(f for f in fams if f not in quantized)) for e in f.examples
    )
    _parse.cache_clear()


def register_family(family: FormatFamily, *, replace: bool = False) -> None:
    """Make a format family's names valid everywhere (recipes, options, costs, pins).

    Raises:
        UsageError: an empty or taken name (without ``replace``), a pattern that does not compile or
            has no ``bits`` group and no ``bits``, or an example that does not parse to this family
            alone, or whose bits are not 2..8 (32 for an unquantized family).

    Example:
        >>> register_family(FormatFamily("demoB", r"demo(?P<bits>[2-8])", "demoB (demo)", ("demo4",)))
        >>> parse_format("demo4").family, "demo4" in known_formats()
        ('demoB', True)
        >>> unregister_family("demoB")
    """
    if family.name in _FAMILIES and not replace:  # refused before its examples are checked
        raise UsageError(f"format family {family.name!r} is already registered; pass replace=True")
    try:
        groups = re.compile(family.pattern).groupindex
    except re.error as e:
        raise UsageError(f"format family {family.name!r}: bad pattern {family.pattern!r}: {e}") from e
    if "bits" not in groups and family.bits is None:
        raise UsageError(f"format family {family.name!r}: its pattern needs a 'bits' group, or give bits")
    for example in family.examples:
        fmt = family.parse(example)
        others = [f.name for f in _FAMILIES.values() if f.name != family.name and f.parse(example)]
        if fmt is None or others:
            raise UsageError(
                f"format family {family.name!r}: example {example!r} must parse to it alone "
                f"(its pattern: {'matches' if fmt else 'does not match'}; other families: {others or 'none'})"
            )
        if not (2 <= fmt.bits <= 8 or fmt.bits == 32):
            raise UsageError(
                f"format family {family.name!r}: {example!r} has {fmt.bits} bits; allowed: 2..8, 32"
            )
    _FAMILIES.add(family.name, family, replace=True)
    _refresh()


def unregister_family(name: str) -> None:
    """Remove a format family (tests); its names no longer parse."""
    _FAMILIES.remove(name, missing_ok=True)
    _refresh()


def known_formats() -> tuple[str, ...]:
    """:data:`KNOWN_FORMATS` as the registry has it now (a name imported earlier is a snapshot)."""
    return KNOWN_FORMATS


def format_grammar() -> str:
    """:data:`FORMAT_GRAMMAR` as the registry has it now."""
    return FORMAT_GRAMMAR


def families() -> tuple[FormatFamily, ...]:
    """The registered format families, in registration order."""
    return tuple(_FAMILIES.values())


def format_family(fmt: str | Format) -> FormatFamily:
    """The registered family of a format (a name or a parsed :class:`Format`).

    Example:
        >>> format_family("int4-b32").block_wise, format_family("int8-d").packed
        (True, False)
    """
    name = (fmt if isinstance(fmt, Format) else parse_format(fmt)).family
    return _FAMILIES[name]


@functools.lru_cache(maxsize=1024)
def _parse(name: str) -> Format:
    for family in _FAMILIES.values():
        fmt = family.parse(name)
        if fmt is not None:
            return fmt
    raise UsageError(f"unknown format {name!r}; allowed: {FORMAT_GRAMMAR}")


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
    if not isinstance(name, str):
        raise UsageError(f"unknown format {name!r}; allowed: {FORMAT_GRAMMAR}")
    return _parse(name)


_INT = r"int(?P<bits>[2-8])"
for _family in (
    FormatFamily(FLOAT, "float", "float", (FLOAT,), bits=32),
    FormatFamily(
        "intB",
        _INT,
        "intB (B = 2..8: weights per output channel + uint8 activations)",
        tuple(f"int{b}" for b in range(2, 9)),
        activations=True,
    ),
    FormatFamily("intB-w", _INT + "-w", "intB-w (weight-only)", tuple(f"int{b}-w" for b in range(2, 9))),
    FormatFamily(
        "intB-d",
        _INT + "-d",
        "intB-d (weights per output channel in int8 + uint8 activations quantized at run time, "
        "MatMul/Gemm layers only)",
        tuple(f"int{b}-d" for b in range(2, 9)),
        dynamic=True,
        packed=False,  # MatMulInteger reads 8-bit integers
    ),
    FormatFamily(
        "intB-bK",
        _INT + r"-b(?P<block>\d+)",
        "intB-bK (weight-only, blocks of K input channels, K a power of two >= 16)",
        ("int4-b32", "int8-b32"),
    ),
    # Asymmetric blocks are named ``uint``: what they store is unsigned codes u in [0, 2^B - 1] with
    # a zero point per block, w = (u - zp) * scale, as MatMulNBits / GatherBlockQuantized with their
    # zero_points input and llama.cpp's Q4_1-style blocks do; ``intB-bK`` stays the symmetric grid.
    FormatFamily(
        "uintB-bK",
        r"uint(?P<bits>[2-8])-b(?P<block>\d+)",
        "uintB-bK (weight-only, asymmetric: blocks of K input channels with a scale and a zero point "
        "each, from the block's min/max; K a power of two >= 16)",
        ("uint4-b32", "uint8-b32"),
        zero_points=True,
    ),
):
    register_family(_family)


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


def allocation_key(allocation: Mapping[str, str]) -> tuple[tuple[str, str], ...]:
    """A hashable key of an allocation (``fqn -> format``), the same whatever its order.

    Example:
        >>> allocation_key({"b": "int4", "a": "float"})
        (('a', 'float'), ('b', 'int4'))
    """
    return tuple(sorted(allocation.items()))


def average_bits(allocation: Mapping[str, str], params: Mapping[str, int]) -> float:
    """Parameter-weighted average weight bits of an allocation (``float`` counts as 32).

    Example:
        >>> average_bits({"a": "int4", "b": "float"}, {"a": 3, "b": 1})
        11.0
    """
    total = sum(params[f] for f in allocation)
    return sum(format_bits(fmt) * params[f] for f, fmt in allocation.items()) / max(total, 1)


# --------------------------------------------------------------------------------------------
# Arithmetic: storage, scales, costs, capability
# --------------------------------------------------------------------------------------------


def formats_by_kind(
    layers: Sequence[LayerInfo], offered: Mapping[str, Sequence[str]]
) -> dict[str, list[str]]:
    """Per layer kind, every format any of its layers was offered
    (:func:`hawqtool.options.candidate_formats`), in first-offered order: for the report.

    Example:
        >>> from hawqtool.types import LayerInfo
        >>> fc = LayerInfo("fc", "linear", (10, 64), params=640)
        >>> formats_by_kind([fc], {"fc": ("int8-d", "float")})
        {'linear': ['int8-d', 'float']}
    """
    out: dict[str, list[str]] = {}
    for layer in layers:
        row = out.setdefault(layer.kind, [])
        row += [f for f in offered[layer.fqn] if f not in row]
    return out


def check_choice(value: str, allowed: Sequence[str], what: str) -> None:
    """Raise a :class:`UsageError` naming ``value`` and ``allowed`` unless ``value`` is one of them."""
    if value not in allowed:
        raise UsageError(f"unknown {what} {value!r}; allowed: {', '.join(allowed)}")


def storage_bits(fmt: str, *, storage: str = "packed", opset: int = DEFAULT_OPSET) -> int:
    """Bits one weight occupies in the exported model.

    Args:
        fmt: a format (:data:`FORMAT_GRAMMAR`).
        storage: ``packed`` (2-bit integers as ONNX INT2 from opset 25, 3–4-bit as INT4, 5–8-bit
            as INT8) or ``container`` (every integer format in INT8). A family that is not
            ``packed`` (``intB-d``) is always stored in INT8.
        opset: the exported model's opset; below 25 there is no INT2, so int2 is packed as INT4.

    Every emitter of :mod:`hawqtool.export` stores exactly these bits: DequantizeLinear
    initializers (INT2 / INT4 / INT8), and MatMulNBits / GatherBlockQuantized, which pack the same
    2, 4 or 8 bits per weight into ``uint8`` rows without padding.

    Raises:
        UsageError: unknown format or storage.

    Example:
        >>> storage_bits("int3"), storage_bits("int3", storage="container"), storage_bits("float")
        (4, 8, 32)
        >>> storage_bits("int2"), storage_bits("int2", opset=21), storage_bits("int4-d")
        (2, 4, 8)
    """
    f = parse_format(fmt)
    check_choice(storage, STORAGES, "storage")
    if not f.quantized:
        return 32
    if storage == "container" or not format_family(f).packed:
        return 8
    if f.bits <= 2 and opset >= INT2_MIN_OPSET:
        return 2
    return 4 if f.bits <= 4 else 8


def scale_count(layer: LayerInfo, fmt: str) -> int:
    """float32 scales a quantized layer stores, by its family's rule (:attr:`FormatFamily.scales`)."""
    f = parse_format(fmt)
    return format_family(f).scales(layer, f)


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
    it: the integers at :func:`storage_bits` (a partial last byte counts whole) plus 4 bytes per
    :func:`scale_count` scale and the :func:`zero_point_bytes` of an asymmetric family, or 4 bytes
    per weight for ``float``. ``bops`` is MACs × weight bits ×
    activation bits (``activation_bits`` for activation formats, 8 for dynamic ones, else 32).

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
    f = parse_format(fmt)
    check_choice(cost, COST_MODELS, "cost model")
    check_choice(storage, STORAGES, "storage")
    if not 1 <= activation_bits <= 32:
        raise UsageError(f"activation_bits must be in 1..32, got {activation_bits}")
    if cost == "bops":
        act = activation_bits if f.activations else DYNAMIC_ACTIVATION_BITS if f.dynamic else 32
        return float(layer.macs * f.bits * act)
    if not f.quantized:
        return float(layer.params * 4)
    bits = storage_bits(fmt, storage=storage, opset=opset)
    weight_bytes = math.ceil(layer.params * bits / 8)
    return float(weight_bytes + SCALE_BYTES * scale_count(layer, fmt) + zero_point_bytes(layer, fmt, bits))


def zero_point_bytes(layer: LayerInfo, fmt: str, bits: int) -> int:
    """Bytes of the zero points a layer stores in ``fmt`` (0 for a symmetric family): one per scale,
    ``bits`` each, packed row by row (one row per output channel, a partial last byte whole), as
    MatMulNBits and GatherBlockQuantized read them. (The DequantizeLinear fallback packs them over
    the whole tensor: at most this many bytes, fewer by up to half a byte per row.)

    Example:
        >>> from hawqtool.types import LayerInfo
        >>> fc = LayerInfo("fc", "linear", (10, 96), params=960)
        >>> zero_point_bytes(fc, "uint4-b32", 4), zero_point_bytes(fc, "int4-b32", 4)  # 10 rows · 3 blocks
        (20, 0)
    """
    f = parse_format(fmt)
    if not (f.quantized and format_family(f).zero_points):
        return 0
    rows = max(layer.out_channels, 1)
    per_row = -(-scale_count(layer, fmt) // rows)
    return rows * math.ceil(per_row * bits / 8)


def _misfit(layer: LayerInfo, f: Format) -> str | None:
    """Why a layer cannot take a format, or ``None`` when it can."""
    if not f.quantized:
        return None
    kind = layer_kind(layer.kind)
    family = format_family(f)
    if family.layer_kinds is not None and kind.name not in family.layer_kinds:
        return f"{family.name} formats are for {', '.join(sorted(family.layer_kinds))} layers"
    if f.activations and not kind.activations:
        return "its input is not an activation"
    if f.dynamic and not (kind.activations and kind.matmul_only):
        return "dynamic formats are for MatMul/Gemm (Linear-like) layers"
    if f.block is not None and not (kind.matrix and len(layer.weight_shape) == 2):
        return f"block formats need a 2-D weight, it has {tuple(layer.weight_shape)}"
    return None


def supports(layer: LayerInfo, fmt: str) -> bool:
    """Whether a layer can take a format, by its kind's capabilities (:class:`LayerKind`) and the
    format's family: activation formats need an activation input, dynamic formats a weight only
    MatMul / Gemm read, block-wise formats a matrix weight.

    Raises:
        UsageError: an unknown format or layer kind.

    Example:
        >>> from hawqtool.types import LayerInfo
        >>> conv = LayerInfo("conv", "conv2d", (32, 16, 3, 3), params=4608)
        >>> fc = LayerInfo("fc", "linear", (10, 64), params=640)
        >>> supports(conv, "int8-d"), supports(fc, "int8-d"), supports(conv, "int8")
        (False, True, True)
    """
    return _misfit(layer, parse_format(fmt)) is None


def unsupported_reason(layer: LayerInfo, fmt: str) -> str | None:
    """Why a layer cannot take a format, with the known formats it can take; ``None`` when it can.

    Example:
        >>> from hawqtool.types import LayerInfo
        >>> emb = LayerInfo("emb", "embedding", (100, 8), params=800)
        >>> unsupported_reason(emb, "int8-w") is None
        True
        >>> unsupported_reason(emb, "int8")[:30]
        'its input is not an activation'
    """
    why = _misfit(layer, parse_format(fmt))
    if why is None:
        return None
    allowed = ", ".join(k for k in KNOWN_FORMATS if _misfit(layer, parse_format(k)) is None)
    return f"{why}; allowed: {allowed}"
