"""QDQ export: graph structure, bit-exact weights, agreement with a torch simulation, accuracy,
integer kernels, file size, and errors. Every file lives under ``tmp_path``."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from hawqtool import quantizer
from hawqtool.errors import ExportError, UsageError
from hawqtool.evaluate import evaluate_onnx, make_session
from hawqtool.export import (
    EMITTERS,
    INT4_STORAGES,
    METADATA_ALLOCATION,
    METADATA_VERSION,
    DequantizeLinearEmitter,
    QDQExporter,
    external_data_path,
    offset_unsigned,
    pack_int2,
    pack_int4,
    pack_rows,
    quantization_plan,
    register_emitters,
    uint8_qparams,
    unregister_emitters,
    write_model,
)
from hawqtool.formats import (
    FormatFamily,
    format_bits,
    is_quantized,
    layer_cost,
    parse_format,
    register_family,
    unregister_family,
)
from hawqtool.prepare import prepare_model, swapped_weights
from hawqtool.quantizer import int_range, quantize_weight
from hawqtool.tasks import top1
from hawqtool.types import ExportSettings

INTEGER_KERNELS = {
    "QLinearConv",
    "QLinearMatMul",
    "QGemm",
    "MatMulIntegerToFloat",
    "ConvInteger",
    "MatMulInteger",
}


# ------------------------------------------------------------------------------------------------
# Fixtures: one exporter per model for the whole module (the float export and calibration are
# the expensive part; every allocation after that is graph surgery).
# ------------------------------------------------------------------------------------------------


def _build(model: torch.nn.Module, splits, **settings) -> QDQExporter:  # type: ignore[no-untyped-def]
    prepared = prepare_model(model, splits.calibration[0][0][:1])
    return QDQExporter.build(
        prepared, splits.calibration, settings=ExportSettings(**settings), max_calibration_batches=2
    )


@pytest.fixture(scope="module")
def cnn(small_cnn_digits, digits_splits) -> QDQExporter:  # type: ignore[no-untyped-def]
    return _build(small_cnn_digits, digits_splits)


@pytest.fixture(scope="module")
def mlp(mlp_digits, digits_splits) -> QDQExporter:  # type: ignore[no-untyped-def]
    return _build(mlp_digits, digits_splits)


@pytest.fixture(scope="module")
def resnet(resnet20_digits, digits_splits) -> QDQExporter:  # type: ignore[no-untyped-def]
    return _build(resnet20_digits, digits_splits)


class TokenMLP(torch.nn.Module):
    """Image rows as 8 tokens through Linear layers on a 3-D input, which the dynamo exporter
    turns into MatMul with a renamed, pre-transposed weight (as in the zoo's transformer), and a
    2-D head that stays a Gemm. Untrained: layout and numerics do not need a trained model."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.tok = torch.nn.Linear(8, 16)
        self.mix = torch.nn.Linear(16, 16)
        self.head = torch.nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.tok(x.flatten(1, 2)))
        h = torch.relu(self.mix(h))
        return self.head(h.mean(dim=1))


@pytest.fixture(scope="module")
def tokens(digits_splits) -> QDQExporter:  # type: ignore[no-untyped-def]
    return _build(TokenMLP(), digits_splits)


def _test_inputs(splits) -> np.ndarray:  # type: ignore[no-untyped-def]
    return np.concatenate([x.numpy() for x, _ in splits.test])


def _run(model: onnx.ModelProto, x: np.ndarray, *, optimized: bool = True) -> np.ndarray:
    if optimized:
        return np.asarray(make_session(model.SerializeToString()).run(None, {"input": x})[0])
    import onnxruntime as ort

    # No graph optimization: every QuantizeLinear / DequantizeLinear runs as the ONNX spec defines
    # it, in float, so this is what the exported graph means, whatever kernels a CPU fuses it into.
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return np.asarray(session.run(None, {"input": x})[0])


