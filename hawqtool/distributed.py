"""Data-parallel Hessian work on ``torch.distributed``: one process per device, results summed.

When a process group is initialised (by :func:`init_from_env` under ``torchrun``, or by the user
before calling the API), the Hessian and dependency stages split their work by data: rank ``r`` of
``w`` takes the parts ``k`` with ``k % w == r`` (:func:`shard`) and every per-part result (trace
samples, Hessian-vector products, gradients, losses) is summed over the ranks with ``all_reduce``
(:func:`all_reduce_sum`), so every rank ends up holding the same numbers and takes the same
decisions. Collectives go through gloo for CPU tensors and NCCL for CUDA tensors; there is no other
transport. Without a process group every function here is a no-op and a single process does all
the work.

Failure: a rank that raises inside a :func:`shared_failure` block still joins one small collective
that tells the others, which then raise :class:`DistributedError` naming it; a rank that dies
outright closes its gloo connections (the others' next collective fails at once), and anything
else is bounded by the process group's timeout (``HAWQTOOL_DIST_TIMEOUT`` seconds, default
:data:`DEFAULT_TIMEOUT_S`).

Rank 0 alone writes caches and outputs (:func:`is_main`).

Example:
    >>> # torchrun --nproc_per_node=4 $(which hawqtool) analyze default
    >>> is_main(), world_size()          # without a process group
    (True, 1)
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
from collections.abc import Iterator, Sequence

import torch
import torch.distributed as dist

from hawqtool.errors import HawqError, UsageError

log = logging.getLogger(__name__)

#: Seconds a collective may wait for a peer before the process group gives up. It bounds the wait
#: for a rank that hangs or died without closing its connections; it must exceed the largest gap
#: between two ranks reaching the same collective (loading the model and data on one rank while
#: another already waits), not the length of the whole stage.
DEFAULT_TIMEOUT_S = 600.0


class DistributedError(HawqError):
    """Another rank failed (or a collective did): this rank stops too (exit 1)."""

    exit_code = 1


def is_initialized() -> bool:
    """Whether a ``torch.distributed`` process group is up in this process."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's rank (0 without a process group)."""
    return dist.get_rank() if is_initialized() else 0


def world_size() -> int:
    """Number of processes in the group (1 without a process group)."""
    return dist.get_world_size() if is_initialized() else 1


def is_main() -> bool:
    """Whether this process writes caches and outputs and runs the stages after the Hessian ones."""
    return rank() == 0


def shard(n: int) -> list[int]:
    """This rank's share of ``n`` parts: the ``k`` with ``k % world_size == rank``.

    Example:
        >>> shard(5)        # one process takes everything
        [0, 1, 2, 3, 4]
    """
    w, r = world_size(), rank()
    return list(range(r, n, w))


def _env_int(name: str, default: int | None = None) -> int:
    value = os.environ.get(name)
    if value is None:
        if default is None:
            raise UsageError(f"{name} is not set; launch with torchrun (it sets RANK, WORLD_SIZE, ...)")
        return default
    try:
        return int(value)
    except ValueError:
        raise UsageError(f"environment variable {name}={value!r} is not an integer") from None


def timeout_s() -> float:
    """The process group's timeout: ``HAWQTOOL_DIST_TIMEOUT`` seconds, else :data:`DEFAULT_TIMEOUT_S`.

    Raises:
        UsageError: the variable is not a positive number.
    """
    raw = os.environ.get("HAWQTOOL_DIST_TIMEOUT")
    if raw is None:
        return DEFAULT_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise UsageError(f"HAWQTOOL_DIST_TIMEOUT={raw!r}: give a positive number of seconds")
    return value


