"""Hessian-vector products of the mean loss over a data split, w.r.t. the quantizable weights.

Shared by the trace estimator (:mod:`hawqtool.hessian`) and the inter-layer dependency terms
(:mod:`hawqtool.dependency`). Hv comes from double backward (``autograd.grad(create_graph=True)``),
which was the fastest way on our CPUs (FACTS.md).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence

import torch

from hawqtool.errors import UsageError
from hawqtool.prepare import Batch, PreparedModel, double_backward_attention
from hawqtool.tasks import LossFn


def resolve_device(device: str) -> torch.device:
    """``auto`` → CUDA when available, else CPU; ``cpu`` / ``cuda`` as asked.

    Raises:
        UsageError: ``cuda`` asked for but not available, or an unknown name.
    """
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise UsageError("hessian.device is 'cuda' but no CUDA device is available; use 'auto' or 'cpu'")
    if device not in ("cpu", "cuda"):
        raise UsageError(f"unknown device {device!r}; allowed: auto, cpu, cuda")
    return torch.device(device)


NO_DOUBLE_BACKWARD = (
    "the loss has no double backward on the path to layer {fqn!r}: an operation's backward cannot "
    "itself be differentiated (an autograd.Function marked @once_differentiable, or a custom op "
    "without a double backward). Replace that op with a twice-differentiable one (for attention: "
    "scaled_dot_product_attention or eager attention)"
)


def severed_double_backward(grad: torch.Tensor) -> bool:
    """Whether the graph of a ``create_graph=True`` gradient holds a node that refuses to be
    differentiated again (torch inserts an ``Error`` node for ``@once_differentiable`` backwards).

    Without this check such a layer's Hessian-vector product silently comes out as zero.
    """
    stack, seen = [grad.grad_fn], set()
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        if type(fn).__name__ == "Error":
            return True
        stack.extend(nxt for nxt, _ in fn.next_functions)
    return False


class SplitHessian:
    """The Hessian H of L(W) = mean loss over ``batches``, restricted to the quantizable weights.

    Works on its own copy of the prepared model, moved to ``device``. Batches are weighted by
    their size, so uneven last batches are counted exactly.

    Example:
        >>> # H = SplitHessian(prepared, calib, F.cross_entropy)
        >>> # Hv = H.hvp({"fc": v})          # dict fqn -> (Hv) block, for every layer
    """

    def __init__(
        self, prepared: PreparedModel, batches: Sequence[Batch], loss_fn: LossFn, *, device: str = "auto"
    ) -> None:
        if len(batches) == 0:
            raise UsageError("the calibration split is empty: give at least one (inputs, targets) batch")
        self.device = resolve_device(device)
        self.model = copy.deepcopy(prepared.model).to(self.device).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.fqns = prepared.fqns
        self.params: dict[str, torch.Tensor] = {}
        for f in self.fqns:
            w = self.model.get_submodule(f).weight
            w.requires_grad_(True)
            self.params[f] = w
        self.batches = [(x.to(self.device), y.to(self.device)) for x, y in batches]
        self.loss_fn = loss_fn
        self.n = sum(len(x) for x, _ in self.batches)

    # -- the primitives --------------------------------------------------------------------------

    def _loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with double_backward_attention():
            loss = self.loss_fn(self.model(x), y)
        if not torch.isfinite(loss):
            raise UsageError(f"the loss is {loss.item()} on a calibration batch: check the model and data")
        return loss

    def batch_loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Mean loss of one batch already on :attr:`device`, differentiable twice.

        Raises:
            UsageError: the loss is NaN or infinite.
        """
        return self._loss(x, y)

    def hvp(
        self,
        v: Mapping[str, torch.Tensor],
        *,
        wrt: Sequence[str] | None = None,
        batches: Sequence[Batch] | None = None,
    ) -> dict[str, torch.Tensor]:
        """(H v) restricted to the layers ``wrt`` (default: all), for v given on some layers.

        Layers missing from ``v`` are zero there. Differentiating only w.r.t. the layers involved
        keeps a single-layer HVP cheap: backward stops at that layer. ``batches`` replaces the
        split (e.g. a random sub-batch, an unbiased estimate of the split's H).
        """
        out_fqns = list(wrt) if wrt is not None else list(self.fqns)
        involved = list(dict.fromkeys([*v.keys(), *out_fqns]))
        params = [self.params[f] for f in involved]
        data = self.batches if batches is None else batches
        n = sum(len(x) for x, _ in data)
        acc = {f: torch.zeros_like(self.params[f]) for f in out_fqns}
        for x, y in data:
            loss = self._loss(x, y)
            grads = torch.autograd.grad(loss, params, create_graph=True)
            gmap = dict(zip(involved, grads, strict=True))
            dot = sum((gmap[f] * v[f].to(self.device)).sum() for f in v)
            try:
                hv = torch.autograd.grad(dot, [self.params[f] for f in out_fqns], allow_unused=True)
            except RuntimeError as e:
                raise UsageError(
                    f"the loss has no double backward ({e}). Use a twice-differentiable loss and "
                    "model (for attention, scaled_dot_product_attention or eager attention)"
                ) from e
            for f, h in zip(out_fqns, hv, strict=True):
                if h is not None:
                    acc[f] += h.detach() * (len(x) / n)
                elif f in v and gmap[f].requires_grad and severed_double_backward(gmap[f]):
                    raise UsageError(NO_DOUBLE_BACKWARD.format(fqn=f))
        return acc

    def grad(self) -> dict[str, torch.Tensor]:
        """Gradient g of the split's mean loss w.r.t. every quantizable weight."""
        params = [self.params[f] for f in self.fqns]
        acc = [torch.zeros_like(p) for p in params]
        for x, y in self.batches:
            gs = torch.autograd.grad(self._loss(x, y), params)
            for a, g in zip(acc, gs, strict=True):
                a += g * (len(x) / self.n)
        return dict(zip(self.fqns, acc, strict=True))

    @torch.no_grad()
    def loss(self, weights: Mapping[str, torch.Tensor] | None = None) -> float:
        """Mean loss over the split, optionally with some layers' weights replaced."""
        saved = {}
        try:
            for f, w in (weights or {}).items():
                saved[f] = self.params[f].data
                self.params[f].data = w.to(self.device, saved[f].dtype)
            total = 0.0
            for x, y in self.batches:
                total += float(self._loss(x, y)) * len(x)
            return total / self.n
        finally:
            for f, w in saved.items():
                self.params[f].data = w
