"""Latency tables with and without pooling layers that run the same kernels, side by side.

A search under ``cost: latency`` takes, for each layer, the format with the lowest predicted
latency, and with it the luckiest timing: one layer's delta is a difference of two noisy timings.
:func:`hawqtool.costs.pool_deltas` shrinks each delta toward those of the layers with its kernel
signature. This bench measures one latency table per model and batch (context ``both``, 1 thread,
CPU time, as ``bench_latency.py``) and compares the table as measured (``raw``,
:meth:`~hawqtool.costs.LatencyTable.unpooled`) with the pooled one on models timed side by side in
interleaved rounds:

- every uniform model (each layer that can in one format) and ``--random`` random allocations:
  Spearman and median |error| of each table's prediction against the measured latency;
- ``--picks`` constrained picks: a random quarter, half or none of the layers forced to float (a
  stand-in for what an accuracy budget forbids), every other layer in its predicted-fastest format
  under each table; the two picks of one constraint are timed in the same rounds, and their
  difference is paired by round (resolved when beyond twice its standard error).

Usage: ``python scripts/bench_pooling.py [--models resnet20,minilm] [--batches 1] [--formats ...]``
(model keys, formats and batches as in ``bench_latency.py``; MiniLM's formats there are the
static ones, ``--formats int8-d,int7-d,int8,int8-w,int4-b32,float`` adds the dynamic ones).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from scipy.stats import spearmanr

from hawqtool import pipeline
from hawqtool.cache import cache_dir
from hawqtool.latency import LatencySettings, LatencyTable, measure_latency, time_interleaved

sys.path.insert(0, str(Path(__file__).parent))
from bench_latency import MODELS, THREADS, batch_feeds, setup


def fastest(table: LatencyTable, forced: set[str]) -> dict[str, str]:
    """Each layer in its predicted-fastest format, those in ``forced`` float."""
    return {
        f: "float" if f in forced else min(row, key=lambda k: row[k].delta_ms)
        for f, row in table.entries.items()
    }


def run(key: str, batch: int, args: argparse.Namespace) -> None:
    bench = MODELS[key]
    formats = tuple(args.formats.split(",")) if args.formats else bench.formats
    ws = pipeline.load(bench.recipe)
    exp = pipeline.exporter(ws)
    feeds = batch_feeds(ws, batch)
    t0 = time.perf_counter()
    pooled = measure_latency(
        exp,
        feeds,
        formats=formats,
        settings=LatencySettings(threads=THREADS, clock="cpu", runs=args.runs),
        cache_dir=None if args.fresh else cache_dir() / "latency",
    )
    raw = pooled.unpooled()
    tables = {"raw": raw, "pooled": pooled}
    layers = list(pooled.entries)
    rng = np.random.default_rng(args.seed)
    allocs: dict[str, Mapping[str, str]] = {"float": {}}
    for fmt in formats:
        if fmt != "float":
            allocs[f"all {fmt}"] = {f: fmt for f in layers if fmt in pooled.entries[f]}
    for i in range(args.random):
        allocs[f"random {i}"] = {f: str(rng.choice(list(pooled.entries[f]))) for f in layers}
    scored = list(allocs)
    for i in range(args.picks):
        forced = {str(f) for f in rng.choice(layers, size=len(layers) // 4 * (i % 3), replace=False)}
        for name, table in tables.items():
            allocs[f"pick {i} {name}"] = fastest(table, forced)
    timed = time_interleaved(
        {k: exp.quantized_model(a).SerializeToString() for k, a in allocs.items()},
        feeds,
        threads=THREADS,
        rounds=args.rounds,
        runs=args.timing_runs,
        clock="cpu",
    )
    print(
        f"\n## {key}, batch {batch} ({' × '.join(map(str, next(iter(feeds.values())).shape))}): "
        f"{len(layers)} layers, formats {'/'.join(formats)}; table {time.perf_counter() - t0:.0f} s "
        f"(float {pooled.float_ms:.3f} ms)\n"
    )
    print("| model | measured ms | predicted raw | predicted pooled |\n|---|---|---|---|")
    for k, a in allocs.items():
        t = timed[k]
        print(
            f"| {k} | {t.median_ms:.3f} ± {t.stderr_ms:.3f} | {raw.predict(a):.3f} | {pooled.predict(a):.3f} |"
        )
    for name, table in tables.items():
        for subset, keys in (("uniform + random", scored), ("all", list(allocs))):
            meas = [timed[k].median_ms for k in keys]
            pred = [table.predict(allocs[k]) for k in keys]
            err = statistics.median(abs(p / m - 1) for p, m in zip(pred, meas, strict=True))
            print(
                f"{name}: {subset} ({len(keys)} models): Spearman {spearmanr(pred, meas).statistic:.3f}, "
                f"median |error| {100 * err:.1f} %"
            )
    for i in range(args.picks):
        d, se, verdict = timed[f"pick {i} pooled"].compare(timed[f"pick {i} raw"])
        p_raw = raw.predict(allocs[f"pick {i} raw"])
        p_pool = pooled.predict(allocs[f"pick {i} pooled"])
        verdict = "within noise" if verdict == "within noise" else "resolved"
        print(
            f"pick {i} ({len(layers) // 4 * (i % 3)} layers float): pooled − raw {d:+.3f} ± {se:.3f} ms "
            f"({verdict}); raw predicted {p_raw:.3f} for {timed[f'pick {i} raw'].median_ms:.3f}, pooled "
            f"{p_pool:.3f} for {timed[f'pick {i} pooled'].median_ms:.3f}"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="resnet20,minilm", help=f"of {', '.join(MODELS)}")
    ap.add_argument("--batches", default=None, help="timed batch sizes (default: each model's own)")
    ap.add_argument("--formats", default=None, help="candidate formats (default: each model's own)")
    ap.add_argument("--runs", type=int, default=10, help="paired runs per latency-table variant")
    ap.add_argument("--random", type=int, default=8, help="random allocations")
    ap.add_argument("--picks", type=int, default=6, help="constrained predicted-fastest picks per table")
    ap.add_argument("--rounds", type=int, default=12, help="interleaved rounds")
    ap.add_argument("--timing-runs", type=int, default=5, help="runs per model per round")
    ap.add_argument("--fresh", action="store_true", help="measure the latency tables again (no cache)")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    for key in setup(ap, args.models):
        batches = [int(b) for b in args.batches.split(",")] if args.batches else MODELS[key].batches
        for b in batches:
            run(key, b, args)


if __name__ == "__main__":
    main()
