"""Sensitivity: the candidate options of every layer, with their cost and HAWQ-V2 score Ω.

For layer i and format b, Ω_i(b) = (Tr(H_ii) / n_i) · ‖Q_b(W_i) − W_i‖² (HAWQ-V2), where the average
trace comes from the Hessian stage and Q_b is :func:`hawqtool.quantizer.quantize_weight`, the same
quantizer that export uses. Cost models:

- ``size``: bytes of the weights as stored, including one float32 scale per output channel for
  quantized formats. ``storage="packed"`` stores 2- to 4-bit integers as ONNX int4 (two per byte)
  and 5- to 8-bit ones as int8; ``storage="container"`` stores every integer format in int8, which
  keeps onnxruntime's integer kernels on CPU (docs/facts.md). Biases stay float whatever the format and
  are the same for every allocation, so they are left out.
- ``bops``: MACs per sample × weight bits (nominal: int4 counts 4 even in an int8 container,
  float 32) × activation bits (``activation_bits`` for a quantized layer, 32 for a float one).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence

import torch

from hawqtool import costs
from hawqtool.costs import CostModel
from hawqtool.errors import UsageError
from hawqtool.quantizer import quantize_as
from hawqtool.types import (
    DEFAULT_OPSET,
    FLOAT,
    FORMAT_GRAMMAR,
    INT2_MIN_OPSET,
    STORAGES,
    LayerInfo,
    LayerOption,
    OptionTable,
    SensitivityTable,
    format_bits,
    is_format,
    parse_format,
)

log = logging.getLogger(__name__)

COST_MODELS = ("size", "bops")
#: Bytes of one per-output-channel scale (float32), stored next to quantized weights.
SCALE_BYTES = 4
#: Bits of the activations a dynamic format (``intB-d``) quantizes at run time (uint8).
DYNAMIC_ACTIVATION_BITS = 8


def _check_format(fmt: str) -> int:
    if not is_format(fmt):
        raise UsageError(f"unknown format {fmt!r}; allowed: {FORMAT_GRAMMAR}")
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
    bits = _check_format(fmt)
    _check_choice(storage, STORAGES, "storage")
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


def build_options(
    layers: Sequence[LayerInfo],
    traces: SensitivityTable,
    weights: Mapping[str, torch.Tensor],
    *,
    formats: Sequence[str] = ("int4", "int8", "float"),
    cost: str | CostModel = "size",
    storage: str = "packed",
    clip_search: bool = True,
    activation_bits: int = 8,
    opset: int = DEFAULT_OPSET,
    activation_omega: Mapping[str, float] | None = None,
    dynamic_activation_omega: Mapping[str, float] | None = None,
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

    With ``activation_omega`` (HAWQ-V2's activation term, :mod:`hawqtool.activations`), every format
    that quantizes the layer's input activation (``Format.activations``: ``intB``) adds the layer's
    Ω_act to its Ω; weight-only formats (``intB-w``, ``intB-bK``) and ``float`` do not. With
    ``dynamic_activation_omega`` the dynamic formats (``intB-d``, activations quantized at run time
    with each tensor's own range) add theirs; without it they are charged their weights' error only.

    Args:
        layers: the quantizable layers (``PreparedModel.layers``), in model order.
        traces: the Hessian stage's table; must cover every layer.
        weights: the (BN-folded) weight of every layer, by FQN.
        formats: candidate formats for unpinned layers, in :data:`~hawqtool.types.KNOWN_FORMATS`.
        cost: a :class:`~hawqtool.costs.CostModel`, or the name of a registered one (``size``,
            ``bops``, or one added with :func:`hawqtool.costs.register`), built for ``storage``,
            ``activation_bits`` and ``opset``. The table records its ``name``.
        storage: integer storage for ``size``, ``packed`` or ``container``.
        clip_search: passed to the quantizer (the export must use the same setting).
        activation_bits: bits of quantized activations for ``bops``.
        opset: the exported model's opset, which decides packed int2 storage for ``size``.
        activation_omega: Ω_act per layer (fqn -> finite number >= 0), added to the Ω of its
            activation-quantizing formats; a layer that can take such a format must be covered.
        dynamic_activation_omega: Ω_act of run-time quantization per layer
            (:meth:`hawqtool.activations.ActivationTable.dynamic_omegas`), added to the Ω of its
            dynamic formats; same checks.

    Raises:
        UsageError: unknown format, cost model or storage; no formats; a layer without a trace or
            a weight, or whose weight or trace does not match the layer's shape; an activation Ω
            missing for a layer that needs one, negative or not finite; a cost that is not finite.

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
        raise UsageError(f"no candidate formats given; allowed: {FORMAT_GRAMMAR}")
    for fmt in formats:
        _check_format(fmt)
    _check_choice(storage, STORAGES, "storage")
    cost_model = (
        costs.get(cost, costs.CostSettings(storage=storage, opset=opset, activation_bits=activation_bits))
        if isinstance(cost, str)
        else cost
    )
    for fqn, value in [*(activation_omega or {}).items(), *(dynamic_activation_omega or {}).items()]:
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
            raise UsageError(f"activation Ω of layer {fqn!r} must be a finite number >= 0, got {value!r}")
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
        if layer.pinned is not None:
            if not supports(layer, layer.pinned):
                raise UsageError(
                    f"layer {layer.fqn!r} ({layer.kind}) is pinned to {layer.pinned!r}, which it cannot "
                    f"take; allowed for it: {', '.join(f for f in formats if supports(layer, f))}"
                )
            allowed: tuple[str, ...] = (layer.pinned,)
        else:
            allowed = tuple(f for f in formats if supports(layer, f)) or (FLOAT,)
            if FLOAT not in allowed and all(not supports(layer, f) for f in formats):
                allowed = (FLOAT,)
        for fmt in allowed:
            _check_format(fmt)
            sq_error = 0.0 if fmt == FLOAT else quantize_as(w, fmt, clip_search=clip_search).sq_error
            omega = avg_trace * sq_error
            spec = parse_format(fmt)
            charged = (
                activation_omega if spec.activations else dynamic_activation_omega if spec.dynamic else None
            )
            if charged is not None:
                if layer.fqn not in charged:
                    raise UsageError(
                        f"no activation Ω for layer {layer.fqn!r}, which can take {fmt!r}; given for: "
                        f"{', '.join(sorted(charged)) or '(nothing)'}"
                    )
                omega += float(charged[layer.fqn])
            layer_cost_value = float(cost_model.layer_cost(layer, fmt))
            if not math.isfinite(layer_cost_value):
                raise UsageError(
                    f"cost model {cost_model.name!r} gives layer {layer.fqn!r} in {fmt!r} a non-finite "
                    f"cost ({layer_cost_value})"
                )
            row.append(LayerOption(format=fmt, cost=layer_cost_value, sq_error=sq_error, omega=omega))
        options[layer.fqn] = tuple(row)
    if clamped:
        log.warning(
            "negative average Hessian trace clamped to 0 (Ω = 0 in every format) for: %s",
            ", ".join(clamped),
        )
    return OptionTable(
        layers=tuple(layer.fqn for layer in layers),
        options=options,
        cost_model=cost_model.name,
        params={layer.fqn: layer.params for layer in layers},
    )
