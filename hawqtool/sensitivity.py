"""Sensitivity: the candidate options of every layer, with their cost and HAWQ-V2 score Ω.

For layer i and format b, Ω_i(b) = (Tr(H_ii) / n_i) · ‖Q_b(W_i) − W_i‖² (HAWQ-V2), where the average
trace comes from the Hessian stage and Q_b is :func:`hawqtool.quantizer.quantize_weight`, the same
quantizer that export uses. Cost models:

- ``size``: bytes of the weights as stored, including one float32 scale per output channel for
  quantized formats. ``storage="packed"`` stores 2- to 4-bit integers as ONNX int4 (two per byte)
  and 5- to 8-bit ones as int8; ``storage="container"`` stores every integer format in int8, which
  keeps onnxruntime's integer kernels on CPU (FACTS.md). Biases stay float whatever the format and
  are the same for every allocation, so they are left out.
- ``bops``: MACs per sample × weight bits (nominal: int4 counts 4 even in an int8 container,
  float 32) × activation bits (``activation_bits`` for a quantized layer, 32 for a float one).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence

import torch

from hawqtool.errors import UsageError
from hawqtool.quantizer import quantize_weight
from hawqtool.types import (
    DEFAULT_OPSET,
    FLOAT,
    INT2_MIN_OPSET,
    KNOWN_FORMATS,
    STORAGES,
    LayerInfo,
    LayerOption,
    OptionTable,
    SensitivityTable,
    format_bits,
)

log = logging.getLogger(__name__)

COST_MODELS = ("size", "bops")
#: Bytes of one per-output-channel scale (float32), stored next to quantized weights.
SCALE_BYTES = 4


def _check_format(fmt: str) -> int:
    if fmt not in KNOWN_FORMATS:
        raise UsageError(f"unknown format {fmt!r}; allowed: {', '.join(KNOWN_FORMATS)}")
    return format_bits(fmt)


def _check_choice(value: str, allowed: Sequence[str], what: str) -> None:
    if value not in allowed:
        raise UsageError(f"unknown {what} {value!r}; allowed: {', '.join(allowed)}")


def storage_bits(fmt: str, *, storage: str = "packed", opset: int = DEFAULT_OPSET) -> int:
    """Bits one weight occupies in the exported model.

    Args:
        fmt: a format of :data:`hawqtool.types.KNOWN_FORMATS`.
        storage: ``packed`` (2-bit integers as ONNX INT2 from opset 25, 3–4-bit as INT4, 5–8-bit
            as INT8) or ``container`` (every integer format in INT8).
        opset: the exported model's opset; below 25 there is no INT2, so int2 is packed as INT4.

    Raises:
        UsageError: unknown format or storage.

    Example:
        >>> storage_bits("int3"), storage_bits("int3", storage="container"), storage_bits("float")
        (4, 8, 32)
        >>> storage_bits("int2"), storage_bits("int2", opset=21)
        (2, 4)
    """
    bits = _check_format(fmt)
    _check_choice(storage, STORAGES, "storage")
    if fmt == FLOAT:
        return 32
    if storage == "container":
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
        >>> conv = LayerInfo("conv", "conv2d", (32, 16, 3, 3), params=4608, macs=294912)
        >>> layer_cost(conv, "int4"), layer_cost(conv, "float")  # 4608/2 + 32 scales · 4 bytes
        (2432.0, 18432.0)
        >>> layer_cost(conv, "int4", cost="bops") == 294912 * 4 * 8
        True
    """
    bits = _check_format(fmt)
    _check_choice(cost, COST_MODELS, "cost model")
    _check_choice(storage, STORAGES, "storage")
    if not 1 <= activation_bits <= 32:
        raise UsageError(f"activation_bits must be in 1..32, got {activation_bits}")
    if cost == "bops":
        act = 32 if fmt == FLOAT else activation_bits
        return float(layer.macs * bits * act)
    if fmt == FLOAT:
        return float(layer.params * 4)
    # Packed int4/int2 hold two/four weights per byte; a partial last byte is padding.
    weight_bytes = math.ceil(layer.params * storage_bits(fmt, storage=storage, opset=opset) / 8)
    return float(weight_bytes + SCALE_BYTES * layer.out_channels)


