"""Data-parallel Hessian stages on torch.distributed (gloo, CPU), and bounded memory.

The multi-process tests start real processes with the environment torchrun gives its workers
(``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``), so they exercise the same
``env://`` rendezvous as ``torchrun --nproc_per_node=2``.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from hawqtool import distributed
from hawqtool.errors import UsageError
from hawqtool.hessian import estimate_traces, seed_of
from hawqtool.hvp import SplitHessian, resolve_dtype
from hawqtool.prepare import prepare_model

# One worker per rank: the zoo MLP on digits (handed over in a file, which spares each process the
# scikit-learn import), traces and the dependency stage's primitives (an HVP, the gradient, the
# loss), written by rank 0. Modes "raise" and "die" make rank 1 fail in the middle of the Hessian
# stage: with an exception, or by exiting without a word. The process group's timeout is far longer
# than the tests wait, so a rank that stops in time stopped because it was told, not timed out.
WORKER = r"""
import json, os, sys
import torch, torch.nn.functional as F
from hawqtool import distributed
from hawqtool.hessian import estimate_traces
from hawqtool.hvp import SplitHessian
from hawqtool.prepare import prepare_model

mode, data, out = sys.argv[1], sys.argv[2], sys.argv[3]
distributed.init_from_env(timeout=3600)
try:
    model, calib = torch.load(data, weights_only=False)
    prepared = prepare_model(model, calib[0][0])
    calls = [0]

    def loss_fn(outputs, targets):
        calls[0] += 1
        if distributed.rank() == 1 and calls[0] == 5 and mode in ("raise", "die"):
            print("FAILING NOW", file=sys.stderr, flush=True)
            if mode == "raise":
                raise RuntimeError("rank 1 fails on purpose")
            os._exit(3)
        return F.cross_entropy(outputs, targets)

    table = estimate_traces(
        prepared, calib, loss_fn, sub_batch=64, rel_tol=0.05, device="cpu", progress=False
    )
    H = SplitHessian(prepared, calib, F.cross_entropy, device="cpu")
    v = {f: torch.ones_like(H.params[f]) for f in prepared.fqns}
    hv = H.hvp(v)
    grad = H.grad()
    result = {
        "table": table.to_dict(),
        "hv": {f: t.flatten().tolist() for f, t in hv.items()},
        "grad": {f: t.flatten().tolist() for f, t in grad.items()},
        "loss": H.loss(),
        "world": distributed.world_size(),
    }
    if distributed.is_main():
        with open(out, "w") as fh:
            json.dump(result, fh)
finally:
    distributed.shutdown()
