"""Prefix replay in the output-space dependency terms: seconds with and without, same results.

Loads a recipe's workspace (default ``minilm`` on the CPU with 16 calibration samples and at most
4 probes), takes its option table (the sensitivity stage runs, or comes from the cache), builds
the quantization error of every quantized (layer, format) key as the dependency stage does
(:func:`hawqtool.dependency.build_dependency_model`), and times
:func:`hawqtool.interactions.output_terms` with ``replay=False`` and ``replay=True`` on the same
workspace, in that order. Prints both times, the replayed share of module calls, and the largest
relative difference of the Gram matrices, linear terms and own losses (0 up to float rounding).

Usage: ``python scripts/bench_replay.py [--recipe minilm] [--keys N] [--set key=value ...]``
(``--keys``: only the first N keys, for a quick look; ``--set`` adds recipe overrides).
"""

from __future__ import annotations

import argparse
import logging
import time

import numpy as np
import torch

from hawqtool import pipeline
from hawqtool.formats import is_quantized
from hawqtool.hvp import SplitHessian
from hawqtool.interactions import output_terms
from hawqtool.quantizer import quant_error

DEFAULTS = ["hessian.device=cpu", "data.kwargs.calibration=16", "hessian.max_probes=4"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", default="minilm")
    ap.add_argument("--keys", type=int, default=0, help="only the first N keys (0: all)")
    ap.add_argument("--set", action="append", default=[], help="a recipe override key=value")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    ws = pipeline.load(args.recipe, overrides=[*DEFAULTS, *args.set])
    options, _ = pipeline.frontier(ws, table=pipeline.analyze(ws, progress=False), progress=False)
    clip = ws.export_settings.clip_search
    deltas = {
        (f, o.format): quant_error(ws.prepared.weight(f), o.format, clip_search=clip)
        for f in options.layers
        for o in options.options[f]
        if is_quantized(o.format)
    }
    if args.keys:
        deltas = dict(list(deltas.items())[: args.keys])
    hessian = SplitHessian(ws.prepared, ws.calibration, ws.loss_fn, device=ws.recipe.hessian.device)
    print(
        f"{args.recipe}: {len(deltas)} keys, {len(hessian.batches)} batches, {torch.get_num_threads()} threads"
    )
    runs = {}
    for replay in (False, True):
        t0 = time.perf_counter()
        runs[replay] = output_terms(hessian, deltas, progress=False, replay=replay)
        print(
            f"replay={replay!s:5}  {time.perf_counter() - t0:7.1f} s  "
            f"replayed share of module calls {runs[replay].replayed_fraction:.3f}"
        )
    off, on = runs[False], runs[True]
    for name in ("gram", "linear", "own_loss"):
        a, b = getattr(off, name), getattr(on, name)
        scale = max(float(np.abs(a).max()), 1e-30)
        print(f"max |{name} difference| / max |{name}| = {float(np.abs(a - b).max()) / scale:.2e}")


if __name__ == "__main__":
    main()
