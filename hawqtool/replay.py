"""Prefix replay: rerun a model with one layer's weight changed without recomputing what cannot
depend on it.

The dependency terms (:mod:`hawqtool.interactions`) run the model once per (layer, format) with only
that layer's weight perturbed. Every submodule whose call ended before the layer's weight was first
read computes exactly what it computed in the float pass, so its recorded output can be returned
instead of running it. :func:`record` runs one float pass with every candidate module's ``forward``
wrapped (call order on a global counter, the output object, the inputs' shapes) and, through a
torch-function mode, the first read of each watched parameter; :meth:`Recording.replaying` then
patches the instance ``forward`` of the maximal replayable modules to return their recorded outputs,
so nothing inside them runs.

A module M is replayed for the layer of parameter p when: it was called exactly once; it is none of
p's owner modules (every module that registers p), nor an ancestor or descendant of one; its call
ended before an owner's first call started and before p's first read; its output is plain data
(tensors, numbers, strings, None, in tuples, lists and dicts); its call mutated neither its inputs
nor its buffers in place; and its output was not mutated in place later in the float pass. Only
maximal ones are patched (a module whose call lies inside another replayed call never runs).
During a replayed pass every patched module must be called exactly once, with inputs of the
recorded shapes, and the recorded outputs must come out untouched; anything else raises
:class:`ReplayError` (callers fall back to the full forward). Side effects kept in plain Python
attributes cannot be seen: a module that hands state to a later module that way must not be used
with replay; nor is randomness drawn inside a replayed module drawn again (run models in eval mode).

Memory: while recording, the outputs of the candidate modules (the children of every ancestor of
an owner of a watched parameter, owners included) of one batch; afterwards only the outputs of the
modules some watched parameter replays. That is at most the module outputs one pass produces, less
than what a backward pass over the same batch keeps (autograd saves every op's inputs).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

T = TypeVar("T")

_PLAIN = (bool, int, float, str, bytes, type(None), torch.dtype, torch.device, torch.Size)


class ReplayError(RuntimeError):
    """A replayed pass did not follow the recorded one (an internal condition: fall back)."""


def _leaves(obj: Any) -> list[Any] | None:
    """The leaves of a plain-data output (tensors and plain scalars), or None for anything else."""
    out: list[Any] = []
    stack = [obj]
    while stack:
        o = stack.pop()
        if isinstance(o, (torch.Tensor, *_PLAIN)):
            out.append(o)
        elif isinstance(o, (tuple, list)):
            stack.extend(reversed(o))
        elif isinstance(o, Mapping):
            stack.extend(reversed(list(o.values())))
        else:
            return None
    return out


def _tensors(obj: Any) -> list[torch.Tensor]:
    """Tensors inside nested tuples, lists and dicts (other objects are skipped)."""
    out: list[torch.Tensor] = []
    stack = [obj]
    while stack:
        o = stack.pop()
        if isinstance(o, torch.Tensor):
            out.append(o)
        elif isinstance(o, (tuple, list)):
            stack.extend(reversed(o))
        elif isinstance(o, Mapping):
            stack.extend(reversed(list(o.values())))
    return out


def _version(t: torch.Tensor) -> int | None:
    try:
        return int(t._version)
    except RuntimeError:  # inference tensors keep no version counter
        return None


def _versions(ts: Sequence[torch.Tensor]) -> tuple[int | None, ...]:
    return tuple(_version(t) for t in ts)


def _signature(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> tuple[Any, ...]:
    return tuple((tuple(t.shape), t.dtype) for t in _tensors((args, dict(kwargs))))


@dataclass
class _Call:
    """One candidate module's recorded call(s)."""

    name: str
    module: nn.Module
    calls: int = 0
    starts: list[int] = field(default_factory=list)
    end: int = -1
    output: Any = None
    signature: tuple[Any, ...] = ()
    leaves: tuple[int, ...] = ()  # ids of the output's leaves: a container mutated later shows
    watched: list[torch.Tensor] = field(default_factory=list)
    versions: tuple[int | None, ...] = ()
    clean: bool = True  # plain output, no in-place change of its inputs, buffers or output