def _has_vnni() -> bool:
    """Whether this x86 CPU has VNNI. Without it onnxruntime's u8 x s8 kernels sum pairs of products
    in 16 bits (VPMADDUBSW), which saturates for full-range int8 weights: a known onnxruntime
    limitation (its quantize_static offers reduce_range for such CPUs); measured here on an AVX2-only
    AMD EPYC, up to 34 output steps off for int8, none for int4 values."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return True
    return "vnni" in flags


def _weight_dequantizers(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    """DequantizeLinear nodes whose input is an initializer (weights, also through the Cast of a
    packed weight), by output name."""
    inits = {t.name for t in model.graph.initializer}
    inits |= {n.output[0] for n in model.graph.node if n.op_type == "Cast" and n.input[0] in inits}
    return {
        n.output[0]: n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits
    }


def _initializer(model: onnx.ModelProto, name: str) -> onnx.TensorProto:
    return next(t for t in model.graph.initializer if t.name == name)


def _mixed(exporter: QDQExporter) -> dict[str, str]:
    """int8, float, int4 and int3 in turn over the layers (every kind of entry)."""
    formats = ("int8", "float", "int4", "int3")
    return {f: formats[i % 4] for i, f in enumerate(exporter.fqns)}


# ------------------------------------------------------------------------------------------------
# Float export
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["cnn", "resnet", "tokens"])
@pytest.mark.slow
def test_float_export_matches_torch_at_any_batch(name, request, digits_splits) -> None:  # type: ignore[no-untyped-def]
    exporter: QDQExporter = request.getfixturevalue(name)
    x = _test_inputs(digits_splits)
    for n in (1, 7, len(x)):  # the batch axis is dynamic
        with torch.no_grad():
            ref = exporter.prepared.model(torch.from_numpy(x[:n])).numpy()
        np.testing.assert_allclose(_run(exporter.float_model, x[:n]), ref, atol=1e-4, rtol=0)


def test_layers_map_to_weight_initializers_in_their_layout(cnn, tokens) -> None:  # type: ignore[no-untyped-def]
    for exporter in (cnn, tokens):
        assert set(exporter.layer_weights) == set(exporter.prepared.fqns)
        for fqn, site in exporter.sites.items():
            w = exporter.prepared.module(fqn).weight.detach().numpy()
            init = numpy_helper.to_array(_initializer(exporter.float_model, site.weight))
            np.testing.assert_array_equal(init, w.T if site.transposed else w)
            assert init.shape[site.axis] == w.shape[0]
    # The dynamo exporter turns the 3-D Linear layers into MatMul with renamed, transposed weights.
    assert [s.op_type for s in tokens.sites.values()] == ["MatMul", "MatMul", "Gemm"]
    assert any(s.transposed and s.axis == 1 for s in tokens.sites.values())


class TwinLinears(torch.nn.Module):
    """``b`` starts as a copy of ``a``; the graphs below are written by hand (no torch export)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = torch.nn.Linear(16, 16)
        self.b = torch.nn.Linear(16, 16)
        self.b.load_state_dict(self.a.state_dict())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x)))


def _hand_graph(prepared, reads: list[tuple[str, str, bool]]) -> onnx.ModelProto:  # type: ignore[no-untyped-def]
    """One node per ``(op, initializer, transposed)``, each initializer holding layer ``a`` or
    ``b``'s weight (``a_T``: a's, transposed)."""
    values = {
        "model.a.weight": prepared.weight("a").numpy(),
        "model.b.weight": prepared.weight("b").numpy(),
        "a_T": prepared.weight("a").numpy().T.copy(),
    }
    nodes, names = [], {}
    for i, (op, init, transposed) in enumerate(reads):
        names[init] = init
        attrs: dict[str, Any] = {"transB": 0 if transposed else 1} if op == "Gemm" else {}
        nodes.append(helper.make_node(op, [f"x{i}", init], [f"x{i + 1}"], name=f"n{i}", **attrs))
    value = helper.make_tensor_value_info
    graph = helper.make_graph(
        nodes,
        "hand",
        [value("x0", TensorProto.FLOAT, ["batch", 16])],
        [value(f"x{len(reads)}", TensorProto.FLOAT, ["batch", 16])],
        initializer=[numpy_helper.from_array(values[n], n) for n in names],
    )
    return helper.make_model(graph)


def test_locate_layers_finds_every_copy_and_stores_each_weight_once() -> None:
    from hawqtool.export import locate_layers

    twins = TwinLinears()
    with torch.no_grad():
        twins.b.weight.add_(1.0)  # no longer equal
    prepared = prepare_model(twins, torch.randn(2, 16))
    # a read by a Gemm and, as a transposed copy, by a MatMul; b by a Gemm.
    model = _hand_graph(
        prepared,
        [("Gemm", "model.a.weight", False), ("MatMul", "a_T", True), ("Gemm", "model.b.weight", False)],
    )
    located, sites = locate_layers(model, prepared)
    assert [(u.node, u.op_type, u.tensor, u.transposed) for u in sites["a"].uses] == [
        ("n0", "Gemm", "model.a.weight", False),
        ("n1", "MatMul", "a_T", True),
    ]
    assert sites["a"].weight == "model.a.weight" and sites["a"].tensors == ("model.a.weight", "a_T")
    assert [t.name for t in located.graph.initializer] == ["model.a.weight", "model.b.weight"]
    transpose = located.graph.node[0]  # the copy is now computed from the one stored weight
    assert (transpose.op_type, list(transpose.input), list(transpose.output)) == (
        "Transpose",
        ["model.a.weight"],
        ["a_T"],
    )
    assert len(model.graph.initializer) == 3  # the input model is left as it was


def test_equal_weights_merged_by_the_exporter_are_an_export_error() -> None:
    from hawqtool.export import locate_layers

    prepared = prepare_model(TwinLinears(), torch.randn(2, 16))
    merged = _hand_graph(prepared, [("Gemm", "model.a.weight", False), ("Gemm", "model.a.weight", False)])
    with pytest.raises(ExportError, match=r"layer 'b' .*equals that of layer 'a'.*cannot take two formats"):
        locate_layers(merged, prepared)
    # Equal but stored apart: each initializer goes to the layer it is named after.
    apart = _hand_graph(prepared, [("Gemm", "model.a.weight", False), ("Gemm", "model.b.weight", False)])
    _, sites = locate_layers(apart, prepared)
    assert (sites["a"].weight, sites["b"].weight) == ("model.a.weight", "model.b.weight")


