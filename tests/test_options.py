"""Options (Ω = avg trace · ‖Q(W) − W‖², cost) by hand and on a real zoo model."""

from __future__ import annotations

import logging
from dataclasses import replace

import pytest
import torch
from torch import nn

from hawqtool.errors import UsageError
from hawqtool.formats import layer_cost
from hawqtool.frontier import pareto_frontier
from hawqtool.options import build_options
from hawqtool.prepare import prepare_model
from hawqtool.types import ExportSettings, LayerInfo, LayerTrace, SensitivityTable


def made_up_traces(layers: tuple[LayerInfo, ...], avg: dict[str, float]) -> SensitivityTable:
    rows = tuple(
        LayerTrace(
            layer=x.fqn,
            trace=avg[x.fqn] * x.params,
            avg_trace=avg[x.fqn],
            stderr=0.01 * abs(avg[x.fqn] * x.params),
            probes=32,
            converged=True,
            params=x.params,
        )
        for x in layers
    )
    return SensitivityTable(layers=rows, seed=0, device="cpu", rel_tol=0.05, hvps=0, seconds=0.0)


@pytest.fixture(scope="module")
def small_cnn() -> nn.Module:
    """The zoo's small CNN with seeded initial weights: the real layer set, without the training
    time (the made-up traces do not need trained weights)."""
    from hawqtool.zoo import SmallCNN

    torch.manual_seed(0)
    return SmallCNN().eval()


@pytest.fixture(scope="module")
def prepared_cnn(small_cnn: nn.Module):  # type: ignore[no-untyped-def]
    return prepare_model(small_cnn, torch.zeros(4, 1, 8, 8), pins={"fc2": "int2"})


def _weights(prepared) -> dict[str, torch.Tensor]:  # type: ignore[no-untyped-def]
    return {f: prepared.module(f).weight for f in prepared.fqns}


def test_build_options_on_a_real_model(prepared_cnn, caplog: pytest.LogCaptureFixture) -> None:  # type: ignore[no-untyped-def]
    layers = prepared_cnn.layers
    assert [x.fqn for x in layers] == ["conv1", "conv2", "fc1", "fc2"]
    avg = {"conv1": 0.5, "conv2": 2e-3, "fc1": -1e-4, "fc2": 0.3}
    weights = _weights(prepared_cnn)
    with caplog.at_level(logging.WARNING, logger="hawqtool.options"):
        table = build_options(layers, made_up_traces(layers, avg), weights, formats=("int4", "int8", "float"))
    assert "fc1" in caplog.text and "clamped" in caplog.text

    assert table.layers == ("conv1", "conv2", "fc1", "fc2") and table.cost_model == "size"
    assert table.params == {x.fqn: x.params for x in layers}
    # The pinned layer has exactly its pinned format, although int2 is not among the formats.
    assert [o.format for o in table.options["fc2"]] == ["int2"]
    # Bytes by hand, (int4, int8, float): params · bits / 8 + 4 per output channel's scale, or
    # params · 4. conv1 32×1×3×3 = 288 weights, conv2 64×32×3×3 = 18432, fc1 64×256 = 16384.
    costs = {"conv1": (272, 416, 1152), "conv2": (9472, 18688, 73728), "fc1": (8448, 16640, 65536)}
    for layer in layers[:3]:
        assert [o.format for o in table.options[layer.fqn]] == ["int4", "int8", "float"]
        assert tuple(o.cost for o in table.options[layer.fqn]) == costs[layer.fqn]
        for opt in table.options[layer.fqn]:
            if opt.format == "float":
                assert opt.sq_error == 0.0 and opt.omega == 0.0
            else:
                assert opt.sq_error > 0.0
                assert opt.omega == max(avg[layer.fqn], 0.0) * opt.sq_error
        o4, o8, _ = table.options[layer.fqn]
        assert o4.cost < o8.cost and o4.sq_error > o8.sq_error
    # Negative trace: Ω clamped at 0 in every format.
    assert all(o.omega == 0.0 for o in table.options["fc1"])
    assert table.options["conv1"][0].omega > table.options["conv1"][1].omega > 0

    frontier = pareto_frontier(table)
    first, last = frontier.points[0], frontier.points[-1]
    assert dict(first.allocation) == {"conv1": "int4", "conv2": "int4", "fc1": "int4", "fc2": "int2"}
    # fc1 is "free" (Ω = 0), so even the most precise point keeps it at int4.
    assert dict(last.allocation) == {"conv1": "float", "conv2": "float", "fc1": "int4", "fc2": "int2"}
    assert frontier.float_cost == sum(layer_cost(x, "float") for x in layers[:3]) + layer_cost(
        layers[3], "int2"
    )


