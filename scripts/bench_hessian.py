"""Benchmark per-layer Hessian trace estimators on ResNet-20 / digits (512 calibration images).

Side by side, in one run, each until every layer's trace reaches ``rel_tol`` relative standard error:

  (a) hawqtool's ``estimate_traces`` (shared-graph rounds on random sub-batches, checkpoint stopping);
  (b) layer-at-a-time Hutchinson: the full 512-image batch, one single-layer HVP per probe, round-robin
      over the layers that have not converged, each stopping on its own stderr;
  (c) plain Hutchinson with one all-layer HVP per probe (capped in time);
  plus PyHessian-style whole-model trace (stop when the running mean changes by < 1e-3) for reference.

Every estimate is compared with a long pooled reference (fixed probe count, a different seed, no
sequential stopping, so unbiased). Timings on a shared CPU are noisy: trust ratios more than seconds.

    python scripts/bench_hessian.py [--device cpu|cuda] [--quick] [--threads N]
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from hawqtool import zoo
from hawqtool.hessian import estimate_traces
from hawqtool.hvp import SplitHessian
from hawqtool.prepare import PreparedModel, prepare_model


@dataclass
class Run:
    name: str
    seconds: float
    hvps: int
    traces: list[float]
    stderrs: list[float]
    converged: list[bool]
    note: str = ""
    projected_s: float | None = None  # when capped: seconds projected to converge every layer


def rademacher(t: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    return torch.randint(0, 2, t.shape, generator=gen, device=t.device, dtype=t.dtype).mul_(2).sub_(1)


def _stats(xs: Sequence[float]) -> tuple[float, float]:
    n = len(xs)
    m = math.fsum(xs) / n
    var = math.fsum((x - m) ** 2 for x in xs) / (n - 1) if n > 1 else math.inf
    return m, math.sqrt(var / n)


def _done(xs: Sequence[float], rel_tol: float, min_probes: int) -> bool:
    if len(xs) < min_probes:
        return False
    m, se = _stats(xs)
    return se <= rel_tol * abs(m)


def layer_at_a_time(
    H: SplitHessian, fqns: Sequence[str], *, rel_tol: float, min_probes: int, max_probes: int, seed: int
) -> Run:
    """(b): full batch, one single-layer HVP per probe, round-robin, each layer stops on its own stderr."""
    gen = torch.Generator(device=H.device).manual_seed(seed)
    samples: dict[str, list[float]] = {f: [] for f in fqns}
    hvps = 0
    start = time.perf_counter()
    while True:
        todo = [
            f for f in fqns if not _done(samples[f], rel_tol, min_probes) and len(samples[f]) < max_probes
        ]
        if not todo:
            break
        for f in todo:
            z = rademacher(H.params[f], gen)
            hz = H.hvp({f: z}, wrt=[f])[f]
            samples[f].append(float((hz * z).sum(dtype=torch.float64)))
            hvps += 1
    seconds = time.perf_counter() - start
    st = [_stats(samples[f]) for f in fqns]
    return Run(
        "(b) layer-at-a-time, full batch",
        seconds,
        hvps,
        [m for m, _ in st],
        [s for _, s in st],
        [_done(samples[f], rel_tol, min_probes) for f in fqns],
    )


def all_layer(
    H: SplitHessian, fqns: Sequence[str], *, rel_tol: float, min_probes: int, cap_s: float, seed: int
) -> Run:
    """(c): one all-layer HVP per probe; every layer's sample carries cross-layer terms."""
    gen = torch.Generator(device=H.device).manual_seed(seed)
    samples: dict[str, list[float]] = {f: [] for f in fqns}
    hvps = 0
    start = time.perf_counter()
    capped = False
    while not all(_done(samples[f], rel_tol, min_probes) for f in fqns):
        if time.perf_counter() - start > cap_s:
            capped = True
            break
        z = {f: rademacher(H.params[f], gen) for f in fqns}
        hz = H.hvp(z)
        for f in fqns:
            samples[f].append(float((hz[f] * z[f]).sum(dtype=torch.float64)))
        hvps += 1
    seconds = time.perf_counter() - start
    st = [_stats(samples[f]) for f in fqns]
    note = ""
    projected = None
    if capped:
        # Probes every layer would need at its current variance, the slowest one deciding.
        need = max(
            (s * math.sqrt(hvps)) ** 2 / (rel_tol * abs(m)) ** 2 if m != 0 else math.inf for m, s in st
        )
        done = sum(_done(samples[f], rel_tol, min_probes) for f in fqns)
        projected = need * seconds / hvps
        note = (
            f"HIT THE {cap_s:.0f} s CAP after {hvps} probes with {done}/{len(fqns)} layers converged; "
            f"~{need:.0f} probes (~{need * seconds / hvps:.0f} s) projected for all layers"
        )
    return Run(
        "(c) one all-layer HVP per probe",
        seconds,
        hvps,
        [m for m, _ in st],
        [s for _, s in st],
        [_done(samples[f], rel_tol, min_probes) for f in fqns],
        note,
        projected,
    )


