"""Cost models: the protocol and registry, size and BOPs, a custom model through the frontier."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from hawqtool import costs
from hawqtool.costs import CostSettings
from hawqtool.errors import UsageError
from hawqtool.formats import parse_format
from hawqtool.frontier import pareto_frontier
from hawqtool.options import build_options
from hawqtool.types import LayerInfo, LayerTrace, SensitivityTable

CONV = LayerInfo("conv", "conv2d", (32, 16, 3, 3), params=4608, macs=294912)


def _traces(layers: tuple[LayerInfo, ...]) -> SensitivityTable:
    rows = tuple(LayerTrace(x.fqn, float(x.params), 1.0, 0.0, 2, True, x.params) for x in layers)
    return SensitivityTable(rows, 0, "cpu", 0.05, 0, 0.0)


# --------------------------------------------------------------------------------------------
# The protocol and the registry
# --------------------------------------------------------------------------------------------


def test_size_and_bops_wrap_layer_cost() -> None:
    settings = CostSettings(storage="container", opset=21, activation_bits=4)
    size, bops = costs.get("size", settings), costs.get("bops", settings)
    assert isinstance(size, costs.CostModel) and isinstance(bops, costs.CostModel)
    assert (size.name, size.unit, bops.name, bops.unit) == ("size", "bytes", "bops", "BOPs")
    # 4608 weights, 32 output channels (a float32 scale each); 294912 MACs.
    macs = 294912
    known = {
        "int2": (4608 + 128, macs * 2 * 4),  # container storage: every integer in 8 bits
        "int4": (4608 + 128, macs * 4 * 4),
        "int8": (4608 + 128, macs * 8 * 4),
        "int4-w": (4608 + 128, macs * 4 * 32),  # weight-only: float activations
        "float": (4 * 4608, macs * 32 * 32),
    }
    for fmt, (nbytes, nbops) in known.items():
        assert (size.layer_cost(CONV, fmt), bops.layer_cost(CONV, fmt)) == (nbytes, nbops), fmt
    # Packed below opset 25: int2 as INT4 (half a byte), at 25 in two bits.
    assert costs.get("size", CostSettings(opset=21)).layer_cost(CONV, "int2") == 2304 + 128
    assert costs.get("size").layer_cost(CONV, "int2") == 1152 + 128
    assert size.fingerprint() != costs.get("size").fingerprint()
    assert costs.unit("latency") == "ms"


def test_registry_errors_name_what_is_allowed() -> None:
    with pytest.raises(UsageError, match=r"unknown cost model 'energy'; registered: size, bops, latency"):
        costs.get("energy")
    with pytest.raises(UsageError, match=r"cost model 'size' is already registered"):
        costs.register("size", costs.SizeCost)
    with pytest.raises(UsageError, match=r"unknown storage 'int4'; allowed: packed, container"):
        CostSettings(storage="int4")
    with pytest.raises(UsageError, match=r"latency costs are measured per model"):
        costs.get("latency").layer_cost(CONV, "int8")
    with pytest.raises(UsageError, match=r"latency costs are measured per model"):
        build_options((CONV,), _traces((CONV,)), {"conv": torch.ones(32, 16, 3, 3)}, cost="latency")


class ParamsCost:
    """A custom cost model: bytes of the weight integers only (no scales)."""

    name = "params-bytes"
    unit = "bytes"

    def layer_cost(self, layer: LayerInfo, fmt: str) -> float:
        return layer.params * parse_format(fmt).bits / 8

    def fingerprint(self) -> str:
        return "params-bytes/v1"


def test_a_custom_cost_model_plugs_in_without_touching_the_frontier() -> None:
    costs.register("params-bytes", lambda settings: ParamsCost(), replace=True)
    assert "params-bytes" in costs.names()
    layers = (
        LayerInfo("a", "linear", (4, 8), params=32),
        LayerInfo("b", "linear", (8, 4), params=32),
        LayerInfo("c", "linear", (2, 8), params=16),
    )
    gen = torch.Generator().manual_seed(0)
    weights = {x.fqn: torch.randn(*x.weight_shape, generator=gen) for x in layers}
    formats = ("int2", "int4", "int8", "float")
    by_name = build_options(layers, _traces(layers), weights, formats=formats, cost="params-bytes")
    by_object = build_options(layers, _traces(layers), weights, formats=formats, cost=ParamsCost())
    assert by_name == by_object
    assert by_name.cost_model == "params-bytes"
    assert by_name.option("a", "int4").cost == 16.0
    front = pareto_frontier(by_name)
    assert front.cost_model == "params-bytes" and front.float_cost == 4 * 80
    # The frontier is the brute-force Pareto set of the custom costs.
    pairs = set()
    for combo in itertools.product(*(by_name.options[x.fqn] for x in layers)):
        pairs.add((math.fsum(o.cost for o in combo), math.fsum(o.omega for o in combo)))
    pareto = sorted(p for p in pairs if not any(q[0] <= p[0] and q[1] <= p[1] and q != p for q in pairs))
    assert [p.cost for p in front] == [c for c, _ in pareto]
    assert [p.omega for p in front] == pytest.approx([o for _, o in pareto], rel=1e-12)


def test_the_frontier_takes_negative_costs() -> None:
    """Latency deltas can be negative (an integer kernel faster than float): still exact."""
    from hawqtool.types import LayerOption, OptionTable

    rng = np.random.default_rng(0)
    layers = tuple(f"l{i}" for i in range(5))
    options = {
        f: tuple(
            LayerOption(fmt, float(rng.integers(-6, 6)), 0.0, float(rng.integers(0, 9)))
            for fmt in ("int4", "int8", "float")
        )
        for f in layers
    }
    table = OptionTable(layers, options, "latency", dict.fromkeys(layers, 1))
    front = pareto_frontier(table)
    pairs = {
        (math.fsum(o.cost for o in c), math.fsum(o.omega for o in c))
        for c in itertools.product(*(options[f] for f in layers))
    }
    pareto = sorted(p for p in pairs if not any(q[0] <= p[0] and q[1] <= p[1] and q != p for q in pairs))
    assert [(p.cost, p.omega) for p in front] == pareto
    assert front.points[0].cost < 0


def test_recipe_fields() -> None:
    from hawqtool.errors import RecipeError
    from hawqtool.recipe import load_recipe

    r = load_recipe("tiny", ["allocation.cost=latency", "evaluate.provider=cpu"])
    assert (r.allocation.cost, r.evaluate.provider) == ("latency", "cpu")
    with pytest.raises(RecipeError, match=r"evaluate.provider"):
        load_recipe("tiny", ["evaluate.provider=tpu"])
