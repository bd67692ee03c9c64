"""The Gauss–Newton view of the loss: its curvature in output space, shared by the Gauss–Newton trace
estimator (:mod:`hawqtool.hessian`) and the output-space dependency terms (:mod:`hawqtool.interactions`).

With teacher targets (``task.targets: model``) and the ``mse`` or ``kl`` loss, the loss gradient at the
float weights is zero and the loss Hessian there IS the Gauss–Newton matrix E[Jᵀ M J], J = ∂f/∂W of the
selected output f. For the built-in losses M = c·BᵀB with

- ``mse`` (:func:`torch.nn.functional.mse_loss`, the mean over all elements): B = I, c = 2 / numel;
- ``kl`` (:func:`hawqtool.tasks.kl`) and ``cross_entropy``: per output row (the class axis: last for
  ``kl`` and for per-position logits with (N, T) class targets, else 1 as in
  :func:`torch.nn.functional.cross_entropy`) Bu = √p ⊙ (u − pᵀu), p = the model's softmax, so
  BᵀB = diag(p) − ppᵀ, and c = 1 / rows (both losses average over rows; rows whose class target is
  -100 are left out, as the loss leaves them out).

So for a Rademacher v over every output element, g = ∂⟨v, B f⟩/∂W (v, B detached: one ordinary backward)
has c·E‖g_i‖² = Tr(H_ii) of every layer at once, and a weight change whose output change is δ changes
the loss by ½c‖Bδ‖² to second order. With labels (``cross_entropy``) the Hessian is this matrix plus a
residual term: the Gauss–Newton part, the Fisher of the model's own predictive distribution, is the
usual positive semi-definite stand-in.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from hawqtool import tasks
from hawqtool.errors import UsageError
from hawqtool.tasks import LossFn

#: Losses with a known output-space curvature, by the function the recipe resolves them to.
KINDS: dict[Callable[..., torch.Tensor], str] = {
    F.mse_loss: "mse",
    tasks.kl: "kl",
    F.cross_entropy: "cross_entropy",
    tasks.cross_entropy: "cross_entropy",
}
#: Where the Gauss–Newton matrix equals the Hessian at the float weights: teacher targets and these.
EXACT_WITH_TEACHER = ("mse", "kl")
ESTIMATORS = ("auto", "gauss_newton", "hutchinson")


def loss_kind(loss_fn: LossFn) -> str | None:
    """``mse``, ``kl`` or ``cross_entropy`` for the built-in losses, else ``None`` (no known curvature).

    Example:
        >>> loss_kind(F.mse_loss), loss_kind(tasks.kl), loss_kind(lambda o, t: (o - t).abs().mean())
        ('mse', 'kl', None)
    """
    return KINDS.get(loss_fn)


def resolve_estimator(estimator: str, loss_fn: LossFn, *, targets: str = "labels") -> str:
    """The trace estimator that ``estimator`` (``auto``, ``gauss_newton``, ``hutchinson``) runs.

    ``auto`` is ``gauss_newton`` where it is exact (``targets == "model"`` with ``mse`` or ``kl``) and
    for ``cross_entropy`` on labels (the Fisher of the model's own predictions: it ranks allocations
    as Hutchinson's traces do, for a fraction of the cost, ``scripts/bench_sensitivity.py``), and
    ``hutchinson`` otherwise (``mse`` on labels, custom losses).

    Raises:
        UsageError: an unknown name, or ``gauss_newton`` for a loss with no known output curvature.

    Example:
        >>> resolve_estimator("auto", tasks.kl, targets="model"), resolve_estimator("auto", F.mse_loss)
        ('gauss_newton', 'hutchinson')
    """
    if estimator not in ESTIMATORS:
        raise UsageError(f"unknown hessian.estimator {estimator!r}; allowed: {', '.join(ESTIMATORS)}")
    kind = loss_kind(loss_fn)
    if estimator == "gauss_newton" and kind is None:
        raise UsageError(
            "hessian.estimator gauss_newton needs a loss with a known output curvature "
            f"({', '.join(KINDS.values())}); use hutchinson (or auto) for a custom loss"
        )
    if estimator == "auto":
        exact = targets == "model" and kind in EXACT_WITH_TEACHER
        return "gauss_newton" if exact or kind == "cross_entropy" else "hutchinson"
    return estimator


@dataclass(frozen=True)
class OutputCurvature:
    """M = c·BᵀB of one batch's outputs: :meth:`apply` is B, :attr:`scale` is c.

    Example:
        >>> out = torch.tensor([[0.0, 1.0, 2.0]])
        >>> m = OutputCurvature.of("kl", out)
        >>> u = torch.tensor([[1.0, -1.0, 0.5]])
        >>> p = torch.softmax(out, -1)[0]
        >>> exact = u[0] @ (torch.diag(p) - torch.outer(p, p)) @ u[0]
        >>> bool(torch.isclose(m.apply(u).square().sum(), exact))
        True
    """

    kind: str
    scale: float
    p: torch.Tensor | None = None  # the softmax, detached (kl, cross_entropy)
    dim: int = -1  # the class axis

    @classmethod
    def of(cls, kind: str, outputs: torch.Tensor, targets: object = None) -> OutputCurvature:
        """The curvature at ``outputs`` (the float model's, detached here) of the loss ``kind``;
        ``targets`` (class labels, for ``cross_entropy``) decide its class axis and ignored rows."""
        out = outputs.detach().float()
        if kind == "mse":
            return cls(kind, 2.0 / max(out.numel(), 1))
        if kind not in ("kl", "cross_entropy"):
            raise UsageError(f"no output curvature for loss {kind!r}; allowed: {', '.join(KINDS.values())}")
        labels = targets if isinstance(targets, torch.Tensor) and not targets.is_floating_point() else None
        per_position = labels is not None and out.dim() > 2 and tuple(labels.shape) == tuple(out.shape[:-1])
        dim = -1 if kind == "kl" or out.dim() < 2 or per_position else 1
        p = torch.softmax(out, dim=dim)
        rows = out.numel() // max(out.shape[dim], 1)
        if kind == "cross_entropy" and labels is not None:
            keep = (labels != -100).to(device=p.device, dtype=p.dtype).unsqueeze(dim)
            p = p * keep  # an ignored row has no curvature
            rows = int(keep.sum())
        return cls(kind, 1.0 / max(rows, 1), p, dim)

    def apply(self, u: torch.Tensor) -> torch.Tensor:
        """B u (differentiable in ``u``); the identity for ``mse``."""
        if self.p is None:
            return u
        p = self.p.to(device=u.device, dtype=u.dtype)
        return p.sqrt() * (u - (p * u).sum(dim=self.dim, keepdim=True))