def init_from_env(*, timeout: float | None = None) -> bool:
    """Join the process group ``torchrun`` describes in the environment, if there is one to join.

    Reads ``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` (the
    ``env://`` rendezvous). With CUDA, each process uses ``cuda:LOCAL_RANK`` and CUDA tensors go
    through NCCL, CPU tensors through gloo; without CUDA everything goes through gloo.

    Args:
        timeout: seconds a collective may wait for a peer (default :func:`timeout_s`).

    Returns:
        Whether a process group was started here (``False`` when ``WORLD_SIZE`` is unset or 1, or
        one is already up).

    Raises:
        UsageError: malformed variables, a rank outside ``[0, WORLD_SIZE)``, or no
            ``torch.distributed`` in this build of torch.
        DistributedError: the rendezvous failed (a peer never came, the address is unreachable).
    """
    world = _env_int("WORLD_SIZE", 1)
    if world < 1:
        raise UsageError(f"WORLD_SIZE={world}: must be at least 1")
    if world == 1 or is_initialized():
        return False
    if not dist.is_available():
        raise UsageError("this build of torch has no torch.distributed; run a single process")
    r = _env_int("RANK")
    if not 0 <= r < world:
        raise UsageError(f"RANK={r} is outside [0, WORLD_SIZE={world})")
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        if not os.environ.get(name):
            raise UsageError(f"{name} is not set; launch with torchrun (it sets RANK, WORLD_SIZE, ...)")
    seconds = timeout if timeout is not None else timeout_s()
    if torch.cuda.is_available():
        local = _env_int("LOCAL_RANK", r % torch.cuda.device_count())
        torch.cuda.set_device(local % torch.cuda.device_count())
        backend = "cpu:gloo,cuda:nccl"
    else:
        backend = "gloo"
    try:
        dist.init_process_group(
            backend=backend,
            init_method="env://",
            world_size=world,
            rank=r,
            timeout=datetime.timedelta(seconds=seconds),
        )
    except (RuntimeError, ValueError, OSError) as e:  # torch's rendezvous errors share these bases
        raise DistributedError(f"rank {r}: could not join the process group of {world}: {e}") from e
    log.info("rank %d of %d joined the process group (%s, timeout %.0f s)", r, world, backend, seconds)
    return True


def shutdown() -> None:
    """Leave the process group (a no-op without one). Safe to call from a ``finally``."""
    if is_initialized():
        dist.destroy_process_group()


def _flag_device() -> torch.device:
    backend = str(dist.get_backend())
    if "gloo" in backend or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())  # an NCCL-only group


def _collective_failed(e: RuntimeError, what: str) -> DistributedError:
    return DistributedError(
        f"rank {rank()}: a collective in {what} failed, most likely because another rank died or "
        f"timed out ({e})"
    )


@contextlib.contextmanager
def shared_failure(what: str) -> Iterator[None]:
    """Run a block of one rank's share of a collective step; tell every rank whether any failed.

    Each rank joins exactly one small all-reduce on leaving the block, failed or not, so none is
    left waiting in the step's next collective. A rank that raised re-raises its own error; the
    others raise :class:`DistributedError` naming the failed ranks. Without a process group this is
    a plain block.

    Args:
        what: the step, for the message (``"the Hessian stage"``).
    """
    if not is_initialized():
        yield
        return
    failed = False
    try:
        yield
    except BaseException:
        failed = True
        raise
    finally:
        flags = torch.zeros(world_size(), dtype=torch.int32, device=_flag_device())
        flags[rank()] = int(failed)
        try:
            dist.all_reduce(flags)
        except RuntimeError as e:
            if not failed:
                raise _collective_failed(e, what) from e
            log.debug("rank %d: could not tell the other ranks of its failure: %s", rank(), e)
        bad = [i for i, f in enumerate(flags.tolist()) if f]
        if bad and not failed:
            raise DistributedError(
                f"rank {rank()}: stopping because rank(s) {', '.join(map(str, bad))} failed in {what} "
                "(their own error is in their log)"
            )


def all_reduce_sum(tensors: Sequence[torch.Tensor], *, what: str = "a collective step") -> None:
    """Sum each tensor over the ranks, in place (a no-op without a process group).

    Raises:
        DistributedError: the collective failed (a peer died or timed out).
    """
    if not is_initialized():
        return
    try:
        for t in tensors:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
    except RuntimeError as e:
        raise _collective_failed(e, what) from e


def all_agree(flag: bool, *, what: str = "a collective step") -> bool:
    """Whether ``flag`` holds on every rank (its own value without a process group).

    Used for decisions that must be the same everywhere, e.g. "every rank found the cache": a
    rank that computes alone would wait forever for the others.
    """
    if not is_initialized():
        return flag
    t = torch.tensor([int(flag)], dtype=torch.int32, device=_flag_device())
    try:
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
    except RuntimeError as e:
        raise _collective_failed(e, what) from e
    return bool(t.item())