# ------------------------------------------------------------------------------------------------
# Graph structure and weights
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("storage", ["packed", "container"])
def test_one_dequantize_per_quantized_weight_with_allocated_dtype(cnn, storage) -> None:  # type: ignore[no-untyped-def]
    exporter = cnn.with_int4_storage(storage)
    allocation = _mixed(exporter)
    model = exporter.quantized_model(allocation)
    dqs = _weight_dequantizers(model)
    inits = {t.name for t in model.graph.initializer}
    for fqn, fmt in allocation.items():
        site = exporter.sites[fqn]
        if not is_quantized(fmt):
            assert site.weight not in dqs and site.weight in inits  # float weight untouched
            continue
        node = dqs[site.weight]
        assert sum(1 for n in model.graph.node if n.output[0] == site.weight) == 1
        casts = {n.output[0]: n.input[0] for n in model.graph.node if n.op_type == "Cast"}
        q = _initializer(model, casts.get(node.input[0], node.input[0]))
        bits = format_bits(fmt)
        packed = {2: TensorProto.INT2, 3: TensorProto.INT4, 4: TensorProto.INT4}
        want = packed.get(bits, TensorProto.INT8) if storage == "packed" else TensorProto.INT8
        assert q.data_type == want
        # packed integers reach the DequantizeLinear through exactly one Cast to INT8
        assert (node.input[0] in casts) == (want != TensorProto.INT8)
        values = numpy_helper.to_array(q).astype(np.int64)
        lo, hi = int_range(bits)
        assert values.min() >= lo and values.max() <= hi  # e.g. int4 in an INT8 container: [-8, 7]
        scale = numpy_helper.to_array(_initializer(model, node.input[1]))
        assert scale.dtype == np.float32 and scale.shape == (q.dims[site.axis],)
        assert helper.get_attribute_value(node.attribute[0]) == site.axis
    n_quantized = sum(is_quantized(f) for f in allocation.values())
    assert len(dqs) == n_quantized


@pytest.mark.parametrize("storage", ["packed", "container"])
def test_onnxruntime_dequantizes_weights_bit_exactly(cnn, tokens, storage) -> None:  # type: ignore[no-untyped-def]
    """What onnxruntime's DequantizeLinear computes equals the quantizer's ``dequantized``."""
    for exporter in (cnn.with_int4_storage(storage), tokens.with_int4_storage(storage)):
        allocation = {f: ("int4", "int8", "int2")[i % 3] for i, f in enumerate(exporter.fqns)}
        model = exporter.quantized_model(allocation)
        dqs = _weight_dequantizers(model)
        nodes = [dqs[exporter.sites[f].weight] for f in exporter.fqns]
        casts = [n for n in model.graph.node if n.op_type == "Cast"]
        needed = {i for n in [*nodes, *casts] for i in n.input}
        probe = helper.make_model(
            helper.make_graph(
                [*casts, *nodes],
                "weights",
                [],
                [helper.make_tensor_value_info(n.output[0], TensorProto.FLOAT, None) for n in nodes],
                initializer=[t for t in model.graph.initializer if t.name in needed],
            ),
            opset_imports=list(model.opset_import),
        )
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        got = ort.InferenceSession(
            probe.SerializeToString(), options, providers=["CPUExecutionProvider"]
        ).run(None, {})
        for fqn, value in zip(exporter.fqns, got, strict=True):
            site = exporter.sites[fqn]
            w = exporter.prepared.module(fqn).weight
            ref = quantize_weight(w, format_bits(allocation[fqn])).dequantized.numpy()
            np.testing.assert_array_equal(value, ref.T if site.transposed else ref)


def _dynamic_reference(exporter: QDQExporter, allocation: dict[str, str], x: np.ndarray) -> np.ndarray:
    """The MLP under dynamic formats, in numpy: each Linear's input quantized per tensor to uint8
    from its own min / max including 0 (ONNX DynamicQuantizeLinear, round half to even), times the
    quantizer's int8 per-channel integers in int32, rescaled by x_scale · w_scale, plus the bias;
    ReLU between the layers."""
    h = x.reshape(len(x), -1).astype(np.float32)
    layers = exporter.prepared.layers
    for i, info in enumerate(layers):
        qw = quantize_weight(exporter.prepared.weight(info.fqn), format_bits(allocation[info.fqn]))
        lo, hi = np.float32(min(h.min(), 0)), np.float32(max(h.max(), 0))
        scale = np.float32((hi - lo) / np.float32(255))
        zp = np.clip(np.rint(-lo / scale), 0, 255)
        hq = np.clip(np.rint(h / scale) + zp, 0, 255).astype(np.int32) - np.int32(zp)
        acc = hq @ qw.q.numpy().astype(np.int32).T
        bias = exporter.prepared.module(info.fqn).bias.detach().numpy()  # type: ignore[operator]
        h = acc.astype(np.float32) * (scale * qw.scale.numpy()) + bias
        if i < len(layers) - 1:
            h = np.maximum(h, 0)
    return h


