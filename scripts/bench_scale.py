"""Scale-out benchmark of the Hessian stage: fewer HVPs for the same error, and data parallelism.

On ResNet-20 and the zoo transformer (digits, 512 calibration images in batches of 128, the
default recipes' data), in one run:

1. **Cost per part** (measured before changing anything): one forward + first backward, then one
   second backward per layer with 1 probe, 4 probes in a loop, 4 probes in one vmapped backward
   (``is_grads_batched``), at sub-batches of 128 and 64.
2. **Reference**: a long fixed-length run (no stopping rule, another seed): every epoch's per-part
   samples are kept; its mean is the reference trace, its standard error is printed.
3. **Schedules to rel_tol 5 %**: today's (sub-batch 128, 1 probe per part, 16-epoch floor) against
   each reduction tried (floor 8, sub-batches 64 and 32, 4 probes per part in one vmapped backward),
   each with ``--seeds`` seeds: HVPs, seconds, |relative error| against the reference (mean and
   max over layers and seeds) and the share of layers within 2 combined standard errors.
4. **Floor bias test**: the stopping rule replayed many times on epochs resampled from the
   reference's own samples (their mean is the truth of the replay): mean relative bias, share within
   2 and beyond 4 standard errors, and epochs, for floors of 16, 8 and 4 epochs.
5. **Data parallel**: traces with 1, 2 and 4 CPU processes (gloo, the environment torchrun gives):
   wall time of the stage, speed-up, peak RSS per process, largest relative difference from 1
   process. Threads per process: cores // processes (at least 1).

    python scripts/bench_scale.py [--quick] [--models resnet20 transformer] [--seeds 2]

Timings on a shared, loaded CPU are noisy: schedules are compared in CPU seconds of this process
(``time.process_time``), which other jobs on the machine barely change; wall seconds are shown too.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from hawqtool import hessian, zoo
from hawqtool.hessian import EpochSampler, _LayerState, estimate_traces
from hawqtool.hvp import SplitHessian
from hawqtool.prepare import PreparedModel, prepare_model

MODELS: dict[str, Callable[[], torch.nn.Module]] = {
    "resnet20": zoo.resnet20_digits,
    "transformer": zoo.transformer_digits,
}
REL_TOL = 0.05


def _load(name: str) -> tuple[PreparedModel, list]:
    calib = zoo.digits(batch_size=128, calibration_size=512).calibration
    return prepare_model(MODELS[name](), calib[0][0]), calib


@contextlib.contextmanager
def _floor(epochs: int) -> Iterator[None]:
    saved = hessian.MIN_EPOCHS
    hessian.MIN_EPOCHS = epochs
    try:
        yield
    finally:
        hessian.MIN_EPOCHS = saved


# --------------------------------------------------------------------------------------------
# 1. cost per part
# --------------------------------------------------------------------------------------------


def cost_per_part(prepared: PreparedModel, calib: list, sub: int, reps: int = 3) -> str:
    H = SplitHessian(prepared, calib, F.cross_entropy, device="cpu")
    x, y = H.batches[0]
    x, y = x[:sub], y[:sub]
    params = [H.params[f] for f in H.fqns]
    gen = torch.Generator().manual_seed(0)

    def rad(shape: Sequence[int]) -> torch.Tensor:
        return torch.randint(0, 2, tuple(shape), generator=gen).float().mul_(2).sub_(1)

    best: dict[str, float] = {}
    for _ in range(reps):
        t = time.process_time()
        grads = torch.autograd.grad(H.batch_loss(x, y), params, create_graph=True)
        times = {"first": time.process_time() - t}
        for label, probes, batched in (("x1", 1, False), ("x4 loop", 4, False), ("x4 vmap", 4, True)):
            t = time.process_time()
            for p, g in zip(params, grads, strict=True):
                if batched:
                    z = rad((probes, *p.shape))
                    torch.autograd.grad(g, p, grad_outputs=z, retain_graph=True, is_grads_batched=True)
                else:
                    for _ in range(probes):
                        torch.autograd.grad(g, p, grad_outputs=rad(p.shape), retain_graph=True)
            times[label] = time.process_time() - t
        for k, v in times.items():
            best[k] = min(best.get(k, math.inf), v)
        del grads
    ms = {k: 1e3 * v for k, v in best.items()}
    return (
        f"  sub-batch {sub:3d}: CPU time: forward + first backward {ms['first']:7.1f} ms | second backward, all "
        f"{len(params)} layers: 1 probe {ms['x1']:7.1f} ms, 4 in a loop {ms['x4 loop']:7.1f} ms, "
        f"4 vmapped {ms['x4 vmap']:7.1f} ms | share of the first backward in a 1-probe part "
        f"{ms['first'] / (ms['first'] + ms['x1']):.0%}"
    )


# --------------------------------------------------------------------------------------------
# 2. reference, 3. schedules
# --------------------------------------------------------------------------------------------


@dataclass
class Reference:
    fqns: list[str]
    trace: list[float]
    stderr: list[float]
    epochs: list[list[tuple[list[float], list[float]]]]  # per layer: (part values, weights) per epoch
    seconds: float


def reference(prepared: PreparedModel, calib: list, epochs: int, seed: int = 10_000) -> Reference:
    H = SplitHessian(prepared, calib, F.cross_entropy, device="cpu")
    sampler = EpochSampler(H, sub_batch=128, seed=seed)
    fqns = list(H.fqns)
    rec: list[list[tuple[list[float], list[float]]]] = [[] for _ in fqns]
    t0 = time.perf_counter()
    for _ in range(epochs):
        values, weights = sampler.sample(fqns)
        for j, v in enumerate(values):
            rec[j].append((v, weights))
    seconds = time.perf_counter() - t0
    trace, stderr = [], []
    for r in rec:
        xs = [math.fsum(w * v for w, v in zip(ws, vs, strict=True)) for vs, ws in r]
        trace.append(statistics.fmean(xs))
        stderr.append(statistics.stdev(xs) / math.sqrt(len(xs)))
    return Reference(fqns, trace, stderr, rec, seconds)


@dataclass
class Schedule:
    label: str
    sub_batch: int = 128
    probes_per_part: int = 1
    floor: int = 16


SCHEDULES = [
    Schedule("today: sub-batch 128, 1 probe/part, floor 16"),
    Schedule("floor 8 epochs", floor=8),
    Schedule("sub-batch 64", sub_batch=64),
    Schedule("sub-batch 32", sub_batch=32),
    Schedule("4 probes/part, one vmapped backward", probes_per_part=4),
]


def run_schedule(
    prepared: PreparedModel, calib: list, ref: Reference, s: Schedule, seeds: Sequence[int]
) -> str:
    hvps, secs, cpu, errs, within = [], [], [], [], []
    for seed in seeds:
        cpu0 = time.process_time()
        with _floor(s.floor):
            table = estimate_traces(
                prepared,
                calib,
                F.cross_entropy,
                seed=seed,
                rel_tol=REL_TOL,
                device="cpu",
                sub_batch=s.sub_batch,
                probes_per_part=s.probes_per_part,
                progress=False,
            )
        cpu.append(time.process_time() - cpu0)
        hvps.append(table.hvps)
        secs.append(table.seconds)
        for row, t, se in zip(table.layers, ref.trace, ref.stderr, strict=True):
            errs.append(abs(row.trace - t) / abs(t))
            within.append(abs(row.trace - t) <= 2 * math.hypot(row.stderr, se))
    return (
        f"  {s.label:42s} HVPs {statistics.fmean(hvps):6.0f}  CPU s {statistics.fmean(cpu):6.1f} "
        f"(wall {statistics.fmean(secs):6.1f})  "
        f"|rel err| mean {statistics.fmean(errs):5.1%} max {max(errs):5.1%}  "
        f"within 2 se {sum(within) / len(within):4.0%}"
    )


# --------------------------------------------------------------------------------------------
# 4. floor bias test (replay of the stopping rule on resampled epochs)
# --------------------------------------------------------------------------------------------


def replay(ref: Reference, floor: int, replicas: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    parts = len(ref.epochs[0][0][1])
    max_epochs = 1000 // parts
    min_epochs = max(2, math.ceil(hessian.MIN_PART_SAMPLES / parts), math.ceil(16 / parts))
    tiny = hessian.TINY_TRACE * statistics.fmean(abs(t) for t in ref.trace)
    bias, within2, beyond4, epochs = [], [], [], []
    with _floor(floor):
        for j, truth in enumerate(ref.trace):
            record = ref.epochs[j]
            for _ in range(replicas):
                st = _LayerState(ref.fqns[j], 1, target=min_epochs, random_parts=True)
                while not st.done:
                    st.add(*rng.choice(record))
                    if st.n >= st.target:
                        st.check(floor=tiny, rel_tol=REL_TOL, max_epochs=max_epochs)
                r = st.result()
                bias.append((r.trace - truth) / abs(truth))
                z = abs(r.trace - truth) / r.stderr if r.stderr > 0 else math.inf
                within2.append(z <= 2)
                beyond4.append(z > 4)
                epochs.append(st.n)
    n = len(bias)
    return (
        f"  floor {floor:2d} epochs: mean relative bias {statistics.fmean(bias):+6.2%}, |error| mean "
        f"{statistics.fmean(abs(b) for b in bias):5.2%}, within 2 se {sum(within2) / n:5.1%}, beyond 4 se "
        f"{sum(beyond4) / n:5.2%}, epochs per layer {statistics.fmean(epochs):5.1f}"
    )


# --------------------------------------------------------------------------------------------
# 5. data parallel
# --------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def data_parallel(name: str, worlds: Sequence[int]) -> list[str]:
    cores = os.cpu_count() or 1
    lines, base = [], None
    for world in worlds:
        port = _free_port()
        with tempfile.TemporaryDirectory() as tmp:
            env = {
                **os.environ,
                "WORLD_SIZE": str(world),
                "LOCAL_WORLD_SIZE": str(world),
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": str(port),
                "OMP_NUM_THREADS": str(max(1, cores // world)),
                "OMP_WAIT_POLICY": "PASSIVE",
            }
            procs = [
                subprocess.Popen(
                    [sys.executable, __file__, "--worker", name, str(Path(tmp) / f"rank{r}.json")],
                    env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                )
                for r in range(world)
            ]
            codes = [p.wait() for p in procs]
            if any(codes):
                lines.append(f"  {world} process(es): failed with exit codes {codes}")
                continue
            ranks = [json.loads((Path(tmp) / f"rank{r}.json").read_text()) for r in range(world)]
        wall = max(r["seconds"] for r in ranks)
        traces = ranks[0]["traces"]
        if base is None:
            base = (wall, traces)
        diff = max(abs(a - b) / max(abs(a), 1e-30) for a, b in zip(base[1], traces, strict=True))
        rss = max(r["peak_rss_mib"] for r in ranks)
        cpu = sum(r["cpu"] for r in ranks)
        lines.append(
            f"  {world} process(es) x {max(1, cores // world)} thread(s): {wall:6.1f} s wall ({cpu:6.1f} CPU s over all ranks), speed-up "
            f"{base[0] / wall:4.2f}x, peak RSS per process {rss:6.0f} MiB, HVPs {ranks[0]['hvps']}, "
            f"largest relative difference from 1 process {diff:.1e}"
        )
    return lines


def worker(name: str, out: str) -> None:
    from hawqtool import distributed

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    distributed.init_from_env()
    try:
        prepared, calib = _load(name)
        start, cpu0 = time.perf_counter(), time.process_time()
        table = estimate_traces(
            prepared, calib, F.cross_entropy, rel_tol=REL_TOL, device="cpu", progress=False
        )
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu0
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
        Path(out).write_text(
            json.dumps(
                {
                    "seconds": seconds,
                    "cpu": cpu,
                    "traces": [r.trace for r in table.layers],
                    "hvps": table.hvps,
                    "peak_rss_mib": peak,
                }
            )
        )
    finally:
        distributed.shutdown()


# --------------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--seeds", type=int, default=2, help="seeds per schedule")
    ap.add_argument("--ref-epochs", type=int, default=64, help="epochs of the reference run")
    ap.add_argument("--replicas", type=int, default=400, help="replays per layer in the floor test")
    ap.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--quick", action="store_true", help="1 seed, 24 reference epochs, 100 replays")
    ap.add_argument("--skip", nargs="*", default=[], choices=["cost", "schedules", "floor", "parallel"])
    ap.add_argument("--worker", nargs=2, metavar=("MODEL", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(*args.worker)
        return
    if args.quick:
        args.seeds, args.ref_epochs, args.replicas = 1, 24, 100
    cores = os.cpu_count() or 1
    torch.set_num_threads(min(2, cores))
    print(
        f"bench_scale: {cores} CPU core(s) (a shared VM: other jobs run beside this one), torch "
        f"{torch.__version__}, {torch.get_num_threads()} threads, rel_tol {REL_TOL}, seeds "
        f"{args.seeds}, reference {args.ref_epochs} epochs",
        flush=True,
    )
    for name in args.models:
        prepared, calib = _load(name)
        print(f"\n== {name}: {len(prepared.fqns)} layers, {sum(len(y) for _, y in calib)} images", flush=True)
        if "cost" not in args.skip:
            print("cost per part (best of 3):", flush=True)
            for sub in (128, 64):
                print(cost_per_part(prepared, calib, sub), flush=True)
        if "schedules" in args.skip and "floor" in args.skip:
            continue
        ref = reference(prepared, calib, args.ref_epochs)
        rel = sorted(se / abs(t) for se, t in zip(ref.stderr, ref.trace, strict=True))
        print(
            f"reference: {args.ref_epochs} epochs x 4 parts, {ref.seconds:.0f} s; its relative stderr "
            f"median {statistics.median(rel):.1%}, max {rel[-1]:.1%}",
            flush=True,
        )
        if "schedules" not in args.skip:
            print(f"schedules to rel_tol {REL_TOL:.0%} (mean over {args.seeds} seed(s)):", flush=True)
            for s in SCHEDULES:
                print(run_schedule(prepared, calib, ref, s, range(args.seeds)), flush=True)
        if "floor" not in args.skip:
            print(
                f"floor bias test ({args.replicas} replays per layer on the reference's epochs):", flush=True
            )
            for floor in (16, 8, 4):
                print(replay(ref, floor, args.replicas), flush=True)
    if "parallel" not in args.skip:
        for name in args.models:
            print(f"\n== data parallel, {name} (gloo on CPU; {cores} cores, so 4 processes oversubscribe):")
            for line in data_parallel(name, args.worlds):
                print(line, flush=True)


if __name__ == "__main__":
    main()