def build_options(
    layers: Sequence[LayerInfo],
    traces: SensitivityTable,
    weights: Mapping[str, torch.Tensor],
    *,
    formats: Sequence[str] = ("int4", "int8", "float"),
    cost: str = "size",
    storage: str = "packed",
    clip_search: bool = True,
    activation_bits: int = 8,
    opset: int = DEFAULT_OPSET,
) -> OptionTable:
    """One :class:`~hawqtool.types.LayerOption` per allowed format per layer: the frontier's input.

    Ω of an integer format is ``max(avg_trace, 0) · ‖Q(W) − W‖²``; ``float`` has zero error and
    zero Ω. A pinned layer (``LayerInfo.pinned``) gets exactly its pinned format, even one not in
    ``formats``.

    Negative average traces (non-convex loss, or noise around a tiny trace) are clamped to 0, so
    that layer's Ω is 0 in every format: a negative Ω would claim that quantizing *lowers* the
    loss, which a second-order estimate along a negative-curvature direction cannot be trusted
    for. The frontier then treats the layer as insensitive and sends it to its cheapest format;
    the search's measured accuracy is what vets that. Each clamped layer is logged as a warning.

    Args:
        layers: the quantizable layers (``PreparedModel.layers``), in model order.
        traces: the Hessian stage's table; must cover every layer.
        weights: the (BN-folded) weight of every layer, by FQN.
        formats: candidate formats for unpinned layers, in :data:`~hawqtool.types.KNOWN_FORMATS`.
        cost: cost model, ``size`` (bytes) or ``bops``.
        storage: integer storage for ``size``, ``packed`` or ``container``.
        clip_search: passed to the quantizer (the export must use the same setting).
        activation_bits: bits of quantized activations for ``bops``.
        opset: the exported model's opset, which decides packed int2 storage for ``size``.

    Raises:
        UsageError: unknown format, cost model or storage; no formats; a layer without a trace or
            a weight, or whose weight or trace does not match the layer's shape.

    Example:
        >>> from hawqtool.types import LayerTrace
        >>> layer = LayerInfo("fc", "linear", (2, 3), params=6)
        >>> table = SensitivityTable((LayerTrace("fc", 6.0, 1.0, 0.1, 10, True, 6),), 0, "cpu", 0.05, 10, 0.1)
        >>> w = {"fc": torch.tensor([[1.0, -0.5, 0.25], [0.0, 0.0, 0.0]])}
        >>> opts = build_options([layer], table, w, formats=("int4", "float"))
        >>> [(o.format, o.cost, round(o.omega, 5)) for o in opts.options["fc"]]
        [('int4', 11.0, 0.00583), ('float', 24.0, 0.0)]
    """
    formats = tuple(dict.fromkeys(formats))  # de-duplicated, order kept
    if not formats:
        raise UsageError(f"no candidate formats given; allowed: {', '.join(KNOWN_FORMATS)}")
    for fmt in formats:
        _check_format(fmt)
    _check_choice(cost, COST_MODELS, "cost model")
    _check_choice(storage, STORAGES, "storage")
    known = {row.layer for row in traces}
    options: dict[str, tuple[LayerOption, ...]] = {}
    clamped = []
    for layer in layers:
        if layer.fqn not in known:
            raise UsageError(
                f"the sensitivity table has no trace for layer {layer.fqn!r}; it covers: "
                f"{', '.join(sorted(known)) or '(nothing)'}"
            )
        if layer.fqn not in weights:
            raise UsageError(f"no weight given for layer {layer.fqn!r}")
        trace = traces[layer.fqn]
        w = weights[layer.fqn]
        if tuple(w.shape) != tuple(layer.weight_shape) or trace.params != layer.params:
            raise UsageError(
                f"layer {layer.fqn!r}: weight shape {tuple(w.shape)} and trace over {trace.params} "
                f"params do not match the layer ({tuple(layer.weight_shape)}, {layer.params} params)"
            )
        if not math.isfinite(trace.avg_trace):
            raise UsageError(f"layer {layer.fqn!r} has a non-finite average trace ({trace.avg_trace})")
        if trace.avg_trace < 0:
            clamped.append(f"{layer.fqn} ({trace.avg_trace:.3g})")
        avg_trace = max(trace.avg_trace, 0.0)
        row = []
        for fmt in (layer.pinned,) if layer.pinned is not None else formats:
            bits = _check_format(fmt)
            sq_error = 0.0 if fmt == FLOAT else quantize_weight(w, bits, clip_search=clip_search).sq_error
            row.append(
                LayerOption(
                    format=fmt,
                    cost=layer_cost(
                        layer, fmt, cost=cost, storage=storage, activation_bits=activation_bits, opset=opset
                    ),
                    sq_error=sq_error,
                    omega=avg_trace * sq_error,
                )
            )
        options[layer.fqn] = tuple(row)
    if clamped:
        log.warning(
            "negative average Hessian trace clamped to 0 (Ω = 0 in every format) for: %s",
            ", ".join(clamped),
        )
    return OptionTable(
        layers=tuple(layer.fqn for layer in layers),
        options=options,
        cost_model=cost,
        params={layer.fqn: layer.params for layer in layers},
    )
