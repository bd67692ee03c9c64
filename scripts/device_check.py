"""GPU check of the Hessian and dependency stages: CUDA results against CPU results.

For ResNet-20 (the ``default`` recipe) and the small transformer (``transformer-digits``):

- **traces**: ``estimate_traces`` on CPU and on CUDA (float32, same seed; the probes differ between
  devices, so they are compared statistically: every layer within 4 combined standard errors),
  then on CUDA in bfloat16 (reported, not judged: a half-precision Hessian carries its own
  rounding error) and with 4 probes per part in one vmapped backward (reported: HVPs and
  seconds against 1 probe, the measurement that decides whether that pays on a GPU);
- **dependency terms**: ``build_dependency_model`` on both devices (deterministic: gᵀΔ, ΔᵀHΔ and
  the measured loss changes within 1e-3 of their largest entry, TF32 off);
- **NCCL path**: a one-process ``torch.distributed`` group (``cpu:gloo,cuda:nccl``) runs the CUDA
  traces again through the all-reduces; they must equal the plain CUDA run (same probes) to 1e-6.

Each prints its seconds and peak GPU memory (``torch.cuda.max_memory_allocated``). Without a CUDA
device only the CPU half runs, and the script says "no CUDA device" and exits 0. Exit 1 when a
comparison fails.

    bash scripts/device_check.sh            # or: python scripts/device_check.py [--models default]
"""

from __future__ import annotations

import argparse
import math
import os
import socket
import sys
import time
from collections.abc import Callable
from typing import Any, TypeVar

import numpy as np
import torch

from hawqtool import distributed, pipeline
from hawqtool.dependency import DependencyModel, build_dependency_model
from hawqtool.errors import HawqError
from hawqtool.hessian import estimate_traces
from hawqtool.hvp import SplitHessian
from hawqtool.types import SensitivityTable

RECIPES = {"default": "ResNet-20", "transformer-digits": "transformer"}
T = TypeVar("T")
failures: list[str] = []


