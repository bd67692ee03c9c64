"""Benchmark hawqtool's QDQ export against onnxruntime's own ``quantize_static``.

For ResNet-20 and the small CNN on digits and the small CNN on MNIST-5k, all in one run:

- ``float``: the BN-folded float model (the export every other row starts from);
- ``ort quantize_static int8``: onnxruntime's QDQ quantizer on that same float model (uint8
  activations, int8 per-channel weights, MinMax, the same calibration batches);
- ``hawqtool int8``, ``hawqtool int4 packed`` (ONNX INT4), ``hawqtool int4 container`` (int4
  values in INT8): uniform allocations through :class:`hawqtool.export.QDQExporter`.

Accuracy is top-1 on the test split. Latency is the median of ``--runs`` runs of one batch of
``--batch`` (64) on ``--threads`` (2) onnxruntime threads; the variants of a model are timed in
interleaved rounds and each reports the median over rounds, so that load from other processes
hits them alike. ``int kernels`` counts QLinearConv / QLinearMatMul / QGemm / QLinearAdd /
MatMulInteger(ToFloat) / ConvInteger nodes in onnxruntime's optimized graph.

Usage: ``python scripts/bench_export.py [--rounds 5] [--runs 30]``
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import torch

from hawqtool import zoo
from hawqtool.evaluate import evaluate_onnx, make_session
from hawqtool.export import QDQExporter
from hawqtool.prepare import prepare_model
from hawqtool.tasks import top1

INTEGER_OPS = {
    "QLinearConv",
    "QLinearMatMul",
    "QGemm",
    "QLinearAdd",
    "MatMulInteger",
    "MatMulIntegerToFloat",
    "ConvInteger",
    "QLinearGlobalAveragePool",
    "QLinearAveragePool",
    "DynamicQuantizeMatMul",
}


def integer_kernels(model_bytes: bytes, tmp: Path) -> int:
    """Integer-kernel nodes in onnxruntime's optimized graph of a model."""
    import onnxruntime as ort

    opt = tmp / "optimized.onnx"
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(opt)
    options.log_severity_level = 3
    ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])
    counts = Counter(n.op_type for n in onnx.load(opt).graph.node)
    return sum(v for k, v in counts.items() if k in INTEGER_OPS)


def ort_quantize_static(
    float_model: onnx.ModelProto, calibration, tmp: Path, *, feeds=None, op_types=None
) -> onnx.ModelProto:
    """onnxruntime's own static QDQ quantization of ``float_model``: the baseline to beat.

    ``feeds`` turns a calibration batch's inputs into onnxruntime feeds (e.g. a ``ModelIO``'s
    ``feeds``, for dict inputs; default: the lone input ``input``); ``op_types`` limits the op
    types quantized (default: every one onnxruntime supports)."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter([feeds(x) if feeds else {"input": x.numpy()} for x, _ in calibration])

        def get_next(self):  # type: ignore[no-untyped-def]
            return next(self.it, None)

    src, dst = tmp / "float.onnx", tmp / "qs.onnx"
    onnx.save(float_model, src)
    quantize_static(
        src,
        dst,
        Reader(),
        quant_format=QuantFormat.QDQ,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        per_channel=True,
        calibrate_method=CalibrationMethod.MinMax,
        op_types_to_quantize=list(op_types) if op_types else None,
    )
    return onnx.load(dst)


def interleaved_latency(
    models: dict[str, bytes], x: np.ndarray, *, threads: int, rounds: int, runs: int, warmup: int = 5
) -> dict[str, float]:
    sessions = {k: make_session(v, threads=threads) for k, v in models.items()}
    for s in sessions.values():
        for _ in range(warmup):
            s.run(None, {"input": x})
    medians: dict[str, list[float]] = {k: [] for k in models}
    for _ in range(rounds):
        for k, s in sessions.items():
            times = []
            for _ in range(runs):
                t = time.perf_counter()
                s.run(None, {"input": x})
                times.append(time.perf_counter() - t)
            medians[k].append(statistics.median(times))
    return {k: 1e3 * statistics.median(v) for k, v in medians.items()}


def bench(name: str, model: torch.nn.Module, splits, args: argparse.Namespace, tmp: Path) -> list[str]:
    calibration = splits.calibration
    prepared = prepare_model(model, calibration[0][0][:1])
    t = time.perf_counter()
    exporter = QDQExporter.build(prepared, calibration)
    build_s = time.perf_counter() - t
    container = exporter.with_int4_storage("container")
    uniform = {b: {f: b for f in exporter.fqns} for b in ("int8", "int4")}
    t = time.perf_counter()
    int8 = exporter.quantized_model(uniform["int8"])
    per_alloc_ms = 1e3 * (time.perf_counter() - t)
    variants = {
        "float": exporter.float_model,
        "ort quantize_static int8": ort_quantize_static(exporter.float_model, calibration, tmp),
        "hawqtool int8": int8,
        "hawqtool int4 packed": exporter.quantized_model(uniform["int4"]),
        "hawqtool int4 container": container.quantized_model(uniform["int4"]),
    }
    data = {k: m.SerializeToString() for k, m in variants.items()}
    pool = np.concatenate([x.numpy() for x, _ in splits.test])
    x = np.ascontiguousarray(np.concatenate([pool] * (-(-args.batch // len(pool))))[: args.batch])
    lat = interleaved_latency(data, x, threads=args.threads, rounds=args.rounds, runs=args.runs)
    rows = []
    base = None
    for k, m in variants.items():
        ev = evaluate_onnx(m, splits.test, top1, threads=args.threads, latency_runs=1, warmup=0)
        base = ev.metric if base is None else base
        rows.append(
            f"| {name} | {k} | {100 * ev.metric:.2f} | {100 * (ev.metric - base):+.2f} | {lat[k]:.3f} | "
            f"{lat[k] / lat['float']:.2f} | {ev.size_bytes / 1024:.1f} | {integer_kernels(data[k], tmp)} |"
        )
    rows.append(
        f"| {name} | (hawqtool build {build_s:.1f} s, one allocation {per_alloc_ms:.0f} ms; "
        f"{len(exporter.fqns)} layers) | | | | | | |"
    )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--runs", type=int, default=30)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)  # torch.onnx and quantize_static chatter
    torch.set_num_threads(args.threads)

    cases = [
        ("ResNet-20 digits", zoo.resnet20_digits, zoo.digits),
        ("small CNN digits", zoo.small_cnn_digits, zoo.digits),
        ("small CNN MNIST-5k", zoo.small_cnn_mnist, zoo.mnist5k),
    ]
    print(
        f"onnxruntime {__import__('onnxruntime').__version__}, {args.threads} threads, batch {args.batch}, "
        f"latency = median over {args.rounds} interleaved rounds of the median of {args.runs} runs"
    )
    print("| model | variant | top-1 % | Δ vs float | latency ms | × float | size KiB | int kernels |")
    print("|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for name, model_fn, data_fn in cases:
            for row in bench(name, model_fn(), data_fn(batch_size=64), args, Path(tmp)):
                print(row, flush=True)


if __name__ == "__main__":
    main()