def test_options_of_a_2x3_weight_worked_by_hand() -> None:
    """Ω and bytes of one Linear(3 → 2) on onnxruntime's max-abs grid (clip_search=False).

    W = [[3.75, -1.5, 0.75], [-1.875, 0.5, 0.0]] (dyadic: every step below is exact in float32).
    int4, grid [-8, 7], scale = max|w| / 7.5:
      row 0: s = 0.5,  w/s = [7.5, -3, 1.5] -> [8 clipped to 7, -3, 2] -> [3.5, -1.5, 1.0]
             error² = 0.25² + 0 + 0.25² = 0.125
      row 1: s = 0.25, w/s = [-7.5, 2, 0] -> [-8 (half to even), 2, 0] -> [-2.0, 0.5, 0.0]
             error² = 0.125² = 0.015625                                  sum 0.140625
    int2, grid [-2, 1], scale = max|w| / 1.5:
      row 0: s = 2.5,  w/s = [1.5, -0.6, 0.3] -> [2 clipped to 1, -1, 0] -> [2.5, -2.5, 0.0]
             error² = 1.25² + 1² + 0.75² = 3.125
      row 1: s = 1.25, w/s = [-1.5, 0.4, 0] -> [-2, 0, 0] -> [-2.5, 0.0, 0.0]
             error² = 0.625² + 0.5² = 0.640625                           sum 3.765625
    Ω = average trace 2.0 × error²: int4 0.28125, int2 7.53125, float 0.
    Bytes: int4 6 × 4 bits = 3 + two float32 scales 8 = 11; int2 (INT2 at opset 25) 12 bits
    = 1.5, rounded up to 2, + 8 = 10; float 6 × 4 = 24.
    """
    layer = LayerInfo("fc", "linear", (2, 3), params=6)
    w = torch.tensor([[3.75, -1.5, 0.75], [-1.875, 0.5, 0.0]])
    table = build_options(
        (layer,),
        made_up_traces((layer,), {"fc": 2.0}),
        {"fc": w},
        formats=("int2", "int4", "float"),
        settings=ExportSettings(clip_search=False),
    )
    got = {o.format: (o.sq_error, o.omega, o.cost) for o in table.options["fc"]}
    assert got == {
        "int2": (3.765625, 7.53125, 10),
        "int4": (0.140625, 0.28125, 11),
        "float": (0.0, 0.0, 24),
    }


def test_build_options_bops_and_container(prepared_cnn) -> None:  # type: ignore[no-untyped-def]
    layers = prepared_cnn.layers
    traces = made_up_traces(layers, dict.fromkeys(prepared_cnn.fqns, 1.0))
    bops = build_options(layers, traces, _weights(prepared_cnn), cost="bops", formats=("int8", "int4"))
    assert bops.cost_model == "bops"
    conv1 = layers[0]
    assert bops.option("conv1", "int4").cost == conv1.macs * 4 * 8 > 0
    assert [o.format for o in bops.options["conv1"]] == ["int8", "int4"]
    container = ExportSettings(int4_storage="container")
    cont = build_options(layers, traces, _weights(prepared_cnn), settings=container, formats=("int4",))
    assert cont.option("conv2", "int4").cost == layers[1].params + 4 * layers[1].out_channels


