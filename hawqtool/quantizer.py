"""The one weight quantizer per format family, dispatched by the format's registered family.

The asymmetric block family (``uintB-bK``) has its own (:func:`quantize_asymmetric`: a scale and a
zero point per block from its min/max). The other built-in integer families share one: symmetric, per output channel (or per channel and block),
round to nearest (half to even, as ONNX ``QuantizeLinear``), on the full signed grid
[-2^(b-1), 2^(b-1) - 1] (int4: [-8, 7], 16 levels). Options measure ‖Q(W) − W‖² with it and export
writes its integers and scales, so what is scored is what ships. A new family registers its own
with :func:`register`.

Why the full grid and a clipping search: a symmetric [-7, 7] int4 grid with a max-abs scale loses
accuracy against onnxruntime's [-8, 7] ``QInt4`` (docs/benchmarks.md). The max-abs scale is
``max|w| / (qmax + 0.5)`` (what onnxruntime's symmetric QInt4 computes): the most negative weight
lands exactly on ``qmin`` and the most positive is clipped by half a step. The per-channel search
picks, by least squared error, among ``alpha`` times that scale (:data:`CLIP_RATIOS`) and the
no-clip scale ``max(max(w)/qmax, -min(w)/-qmin)``, which puts the channel's extreme weight exactly
on the grid (it helps filters with few weights whose positive max would be clipped;
docs/benchmarks.md). Because every chosen scale puts some integer on ``qmin`` or ``qmax``,
quantizing the dequantized weight again finds the same grid (idempotence).

The clip search costs 27 fake-quantizations per weight, and the options, the dependency stage, the
single-layer measurements and export each quantize the same weights in the same formats. So
:func:`quantize_as` keeps its results by the weight's content (a hash of its bytes), the format and
the quantizer, up to :data:`CACHE_BYTES` (least recently used first out): each (weight, format) is
searched once per process. The returned tensors are shared: callers must not modify them.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from hawqtool.cache import hash_tensor
from hawqtool.errors import UsageError
from hawqtool.formats import Format, families, format_family, parse_format
from hawqtool.registry import Registry

#: Candidate clipping ratios of the per-channel scale search (1.0 = no clipping).
CLIP_RATIOS = tuple(1.0 - 0.02 * i for i in range(26))  # 1.0 down to 0.5


@dataclass(frozen=True)
class QuantizedWeight:
    """Result of quantizing one weight tensor.

    Attributes:
        q: integers, ``int8`` (a container for every b ≤ 8), same shape as the weight.
        scale: float32 per-output-channel scales, shape ``(out_channels,)``, or per channel and
            block, ``(out_channels, blocks)``.
        dequantized: ``(q - zero_point) * scale`` in float32, exactly what ``DequantizeLinear``
            (and MatMulNBits / GatherBlockQuantized) compute.
        sq_error: ‖dequantized − W‖² (float64 sum).
        bits: the format's bits.
        zero_point: ``int8`` zero points of an asymmetric grid, the shape of ``scale``, on the same
            signed grid as ``q`` (an exporter storing unsigned codes adds ``2^(b-1)`` to both);
            ``None`` for a symmetric one (zero point 0).
    """

    q: torch.Tensor
    scale: torch.Tensor
    dequantized: torch.Tensor
    sq_error: float
    bits: int
    zero_point: torch.Tensor | None = None

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1))

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1


def int_range(bits: int) -> tuple[int, int]:
    """The signed integer range of ``bits``-bit weights: ``int_range(4) == (-8, 7)``."""
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def _fake_quant(w2d: torch.Tensor, scale: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    return torch.clamp(torch.round(w2d / scale[:, None]), qmin, qmax)


def quantize_weight(
    weight: torch.Tensor, bits: int, *, clip_search: bool = True, block: int | None = None
) -> QuantizedWeight:
    """Quantize ``weight`` (output channels first) to ``bits`` bits per output channel or block.

    Args:
        weight: float tensor, shape ``(out_channels, ...)``.
        bits: 2 to 8.
        clip_search: choose each channel's scale by least squared error among :data:`CLIP_RATIOS`
            times the max-abs scale and the no-clip scale; otherwise use the max-abs scale
            (``alpha = 1``, onnxruntime's symmetric grid).
        block: one scale per output channel and block of ``block`` consecutive input elements
            (the weight flattened to ``(out_channels, K)``; a last partial block is treated as if
            padded with zeros, which quantize exactly). ``scale`` then has shape
            ``(out_channels, ceil(K / block))``.

    Example:
        >>> qw = quantize_weight(torch.tensor([[1.0, -0.5, 0.25]]), 4, clip_search=False)
        >>> qw.q.tolist(), round(qw.scale.item(), 4)
        ([[7, -4, 2]], 0.1333)
    """
    if not 2 <= bits <= 8:
        raise ValueError(f"bits must be in 2..8, got {bits}")
    if block is not None and block < 1:
        raise ValueError(f"block must be >= 1, got {block}")
    qmin, qmax = int_range(bits)
    w = weight.detach().to(torch.float32)
    q, scale = _search(_rows(w, block), qmin, qmax, clip_search=clip_search)
    return _assemble(w, q, scale, None, block=block, bits=bits)


def _rows(w: torch.Tensor, block: int | None) -> torch.Tensor:
    """The weight as rows that take one scale each: ``(out, K)`` per channel, or ``(out · blocks,
    block)`` with the last partial block of each channel padded with zeros."""
    w2d = w.reshape(w.shape[0], -1)
    if block is None:
        return w2d
    k = w2d.shape[1]
    padded = torch.zeros(w2d.shape[0], -(-k // block) * block, dtype=w2d.dtype, device=w2d.device)
    padded[:, :k] = w2d
    return padded.reshape(-1, block)


def _assemble(
    w: torch.Tensor,
    q: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | None,
    *,
    block: int | None,
    bits: int,
) -> QuantizedWeight:
    """Per-row integers, scales (and zero points) of :func:`_rows` back in the weight's layout,
    dequantized as ``(q - zero_point) * scale``."""
    out, k = w.shape[0], w[0].numel()
    if block is not None:
        q = q.reshape(out, -1)[:, :k]
        scale = scale.reshape(out, -1)
        zero_point = None if zero_point is None else zero_point.reshape(out, -1)

        def spread(a: torch.Tensor) -> torch.Tensor:
            return a.repeat_interleave(block, dim=1)[:, :k]
    else:

        def spread(a: torch.Tensor) -> torch.Tensor:
            return a[:, None]

    deq = ((q if zero_point is None else q - spread(zero_point)) * spread(scale)).reshape(w.shape)
    return QuantizedWeight(
        q=q.to(torch.int8).reshape(w.shape),
        scale=scale.contiguous(),
        dequantized=deq,
        sq_error=float(((deq - w).double() ** 2).sum()),
        bits=bits,
        zero_point=None if zero_point is None else zero_point.to(torch.int8).contiguous(),
    )


def _search(
    w2d: torch.Tensor, qmin: int, qmax: int, *, clip_search: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Integers and one scale per row of ``w2d``, by the module docstring's scale search."""
    absmax = w2d.abs().amax(dim=1)
    # An all-zero row has no scale to speak of; 1.0 keeps DequantizeLinear well defined.
    absmax = torch.where(absmax > 0, absmax, torch.ones_like(absmax) * (qmax + 0.5))
    base = absmax / (qmax + 0.5)
    candidates = [base * r for r in CLIP_RATIOS] if clip_search else [base]
    if clip_search:
        # Last, so that ties keep a clipping-ratio scale.
        no_clip = torch.maximum(w2d.amax(dim=1).clamp(min=0) / qmax, w2d.amin(dim=1).clamp(max=0) / qmin)
        candidates.append(torch.where(no_clip > 0, no_clip, base))
    best_scale = base.clone()
    best_err = torch.full_like(base, float("inf"), dtype=torch.float64)
    for cand in candidates:
        s = cand.to(torch.float32)
        err = ((_fake_quant(w2d, s, qmin, qmax) * s[:, None] - w2d).double() ** 2).sum(dim=1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, s, best_scale)
    return _fake_quant(w2d, best_scale, qmin, qmax), best_scale


def quantize_asymmetric(
    weight: torch.Tensor, bits: int, block: int, *, clip_search: bool = True
) -> QuantizedWeight:
    """Quantize ``weight`` (output channels first) to ``bits`` bits per output channel and block of
    ``block`` input elements, on an asymmetric grid: a scale and an integer zero point per block.

    Each block's range ``[lo, hi]`` is its min and max widened to hold 0 (so 0 is exact, as
    onnxruntime's MatMulNBits quantizer does); ``scale = (hi - lo) / (2^b - 1)``, the zero point
    ``round(-lo / scale)``, the codes ``clamp(round(w / scale) + zp)``. With ``clip_search`` the range
    is shrunk by each of :data:`CLIP_RATIOS` and the least squared error kept per block. Codes and
    zero points are returned on the signed grid ``[-2^(b-1), 2^(b-1) - 1]`` (the unsigned code minus
    ``2^(b-1)``), so ``q - zero_point`` is the unsigned difference. A last partial block is padded
    with zeros, which quantize exactly.

    Example:
        >>> qw = quantize_asymmetric(torch.tensor([[0.0, 1.0, 2.0, 3.0]]), 2, 4, clip_search=False)
        >>> qw.q.tolist(), qw.zero_point.tolist(), qw.scale.tolist(), qw.dequantized.tolist()
        ([[-2, -1, 0, 1]], [[-2]], [[1.0]], [[0.0, 1.0, 2.0, 3.0]])
    """
    if not 2 <= bits <= 8:
        raise ValueError(f"bits must be in 2..8, got {bits}")
    if block < 1:
        raise ValueError(f"block must be >= 1, got {block}")
    levels = 2**bits - 1
    w = weight.detach().to(torch.float32)
    rows = _rows(w, block)
    lo0, hi0 = rows.amin(dim=1).clamp(max=0), rows.amax(dim=1).clamp(min=0)
    best: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
    best_err = torch.full_like(lo0, float("inf"), dtype=torch.float64)
    for ratio in CLIP_RATIOS if clip_search else (1.0,):
        span = (hi0 - lo0) * ratio
        # An all-zero block has no range; scale 1 keeps the ops well defined and 0 exact.
        scale = torch.where(span > 0, span / levels, torch.ones_like(span)).to(torch.float32)
        zp = torch.clamp(torch.round(-lo0 * ratio / scale), 0, levels)
        u = torch.clamp(torch.round(rows / scale[:, None]) + zp[:, None], 0, levels)
        err = (((u - zp[:, None]) * scale[:, None] - rows).double() ** 2).sum(dim=1)
        if best is None:
            best, best_err = (u, zp, scale), err
            continue
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = (
            torch.where(better[:, None], u, best[0]),
            torch.where(better, zp, best[1]),
            torch.where(better, scale, best[2]),
        )
    assert best is not None
    u, zp, scale = best
    half = 2 ** (bits - 1)  # codes and zero points on the signed grid: the same differences
    return _assemble(w, u - half, scale, zp - half, block=block, bits=bits)


class WeightQuantizer(Protocol):
    """A format family's quantizer: a weight (output channels first) in one of its formats."""

    def __call__(self, weight: torch.Tensor, fmt: Format, *, clip_search: bool) -> QuantizedWeight: ...


def symmetric(weight: torch.Tensor, fmt: Format, *, clip_search: bool) -> QuantizedWeight:
    """The built-in integer families' quantizer: :func:`quantize_weight` at the format's bits and block."""
    return quantize_weight(weight, fmt.bits, clip_search=clip_search, block=fmt.block)


def asymmetric(weight: torch.Tensor, fmt: Format, *, clip_search: bool) -> QuantizedWeight:
    """The asymmetric block family's quantizer (``uintB-bK``): :func:`quantize_asymmetric`."""
    if fmt.block is None:
        raise UsageError(f"format {fmt.name!r}: asymmetric quantization needs a block size")
    return quantize_asymmetric(weight, fmt.bits, fmt.block, clip_search=clip_search)


_QUANTIZERS = Registry[WeightQuantizer]("quantizer of format family")
for _family in ("intB", "intB-w", "intB-d", "intB-bK"):
    _QUANTIZERS.add(_family, symmetric)
_QUANTIZERS.add("uintB-bK", asymmetric)


def register(family: str, quantizer: WeightQuantizer, *, replace: bool = False) -> None:
    """Make ``quantizer`` the one quantizer of a registered format family.

    Raises:
        UsageError: the family is not registered in :mod:`hawqtool.formats`, or already has a
            quantizer and ``replace`` is false.
    """
    if family not in {f.name for f in families()}:
        raise UsageError(
            f"format family {family!r} is not registered; registered: {', '.join(f.name for f in families())}"
        )
    _QUANTIZERS.add(family, quantizer, replace=replace)


def unregister(family: str) -> None:
    """Remove a family's quantizer (tests)."""
    _QUANTIZERS.remove(family, missing_ok=True)


#: Bytes of quantized weights :func:`quantize_as` keeps (module doc); 0 keeps none.
CACHE_BYTES = 1 << 30
_cache: OrderedDict[tuple[Any, ...], QuantizedWeight] = OrderedDict()
_cached_bytes = 0


def _nbytes(qw: QuantizedWeight) -> int:
    parts = (qw.q, qw.scale, qw.dequantized, qw.zero_point)
    return sum(t.numel() * t.element_size() for t in parts if t is not None)


def _content_key(weight: torch.Tensor) -> tuple[str, str]:
    """What identifies a weight's values: a hash of its dtype, shape and bytes, and its device."""
    h = hashlib.sha256()
    hash_tensor(h, "weight", weight)
    return str(weight.device), h.hexdigest()


def clear_cache() -> None:
    """Forget every quantized weight :func:`quantize_as` keeps."""
    global _cached_bytes
    _cache.clear()
    _cached_bytes = 0


def quantize_as(weight: torch.Tensor, fmt: str, *, clip_search: bool = True) -> QuantizedWeight:
    """Quantize ``weight`` as format ``fmt`` with its family's quantizer; a weight of the same values
    quantized before in the same format returns the kept result (module doc; do not modify it).

    Raises:
        ValueError: ``fmt`` is ``float``.
        UsageError: an unknown format, or a family without a quantizer.

    Example:
        >>> w = torch.tensor([[1.0, -0.5, 0.25]])
        >>> quantize_as(w, "int4") is quantize_as(w.clone(), "int4")  # same values: searched once
        True
    """
    global _cached_bytes
    f = parse_format(fmt)
    if not f.quantized:
        raise ValueError("float is not a quantized format")
    family = format_family(f).name
    if family not in _QUANTIZERS:
        raise UsageError(
            f"format {fmt!r}: its family {f.family!r} has no quantizer (hawqtool.quantizer.register)"
        )
    quantizer = _QUANTIZERS[family]
    if CACHE_BYTES <= 0:
        return quantizer(weight, f, clip_search=clip_search)
    key = (f.name, clip_search, quantizer, *_content_key(weight))
    hit = _cache.get(key)
    if hit is not None:
        _cache.move_to_end(key)
        return hit
    qw = quantizer(weight, f, clip_search=clip_search)
    _cache[key] = qw
    _cached_bytes += _nbytes(qw)
    while _cached_bytes > CACHE_BYTES and _cache:
        _, old = _cache.popitem(last=False)
        _cached_bytes -= _nbytes(old)
    return qw


def dequantize_as(weight: torch.Tensor, fmt: str, *, clip_search: bool = True) -> torch.Tensor:
    """The weight a layer holds under format ``fmt`` (``float`` returns it unchanged), a tensor of
    the caller's own."""
    if not parse_format(fmt).quantized:
        return weight.detach()
    return quantize_as(weight, fmt, clip_search=clip_search).dequantized.to(weight.dtype, copy=True)


def quant_error(weight: torch.Tensor, fmt: str, *, clip_search: bool = True) -> torch.Tensor:
    """Δ = Q(W) − W for format ``fmt`` (zeros for ``float``)."""
    if not parse_format(fmt).quantized:
        return torch.zeros_like(weight.detach())
    return quantize_as(weight, fmt, clip_search=clip_search).dequantized.to(weight.dtype) - weight.detach()
