"""A toy format family, a toy layer handler and a toy cost model, each one registration, run through
prepare_model -> build_options -> pareto_frontier (and the toy family through the exporter) with
known answers; every registry is left as it was."""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from hawqtool import costs, quantizer
from hawqtool.errors import UsageError
from hawqtool.export import QDQExporter
from hawqtool.export.emitters import Emission, LayerContext, register_emitters, unregister_emitters
from hawqtool.formats import (
    Format,
    FormatFamily,
    LayerKind,
    is_format,
    known_formats,
    layer_cost,
    parse_format,
    register_family,
    scale_count,
    supports,
    unregister_family,
)
from hawqtool.frontier import pareto_frontier
from hawqtool.options import build_options
from hawqtool.prepare import (
    LayerHandler,
    handlers,
    prepare_model,
    register_handler,
    swapped_weights,
    unregister_handler,
)
from hawqtool.quantizer import QuantizedWeight, quantize_as, quantize_weight
from hawqtool.types import ExportSettings, LayerInfo, LayerTrace, SensitivityTable

# --------------------------------------------------------------------------------------------
# The toys
# --------------------------------------------------------------------------------------------

#: Per-tensor integer weights: one scale for the whole tensor (a scale rule no built-in family has),
#: weight-only, always stored in INT8.
PER_TENSOR = FormatFamily(
    "ptB",
    r"pt(?P<bits>[2-8])",
    "ptB (B = 2..8: weight-only, one scale per tensor)",
    ("pt4", "pt8"),
    packed=False,
    scales=lambda layer, fmt: 1,
)


def per_tensor(weight: torch.Tensor, fmt: Format, *, clip_search: bool) -> QuantizedWeight:
    bits = fmt.bits
    qw = quantize_weight(weight.reshape(1, -1), bits, clip_search=clip_search)
    return QuantizedWeight(
        q=qw.q.reshape(weight.shape),
        scale=qw.scale,
        dequantized=qw.dequantized.reshape(weight.shape),
        sq_error=qw.sq_error,
        bits=bits,
    )


class PerTensorEmitter:
    """int8 integers and one scalar scale → a per-tensor DequantizeLinear under the weight's name."""

    kind = "PerTensorDequantizeLinear"

    def emit(self, ctx: LayerContext) -> Emission | None:
        from onnx import helper, numpy_helper

        site = ctx.site
        if site.transposed or len(site.tensors) != 1:
            return None
        w = site.weight
        q = numpy_helper.from_array(ctx.q.astype(np.int8), f"{w}_quantized")
        s = numpy_helper.from_array(ctx.scale.reshape(()).astype(np.float32), f"{w}_scale")
        node = helper.make_node("DequantizeLinear", [q.name, s.name], [w], name=f"{w}_DequantizeLinear")
        return Emission(
            initializers=(q, s),
            nodes=(node,),
            drops=site.tensors,
            kinds={u.node: self.kind for u in site.uses},
        )