def test_build_options_bad_input(prepared_cnn) -> None:  # type: ignore[no-untyped-def]
    layers = prepared_cnn.layers
    traces = made_up_traces(layers, dict.fromkeys(prepared_cnn.fqns, 1.0))
    weights = _weights(prepared_cnn)
    with pytest.raises(UsageError, match=r"unknown format 'int16'; allowed: float, intB"):
        build_options(layers, traces, weights, formats=("int4", "int16"))
    with pytest.raises(UsageError, match=r"no candidate formats"):
        build_options(layers, traces, weights, formats=())
    with pytest.raises(UsageError, match=r"unknown cost model 'energy'; registered: size, bops, latency"):
        build_options(layers, traces, weights, cost="energy")
    with pytest.raises(UsageError, match=r"unknown int4 storage 'int4'; allowed: packed, container"):
        build_options(layers, traces, weights, settings=ExportSettings(int4_storage="int4"))
    partial = SensitivityTable(traces.layers[:2], 0, "cpu", 0.05, 0, 0.0)
    with pytest.raises(UsageError, match=r"no trace for layer 'fc1'; it covers: conv1, conv2"):
        build_options(layers, partial, weights)
    with pytest.raises(UsageError, match=r"no weight given for layer 'conv2'"):
        build_options(layers, traces, {"conv1": weights["conv1"]})
    with pytest.raises(UsageError, match=r"layer 'conv1': weight shape \(3, 3\)"):
        build_options(layers, traces, {**weights, "conv1": torch.zeros(3, 3)})


def test_dynamic_formats_are_options_of_linear_layers_only(prepared_cnn) -> None:  # type: ignore[no-untyped-def]
    """A conv never gets ``int8-d``; a Linear gets it with int8's integers (same error, same bytes)
    and bops at 8-bit activations; a conv pinned to it is an error naming what it can take."""
    layers = tuple(replace(i, pinned=None) for i in prepared_cnn.layers)
    traces = made_up_traces(layers, dict.fromkeys(prepared_cnn.fqns, 1.0))
    weights = _weights(prepared_cnn)
    opts = build_options(layers, traces, weights, formats=("int8-d", "int4-d", "int8", "float"))
    for layer in layers:
        got = [o.format for o in opts.options[layer.fqn]]
        if layer.kind == "linear":
            assert got == ["int8-d", "int4-d", "int8", "float"]
            d, s = opts.option(layer.fqn, "int8-d"), opts.option(layer.fqn, "int8")
            assert (d.cost, d.sq_error, d.omega) == (s.cost, s.sq_error, s.omega)
            assert opts.option(layer.fqn, "int4-d").cost == layer.params + 4 * layer.out_channels
            assert layer_cost(layer, "int4-d", cost="bops") == layer.macs * 4 * 8
        else:
            assert got == ["int8", "float"], (layer.kind, got)
    pinned = (replace(layers[0], pinned="int8-d"), *layers[1:])
    with pytest.raises(
        UsageError, match=r"'conv1' \(conv2d\) is pinned to 'int8-d'.*allowed for it: int8, float"
    ):
        build_options(pinned, traces, weights, formats=("int8-d", "int8", "float"))


def test_pins_to_unknown_layers_are_rejected(small_cnn: nn.Module) -> None:
    with pytest.raises(UsageError, match=r"pin 'conv9' matches no quantizable layer; layers are: conv1"):
        prepare_model(small_cnn, torch.zeros(2, 1, 8, 8), pins={"conv9": "int8"})
    with pytest.raises(UsageError, match=r"unknown format 'int1'"):
        prepare_model(small_cnn, torch.zeros(2, 1, 8, 8), pins={"conv1": "int1"})
