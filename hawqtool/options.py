"""Options: the candidate formats of every layer, with their cost and HAWQ-V2 score Ω.

The candidates are the recipe's list (each layer keeps those it can take), or with
``formats: auto`` (:data:`~hawqtool.formats.AUTO`) the formats its kind runs well on the execution
provider (:data:`AUTO_FORMATS`, :func:`auto_formats`).

For layer i and format b, Ω_i(b) = (Tr(H_ii) / n_i) · ‖Q_b(W_i) − W_i‖² (HAWQ-V2), where the average
trace comes from the Hessian stage and Q_b is the format family's quantizer
(:func:`hawqtool.quantizer.quantize_as`), the same one export uses. Costs come from a cost model
(:mod:`hawqtool.costs`; ``size`` and ``bops`` are :func:`hawqtool.formats.layer_cost`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence

import torch

from hawqtool import costs
from hawqtool.costs import CostModel
from hawqtool.errors import UsageError
from hawqtool.formats import AUTO, FLOAT, format_grammar, layer_kind, parse_format, supports
from hawqtool.quantizer import quantize_as
from hawqtool.types import ExportSettings, LayerInfo, LayerOption, OptionTable, SensitivityTable

log = logging.getLogger(__name__)

#: Transformer-style Linear / MatMul weights: asymmetric 4-bit blocks (MatMulNBits with zero
#: points, as onnxruntime's and llama.cpp's 4-bit blocks), 8-bit blocks (MatMulNBits), dynamic
#: int8 (DynamicQuantizeMatMul, what ``quantize_dynamic`` writes), weight-only int8, float. No
#: static uint8 activations: on a BERT-class model they cost the most fidelity.
_MATMUL = ("uint4-b32", "int8-b32", "int8-d", "int8-w", "float")
#: Embedding tables (GatherBlockQuantized; a table tied to the output head is one decision and
#: its head use becomes MatMulNBits in a block format: an int8 head with ``int8-b32``).
_EMBEDDING = ("uint4-b32", "int8-b32", "int8-w", "float")
#: Convolutions: static uint8 activations with int8 / int4 weights (QLinearConv), float.
_CONV = ("int4", "int8", "float")
#: ``allocation.formats: auto``: per execution provider, per layer kind, the formats offered. A
#: provider without its own table uses the ``cpu`` one (where these choices were measured); a kind
#: without a row gets the row of the built-in kind with its capabilities (:func:`auto_formats`).
AUTO_FORMATS: dict[str, dict[str, tuple[str, ...]]] = {
    "cpu": {
        "linear": _MATMUL,
        "mha_in_proj": _MATMUL,
        "hf_conv1d": _MATMUL,
        "embedding": _EMBEDDING,
        "conv1d": _CONV,
        "conv2d": _CONV,
    },
}


def auto_formats(layer: LayerInfo, provider: str = "cpu") -> tuple[str, ...]:
    """The formats ``formats: auto`` offers a layer: its kind's row of :data:`AUTO_FORMATS` for the
    provider, less those the layer cannot take (:func:`hawqtool.formats.supports`) and, on a
    MatMul / Gemm weight, block formats whose block does not divide its input size (MatMulNBits
    needs whole blocks; the fallback dequantizes in float); ``float`` always. A kind without a row: that of a built-in kind with the same capabilities (a Linear-like
    MatMul weight, an activation-quantizable convolution, or an embedding-like table), else weight-only
    int8 and float.

    Example:
        >>> auto_formats(LayerInfo("conv", "conv2d", (8, 4, 3, 3), params=288))
        ('int4', 'int8', 'float')
        >>> auto_formats(LayerInfo("emb", "embedding", (100, 64), params=6400))
        ('uint4-b32', 'int8-b32', 'int8-w', 'float')
    """
    table = AUTO_FORMATS.get(provider, AUTO_FORMATS["cpu"])
    row = table.get(layer.kind)
    if row is None:
        kind = layer_kind(layer.kind)
        if kind.activations and kind.matmul_only:
            row = _MATMUL
        elif kind.activations:
            row = _CONV
        elif kind.matrix:
            row = _EMBEDDING
        else:
            row = ("int8-w", FLOAT)
    matmul = layer_kind(layer.kind).matmul_only
    k = layer.params // max(layer.out_channels, 1)

    def whole_blocks(fmt: str) -> bool:
        block = parse_format(fmt).block
        return block is None or not matmul or k % block == 0

    return tuple(f for f in dict.fromkeys((*row, FLOAT)) if supports(layer, f) and whole_blocks(f))


def candidate_formats(
    layers: Sequence[LayerInfo], formats: Sequence[str] | str, *, provider: str = "cpu"
) -> dict[str, tuple[str, ...]]:
    """Per layer (FQN), the formats it is offered: its pin alone; with ``formats`` =
    :data:`~hawqtool.formats.AUTO` its :func:`auto_formats`; otherwise the listed formats it can
    take (``float`` when it can take none).

    Raises:
        UsageError: a pin the layer cannot take, naming what it can; an unknown format.

    Example:
        >>> fc = LayerInfo("fc", "linear", (10, 64), params=640)
        >>> candidate_formats([fc], "auto")
        {'fc': ('uint4-b32', 'int8-b32', 'int8-d', 'int8-w', 'float')}
        >>> candidate_formats([fc], ("int4", "float"))
        {'fc': ('int4', 'float')}
    """
    out: dict[str, tuple[str, ...]] = {}
    explicit = () if formats == AUTO else tuple(dict.fromkeys(formats))
    for fmt in explicit:
        parse_format(fmt)
    for layer in layers:
        if layer.pinned is not None:
            if not supports(layer, layer.pinned):
                offered = auto_formats(layer, provider) if formats == AUTO else explicit
                raise UsageError(
                    f"layer {layer.fqn!r} ({layer.kind}) is pinned to {layer.pinned!r}, which it cannot "
                    f"take; allowed for it: {', '.join(f for f in offered if supports(layer, f))}"
                )
            out[layer.fqn] = (layer.pinned,)
        elif formats == AUTO:
            out[layer.fqn] = auto_formats(layer, provider)
        else:
            out[layer.fqn] = tuple(f for f in explicit if supports(layer, f)) or (FLOAT,)
    return out


def offered_formats(
    layers: Sequence[LayerInfo], formats: Sequence[str] | str, *, provider: str = "cpu"
) -> tuple[str, ...]:
    """Every format some layer is offered (:func:`candidate_formats`), in first-offered order: the
    list to measure latencies in, draw uniform reference models of, or warn about."""
    rows = candidate_formats(layers, formats, provider=provider).values()
    return tuple(dict.fromkeys(f for row in rows for f in row))


def build_options(
    layers: Sequence[LayerInfo],
    traces: SensitivityTable,
    weights: Mapping[str, torch.Tensor],
    *,
    settings: ExportSettings | None = None,
    formats: Sequence[str] | str = ("int4", "int8", "float"),
    provider: str = "cpu",
    cost: str | CostModel = "size",
    activation_bits: int = 8,
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
        settings: the export settings the exporter will use: integer storage and opset (``size``
            costs) and the quantizer's clip search; ``None``: the defaults (``ExportSettings()``).
        formats: candidate formats for unpinned layers (:data:`~hawqtool.formats.FORMAT_GRAMMAR`),
            or :data:`~hawqtool.formats.AUTO` for those each layer's kind runs well on ``provider``
            (:func:`candidate_formats`).
        provider: the execution provider ``auto`` chooses for (:data:`AUTO_FORMATS`).
        cost: a :class:`~hawqtool.costs.CostModel`, or the name of a registered one (``size``,
            ``bops``, or one added with :func:`hawqtool.costs.register`), built for ``settings``
            and ``activation_bits``. The table records its ``name``.
        activation_bits: bits of quantized activations for ``bops``.
        activation_omega: Ω_act per layer (fqn -> finite number >= 0), added to the Ω of its
            activation-quantizing formats; a layer that can take such a format must be covered.
        dynamic_activation_omega: Ω_act of run-time quantization per layer
            (:meth:`hawqtool.activations.ActivationTable.dynamic_omegas`), added to the Ω of its
            dynamic formats; same checks.

    Raises:
        UsageError: unknown format or cost model; no formats; a layer without a trace or
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
    if formats != AUTO and not tuple(formats):
        raise UsageError(f"no candidate formats given; allowed: {format_grammar()} or {AUTO}")
    candidates = candidate_formats(layers, formats, provider=provider)
    settings = settings or ExportSettings()
    if isinstance(cost, str):
        cost_settings = costs.CostSettings(settings.int4_storage, settings.opset, activation_bits)
        cost_model = costs.get(cost, cost_settings)
    else:
        cost_model = cost
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
        for fmt in candidates[layer.fqn]:
            spec = parse_format(fmt)
            sq_error = (
                quantize_as(w, fmt, clip_search=settings.clip_search).sq_error if spec.quantized else 0.0
            )
            omega = avg_trace * sq_error
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