def pyhessian_style(
    H: SplitHessian, fqns: Sequence[str], *, seed: int, tol: float = 1e-3
) -> tuple[float, int, float]:
    """PyHessian's ``trace(maxIter=100, tol=1e-3)`` loop, over the quantizable weights."""
    gen = torch.Generator(device=H.device).manual_seed(seed)
    samples: list[float] = []
    prev = 0.0
    start = time.perf_counter()
    for _ in range(100):
        z = {f: rademacher(H.params[f], gen) for f in fqns}
        hz = H.hvp(z)
        samples.append(sum(float((hz[f] * z[f]).sum(dtype=torch.float64)) for f in fqns))
        mean = statistics.fmean(samples)
        if abs(mean - prev) / (abs(prev) + 1e-6) < tol:
            break
        prev = mean
    return time.perf_counter() - start, len(samples), statistics.fmean(samples)


def median_time(fn: Callable[[], object], repeats: int = 5) -> float:
    fn()
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def report(
    run: Run, ref: Sequence[float], ref_se: Sequence[float], fqns: Sequence[str], *, verbose: bool
) -> None:
    errs = [(t - r) / r for t, r in zip(run.traces, ref, strict=True)]
    z_own = [
        abs(t - r) / s if s > 0 else math.inf for t, r, s in zip(run.traces, ref, run.stderrs, strict=True)
    ]
    z_comb = [
        abs(t - r) / math.hypot(s, rs)
        for t, r, s, rs in zip(run.traces, ref, run.stderrs, ref_se, strict=True)
    ]
    n = len(errs)
    bias = statistics.fmean(errs)
    bias_se = statistics.stdev(errs) / math.sqrt(n)
    print(f"{run.name}: {run.seconds:.1f} s, {run.hvps} HVPs, {sum(run.converged)}/{n} layers converged")
    if run.note:
        print(f"    {run.note}")
    print(
        f"    error vs reference: median |err| {100 * statistics.median(map(abs, errs)):.1f} %, "
        f"max {100 * max(map(abs, errs)):.1f} %, mean signed {100 * bias:+.2f} % ± {100 * bias_se:.2f} %"
    )
    print(
        f"    coverage: {sum(z <= 2 for z in z_own)}/{n} within 2 of its own stderr, "
        f"{sum(z <= 2 for z in z_comb)}/{n} within 2 combined (own ⊕ reference) stderr"
    )
    if verbose:
        for f, t, s, r, e in zip(fqns, run.traces, run.stderrs, ref, errs, strict=True):
            rel = 100 * s / abs(t)
            print(f"      {f:22s} {t:9.4f} ± {s:7.4f} ({rel:4.1f} %)  ref {r:8.4f}  err {100 * e:+5.1f} %")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--quick", action="store_true", help="rel_tol 0.10, shorter cap and reference (< 2 min)")
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1), help="torch CPU threads")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--verbose", action="store_true", help="print every layer's estimate")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rel_tol = 0.10 if args.quick else 0.05
    cap_s = 20.0 if args.quick else 150.0
    ref_probes = 300 if args.quick else 1000
    min_probes, max_probes = 16, 1000

    calib = zoo.digits(batch_size=512).calibration
    prepared: PreparedModel = prepare_model(zoo.resnet20_digits(), calib[0][0])
    fqns = prepared.fqns
    H = SplitHessian(prepared, calib, F.cross_entropy, device=args.device)
    x, y = H.batches[0]
    print(
        f"ResNet-20 / digits, {H.n} calibration images, {len(fqns)} layers, device {H.device}, "
        f"{args.threads} torch threads, rel_tol {rel_tol}, min_probes {min_probes}"
    )

    def fwd_bwd(n: int) -> Callable[[], object]:
        params = list(H.params.values())
        return lambda: torch.autograd.grad(H.batch_loss(x[:n], y[:n]), params)

    t_fb = median_time(fwd_bwd(H.n))
    t_fb128 = median_time(fwd_bwd(128))
    print(f"forward+backward: {1e3 * t_fb:.1f} ms on 512 images, {1e3 * t_fb128:.1f} ms on 128", flush=True)

    t0 = time.perf_counter()
    a = estimate_traces(
        prepared,
        calib,
        F.cross_entropy,
        seed=args.seed,
        rel_tol=rel_tol,
        min_probes=min_probes,
        max_probes=max_probes,
        device=args.device,
        sub_batch=128,
        progress=False,
    )
    run_a = Run(
        "(a) hawqtool estimate_traces (sub_batch 128)",
        time.perf_counter() - t0,
        a.hvps,
        [r.trace for r in a],
        [r.stderr for r in a],
        [r.converged for r in a],
    )
    print(f"  done {run_a.name}: {run_a.seconds:.1f} s", flush=True)
    run_b = layer_at_a_time(
        H, fqns, rel_tol=rel_tol, min_probes=min_probes, max_probes=max_probes, seed=args.seed
    )
    print(f"  done {run_b.name}: {run_b.seconds:.1f} s", flush=True)
    run_c = all_layer(H, fqns, rel_tol=rel_tol, min_probes=min_probes, cap_s=cap_s, seed=args.seed)
    print(f"  done {run_c.name}: {run_c.seconds:.1f} s", flush=True)
    py_s, py_n, py_trace = pyhessian_style(H, fqns, seed=args.seed)
    print(f"  done PyHessian-style: {py_s:.1f} s; now the reference ...", flush=True)

    t0 = time.perf_counter()
    # A fixed probe count never "converges" at rel_tol≈0; that warning is expected here.
    logging.getLogger("hawqtool.hessian").setLevel(logging.ERROR)
    ref = estimate_traces(
        prepared,
        calib,
        F.cross_entropy,
        seed=10_000 + args.seed,
        rel_tol=1e-9,
        min_probes=ref_probes,
        max_probes=ref_probes,
        device=args.device,
        sub_batch=128,
        progress=False,
    )
    ref_s = time.perf_counter() - t0
    ref_t = [r.trace for r in ref]
    ref_se = [r.stderr for r in ref]
    rel_ref = [s / abs(t) for t, s in zip(ref_t, ref_se, strict=True)]
    print(
        f"reference: {ref_probes} probes per layer ({ref.hvps} single-layer HVPs on random 128-image "
        f"sub-batches, seed {10_000 + args.seed}, fixed count, no sequential stopping) in {ref_s:.0f} s; "
        f"its relative stderr {100 * min(rel_ref):.1f}–{100 * max(rel_ref):.1f} %"
    )
    print()
    for run in (run_a, run_b, run_c):
        report(run, ref_t, ref_se, fqns, verbose=args.verbose)
    total = math.fsum(ref_t)
    total_se = math.sqrt(math.fsum(s * s for s in ref_se))
    print(
        f"PyHessian-style whole-model trace: {py_s:.1f} s, {py_n} all-layer HVPs, {py_trace:.3f} vs ref. "
        f"Σ traces {total:.3f} ± {total_se:.3f} (error {100 * (py_trace - total) / total:+.1f} %); "
        "no per-layer values or error bars"
    )
    print()
    c_s = run_c.projected_s or run_c.seconds
    c_how = f"projected {c_s:.0f} s" if run_c.projected_s else "measured"
    print(
        f"speed-up of (a): {run_b.seconds / run_a.seconds:.1f}× vs (b), "
        f"{c_s / run_a.seconds:.1f}× vs (c) ({c_how}), "
        f"{min(run_b.seconds, c_s) / run_a.seconds:.1f}× vs the better of (b) and (c)"
    )
    print(
        "seconds per HVP in units of one forward+backward on the same batch: "
        f"(a) {run_a.seconds / run_a.hvps / t_fb128:.2f} (128 images, incl. its share of the shared pass), "
        f"(b) {run_b.seconds / run_b.hvps / t_fb:.2f} (512), "
        f"(c) {run_c.seconds / run_c.hvps / t_fb:.2f} (512)"
    )


if __name__ == "__main__":
    main()