@pytest.mark.parametrize(
    "fmt",
    [
        pytest.param(
            "int8-d",
            marks=pytest.mark.skipif(
                not _has_vnni(), reason="u8 x s8 saturates without VNNI (measured: 12 % off here)"
            ),
        ),
        "int7-d",
    ],
)
def test_dynamic_format_is_numpy_dynamic_quantization(mlp, digits_splits, fmt, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Every Linear in ``intB-d``: onnxruntime fuses each into DynamicQuantizeMatMul, and the model's
    outputs (batch-wide activation ranges, two batch sizes, with and without graph optimization)
    are the numpy re-computation's (measured: bit-equal for int7-d); the file stores the size
    cost's bytes. Without VNNI, full-range int8 weights saturate onnxruntime's u8 x s8 kernels
    (MatMulInteger and DynamicQuantizeMatMul alike), as for the static ``int8``: int7-d avoids it."""
    allocation = dict.fromkeys(mlp.fqns, fmt)
    model = mlp.quantized_model(allocation)
    ops = Counter(n.op_type for n in model.graph.node)
    assert ops["DynamicQuantizeLinear"] == ops["MatMulInteger"] == 3 and ops["DequantizeLinear"] == 0, ops
    assert {k for v in mlp.emitters(allocation).values() for k in v.values()} == {"MatMulInteger"}
    optimized = tmp_path / "optimized.onnx"
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.optimized_model_filepath = str(optimized)
    options.log_severity_level = 3
    ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    fused = Counter(n.op_type for n in onnx.load(optimized).graph.node)
    assert fused["DynamicQuantizeMatMul"] == 3 and fused["MatMulInteger"] == 0, fused
    x = _test_inputs(digits_splits)
    for batch in (x[:1], x):
        got, ref = _run(model, batch), _dynamic_reference(mlp, allocation, batch)
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
        np.testing.assert_allclose(
            _run(model, batch, optimized=False), ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max()
        )
    path = mlp.export(allocation, tmp_path / "m.onnx")
    stored = sum(
        len(t.raw_data)
        for t in onnx.load(path).graph.initializer
        if t.name.endswith(("_quantized", "_scale"))
    )
    cost = sum(int(layer_cost(i, fmt, cost="size")) for i in mlp.prepared.layers)
    assert (
        stored
        == cost
        == mlp.weight_bytes(allocation)
        == sum(i.params + 4 * i.out_channels for i in mlp.prepared.layers)
    )


@pytest.mark.parametrize("storage", INT4_STORAGES)
def test_each_storage_mode_gives_its_initializer_dtype_and_bytes(mlp, storage) -> None:  # type: ignore[no-untyped-def]
    """hidden.0 is 64×64 = 4096 weights, at the default opset 25. Worked by hand: packed int2 is
    ONNX INT2, 4 per byte (1024 bytes); packed int3 and int4 are INT4, 2 per byte (2048); a
    container keeps each integer in one INT8 byte (4096); int8 is INT8 (4096) in both modes."""
    expected = {
        "packed": {
            "int2": (TensorProto.INT2, 1024),
            "int3": (TensorProto.INT4, 2048),
            "int4": (TensorProto.INT4, 2048),
            "int8": (TensorProto.INT8, 4096),
        },
        "container": {f: (TensorProto.INT8, 4096) for f in ("int2", "int3", "int4", "int8")},
    }
    assert set(expected) == set(INT4_STORAGES), "a new storage mode needs its expected dtypes here"
    exporter = mlp.with_int4_storage(storage)
    name = f"{exporter.sites['hidden.0'].weight}_quantized"
    for fmt, want in expected[storage].items():
        model = exporter.quantized_model({"hidden.0": fmt})
        (q,) = [t for t in model.graph.initializer if t.name == name]
        assert (q.data_type, len(q.raw_data)) == want, fmt


def test_pack_int4_round_trips_through_onnx() -> None:
    rng = np.random.default_rng(0)
    for n in (1, 2, 7, 64):
        v = rng.integers(-8, 8, size=n).astype(np.int8)
        t = helper.make_tensor("t", TensorProto.INT4, [n], pack_int4(v), raw=True)
        assert len(t.raw_data) == math.ceil(n / 2)
        np.testing.assert_array_equal(numpy_helper.to_array(t).astype(np.int8), v)
    with pytest.raises(ValueError, match="int4"):
        pack_int4(np.array([8], np.int8))


def test_pack_int2_round_trips_through_onnx() -> None:
    rng = np.random.default_rng(0)
    for n in (1, 3, 4, 9, 64):
        v = rng.integers(-2, 2, size=n).astype(np.int8)
        t = helper.make_tensor("t", TensorProto.INT2, [n], pack_int2(v), raw=True)
        assert len(t.raw_data) == math.ceil(n / 4)
        np.testing.assert_array_equal(numpy_helper.to_array(t).astype(np.int8), v)
    with pytest.raises(ValueError, match="int2"):
        pack_int2(np.array([2], np.int8))


def test_pack_rows_is_the_contrib_ops_layout() -> None:
    """MatMulNBits / GatherBlockQuantized bytes, worked by hand: each row packs on its own, first
    value in the lowest bits; signed values are stored with the midpoint zero point added."""
    assert pack_rows(np.array([[1, 2], [15, 0]], np.uint8), 4).tolist() == [[0x21], [0x0F]]
    assert pack_rows(np.array([[1, 2, 3, 0]], np.uint8), 2).tolist() == [[0b00111001]]
    assert pack_rows(np.array([[7, 200]], np.uint8), 8).tolist() == [[7, 200]]
    assert offset_unsigned(np.array([-8, -1, 0, 7], np.int8), 4).tolist() == [0, 7, 8, 15]
    assert offset_unsigned(np.array([-128, 127], np.int8), 8).tolist() == [0, 255]
    rng = np.random.default_rng(0)
    for bits in (2, 4, 8):
        u = rng.integers(0, 2**bits, size=(3, 32)).astype(np.uint8)
        packed = pack_rows(u, bits)
        assert packed.shape == (3, 32 * bits // 8)
        back = np.stack([(packed >> (bits * j)) & (2**bits - 1) for j in range(8 // bits)], -1).reshape(3, 32)
        np.testing.assert_array_equal(back, u)
    with pytest.raises(ValueError, match="allowed: 2, 4, 8"):
        pack_rows(np.zeros((1, 8), np.uint8), 3)
    with pytest.raises(ValueError, match="whole bytes"):
        pack_rows(np.zeros((1, 3), np.uint8), 4)
    with pytest.raises(ValueError, match=r"\[-8, 7\]"):
        offset_unsigned(np.array([8]), 4)


def _tiny_matmul() -> onnx.ModelProto:
    w = np.arange(64 * 10, dtype=np.float32).reshape(64, 10) / 640
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["input", "W"], ["output"])],
        "tiny",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 64])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", 10])],
        initializer=[numpy_helper.from_array(w, "W")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])


def test_write_model_uses_external_data_only_past_the_limit(tmp_path) -> None:  # type: ignore[no-untyped-def]
    x = np.ones((2, 64), np.float32)
    inline = write_model(_tiny_matmul(), tmp_path / "inline" / "m.onnx")
    assert [p.name for p in inline.parent.iterdir()] == ["m.onnx"]
    path = write_model(_tiny_matmul(), tmp_path / "big" / "m.onnx", max_inline_bytes=1000)
    assert sorted(p.name for p in path.parent.iterdir()) == ["m.onnx", "m.onnx.data"]  # no temporaries
    assert external_data_path(path).stat().st_size == 64 * 10 * 4  # the weight, raw
    want = _run(_tiny_matmul(), x)
    np.testing.assert_array_equal(_run(onnx.load(path), x), want)
    import onnxruntime as ort

    by_path = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    np.testing.assert_array_equal(by_path.run(None, {"input": x})[0], want)
    # Written atomically: a failure leaves nothing behind.
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    with pytest.raises(ExportError, match="cannot write"):
        write_model(_tiny_matmul(), blocker / "m.onnx", max_inline_bytes=1000)
    assert blocker.read_text() == "not a folder"


def test_packed_int2_needs_opset_25_else_it_is_int4(mlp_digits, digits_splits) -> None:  # type: ignore[no-untyped-def]
    """At opset 25 an int2 weight is an INT2 initializer (a quarter byte each); below, INT4."""
    alloc = {"hidden.0": "int2"}
    for opset, dtype, nbytes in ((25, TensorProto.INT2, 64 * 64 // 4), (21, TensorProto.INT4, 64 * 64 // 2)):
        exporter = _build(mlp_digits, digits_splits, opset=opset)
        model = exporter.quantized_model(alloc)
        name = f"{exporter.sites['hidden.0'].weight}_quantized"
        (q,) = [t for t in model.graph.initializer if t.name == name]
        assert (q.data_type, len(q.raw_data)) == (dtype, nbytes)


def test_uint8_qparams_follow_onnxruntime() -> None:
    from onnxruntime.quantization.quant_utils import compute_scale_zp

    for lo, hi in [(0.0, 3.7), (-1.25, 2.5), (-0.3, 0.0), (0.2, 0.9), (0.0, 0.0)]:
        lo32, hi32 = np.float32(lo), np.float32(hi)  # calibrators return float32 ranges
        zp, scale = compute_scale_zp(lo32, hi32, np.uint8(0), np.uint8(255))
        s, z = uint8_qparams(float(lo32), float(hi32))
        assert (float(s), int(z)) == (float(scale), int(zp))


def test_metadata_and_checker(cnn, tmp_path) -> None:  # type: ignore[no-untyped-def]
    allocation = {cnn.fqns[0]: "int4"}
    path = cnn.export(allocation, tmp_path / "out" / "m.onnx", metadata={"recipe": "demo"})
    model = onnx.load(path)
    onnx.checker.check_model(model, full_check=True)
    props = {p.key: p.value for p in model.metadata_props}
    assert json.loads(props[METADATA_ALLOCATION]) == cnn.full_allocation(allocation)
    assert props[METADATA_VERSION] and props["recipe"] == "demo"
    assert [p.name for p in tmp_path.joinpath("out").iterdir()] == ["m.onnx"]  # no temporary left
    float_path = cnn.export_float(tmp_path / "float.onnx")
    assert not _weight_dequantizers(onnx.load(float_path))


# ------------------------------------------------------------------------------------------------
# onnxruntime against a torch simulation of the same allocation
# ------------------------------------------------------------------------------------------------


def _fake_quant(x: torch.Tensor, scale: float, zero_point: int) -> torch.Tensor:
    q = torch.clamp(torch.round(x / scale) + zero_point, 0, 255)
    return (q - zero_point) * scale


def _torch_simulation(exporter: QDQExporter, allocation: dict[str, str], x: torch.Tensor) -> np.ndarray:
    """The prepared model with the quantizer's dequantized weights and uint8 fake quantization of
    each quantized layer's input and output, with the exporter's scales and zero points."""
    full = exporter.full_allocation(allocation)
    sites = [exporter.sites[f] for f, fmt in full.items() if is_quantized(fmt)]
    plan = quantization_plan(exporter.float_model.graph, sites)

    def qparams(tensor: str) -> tuple[float, int]:
        aq = exporter.activations[plan[tensor] or tensor]
        return aq.scale, aq.zero_point

    weights = {
        s.fqn: quantize_weight(exporter.prepared.weight(s.fqn), format_bits(full[s.fqn])).dequantized
        for s in sites
    }

    def quantize_input(params: tuple[float, int]):  # type: ignore[no-untyped-def]
        return lambda module, args: (_fake_quant(args[0], *params),)

    def quantize_output(params: tuple[float, int]):  # type: ignore[no-untyped-def]
        # The output Q sits after the Relu the layer feeds; its zero point is 0 (a Relu output's
        # range starts at 0), so fake-quantizing before the Relu gives the same values.
        return lambda module, args, out: _fake_quant(out, *params)

    hooks = []
    for s in sites:
        module = exporter.prepared.module(s.fqn)
        hooks.append(module.register_forward_pre_hook(quantize_input(qparams(s.input))))
        if s.output in plan:  # Conv and Gemm outputs; a MatMul's stays float (plan.py)
            hooks.append(module.register_forward_hook(quantize_output(qparams(s.output))))
    try:
        with swapped_weights(exporter.prepared, weights) as model, torch.no_grad():
            return model(x).numpy()  # type: ignore[no-any-return]
    finally:
        for h in hooks:
            h.remove()


@pytest.mark.parametrize("name", ["cnn", "mlp", "tokens"])
@pytest.mark.parametrize("kind", ["int8", "int4", "mixed"])
def test_onnxruntime_matches_torch_fake_quant(name, kind, request, digits_splits) -> None:  # type: ignore[no-untyped-def]
    exporter: QDQExporter = request.getfixturevalue(name)
    allocation = _mixed(exporter) if kind == "mixed" else {f: kind for f in exporter.fqns}
    x = _test_inputs(digits_splits)
    model = exporter.quantized_model(allocation)
    ref = _torch_simulation(exporter, allocation, torch.from_numpy(x))
    last = exporter.sites[exporter.fqns[-1]].output
    # A quantized output's uint8 step; for a MatMul's float output, a uint8 grid over its range.
    step = exporter.activations[last].scale if last in exporter.activations else float(np.ptp(ref)) / 255
    # The graph as ONNX defines it (no fusion) computes the fake-quantized model: within one step
    # of the logits' uint8 grid (float summation order may round an activation the other way).
    plain = np.abs(_run(model, x, optimized=False) - ref) / step
    assert plain.max() <= 1.0 + 1e-4, plain.max()
    assert plain.mean() <= 0.25
    if kind != "int4" and not _has_vnni():
        pytest.skip("full-range int8 weights saturate onnxruntime's u8 x s8 kernels on CPUs without VNNI")
    # Fused into integer kernels: integer rounding may also move an output by one step.
    got = _run(model, x)
    err = np.abs(got - ref) / step
    assert err.max() <= 1.0 + 1e-4, err.max()
    assert err.mean() <= 0.25
    assert (got.argmax(1) == ref.argmax(1)).mean() >= 0.98


# ------------------------------------------------------------------------------------------------
# Accuracy and integer kernels
# ------------------------------------------------------------------------------------------------


def _optimized_ops(model: onnx.ModelProto, tmp_path: Path) -> Counter[str]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    options.log_severity_level = 3
    ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return Counter(n.op_type for n in onnx.load(tmp_path / "optimized.onnx").graph.node)


@pytest.mark.slow  # ResNet-20's export
def test_resnet20_uniform_int8_keeps_accuracy_on_integer_kernels(resnet, digits_splits, tmp_path) -> None:  # type: ignore[no-untyped-def]
    int8 = resnet.quantized_model({f: "int8" for f in resnet.fqns})
    base = evaluate_onnx(resnet.float_model, digits_splits.test, top1, latency_runs=1, warmup=0)
    # The graph as ONNX defines it keeps the accuracy on every CPU.
    x, y = _test_inputs(digits_splits), np.concatenate([t.numpy() for _, t in digits_splits.test])
    plain = float((_run(int8, x, optimized=False).argmax(1) == y).mean())
    assert plain >= base.metric - 0.005, (base.metric, plain)
    if _has_vnni():  # the integer kernels too, where u8 x s8 does not saturate on int8 weights
        quant = evaluate_onnx(int8, digits_splits.test, top1, latency_runs=1, warmup=0)
        assert quant.metric >= base.metric - 0.005, (base.metric, quant.metric)
    ops = _optimized_ops(int8, tmp_path)
    assert ops["QLinearConv"] == 21 and ops["QGemm"] == 1, ops  # every layer on an integer kernel
    assert ops["QLinearAdd"] == 9, ops  # residual adds stay in uint8 too
    assert ops["Conv"] == ops["Gemm"] == 0, ops


def test_transformer_int8_uses_integer_matmuls(tokens, tmp_path) -> None:  # type: ignore[no-untyped-def]
    ops = _optimized_ops(tokens.quantized_model({f: "int8" for f in tokens.fqns}), tmp_path)
    n_matmul = sum(s.op_type == "MatMul" for s in tokens.sites.values())
    assert ops["MatMulIntegerToFloat"] + ops["QLinearMatMul"] == n_matmul, ops
    assert ops["QGemm"] == 1, ops


# ------------------------------------------------------------------------------------------------
# File size against the size cost model
# ------------------------------------------------------------------------------------------------


def _cost_model_bytes(exporter: QDQExporter, allocation: dict[str, str]) -> int:
    """The size cost model of the sensitivity stage, summed over the layers."""
    full = exporter.full_allocation(allocation)
    costs = [
        layer_cost(info, full[info.fqn], storage=exporter.settings.int4_storage)
        for info in exporter.prepared.layers
    ]
    return int(sum(costs))


# ResNet-20's export takes long: slow.
@pytest.mark.parametrize("name", ["cnn", pytest.param("resnet", marks=pytest.mark.slow)])
@pytest.mark.parametrize("storage", ["packed", "container"])
@pytest.mark.parametrize("kind", ["float", "int8", "int4", "mixed"])
def test_file_size_matches_size_cost_model(name, storage, kind, request, tmp_path) -> None:  # type: ignore[no-untyped-def]
    exporter = request.getfixturevalue(name).with_int4_storage(storage)
    allocation = _mixed(exporter) if kind == "mixed" else {f: kind for f in exporter.fqns}
    size = exporter.export(allocation, tmp_path / f"{kind}.onnx").stat().st_size
    model = onnx.load(tmp_path / f"{kind}.onnx")
    # Weight bytes actually in the file: float weights, or integers + scales (+ zero point).
    inits = {t.name: t for t in model.graph.initializer}
    dqs = _weight_dequantizers(model)
    stored = 0
    casts = {n.output[0]: n.input[0] for n in model.graph.node if n.op_type == "Cast"}
    for site in exporter.sites.values():
        tensors = (
            [inits[casts.get(i, i)] for i in dqs[site.weight].input]
            if site.weight in dqs
            else [inits[site.weight]]
        )
        assert all(t.raw_data for t in tensors)  # raw little-endian bytes, nothing varint-coded
        stored += sum(len(t.raw_data) for t in tensors)
    # Exactly what differs from the size cost model: quantized Gemm weights carry a 1-byte
    # zero point per output channel (onnxruntime fuses QGemm only with one).
    gemm_zp = sum(
        info.out_channels
        for info in exporter.prepared.layers
        if exporter.sites[info.fqn].op_type == "Gemm"
        and is_quantized(exporter.full_allocation(allocation)[info.fqn])
    )
    assert stored == _cost_model_bytes(exporter, allocation) + gemm_zp == exporter.weight_bytes(allocation)
    # The rest of the file: float32 biases, then protobuf framing: every node (names, attributes)
    # and every initializer's header (name, dims), activation scales and zero points included.
    # Measured on ResNet-20 int8: 133 B per node, 28 B per initializer header.
    biases = sum(4 * exporter.prepared.module(f).bias.numel() for f in exporter.fqns)
    framing = 160 * len(model.graph.node) + 64 * len(model.graph.initializer) + 2048
    assert 0 < size - stored - biases <= framing, (size - stored - biases, framing)


# ------------------------------------------------------------------------------------------------
# Errors
# ------------------------------------------------------------------------------------------------


def test_unknown_layer_or_format_is_a_usage_error(cnn, tmp_path) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(UsageError, match=r"'nope'.*layers are: conv1, conv2, fc1, fc2"):
        cnn.export({"nope": "int8"}, tmp_path / "a.onnx")
    with pytest.raises(UsageError, match=r"'int9'.*allowed: float, intB"):
        cnn.export({"conv1": "int9"}, tmp_path / "b.onnx")
    with pytest.raises(UsageError, match=r"'conv1' \(conv2d\) cannot take format 'int4-b32'.*2-D weight"):
        cnn.export({"conv1": "int4-b32"}, tmp_path / "c.onnx")
    with pytest.raises(UsageError, match=r"'conv1' \(conv2d\) cannot take format 'int8-d'.*allowed: int2, "):
        cnn.export({"conv1": "int8-d"}, tmp_path / "d.onnx")
    with pytest.raises(UsageError, match="reserved"):
        cnn.quantized_model({}, metadata={METADATA_ALLOCATION: "{}"})
    assert list(tmp_path.iterdir()) == []


def test_a_format_family_is_one_registration_of_its_emitters(tokens, tmp_path) -> None:  # type: ignore[no-untyped-def]
    block = {"mix": "int4-b16"}  # a MatMul on Wᵀ with K = 16: MatMulNBits applies
    assert set(tokens.emitters(block)["mix"].values()) == {"MatMulNBits"}
    family = parse_format("int4-b16").family
    builtin = EMITTERS[family]
    try:
        # Registered with DequantizeLinear alone, the family's layers take it (a fresh emission cache).
        register_emitters(family, (DequantizeLinearEmitter(),), replace=True)
        fresh = tokens.with_int4_storage(tokens.settings.int4_storage)
        assert set(fresh.emitters(block)["mix"].values()) == {"DequantizeLinear"}
        assert fresh.export(block, tmp_path / "dq.onnx").exists()
        with pytest.raises(UsageError, match=rf"emitters of format family '{family}' is already registered"):
            register_emitters(family, (DequantizeLinearEmitter(),))
        # A family with no emitter is refused by name, with the families that have one.
        unregister_emitters(family)
        with pytest.raises(
            UsageError,
            match=rf"'mix': format 'int4-b16' \(family '{family}'\) has no ONNX emitter; families with one: ",
        ):
            fresh.quantized_model(block)
    finally:
        register_emitters(family, builtin, replace=True)


def test_a_new_format_family_exports_with_one_emitter_registration(mlp, digits_splits, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A toy weight-only family ("halfB": the integer quantizer at B bits, stored as INT8): its format,
    quantizer and emitter registrations are all it takes to export and run it."""
    family = FormatFamily("halfB", r"half(?P<bits>[2-8])", "halfB (toy)", ("half4",), packed=False)
    register_family(family)
    try:
        quantizer.register("halfB", quantizer.symmetric)
        register_emitters("halfB", (DequantizeLinearEmitter(),))
        allocation = {mlp.fqns[-1]: "half4"}
        assert mlp.emitters(allocation) == {
            mlp.fqns[-1]: {mlp.sites[mlp.fqns[-1]].uses[0].node: "DequantizeLinear"}
        }
        x = _test_inputs(digits_splits)[:64]
        weight = quantizer.quantize_as(mlp.prepared.weight(mlp.fqns[-1]), "half4").dequantized
        with swapped_weights(mlp.prepared, {mlp.fqns[-1]: weight}) as model, torch.no_grad():
            ref = model(torch.from_numpy(x)).numpy()
        # Weight-only: float compute on exactly the quantizer's weight.
        np.testing.assert_allclose(_run(mlp.quantized_model(allocation), x), ref, atol=1e-4, rtol=0)
        with pytest.raises(UsageError, match=r"unknown format 'half9'; allowed: .*halfB \(toy\)"):
            mlp.quantized_model({mlp.fqns[-1]: "half9"})
    finally:
        unregister_emitters("halfB")
        quantizer.unregister("halfB")
        unregister_family("halfB")


def test_bad_build_options_are_usage_errors(cnn, digits_splits) -> None:  # type: ignore[no-untyped-def]
    calibration = digits_splits.calibration
    for settings, match in [
        (
            ExportSettings(calibration="kl"),
            "unknown calibration method 'kl'; allowed: minmax, percentile, entropy",
        ),
        (ExportSettings(opset=13), ">= 18"),
    ]:
        with pytest.raises(UsageError, match=match):
            QDQExporter.build(cnn.prepared, calibration, settings=settings)
    with pytest.raises(UsageError, match="unknown int4 storage 'nibbles'; allowed: packed, container"):
        cnn.with_int4_storage("nibbles")
    with pytest.raises(UsageError, match=">= 1"):
        QDQExporter.build(cnn.prepared, calibration, max_calibration_batches=0)
    with pytest.raises(UsageError, match="empty"):
        QDQExporter.build(cnn.prepared, [])
    assert cnn.settings == ExportSettings() and cnn.with_int4_storage("container").settings == ExportSettings(
        int4_storage="container"
    )


def test_packed_int4_below_opset_21_is_a_usage_error(mlp_digits, digits_splits, tmp_path) -> None:  # type: ignore[no-untyped-def]
    exporter = _build(mlp_digits, digits_splits, opset=20)
    assert exporter.float_model.opset_import[0].version == 20
    with pytest.raises(UsageError, match="opset >= 21"):
        exporter.export({"head": "int4"}, tmp_path / "m.onnx")
    assert list(tmp_path.iterdir()) == []
    # int8, and int4 values in an INT8 container, need no INT4 type.
    exporter.export({"head": "int8"}, tmp_path / "ok.onnx")
    exporter.with_int4_storage("container").export({"head": "int4"}, tmp_path / "ok4.onnx")


def test_unwritable_output_is_an_export_error_leaving_nothing(cnn, tmp_path) -> None:  # type: ignore[no-untyped-def]
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    with pytest.raises(ExportError, match="cannot write"):
        cnn.export({"conv1": "int8"}, blocker / "model.onnx")
    assert [p.name for p in tmp_path.iterdir()] == ["a_file"]
    assert blocker.read_text() == "not a folder"


def test_calibration_methods_give_usable_ranges(mlp, digits_splits) -> None:  # type: ignore[no-untyped-def]
    from hawqtool.export import calibrate

    inputs = [{"input": x.numpy()} for x, _ in digits_splits.calibration[:2]]
    relu = mlp.sites["hidden.0"].output
    minmax = calibrate(mlp.float_model, [relu], inputs, "minmax")[relu]
    assert minmax[0] == 0.0 and minmax[1] == pytest.approx(mlp.activations[relu].rmax)
    for method in ("percentile", "entropy"):
        lo, hi = calibrate(mlp.float_model, [relu], inputs, method)[relu]
        assert lo <= 0.0 < hi <= minmax[1] * 1.001, (method, lo, hi)


def test_import_loads_neither_onnx_nor_onnxruntime() -> None:
    code = (
        "import sys, hawqtool.export, hawqtool.evaluate; "
        "print('onnxruntime' in sys.modules, 'onnx' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]
