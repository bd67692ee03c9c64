"""evaluate_onnx on tiny hand-written graphs with known answers. Every file lives under tmp_path."""

from __future__ import annotations

import onnx
import pytest
import torch
from onnx import parser

from hawqtool.errors import ExportError, UsageError
from hawqtool.evaluate import Evaluation, evaluate_onnx
from hawqtool.tasks import neg_mse, top1

IDENTITY = """
<ir_version: 10, opset_import: ["" : 21]>
identity (float[N, 3] input) => (float[N, 3] output) {
    output = Identity(input)
}
"""

# Parses and passes the checker's light mode, but onnxruntime has no such operator.
UNKNOWN_OP = """
<ir_version: 10, opset_import: ["" : 21, "nowhere" : 1]>
broken (float[N, 3] input) => (float[N, 3] output) {
    output = nowhere.NoSuchOp(input)
}
"""


def _batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    # Row arg-maxes 0, 1, 2 | 0, 2 against targets 0, 1, 1 | 0, 2: 4 of 5 right.
    x1 = torch.tensor([[1.0, 0, 0], [0, 1, 0], [0, 0, 1]])
    x2 = torch.tensor([[5.0, 1, 1], [0, 0, 3]])
    return [(x1, torch.tensor([0, 1, 1])), (x2, torch.tensor([0, 2]))]


def test_metric_over_the_whole_split_and_file_size(tmp_path) -> None:  # type: ignore[no-untyped-def]
    model = parser.parse_model(IDENTITY)
    ev = evaluate_onnx(model, _batches(), top1, latency_runs=5)
    assert isinstance(ev, Evaluation)
    assert ev.metric == pytest.approx(0.8) and ev.samples == 5
    assert ev.size_bytes == len(model.SerializeToString())
    assert ev.latency_ms > 0 and ev.seconds >= ev.latency_ms / 1e3
    path = tmp_path / "identity.onnx"
    onnx.save(model, path)
    from_file = evaluate_onnx(path, _batches(), top1, latency_runs=1, warmup=0)
    assert from_file.metric == ev.metric and from_file.size_bytes == path.stat().st_size
    assert set(ev.to_dict()) == {"metric", "latency_ms", "size_bytes", "samples", "seconds", "per_sample"}


def test_numpy_batches_other_metrics_and_a_larger_latency_batch() -> None:
    batches = [(x.numpy(), x.numpy()) for x, _ in _batches()]  # identity: outputs == targets
    ev = evaluate_onnx(parser.parse_model(IDENTITY), batches, neg_mse, latency_batch=64, threads=1)
    assert ev.metric == 0.0 and ev.samples == 5


def test_onnxruntime_failures_are_export_errors() -> None:
    with pytest.raises(ExportError, match="cannot load"):
        evaluate_onnx(parser.parse_model(UNKNOWN_OP), _batches(), top1)
    wrong_width = [(torch.ones(2, 4), torch.zeros(2))]
    with pytest.raises(ExportError, match="failed to run"):
        evaluate_onnx(parser.parse_model(IDENTITY), wrong_width, top1)


def test_bad_input_is_a_usage_error(tmp_path) -> None:  # type: ignore[no-untyped-def]
    model = parser.parse_model(IDENTITY)
    with pytest.raises(UsageError, match="empty split"):
        evaluate_onnx(model, [], top1)
    with pytest.raises(UsageError, match="cannot read model"):
        evaluate_onnx(tmp_path / "missing.onnx", _batches(), top1)
    with pytest.raises(UsageError, match="threads=0"):
        evaluate_onnx(model, _batches(), top1, threads=0)
    assert list(tmp_path.iterdir()) == []