class _FirstUse(TorchFunctionMode):
    """Stamps the first torch call that reads each watched parameter with the recording counter."""

    def __init__(self, params: Mapping[int, torch.Tensor], counter: Iterator[int]) -> None:
        super().__init__()
        self.pending = dict(params)
        self.counter = counter
        self.first: dict[int, int] = {}

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Any,
        args: Sequence[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        if self.pending:
            for t in _tensors((tuple(args), dict(kwargs))):
                if id(t) in self.pending and self.pending[id(t)] is t:
                    del self.pending[id(t)]
                    self.first[id(t)] = next(self.counter)
        return func(*args, **kwargs)


@dataclass(frozen=True)
class Plan:
    """The modules replayed for one parameter, and the share of recorded module calls they skip."""

    names: tuple[str, ...]
    skipped: float


class Recording(Generic[T]):
    """One recorded float pass: its result, and a replay plan per watched parameter."""

    def __init__(self, result: T, calls: list[_Call], plans: dict[int, list[_Call]], total: int) -> None:
        self.result = result
        self._plans = plans
        self._total = total
        self._calls = calls
        self._summaries: dict[int, Plan] = {}

    def plan(self, param: torch.Tensor) -> Plan:
        """What :meth:`replaying` skips for ``param`` (empty for a parameter not watched)."""
        if id(param) not in self._summaries:
            chosen = self._plans.get(id(param), [])
            starts = [s for d in self._calls for s in d.starts]
            skipped = sum(1 for c in chosen for s in starts if c.starts[0] <= s <= c.end)
            share = skipped / self._total if self._total else 0.0
            self._summaries[id(param)] = Plan(tuple(c.name for c in chosen), share)
        return self._summaries[id(param)]

    @contextmanager
    def replaying(self, param: torch.Tensor) -> Iterator[Plan]:
        """While open, the modules of ``param``'s plan return their recorded outputs.

        Raises:
            ReplayError: a patched module was called other than exactly once, with inputs of other
                shapes, or a recorded output was changed in place (the recording is then spoiled).
        """
        chosen = self._plans.get(id(param), [])
        used = [0] * len(chosen)
        saved = []

        def patched(i: int, c: _Call) -> Callable[..., Any]:
            def forward(*args: Any, **kwargs: Any) -> Any:
                used[i] += 1
                if used[i] > 1:
                    raise ReplayError(f"replayed module {c.name!r} was called again")
                if _signature(args, kwargs) != c.signature:
                    raise ReplayError(f"replayed module {c.name!r} was called with other input shapes")
                return c.output

            return forward

        try:
            for i, c in enumerate(chosen):
                saved.append(_patch(c.module, patched(i, c)))
            yield self.plan(param)
        finally:
            for c, old in zip(chosen, saved, strict=False):
                _unpatch(c.module, old)
        for c, n in zip(chosen, used, strict=True):
            if n != 1:
                raise ReplayError(f"replayed module {c.name!r} was called {n} times, recorded once")
            if _versions(c.watched) != c.versions or _leaf_ids(c.output) != c.leaves:
                raise ReplayError(f"the recorded output of {c.name!r} was changed in place")


_MISSING = object()


def _patch(module: nn.Module, forward: Callable[..., Any]) -> Any:
    old = module.__dict__.get("forward", _MISSING)
    module.__dict__["forward"] = forward
    return old


def _unpatch(module: nn.Module, old: Any) -> None:
    if old is _MISSING:
        module.__dict__.pop("forward", None)
    else:
        module.__dict__["forward"] = old


def _leaf_ids(output: Any) -> tuple[int, ...]:
    leaves = _leaves(output)
    return () if leaves is None else tuple(id(x) for x in leaves)


def _graph(model: nn.Module) -> tuple[dict[int, str], dict[int, list[nn.Module]], dict[int, nn.Module]]:
    """Names, parents (every module that registers a module as a child) and modules by id."""
    names: dict[int, str] = {}
    parents: dict[int, list[nn.Module]] = {}
    byid: dict[int, nn.Module] = {}
    for name, m in model.named_modules():
        names[id(m)] = name
        byid[id(m)] = m
        for child in m._modules.values():
            if child is not None:
                parents.setdefault(id(child), []).append(m)
    return names, parents, byid


def _ancestors(ms: Sequence[nn.Module], parents: Mapping[int, list[nn.Module]]) -> set[int]:
    out: set[int] = set()
    stack = [p for m in ms for p in parents.get(id(m), [])]
    while stack:
        p = stack.pop()
        if id(p) not in out:
            out.add(id(p))
            stack.extend(parents.get(id(p), []))
    return out


def record(model: nn.Module, run: Callable[[], T], *, params: Sequence[torch.Tensor]) -> Recording[T]:
    """Run ``run()`` (a forward pass of ``model``) once, recording what replay needs for ``params``.

    Example:
        >>> net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)).eval()
        >>> x = torch.randn(5, 3)
        >>> with torch.no_grad():
        ...     rec = record(net, lambda: net(x), params=[net[2].weight])
        ...     with rec.replaying(net[2].weight) as plan:
        ...         same = torch.equal(net(x), rec.result)
        >>> plan.names, same
        (('0', '1'), True)
    """
    names, parents, byid = _graph(model)
    owners: dict[int, list[nn.Module]] = {}
    for p in params:
        owners[id(p)] = [m for m in byid.values() if any(q is p for q in m._parameters.values())]
    ancestors = _ancestors([m for ms in owners.values() for m in ms], parents)
    candidates = {id(c): c for a in ancestors for c in byid[a]._modules.values() if c is not None}
    counter = itertools.count()
    calls = [_Call(names[i], m) for i, m in candidates.items()]
    saved = []

    def wrap(c: _Call, inner: Callable[..., Any]) -> Callable[..., Any]:
        def forward(*args: Any, **kwargs: Any) -> Any:
            c.calls += 1
            c.starts.append(next(counter))
            inputs = _tensors((args, dict(kwargs)))
            state = [*inputs, *c.module.buffers()]
            before = _versions(state)
            out = inner(*args, **kwargs)
            c.end = next(counter)
            if c.calls == 1:
                leaves = _leaves(out)
                c.clean = leaves is not None and _versions(state) == before and None not in before
                if c.clean:
                    c.output, c.signature = out, _signature(args, kwargs)
                    c.watched = _tensors(out)
                    c.versions = _versions(c.watched)
                    c.leaves = _leaf_ids(out)
            return out

        return forward

    mode = _FirstUse({id(p): p for p in params}, counter)
    try:
        for c in calls:
            saved.append(_patch(c.module, wrap(c, c.module.forward)))
        with mode:
            result = run()
    finally:
        for c, old in zip(calls, saved, strict=False):
            _unpatch(c.module, old)

    for c in calls:
        if c.clean and (
            None in c.versions or _versions(c.watched) != c.versions or _leaf_ids(c.output) != c.leaves
        ):
            c.clean = False  # changed in place after it was returned: the recorded value is gone
    plans: dict[int, list[_Call]] = {}
    for p in params:
        mine = owners[id(p)]
        related = _ancestors(mine, parents) | {id(d) for m in mine for d in m.modules()}
        first = [c.starts[0] for c in calls if id(c.module) in {id(m) for m in mine} and c.starts]
        if id(p) in mode.first:
            first.append(mode.first[id(p)])
        limit = min(first) if first else math.inf
        eligible = sorted(
            (c for c in calls if c.calls == 1 and c.clean and id(c.module) not in related and c.end < limit),
            key=lambda c: c.starts[0],
        )
        chosen: list[_Call] = []
        for c in eligible:
            if not chosen or c.starts[0] > chosen[-1].end:
                chosen.append(c)
        plans[id(p)] = chosen
    keep = {id(c) for cs in plans.values() for c in cs}
    for c in calls:
        if id(c) not in keep:
            c.output, c.watched = None, []
    total = sum(c.calls for c in calls)
    return Recording(result, calls, plans, total)