class Mix(nn.Module):
    """A square mixing matrix applied ``steps`` times with a plain matmul: no built-in handler knows
    it, and its MACs are ``steps`` times one matrix (what a filter count would not say)."""

    def __init__(self, d: int, steps: int) -> None:
        super().__init__()
        self.steps = steps
        # On a per-tensor int4 grid (0.5 · k, k from -8 to 7, both ends present): pt4 is exact.
        k = (torch.arange(d * d) * 5) % 16 - 8
        self.weight = nn.Parameter(0.5 * k.reshape(d, d).float() / d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for _ in range(self.steps):
            x = x @ self.weight.T
        return x


MIX = LayerKind("mix", activations=False, matmul_only=False, matrix=True)
MIX_HANDLER = LayerHandler(
    MIX,
    lambda m: isinstance(m, Mix),
    macs=lambda m, inp, out, n: {"": m.steps * m.weight.numel()},
    onnx_ops=("MatMul",),
)


class WeightBits:
    """A toy cost model: MACs × weight bits (no activation bits, no storage)."""

    name, unit = "macbits", "bit-MACs"

    def layer_cost(self, layer: LayerInfo, fmt: str) -> float:
        return float(layer.macs * parse_format(fmt).bits)

    def fingerprint(self) -> str:
        return "macbits/v1"


@pytest.fixture
def toys() -> Iterator[None]:
    register_family(PER_TENSOR)
    quantizer.register("ptB", per_tensor)
    register_handler(MIX_HANDLER)
    costs.register("macbits", lambda settings: WeightBits())
    try:
        yield
    finally:
        costs.unregister("macbits")
        unregister_handler("mix")
        quantizer.unregister("ptB")
        unregister_family("ptB")


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(Mix(8, steps=3), nn.Linear(8, 3)).eval()


def _traces(layers: tuple[LayerInfo, ...], avg: dict[str, float]) -> SensitivityTable:
    rows = tuple(LayerTrace(x.fqn, avg[x.fqn] * x.params, avg[x.fqn], 0.0, 8, True, x.params) for x in layers)
    return SensitivityTable(rows, 0, "cpu", 0.05, 0, 0.0)


# --------------------------------------------------------------------------------------------
# The tests
# --------------------------------------------------------------------------------------------


def test_toys_run_from_prepare_to_the_frontier(toys: None) -> None:
    assert is_format("pt4") and "pt4" in known_formats() and known_formats()[-1] == "float"
    prepared = prepare_model(_model(), torch.zeros(4, 8))
    mix, fc = prepared.layers
    # The toy handler found the layer and counted its MACs: 3 steps × 8 × 8.
    assert (mix.fqn, mix.kind, mix.weight_shape, mix.macs) == ("0", "mix", (8, 8), 192)
    assert (fc.kind, fc.macs) == ("linear", 24)
    # The kind's capabilities decide: a mix layer has no activation input (no int8), but takes
    # the weight-only toy family; the toy family's one scale shows in its size.
    assert not supports(mix, "int8") and supports(mix, "pt4") and supports(fc, "pt4")
    assert scale_count(mix, "pt4") == 1 and layer_cost(mix, "pt4") == 64 + 4  # INT8 storage
    qw = quantize_as(prepared.weight("0"), "pt4")
    assert qw.scale.shape == (1,) and qw.sq_error == 0.0  # the weight is on a per-tensor grid
    assert quantize_as(prepared.weight("1"), "pt4").scale.shape == (1,)

    weights = dict(zip(prepared.fqns, prepared.weights(), strict=True))
    table = build_options(
        prepared.layers,
        _traces(prepared.layers, {"0": 1.0, "1": 2.0}),
        weights,
        formats=("pt4", "int8", "float"),
        cost="macbits",
        settings=ExportSettings(),
    )
    assert table.cost_model == "macbits"
    got = {f: [(o.format, o.cost) for o in table.options[f]] for f in table.layers}
    assert got == {
        "0": [("pt4", 768.0), ("float", 6144.0)],
        "1": [("pt4", 96.0), ("int8", 192.0), ("float", 768.0)],
    }
    fc_pt4, fc_int8 = table.option("1", "pt4"), table.option("1", "int8")
    assert (
        fc_pt4.sq_error == quantize_as(weights["1"], "pt4").sq_error and fc_pt4.omega == 2.0 * fc_pt4.sq_error
    )
    assert fc_pt4.omega > fc_int8.omega > 0.0 and table.option("0", "pt4").omega == 0.0

    frontier = pareto_frontier(table)
    points = [(p.cost, dict(p.allocation)) for p in frontier]
    assert points == [
        (864.0, {"0": "pt4", "1": "pt4"}),
        (960.0, {"0": "pt4", "1": "int8"}),
        (1536.0, {"0": "pt4", "1": "float"}),
    ]
    # The same as every allocation, brute force: nothing cheaper is as good.
    for alloc in itertools.product(*(table.options[f] for f in table.layers)):
        cost, omega = sum(o.cost for o in alloc), sum(o.omega for o in alloc)
        assert any(p.cost <= cost and p.omega <= omega + 1e-12 for p in frontier)
    assert frontier.float_cost == 6144 + 768


def test_registering_twice_is_refused(toys: None) -> None:
    with pytest.raises(UsageError, match=r"a layer handler for kind 'mix' is already registered"):
        register_handler(MIX_HANDLER)
    with pytest.raises(UsageError, match=r"quantizer of format family 'ptB' is already registered"):
        quantizer.register("ptB", per_tensor)
    with pytest.raises(UsageError, match=r"format family 'nope' is not registered"):
        quantizer.register("nope", per_tensor)


def test_after_the_toys_nothing_of_them_remains() -> None:
    assert not is_format("pt4") and "pt4" not in known_formats()
    assert "mix" not in [h.kind.name for h in handlers()] and "macbits" not in costs.names()
    with pytest.raises(UsageError, match=r"unknown format 'pt4'; allowed: float, intB"):
        parse_format("pt4")


def test_a_family_without_a_quantizer_is_an_error_naming_it() -> None:
    register_family(PER_TENSOR)
    try:
        with pytest.raises(UsageError, match=r"format 'pt4': its family 'ptB' has no quantizer"):
            quantize_as(torch.ones(2, 2), "pt4")
    finally:
        unregister_family("ptB")


@pytest.fixture
def toy_emitter(toys: None) -> Iterator[None]:
    register_emitters("ptB", (PerTensorEmitter(),))
    try:
        yield
    finally:
        unregister_emitters("ptB")


@pytest.mark.slow  # the torch.onnx export: about 7 s on 2 cores
def test_the_toy_family_exports_and_runs_in_onnxruntime(toy_emitter: None, tmp_path: Path) -> None:
    import onnxruntime as ort

    model = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 3)).eval()
    torch.manual_seed(1)
    x = torch.randn(16, 8)
    prepared = prepare_model(model, x)
    exporter = QDQExporter.build(prepared, [(x, None)])
    allocation = {"0": "pt8", "2": "pt4"}
    path = exporter.export(allocation, tmp_path / "m.onnx")
    graph = onnx.load(str(path)).graph
    scales = {i.name: tuple(i.dims) for i in graph.initializer if i.name.endswith("_scale")}
    assert sorted(scales.values()) == [(), ()]  # one scalar scale per layer
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (name,) = [i.name for i in session.get_inputs()]
    out = session.run(None, {name: x.numpy()})[0]
    fake = {f: quantize_as(prepared.weight(f), fmt).dequantized for f, fmt in allocation.items()}
    with swapped_weights(prepared, fake), torch.no_grad():
        want = prepared.forward(x).numpy()
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)
    assert not math.isclose(float(np.abs(out - model(x).detach().numpy()).max()), 0.0)