def test_quantized_zoo_model_end_to_end(small_cnn_digits, digits_splits, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A written QDQ file scores exactly what its in-memory ONNX model scores, and the ONNX float
    export scores what the user's torch model scores on the same split, counted here by hand."""
    from hawqtool.export import QDQExporter
    from hawqtool.prepare import prepare_model

    split = digits_splits.evaluation
    prepared = prepare_model(small_cnn_digits, digits_splits.calibration[0][0][:1])
    exporter = QDQExporter.build(prepared, digits_splits.calibration, max_calibration_batches=1)
    # int7 weights: onnxruntime's u8 x s8 kernels saturate on full-range int8 weights on CPUs without
    # VNNI; 7-bit weights run exactly on every CPU, on the same integer kernels.
    allocation = {f: "int7" for f in exporter.fqns}
    path = exporter.export(allocation, tmp_path / "int7.onnx")
    from_file = evaluate_onnx(path, split, top1, latency_runs=3, latency_batch=64)
    in_memory = evaluate_onnx(exporter.quantized_model(allocation), split, top1, latency_runs=1)
    float_onnx = evaluate_onnx(exporter.float_model, split, top1, latency_runs=1)

    # The user's (unfolded) torch model, independently of hawqtool's metric code.
    correct = total = 0
    with torch.no_grad():
        for x, y in split:
            correct += int((small_cnn_digits(x).argmax(dim=1) == y).sum())
            total += len(y)
    torch_top1 = correct / total

    assert from_file.samples == in_memory.samples == total
    assert from_file.size_bytes == path.stat().st_size
    assert from_file.metric == in_memory.metric  # same graph, same session settings
    # BN folding and export change outputs by float rounding only: at most one near-tie flips.
    assert abs(float_onnx.metric - torch_top1) <= 1 / total
    # uint8 activations and int7 weights: the drop on this model is under one point.
    assert abs(from_file.metric - torch_top1) <= 0.01
    assert 0.9 < torch_top1 <= 1.0  # a trained model, so the comparison means something


TOKENS = """
<ir_version: 10, opset_import: ["" : 21]>
tokens (float[N, T, 2] input) => (float[N, T, 2] output) {
    output = Identity(input)
}
"""


def test_per_token_metrics_ignore_the_padding_between_batches_of_different_lengths() -> None:
    # Per-token logits (N, T, 2), batches padded to their own length: 1 token, then 3 tokens.
    # Batch 1: one sentence, its only token disagrees with the teacher (0.0). Batch 2: one sentence
    # of 3 tokens, 2 agree (2/3). Zero-padding batch 1 to 3 tokens would add 2 "agreeing" positions
    # (arg-max 0 == 0) and give it 2/3 instead of 0: known answer mean(0, 2/3) = 1/3, not 2/3.
    from hawqtool.tasks import mse, top1_agreement

    model = parser.parse_model(TOKENS)
    x1, t1 = torch.tensor([[[0.0, 1.0]]]), torch.tensor([[[1.0, 0.0]]])
    x2 = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]]])
    t2 = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]]])
    ev = evaluate_onnx(model, [(x1, t1), (x2, t2)], top1_agreement, latency_runs=1, warmup=0)
    assert ev.values is not None and ev.values.tolist() == pytest.approx([0.0, 2 / 3])
    assert ev.metric == pytest.approx(1 / 3)
    # mse per sentence over its own tokens: batch 1 (1 + 1) / 2 = 1; batch 2 (0 + 0 + 0 + 0 + 1 + 1) / 6.
    ev = evaluate_onnx(model, [(x1, t1), (x2, t2)], mse, latency_runs=1, warmup=0)
    assert ev.values is not None and ev.values.tolist() == pytest.approx([1.0, 1 / 3])


def test_providers_are_checked() -> None:
    import onnxruntime as ort

    from hawqtool.evaluate import make_session

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        with pytest.raises(
            UsageError, match=r"execution provider 'cuda' .* is not available .*; available: .*cpu"
        ):
            make_session(b"", provider="cuda")
    with pytest.raises(UsageError, match=r"unknown execution provider 'tpu'"):
        make_session(b"", provider="tpu")