def timed(fn: Callable[[], T], device: str) -> tuple[T, float, float]:
    """(result, seconds, peak GPU MiB; NaN on CPU)."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    out = fn()
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t
    peak = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else math.nan
    return out, seconds, peak


def check(ok: bool, what: str) -> None:
    print(f"    {'ok  ' if ok else 'FAIL'} {what}", flush=True)
    if not ok:
        failures.append(what)


def traces(ws: Any, device: str, **kw: Any) -> SensitivityTable:
    return estimate_traces(
        ws.prepared,
        ws.calibration,
        ws.loss_fn,
        **{**pipeline.trace_settings(ws), "device": device},
        sub_batch=ws.recipe.hessian.sub_batch,
        progress=False,
        **kw,
    )


def compare_traces(a: SensitivityTable, b: SensitivityTable, label: str, *, judge: bool) -> None:
    z = [
        abs(x.trace - y.trace) / math.hypot(x.stderr, y.stderr) if x.stderr or y.stderr else 0.0
        for x, y in zip(a.layers, b.layers, strict=True)
    ]
    rel = [abs(x.trace - y.trace) / max(abs(x.trace), 1e-30) for x, y in zip(a.layers, b.layers, strict=True)]
    text = (
        f"{label}: {len(z)} layers, largest gap {max(z):.2f} combined standard errors "
        f"({sum(v > 2 for v in z)} beyond 2), largest relative difference {max(rel):.1%}"
    )
    if judge:
        check(max(z) <= 4.0, text)
    else:
        print(f"    info {text}", flush=True)


def dependency(ws: Any, options: Any, device: str) -> DependencyModel:
    hessian = SplitHessian(ws.prepared, ws.calibration, ws.loss_fn, device=device)
    return build_dependency_model(
        hessian, ws.prepared, options, clip_search=ws.recipe.allocation.clip_search, progress=False
    )


def compare_dependency(a: DependencyModel, b: DependencyModel) -> None:
    for name in ("linear", "matrix", "measured"):
        x, y = getattr(a, name), getattr(b, name)
        if x is None or y is None:
            continue
        scale = max(float(np.abs(x).max()), 1e-30)
        err = float(np.abs(x - y).max()) / scale
        check(
            err <= 1e-3,
            f"dependency {name} {x.shape}: CUDA vs CPU, largest difference {err:.1e} of its largest entry",
        )


def nccl_group() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(
        {
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "RANK": "0",
            "LOCAL_RANK": "0",
            "WORLD_SIZE": "1",
        }
    )
    torch.distributed.init_process_group(
        backend="cpu:gloo,cuda:nccl", init_method="env://", rank=0, world_size=1
    )


def run(recipe: str, cuda: bool) -> None:
    print(f"\n== {RECIPES.get(recipe, recipe)} ({recipe} recipe)", flush=True)
    ws = pipeline.load(recipe)
    print(
        f"  {len(ws.prepared.fqns)} layers, {sum(len(y) for _, y in ws.calibration)} calibration images",
        flush=True,
    )
    cpu, s, _ = timed(lambda: traces(ws, "cpu"), "cpu")
    print(f"  traces, CPU: {cpu.hvps} HVPs, {s:.1f} s", flush=True)
    options, _ = pipeline.frontier(ws, table=cpu, progress=False)
    dep_cpu, s, _ = timed(lambda: dependency(ws, options, "cpu"), "cpu")
    print(f"  dependency, CPU: {dep_cpu.hvps} HVPs + {dep_cpu.forward_passes} passes, {s:.1f} s", flush=True)
    if not cuda:
        return
    for step in (cuda_traces, cuda_dependency, nccl_traces):
        try:
            step(ws, cpu, dep_cpu, options)
        except (RuntimeError, HawqError) as e:  # report and go on: one short run checks everything
            check(False, f"{step.__name__} raised {type(e).__name__}: {e}")
            distributed.shutdown()


_gpu: dict[str, SensitivityTable] = {}


def cuda_traces(ws: Any, cpu: SensitivityTable, dep_cpu: DependencyModel, options: Any) -> None:
    gpu, s, peak = timed(lambda: traces(ws, "cuda"), "cuda")
    _gpu[ws.recipe.name] = gpu
    print(f"  traces, CUDA float32: {gpu.hvps} HVPs, {s:.1f} s, peak {peak:.0f} MiB", flush=True)
    compare_traces(cpu, gpu, "CUDA vs CPU traces", judge=True)
    half, s, peak = timed(lambda: traces(ws, "cuda", dtype="bfloat16"), "cuda")
    print(f"  traces, CUDA bfloat16: {half.hvps} HVPs, {s:.1f} s, peak {peak:.0f} MiB", flush=True)
    compare_traces(gpu, half, "bfloat16 vs float32 traces", judge=False)
    four, s4, peak = timed(lambda: traces(ws, "cuda", probes_per_part=4), "cuda")
    _, s1, _ = timed(lambda: traces(ws, "cuda", seed=ws.recipe.hessian.seed + 1), "cuda")
    print(
        f"  traces, CUDA 4 probes/part: {four.hvps} HVPs, {s4:.1f} s (1 probe/part, other seed: {s1:.1f} s), "
        f"peak {peak:.0f} MiB",
        flush=True,
    )
    compare_traces(gpu, four, "4 probes/part vs 1", judge=True)


def cuda_dependency(ws: Any, cpu: SensitivityTable, dep_cpu: DependencyModel, options: Any) -> None:
    dep_gpu, s, peak = timed(lambda: dependency(ws, options, "cuda"), "cuda")
    print(
        f"  dependency, CUDA: {dep_gpu.hvps} HVPs + {dep_gpu.forward_passes} passes, {s:.1f} s, peak {peak:.0f} MiB",
        flush=True,
    )
    compare_dependency(dep_cpu, dep_gpu)


def nccl_traces(ws: Any, cpu: SensitivityTable, dep_cpu: DependencyModel, options: Any) -> None:
    gpu = _gpu.get(ws.recipe.name)
    if gpu is None:
        check(False, "NCCL path: no plain CUDA run to compare with")
        return
    nccl_group()
    try:
        again, s, peak = timed(lambda: traces(ws, "cuda"), "cuda")
        rel = max(
            abs(a.trace - b.trace) / max(abs(a.trace), 1e-30)
            for a, b in zip(gpu.layers, again.layers, strict=True)
        )
        print(f"  traces through NCCL all-reduces (1 rank): {s:.1f} s, peak {peak:.0f} MiB", flush=True)
        check(
            distributed.is_initialized() and rel <= 1e-6, f"NCCL path equals the plain CUDA run ({rel:.1e})"
        )
    finally:
        distributed.shutdown()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=list(RECIPES), help="built-in recipe names")
    args = ap.parse_args()
    cuda = torch.cuda.is_available()
    if cuda:
        # Compare at float32 precision: TF32 convolutions would differ from CPU by ~1e-3 alone.
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        print(f"device_check: {torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
    else:
        print("device_check: no CUDA device: running the CPU half only", flush=True)
    torch.set_num_threads(min(16, os.cpu_count() or 1))
    for recipe in args.models:
        run(recipe, cuda)
    if not cuda:
        print("\nno CUDA device: CPU half done, nothing compared", flush=True)
        return 0
    print(f"\n{len(failures)} failed" + (": " + "; ".join(failures) if failures else ""), flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
