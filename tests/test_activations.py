"""Activation traces (HAWQ-V2 §iii) against the exact Hessian w.r.t. each layer's input, and Ω_act."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hawqtool.activations import ActivationTable, estimate_activation_traces, uint8_fake_quant
from hawqtool.errors import UsageError
from hawqtool.export import uint8_qparams
from hawqtool.frontier import pareto_frontier
from hawqtool.options import build_options
from hawqtool.prepare import prepare_model
from hawqtool.types import LayerTrace, SensitivityTable


class TinyMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 6)
        self.fc2 = nn.Linear(6, 5)
        self.head = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.fc2(torch.tanh(self.fc1(x)))))


def _setup() -> tuple[TinyMLP, list[tuple[torch.Tensor, torch.Tensor]]]:
    torch.manual_seed(0)
    model = TinyMLP().eval()
    gen = torch.Generator().manual_seed(1)
    batches = [(torch.randn(n, 4, generator=gen), torch.randint(0, 3, (n,), generator=gen)) for n in (7, 5)]
    return model, batches


def _exact_traces(model: TinyMLP, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, float]:
    """Tr of the Hessian of the split's mean loss w.r.t. each layer's flattened input over the split."""
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    stages = [
        ("fc1", lambda a: a),
        ("fc2", lambda a: torch.tanh(model.fc1(a))),
        ("head", lambda a: torch.tanh(model.fc2(torch.tanh(model.fc1(a))))),
    ]
    rests = {
        "fc1": lambda h: model.head(torch.tanh(model.fc2(torch.tanh(model.fc1(h))))),
        "fc2": lambda h: model.head(torch.tanh(model.fc2(h))),
        "head": lambda h: model.head(h),
    }
    out = {}
    with torch.no_grad():
        acts = {name: f(x) for name, f in stages}
    for name, act in acts.items():
        shape = act.shape

        def loss(flat: torch.Tensor, name: str = name, shape: torch.Size = shape) -> torch.Tensor:
            # The mean over the whole split: Σ_k (n_k/N) · (mean loss of batch k).
            return F.cross_entropy(rests[name](flat.reshape(shape)), y)

        H = torch.autograd.functional.hessian(loss, act.reshape(-1))
        out[name] = float(torch.diagonal(H).sum())
    return out


def test_traces_match_the_exact_activation_hessian(tmp_path) -> None:  # type: ignore[no-untyped-def]
    model, batches = _setup()
    prepared = prepare_model(model, batches[0][0])
    table = estimate_activation_traces(
        prepared, batches, F.cross_entropy, rel_tol=0.05, min_probes=16, max_probes=20000, progress=False
    )
    exact = _exact_traces(model, batches)
    assert [r.layer for r in table.layers] == ["fc1", "fc2", "head"]
    for row in table.layers:
        assert row.converged
        assert row.stderr > 0
        assert abs(row.trace - exact[row.layer]) <= 4 * row.stderr, (row, exact[row.layer])
        assert row.numel == 12 * {"fc1": 4, "fc2": 6, "head": 5}[row.layer]


def test_quantization_error_and_omega_use_the_exporters_uint8_range() -> None:
    model, batches = _setup()
    prepared = prepare_model(model, batches[0][0])
    table = estimate_activation_traces(prepared, batches, F.cross_entropy, rel_tol=0.2, progress=False)
    x = torch.cat([b[0] for b in batches])
    with torch.no_grad():
        h1 = torch.tanh(model.fc1(x))
    for name, act in (("fc1", x), ("fc2", h1)):
        row = table[name]
        assert (row.rmin, row.rmax) == pytest.approx((float(act.min()), float(act.max())))
        scale, zp = uint8_qparams(row.rmin, row.rmax)
        assert (row.scale, row.zero_point) == (pytest.approx(float(scale)), int(zp))
        sq = float((uint8_fake_quant(act, float(scale), int(zp)) - act).double().pow(2).sum())
        assert row.sq_error == pytest.approx(sq, rel=1e-6)
        assert row.omega == pytest.approx(max(row.trace, 0) / row.numel * sq)


def test_uint8_fake_quant_matches_onnxruntime() -> None:
    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto, helper

    x = np.linspace(-1.3, 2.9, 101, dtype=np.float32)
    scale, zp = uint8_qparams(float(x.min()), float(x.max()))
    graph = helper.make_graph(
        [
            helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]),
            helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"]),
        ],
        "qdq",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [101])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [101])],
        initializer=[
            helper.make_tensor("s", TensorProto.FLOAT, [], [float(scale)]),
            helper.make_tensor("z", TensorProto.UINT8, [], [int(zp)]),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    (y,) = sess.run(None, {"x": x})
    ours = uint8_fake_quant(torch.from_numpy(x), float(scale), int(zp)).numpy()
    np.testing.assert_allclose(ours, y, rtol=0, atol=1e-6)


def test_dynamic_error_is_what_onnxruntimes_dynamic_quantization_loses_batch_by_batch() -> None:
    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [
            helper.make_node("DynamicQuantizeLinear", ["x"], ["q", "s", "z"]),
            helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"]),
        ],
        "dql",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
    )
    onnx_model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    onnx_model.ir_version = 10
    sess = ort.InferenceSession(onnx_model.SerializeToString(), providers=["CPUExecutionProvider"])
    model, batches = _setup()
    prepared = prepare_model(model, batches[0][0])
    table = estimate_activation_traces(prepared, batches, F.cross_entropy, rel_tol=0.2, progress=False)
    expected = dict.fromkeys(("fc1", "fc2", "head"), 0.0)
    for x, _ in batches:  # each batch is quantized with its own range, as the exported model runs it
        with torch.no_grad():
            h1 = torch.tanh(model.fc1(x))
            h2 = torch.tanh(model.fc2(h1))
        for name, act in (("fc1", x), ("fc2", h1), ("head", h2)):
            a = act.numpy().astype(np.float32)
            (y,) = sess.run(None, {"x": a})
            expected[name] += float(((y.astype(np.float64) - a) ** 2).sum())
    for name, sq in expected.items():
        row = table[name]
        assert row.sq_error_dynamic == pytest.approx(sq, rel=1e-5)
        assert row.omega_dynamic == pytest.approx(max(row.trace, 0) / row.numel * sq)
        assert 0 < row.sq_error_dynamic < row.sq_error  # a batch's range is within the split's
    assert table.dynamic_omegas() == {r.layer: r.omega_dynamic for r in table.layers}


def test_cache_roundtrip_and_seed(tmp_path) -> None:  # type: ignore[no-untyped-def]
    model, batches = _setup()
    prepared = prepare_model(model, batches[0][0])
    kw: dict[str, Any] = {"rel_tol": 0.2, "progress": False, "cache_dir": tmp_path}
    first = estimate_activation_traces(prepared, batches, F.cross_entropy, **kw)
    assert len(list(tmp_path.glob("activations-*.json"))) == 1
    again = estimate_activation_traces(prepared, batches, F.cross_entropy, **kw)
    assert again == first
    assert ActivationTable.from_dict(first.to_dict()) == first
    other = estimate_activation_traces(prepared, batches, F.cross_entropy, **{**kw, "cache_dir": None})
    assert other.omegas() == first.omegas()  # same seed, same device: bit for bit


def test_activation_omega_charges_static_and_dynamic_formats_their_own_terms() -> None:
    model, batches = _setup()
    prepared = prepare_model(model, batches[0][0])
    layers = prepared.layers
    traces = SensitivityTable(
        tuple(LayerTrace(x.fqn, float(x.params), 1.0, 0.0, 2, True, x.params) for x in layers),
        0,
        "cpu",
        0.05,
        0,
        0.0,
    )
    weights = dict(zip(prepared.fqns, prepared.weights(), strict=True))
    formats = ("int4", "int4-w", "int8", "int8-d", "float")
    act = {"fc1": 0.5, "fc2": 0.25, "head": 2.0}
    dyn = {"fc1": 0.125, "fc2": 0.0625, "head": 1.0}
    plain = build_options(layers, traces, weights, formats=formats)
    charged = build_options(
        layers, traces, weights, formats=formats, activation_omega=act, dynamic_activation_omega=dyn
    )
    for fqn in prepared.fqns:
        for fmt in formats:
            extra = act[fqn] if fmt in ("int4", "int8") else dyn[fqn] if fmt == "int8-d" else 0.0
            assert charged.option(fqn, fmt).omega == pytest.approx(plain.option(fqn, fmt).omega + extra)
    # The frontier's least-Ω quantized end now prefers weight-only formats on the costly input.
    assert math.isfinite(pareto_frontier(charged).points[0].omega)
    with pytest.raises(UsageError, match=r"no activation Ω for layer 'head'"):
        build_options(layers, traces, weights, formats=formats, activation_omega={"fc1": 1.0, "fc2": 1.0})
    with pytest.raises(UsageError, match=r"activation Ω of layer 'fc1' must be a finite number >= 0"):
        build_options(layers, traces, weights, formats=formats, activation_omega={**act, "fc1": -1.0})
    with pytest.raises(UsageError, match=r"no activation Ω for layer 'fc2', which can take 'int8-d'"):
        build_options(layers, traces, weights, formats=formats, dynamic_activation_omega={"fc1": 1.0})
    with pytest.raises(UsageError, match=r"activation Ω of layer 'head' must be a finite number >= 0"):
        build_options(
            layers, traces, weights, formats=formats, dynamic_activation_omega={**dyn, "head": math.nan}
        )


def test_bad_settings_are_usage_errors() -> None:
    model, batches = _setup()
    prepared = prepare_model(model, batches[0][0])
    with pytest.raises(UsageError, match=r"calibration split is empty"):
        estimate_activation_traces(prepared, [], F.cross_entropy)
    with pytest.raises(UsageError, match=r"rel_tol must be a finite number > 0, got 0"):
        estimate_activation_traces(prepared, batches, F.cross_entropy, rel_tol=0)
    with pytest.raises(UsageError, match=r"max_probes must be an integer >= min_probes \(16\), got 4"):
        estimate_activation_traces(prepared, batches, F.cross_entropy, min_probes=16, max_probes=4)
