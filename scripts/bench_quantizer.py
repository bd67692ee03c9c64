"""hawqtool's weight quantizer vs onnxruntime's symmetric per-channel weight grids, in torch.

Every conv/linear weight of a trained zoo model is fake-quantized (activations stay float) with:

- ``ort``: onnxruntime's own ``quantize_data`` per output channel, symmetric — QInt4 [-8, 7] with
  scale = max|w| / 7.5 (int4 has no "symmetric range" in ORT), QInt8 [-127, 127] with
  scale = max|w| / 127 (``ONNX_INT_TYPE_SYMMETRIC_RANGE``); 2/3 bits: not offered by ORT;
- ``max-abs``: ``quantize_weight(clip_search=False)``, max|w| / (qmax + 0.5) on [-2^(b-1), 2^(b-1)-1];
- ``clip-only``: the least-squares search over ``CLIP_RATIOS`` alone (the quantizer before the
  no-clip candidate was added);
- ``hawqtool``: ``quantize_weight`` as it is (clip ratios + the no-clip scale).

Prints top-1 on the evaluation and test splits and Σ‖ΔW‖² (with conv1's share, the layer the
no-clip candidate helps). Run: ``python scripts/bench_quantizer.py`` (trains the zoo models into
the cache on first use, ~1–2 minutes).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import numpy as np
import torch

from hawqtool import zoo
from hawqtool.prepare import prepare_model, swapped_weights
from hawqtool.quantizer import CLIP_RATIOS, int_range, quantize_weight

Quant = Callable[[torch.Tensor, int], torch.Tensor | None]


def ort_grid(w: torch.Tensor, bits: int) -> torch.Tensor | None:
    from onnx import TensorProto
    from onnxruntime.quantization.quant_utils import quantize_data

    qtype = {4: TensorProto.INT4, 8: TensorProto.INT8}.get(bits)
    if qtype is None:
        return None
    rows = []
    for row in w.detach().reshape(w.shape[0], -1).numpy():
        zp, scale, q = quantize_data(row, qtype, True)
        rows.append((q.astype(np.float32) - np.float32(zp)) * np.float32(scale))
    return torch.from_numpy(np.stack(rows)).reshape(w.shape)


def _integers(w2d: torch.Tensor, scale: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    """Round-to-nearest integers of each row at its scale, clamped to [qmin, qmax]."""
    return torch.clamp(torch.round(w2d / scale[:, None]), qmin, qmax)


def clip_only(w: torch.Tensor, bits: int) -> torch.Tensor:
    """The search over CLIP_RATIOS × the max-abs scale, without the no-clip candidate."""
    qmin, qmax = int_range(bits)
    w2d = w.detach().float().reshape(w.shape[0], -1)
    absmax = w2d.abs().amax(dim=1)
    base = torch.where(absmax > 0, absmax, torch.full_like(absmax, qmax + 0.5)) / (qmax + 0.5)
    best, best_err = base.clone(), torch.full_like(base, float("inf"), dtype=torch.float64)
    for r in CLIP_RATIOS:
        s = base * r
        err = ((_integers(w2d, s, qmin, qmax) * s[:, None] - w2d).double() ** 2).sum(dim=1)
        better = err < best_err
        best_err, best = torch.where(better, err, best_err), torch.where(better, s, best)
    return (_integers(w2d, best, qmin, qmax) * best[:, None]).reshape(w.shape)


METHODS: dict[str, Quant] = {
    "ort": ort_grid,
    "max-abs": lambda w, b: quantize_weight(w, b, clip_search=False).dequantized,
    "clip-only": clip_only,
    "hawqtool": lambda w, b: quantize_weight(w, b).dequantized,
}


def top1(model: torch.nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    correct = total = 0
    with torch.no_grad():
        for x, y in batches:
            correct += int((model(x).argmax(1) == y).sum())
            total += len(y)
    return correct / total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["small_cnn_mnist", "small_cnn_digits"])
    ap.add_argument("--bits", type=int, nargs="+", default=[2, 3, 4, 8])
    args = ap.parse_args()
    torch.set_num_threads(2)
    for name in args.models:
        data = zoo.mnist5k() if "mnist" in name else zoo.digits()
        prepared = prepare_model(getattr(zoo, name)(), next(iter(data.calibration))[0])
        ev, te = list(data.evaluation), list(data.test)
        print(
            f"\n{name}: float top-1 {top1(prepared.model, ev):.3f} eval / {top1(prepared.model, te):.3f} test"
        )
        print(f"{'bits':>4s} {'method':10s} {'eval':>6s} {'test':>6s} {'Σ‖ΔW‖²':>10s} {'conv1':>8s}")
        original = {f: w.detach().clone() for f, w in zip(prepared.fqns, prepared.weights(), strict=True)}
        for bits in args.bits:
            for method, fn in METHODS.items():
                maybe = {f: fn(w, bits) for f, w in original.items()}
                q = {f: v for f, v in maybe.items() if v is not None}
                if len(q) < len(maybe):
                    continue
                err = {f: float(((q[f] - original[f]).double() ** 2).sum()) for f in q}
                with swapped_weights(prepared, q) as model:  # type: ignore[arg-type]
                    acc_e, acc_t = top1(model, ev), top1(model, te)
                print(
                    f"{bits:4d} {method:10s} {acc_e:6.3f} {acc_t:6.3f} {sum(err.values()):10.4f} "
                    f"{err[prepared.fqns[0]]:8.4f}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
