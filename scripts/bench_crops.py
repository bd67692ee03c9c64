"""How hard the ``efficientnet-lite0`` recipe's crops are on top-1 agreement, and what uniform
quantization does to it: hawqtool's uniform int8 (static) and int8-w, onnxruntime's own
``quantize_static`` (QDQ, per-tensor and per-channel, MinMax on the same calibration crops).

Prints the float model's top-1 probability (median) and how many evaluation crops have their top two
classes within 0.05 / 0.01 probability, then each model's top-1 agreement with the float ONNX model
on the evaluation split. Needs ``pip install -e ".[vision]"``.

Usage: ``python scripts/bench_crops.py [--out DIR]``
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

from hawqtool import pipeline
from hawqtool.evaluate import make_session, run_session


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="bench-crops-"))
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    ws = pipeline.load("efficientnet-lite0", overrides=["hessian.device=cpu"])
    exp = pipeline.exporter(ws)
    onnx.save(exp.float_model, str(out / "float.onnx"))
    inputs = [x for x, _ in ws.evaluation]

    def logits(model: Any) -> np.ndarray:
        s = make_session(model, threads=2, provider="cpu")
        return np.concatenate([run_session(s, ws.io.feeds(x)) for x in inputs])

    ref = logits(exp.float_model)
    p = np.sort(torch.softmax(torch.from_numpy(ref), -1).numpy(), -1)
    margin = p[:, -1] - p[:, -2]
    print(
        f"{len(ref)} evaluation crops: median top-1 probability {np.median(p[:, -1]):.3f}; top two within "
        f"0.05: {(margin < 0.05).mean():.1%}, within 0.01: {(margin < 0.01).mean():.1%}"
    )
    models: dict[str, Any] = {
        f"hawqtool uniform {fmt}": exp.quantized_model(pipeline.uniform_allocation(ws, fmt))
        for fmt in ("int8", "int8-w")
    }
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):  # type: ignore[misc]
        def __init__(self) -> None:
            self.it = iter([ws.io.feeds(x) for x, _ in ws.calibration])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.it, None)

    for per_channel in (False, True):
        path = out / f"ort-static-{'per-channel' if per_channel else 'per-tensor'}.onnx"
        quantize_static(
            str(out / "float.onnx"), str(path), Reader(), quant_format=QuantFormat.QDQ,
            per_channel=per_channel, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
        )  # fmt: skip
        models[f"onnxruntime quantize_static {'per-channel' if per_channel else 'per-tensor'}"] = str(path)
    for name, model in models.items():
        agree = (logits(model).argmax(-1) == ref.argmax(-1)).mean()
        print(f"{name:<40} top-1 agreement {agree:.1%}")
    print(f"{time.perf_counter() - t0:.0f} s; models in {out}")


if __name__ == "__main__":
    main()
