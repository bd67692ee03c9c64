"""Models past protobuf's 2 GiB limit, simulated on small ones by lowering the inline limit.

Known answers: a model written or opened with external data runs in onnxruntime to the same outputs
as the inline one, the caller's model is left byte for byte as it was, no temporary file is left;
the opset conversion of the float export never serializes the weights (it works on a graph whose
initializers have no bytes) and gives every weight back unchanged. Every file lives under
``tmp_path`` or a temporary folder the code removes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from hawqtool.errors import ExportError
from hawqtool.evaluate import batchwise, evaluate_onnx, make_session
from hawqtool.export.torch_export import convert_opset
from hawqtool.export.writer import (
    EXTERNAL_DATA_MIN_BYTES,
    external_data_path,
    session_source,
    write_external,
    write_model,
)


def _model(opset: int = 21) -> onnx.ModelProto:
    """y = relu(x @ W1) @ W2 + b: two 16 KiB weights (external past the limit) and a small bias."""
    g = np.random.default_rng(0)
    w1 = numpy_helper.from_array(g.standard_normal((64, 64)).astype(np.float32), "w1")
    w2 = numpy_helper.from_array(g.standard_normal((64, 8)).astype(np.float32), "w2")
    b = numpy_helper.from_array(np.arange(8, dtype=np.float32), "b")
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"]),
        helper.make_node("Relu", ["h"], ["r"]),
        helper.make_node("MatMul", ["r", "w2"], ["m"]),
        helper.make_node("Add", ["m", "b"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 8])],
        initializer=[w1, w2, b],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


X = np.random.default_rng(1).standard_normal((3, 64)).astype(np.float32)


def _run(source: bytes | str) -> np.ndarray:
    return np.asarray(make_session(source, threads=1).run(None, {"x": X})[0])


def test_write_model_past_the_limit_runs_the_same_and_leaves_the_model_as_it_was(tmp_path: Path) -> None:
    model = _model()
    before = model.SerializeToString()
    path = write_model(model, tmp_path / "m.onnx", max_inline_bytes=1000)
    assert model.SerializeToString() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.data"]
    assert external_data_path(path).stat().st_size == 64 * 64 * 4 + 64 * 8 * 4  # w1 + w2
    bare = onnx.load(path, load_external_data=False)
    external = {t.name for t in bare.graph.initializer if t.data_location == TensorProto.EXTERNAL}
    assert external == {"w1", "w2"} and EXTERNAL_DATA_MIN_BYTES > 8 * 4  # the bias stays inline
    np.testing.assert_array_equal(_run(str(path)), _run(before))


def test_session_source_opens_a_temporary_copy_past_the_limit(tmp_path: Path) -> None:
    model = _model()
    before = model.SerializeToString()
    with session_source(model) as inline:
        assert inline == before
    with session_source(model, max_inline_bytes=1000) as source:
        assert isinstance(source, str) and Path(source).is_file()
        assert external_data_path(source).is_file()
        session = make_session(source, threads=1)
        folder = Path(source).parent
    assert not folder.exists()  # removed on exit; the session keeps what it loaded
    np.testing.assert_array_equal(np.asarray(session.run(None, {"x": X})[0]), _run(before))
    assert model.SerializeToString() == before


def test_make_session_and_evaluate_take_a_model_proto() -> None:
    model = _model()
    np.testing.assert_array_equal(
        np.asarray(make_session(model, threads=1).run(None, {"x": X})[0]), _run(model.SerializeToString())
    )
    ev = evaluate_onnx(model, [(X, np.zeros(3))], lambda o, t: np.ones(len(o)), latency_runs=1, warmup=0)
    assert ev.size_bytes == len(model.SerializeToString()) and ev.metric == 1.0


def test_constants_past_the_limit_outside_the_initializers_are_an_export_error(tmp_path: Path) -> None:
    model = _model()
    big = numpy_helper.from_array(np.zeros(300, np.float32), "c")
    model.graph.node.insert(0, helper.make_node("Constant", [], ["c"], value=big))
    with pytest.raises(ExportError, match="without its initializers' data"):
        write_external(model, tmp_path / "m.onnx", limit=100)  # protobuf's limit, scaled down
    assert not (tmp_path / "m.onnx").exists()


def test_opset_conversion_works_on_the_graph_and_gives_the_weights_back() -> None:
    model = _model(21)
    weights = {t.name: numpy_helper.to_array(t).copy() for t in model.graph.initializer}
    converted = convert_opset(model, 25)
    assert {o.domain: o.version for o in converted.opset_import}[""] == 25
    got = {t.name: numpy_helper.to_array(t) for t in converted.graph.initializer}
    assert set(got) == set(weights)
    for name, w in weights.items():
        np.testing.assert_array_equal(got[name], w)
    assert all(t.data_location == TensorProto.DEFAULT for t in converted.graph.initializer)
    np.testing.assert_array_equal(_run(converted.SerializeToString()), _run(_model(21).SerializeToString()))


def test_evaluation_holds_one_batch_of_outputs_for_a_per_sample_metric() -> None:
    assert batchwise("top1") and not batchwise("perplexity")  # perplexity is centred on the split
    model = _model()
    g = np.random.default_rng(2)
    batches = [(g.standard_normal((4, 64)).astype(np.float32), np.zeros(4)) for _ in range(5)]
    seen: list[int] = []

    def per_row(outputs: np.ndarray, targets: np.ndarray) -> np.ndarray:
        seen.append(len(outputs))
        return np.asarray(outputs[:, 0] > 0, dtype=np.float64)

    ev = evaluate_onnx(model, batches, per_row, latency_runs=1, warmup=0, per_batch=True)
    assert seen == [4] * 5  # batch by batch, never the split
    outputs = np.concatenate([_run_x(x) for x, _ in batches])
    np.testing.assert_array_equal(ev.values, (outputs[:, 0] > 0).astype(np.float64))  # type: ignore[arg-type]
    assert ev.samples == 20 and ev.outputs is None
    # One number per split, or keep_outputs: the outputs of the split are kept, as before.
    seen.clear()
    kept = evaluate_onnx(model, batches, per_row, latency_runs=1, warmup=0, keep_outputs=True, per_batch=True)
    assert seen == [20] and kept.outputs is not None and kept.metric == ev.metric
    seen.clear()
    whole = evaluate_onnx(model, batches, per_row, latency_runs=1, warmup=0)  # the default: the split
    assert seen == [20] and whole.metric == ev.metric
    split = evaluate_onnx(
        model, batches, lambda o, t: float(o.mean()), latency_runs=1, warmup=0, per_batch=True
    )
    assert split.values is None and split.metric == pytest.approx(float(outputs.mean()), rel=1e-6)


def _run_x(x: np.ndarray) -> np.ndarray:
    return np.asarray(make_session(_model(), threads=1).run(None, {"x": x})[0])