"""

SETTINGS = {"sub_batch": 64, "rel_tol": 0.05, "device": "cpu", "progress": False}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _rank_env(rank: int, world: int, port: int, **extra: str) -> dict[str, str]:
    return {
        **os.environ,
        "RANK": str(rank),
        "LOCAL_RANK": str(rank),
        "WORLD_SIZE": str(world),
        "LOCAL_WORLD_SIZE": str(world),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "OMP_NUM_THREADS": "1",
        "OMP_WAIT_POLICY": "PASSIVE",
        **extra,
    }


# Generous: on a loaded 2-core machine the ranks' start-up alone (importing torch twice) can take
# a minute. Far below the workers' process-group timeout (3600 s), which no test may rely on.
SPAWN_TIMEOUT_S = 900


def _spawn(
    cmd: list[str], world: int, *, timeout: float = SPAWN_TIMEOUT_S
) -> tuple[list[int], list[str], list[float]]:
    """Run ``cmd`` once per rank; returns exit codes, stderr texts and when each exited
    (``time.monotonic()``, for information: no test asserts on timings). A port that another
    process took between :func:`_free_port` and the rendezvous is retried on a fresh one."""
    for _attempt in range(3):
        codes, errs, ended = _spawn_once(cmd, world, timeout=timeout)
        if not any("EADDRINUSE" in e or "address already in use" in e.lower() for e in errs):
            break
    return codes, errs, ended


def _spawn_once(cmd: list[str], world: int, *, timeout: float) -> tuple[list[int], list[str], list[float]]:
    port = _free_port()
    ended: list[float | None] = [None] * world
    with contextlib.ExitStack() as stack:
        logs = [stack.enter_context(tempfile.TemporaryFile("w+")) for _ in range(world)]
        procs = [
            subprocess.Popen(cmd, env=_rank_env(r, world, port), stderr=logs[r], text=True)
            for r in range(world)
        ]
        deadline = time.monotonic() + timeout
        try:
            while None in ended and time.monotonic() < deadline:
                for r, p in enumerate(procs):
                    if ended[r] is None and p.poll() is not None:
                        ended[r] = time.monotonic()
                time.sleep(0.05)
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
        errs = []
        for f in logs:
            f.seek(0)
            errs.append(f.read())
    running = [r for r, t in enumerate(ended) if t is None]
    assert not running, f"ranks {running} still running after {timeout} s: {errs}"
    return [p.returncode for p in procs], errs, [t for t in ended if t is not None]


@pytest.fixture(scope="module")
def worker(tmp_path_factory: pytest.TempPathFactory, mlp_digits, digits_splits) -> list[str]:  # type: ignore[no-untyped-def]
    """The command that starts one worker, less its mode and output file."""
    folder = tmp_path_factory.mktemp("worker")
    (folder / "worker.py").write_text(WORKER)
    torch.save((mlp_digits, digits_splits.calibration), folder / "data.pt")
    return [sys.executable, str(folder / "worker.py")]


def _data_arg(cmd: list[str]) -> str:
    return str(Path(cmd[1]).with_name("data.pt"))


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(a), abs(b), 1e-30)


@pytest.mark.slow
def test_two_processes_give_the_traces_of_one(
    worker: list[str], tmp_path: Path, mlp_digits, digits_splits
) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "two.json"
    codes, errs, _ = _spawn([*worker, "ok", _data_arg(worker), str(out)], world=2)
    assert codes == [0, 0], errs
    two = json.loads(out.read_text())
    assert two["world"] == 2

    calib = digits_splits.calibration
    prepared = prepare_model(mlp_digits, calib[0][0])
    one = estimate_traces(prepared, calib, F.cross_entropy, **SETTINGS)  # type: ignore[arg-type]
    assert two["table"]["hvps"] == one.hvps
    for a, b in zip(one.layers, two["table"]["layers"], strict=True):
        assert (a.layer, a.probes, a.converged) == (b["layer"], b["probes"], b["converged"])
        assert _rel(a.trace, b["trace"]) <= 1e-6 and _rel(a.stderr, b["stderr"]) <= 1e-6

    # The dependency stage's primitives: sums over batches split across ranks, then all-reduced.
    H = SplitHessian(prepared, calib, F.cross_entropy, device="cpu")
    hv = H.hvp({f: torch.ones_like(H.params[f]) for f in prepared.fqns})
    grad = H.grad()
    assert _rel(H.loss(), two["loss"]) <= 1e-6
    for f in prepared.fqns:
        for mine, theirs in ((hv[f], two["hv"][f]), (grad[f], two["grad"][f])):
            scale = float(mine.abs().max())
            assert float((mine.flatten() - torch.tensor(theirs)).abs().max()) <= 1e-6 * scale


@pytest.mark.parametrize("mode", ["raise", "die"])
@pytest.mark.slow
def test_a_failing_rank_takes_every_rank_down(worker: list[str], tmp_path: Path, mode: str) -> None:
    # Every rank is gone well before the process group's timeout (3600 s): the healthy one was told.
    codes, errs, _ = _spawn([*worker, mode, _data_arg(worker), str(tmp_path / "x.json")], world=2)
    assert all(c != 0 for c in codes), (codes, errs)
    assert "FAILING NOW" in errs[1], errs
    if mode == "raise":
        assert "rank 1 fails on purpose" in errs[1]
        assert "rank(s) 1 failed in the Hessian stage" in errs[0]
    else:
        assert codes[1] == 3
        assert "DistributedError" in errs[0] and "another rank died" in errs[0]


SITECUSTOMIZE = r"""
import os, sys

_fd = os.open(os.environ["WRITE_LOG"], os.O_WRONLY | os.O_APPEND | os.O_CREAT)
_watch = tuple(os.environ["WRITE_WATCH"].split(os.pathsep))
_rank = os.environ.get("RANK", "-")


def _hook(event, args):
    if event == "open":
        path, mode, flags = args
        writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
            isinstance(flags, int) and flags & (os.O_WRONLY | os.O_RDWR)
        )
    elif event == "os.rename":
        path, writing = args[1], True
    else:
        return
    if writing and isinstance(path, (str, os.PathLike)):
        path = os.path.abspath(os.fspath(path))
        if path.startswith(_watch) and not os.path.basename(path).startswith("."):
            os.write(_fd, f"{_rank}\t{event}\t{path}\n".encode())


sys.addaudithook(_hook)
"""


@pytest.mark.slow
def test_cli_under_torchrun_writes_each_output_once(tmp_path: Path, hawqtool_cache: Path, mlp_digits) -> None:  # type: ignore[no-untyped-def]
    # An audit hook in every process logs each file opened for writing (or renamed into place)
    # under the output folder and the stage caches, with the rank that did it.
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(SITECUSTOMIZE)
    log = tmp_path / "writes.log"
    out = tmp_path / "out"
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "zoo").symlink_to(hawqtool_cache / "zoo")  # the trained MLP, not retrained per rank
    torchrun = Path(sys.executable).with_name("torchrun")
    hawqtool = Path(sys.executable).with_name("hawqtool")
    # --standalone: the rendezvous takes a free port (the default, 29500, collides with any other
    # torchrun on the machine, such as a second checkout's test run). The process group's timeout
    # is raised so that load (rank 0 loading while rank 1 waits) cannot trip it; nothing is timed.
    proc = subprocess.run(
        [
            str(torchrun),
            "--standalone",
            "--nproc_per_node=2",
            str(hawqtool),
            "quantize",
            "tiny",
            "--out",
            str(out),
            "-q",
        ],
        env={
            **os.environ,
            "PYTHONPATH": str(hook) + os.pathsep + os.environ.get("PYTHONPATH", ""),
            "WRITE_LOG": str(log),
            "WRITE_WATCH": os.pathsep.join([str(out), str(cache / "hessian"), str(cache / "dependency")]),
            "HAWQTOOL_CACHE": str(cache),
            "HAWQTOOL_DIST_TIMEOUT": "3600",
            "OMP_WAIT_POLICY": "PASSIVE",
            "OMP_NUM_THREADS": "1",
        },
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("budget met") == 1  # rank 0 alone reports
    rows = [line.split("\t") for line in log.read_text().splitlines()]
    assert rows, "the audit hook saw no writes"
    assert {rank for rank, _, _ in rows} == {"0"}, rows
    written: dict[str, int] = {}
    for _, _, path in rows:
        written[path] = written.get(path, 0) + 1
    for name in (
        "model.onnx",
        "report.json",
        "report.md",
        "sensitivity.csv",
        "sensitivity.json",
        "frontier.png",
    ):
        assert written.get(str(out / name)) == 1, (name, written)
    # frontier.csv: once with ΣΩ, once more re-scored by the dependency terms (as with one process).
    assert written.get(str(out / "frontier.csv")) == 2
    caches = [p for p in written if not p.startswith(str(out))]
    assert len(caches) == 2 and all(written[p] == 1 for p in caches), written  # traces, dependency


def test_hessian_memory_does_not_grow_with_the_split(digits_splits, mlp_digits) -> None:  # type: ignore[no-untyped-def]
    """Bytes of tensors the Hessian stage holds at its peak, for a split and the same split 8×.

    Measured with torch's own CPU allocator accounting (the profiler's ``profile_memory``: every
    allocation event carries the running total of bytes allocated since profiling began), so it
    counts exactly the tensors the stage creates, autograd's saved activations included, and not
    the data the caller already holds. With the whole split concatenated (the earlier sampler)
    this grew 4.4× for 8× the data; with sub-batches gathered one at a time it stays flat.
    """
    calib = digits_splits.calibration
    prepared = prepare_model(mlp_digits, calib[0][0])
    peaks = []
    for copies in (1, 8):
        data = calib * copies  # 512 → 4096 images: 8 → 64 sub-batches of 64
        parts = math.ceil(sum(len(y) for _, y in data) / 64)
        kw = {"sub_batch": 64, "rel_tol": 1e-9, "min_probes": 2 * parts, "max_probes": 2 * parts}
        peaks.append(
            _peak_cpu_bytes(
                lambda data=data, kw=kw: estimate_traces(
                    prepared, data, F.cross_entropy, device="cpu", progress=False, **kw
                )
            )  # type: ignore[misc]
        )
    assert peaks[1] < 1.5 * peaks[0], peaks


def _peak_cpu_bytes(fn) -> int:  # type: ignore[no-untyped-def]
    import torch._C._profiler as P
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    peak, stack = 0, list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        extra = node.extra_fields
        if isinstance(extra, P._ExtraFields_Allocation) and extra.device.type == "cpu":
            peak = max(peak, extra.total_allocated)
        stack.extend(node.children)
    assert peak > 0, "the profiler recorded no allocations"
    return peak


def test_without_a_process_group_everything_is_local() -> None:
    assert not distributed.is_initialized()
    assert (distributed.rank(), distributed.world_size(), distributed.is_main()) == (0, 1, True)
    assert distributed.shard(3) == [0, 1, 2]
    assert distributed.all_agree(True) and not distributed.all_agree(False)
    t = torch.ones(2)
    distributed.all_reduce_sum([t])
    assert t.tolist() == [1.0, 1.0]
    with pytest.raises(ValueError, match="inside"), distributed.shared_failure("a test"):
        raise ValueError("inside")


def test_init_from_env_validates_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert distributed.init_from_env() is False  # nothing to join
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(UsageError, match="WORLD_SIZE='two'"):
        distributed.init_from_env()
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "5")
    with pytest.raises(UsageError, match=r"RANK=5 is outside \[0, WORLD_SIZE=2\)"):
        distributed.init_from_env()
    monkeypatch.setenv("HAWQTOOL_DIST_TIMEOUT", "-3")
    with pytest.raises(UsageError, match="HAWQTOOL_DIST_TIMEOUT"):
        distributed.timeout_s()


def test_probe_seeds_are_fixed_numbers_distinct_per_position_and_seed() -> None:
    # Fixed values: the same on every rank, process and machine (a change would also change every
    # cached trace), so 1, 2 or 8 processes draw the same probes.
    assert seed_of(0, "probe", 0, 0, 0) == 518206910240175452
    assert seed_of(0, "partition", 0) == 5482035513265513171
    keys = {seed_of(0, "probe", e, k, i) for e in range(4) for k in range(4) for i in range(4)}
    assert len(keys) == 64 and all(0 <= s < 2**63 for s in keys)
    assert seed_of(1, "partition", 0) != seed_of(0, "partition", 0)


def test_half_precision_is_cuda_only() -> None:
    assert resolve_dtype("float32", torch.device("cpu")) is torch.float32
    with pytest.raises(UsageError, match=r"'bfloat16' needs a CUDA device.*allowed on cpu: float32"):
        resolve_dtype("bfloat16", torch.device("cpu"))
    with pytest.raises(UsageError, match="allowed: float32, bfloat16, float16"):
        resolve_dtype("float64", torch.device("cpu"))
