"""Losses and metrics named in recipes (``task.loss``, ``task.metric``).

A loss is ``fn(outputs, targets) -> scalar tensor``: the MEAN over the batch, differentiable twice.

A metric is ``fn(outputs, targets) -> np.ndarray | float`` on numpy arrays (the outputs of a split's
batches concatenated), so it serves torch and onnxruntime outputs alike. The built-in metrics return
ONE VALUE PER SAMPLE, shape (N,) with N the leading dimension of ``outputs``: the split's metric is
their mean, and paired per-sample values are what :mod:`hawqtool.confidence` bounds a drop with. A
user's metric may return per-sample values or one float for the whole split; :func:`per_sample`
tells which.

``top1_agreement``, ``cosine`` and the ``kl`` loss compare with a teacher: their ``targets`` are the
float model's outputs on the same inputs (:data:`USES_TEACHER`), computed without gradients.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F

from hawqtool.errors import UsageError

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
MetricFn = Callable[[np.ndarray, np.ndarray], np.ndarray | float]


def top1(outputs: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Per sample: 1.0 where the arg-max over the last axis is the target class, else 0.0.

    ``outputs`` (N, C) with integer ``targets`` (N,). For per-position outputs (N, T, C) with
    targets (N, T) it is each sample's fraction of correct positions.

    Example:
        >>> top1(np.array([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7]]), np.array([1, 1, 1]))
        array([1., 0., 1.])
    """
    out = np.asarray(outputs)
    pred = out.argmax(axis=-1)
    tgt = np.asarray(targets)
    if tgt.shape != pred.shape:
        raise UsageError(
            f"metric top1: targets of shape {tgt.shape} must be class indices of shape {pred.shape} "
            f"(the outputs' shape {out.shape} without the class axis)"
        )
    return _mean_per_sample((pred == tgt).astype(np.float64))


def top1_agreement(outputs: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Per sample: 1.0 where the arg-max of ``outputs`` equals the teacher's (``targets``), else 0.0.

    ``targets`` are a teacher's outputs of the same shape. For outputs with more than 2 axes
    (per-token logits (N, T, C)) each sample's value is its fraction of agreeing positions.

    Example:
        >>> top1_agreement(np.array([[0.1, 0.9], [0.8, 0.2]]), np.array([[0.2, 0.8], [0.1, 0.9]]))
        array([1., 0.])
    """
    out, tgt = _same_shape(outputs, targets, name="top1_agreement")
    return _mean_per_sample((out.argmax(axis=-1) == tgt.argmax(axis=-1)).astype(np.float64))


def cosine(outputs: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Per sample: cosine similarity of the flattened outputs with the teacher's (``targets``).

    In float64, clipped to [-1, 1]. Identical vectors score exactly 1.0 (rounding in the norms would
    otherwise give 0.9999999999999993, and the float model's fidelity to itself must be 1); a zero
    vector against a nonzero one is 0.0.

    Example:
        >>> cosine(np.array([[1.0, 0.0], [1.0, 1.0], [0.0, 0.0]]), np.array([[2.0, 0.0], [1.0, -1.0], [0.0, 0.0]]))
        array([1., 0., 1.])
    """
    out, tgt = _same_shape(outputs, targets, name="cosine", min_ndim=1)
    o = out.reshape(len(out), -1).astype(np.float64)
    t = tgt.reshape(len(tgt), -1).astype(np.float64)
    dot = np.einsum("ij,ij->i", o, t)
    norms = np.linalg.norm(o, axis=1) * np.linalg.norm(t, axis=1)
    identical = (o == t).all(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        sim = np.where(norms > 0, dot / np.where(norms > 0, norms, 1.0), 0.0)
    return np.where(identical, 1.0, np.clip(sim, -1.0, 1.0))


def mse(outputs: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Per sample: mean squared error over the flattened sample (float64; lower is better).

    ``targets`` must hold as many values as ``outputs`` (they are reshaped to the outputs' shape, so
    (N, 1) outputs against (N,) targets do not broadcast to (N, N)).

    Example:
        >>> mse(np.array([[1.0, 2.0], [0.0, 0.0]]), np.array([[1.0, 0.0], [3.0, 1.0]]))
        array([2., 5.])
    """
    out = np.asarray(outputs, dtype=np.float64)
    tgt = np.asarray(targets, dtype=np.float64)
    if tgt.size != out.size:
        raise UsageError(
            f"metric mse: targets of shape {tgt.shape} must hold as many values as the outputs {out.shape}"
        )
    diff = out - tgt.reshape(out.shape)
    return (diff**2).reshape(len(out), -1).mean(axis=1)


def neg_mse(outputs: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Per sample: the negative of :func:`mse` (higher is better).

    Example:
        >>> neg_mse(np.array([[1.0, 2.0]]), np.array([[1.0, 0.0]]))
        array([-2.])
    """
    return -mse(outputs, targets)


def kl(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """KL(softmax(targets) ‖ softmax(outputs)): distillation from a teacher's logits (``targets``).

    Summed over the class (last) axis, averaged over every other axis, so per-token logits (N, T, C)
    work. Zero, with a zero gradient, where outputs == targets; its Hessian there is the softmax
    covariance diag(p) − ppᵀ per position (over the number of positions), positive along any
    direction that is not constant across classes, which is what Hessian traces need.

    Example:
        >>> t = torch.tensor([[1.0, 2.0, 3.0]])
        >>> float(kl(t, t)), round(float(kl(torch.zeros(1, 3), t)), 4)
        (0.0, 0.2662)
    """
    if outputs.shape != targets.shape:
        raise UsageError(
            f"loss kl: targets (teacher logits) of shape {tuple(targets.shape)} must have the outputs' "
            f"shape {tuple(outputs.shape)}"
        )
    log_q = F.log_softmax(outputs, dim=-1)
    log_p = F.log_softmax(targets, dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(dim=-1).mean()


LOSSES: dict[str, LossFn] = {"cross_entropy": F.cross_entropy, "mse": F.mse_loss, "kl": kl}
METRICS: dict[str, MetricFn] = {
    "top1": top1,
    "top1_agreement": top1_agreement,
    "cosine": cosine,
    "mse": mse,
    "neg_mse": neg_mse,
}
HIGHER_IS_BETTER: dict[str, bool] = {
    "top1": True,
    "top1_agreement": True,
    "cosine": True,
    "mse": False,
    "neg_mse": True,
}
"""Each built-in metric's direction: the default of ``task.higher_is_better`` for that name."""
BINARY: dict[str, bool] = {
    "top1": True,
    "top1_agreement": True,
    "cosine": False,
    "mse": False,
    "neg_mse": False,
}
"""Whether each built-in metric is binary per sample (0 or 1: accuracy-like) or continuous: the default
of ``task.binary`` for that name. It decides how a drop is bounded (:mod:`hawqtool.confidence`) and
whether a split has a smallest resolvable drop. Declared, not read off the values: a teacher-fidelity
``cosine`` scores the float model exactly 1 on every sample, which looks binary."""
USES_TEACHER: frozenset[str] = frozenset({"top1_agreement", "cosine", "kl"})
"""Built-in metrics and losses whose ``targets`` are the float model's outputs, not labels."""


def per_sample(values: npt.ArrayLike, n: int, *, name: str = "metric") -> np.ndarray | None:
    """A metric's per-sample values as float64 of shape (n,), or None when it is one split value.

    Args:
        values: what the metric returned on a split of ``n`` samples.
        n: samples in the split (the leading dimension of the outputs).
        name: the metric's name, for errors.

    Raises:
        UsageError: values of any other shape, or NaN / infinite values.

    Example:
        >>> per_sample(np.array([1, 0, 1]), 3), per_sample(0.5, 3)
        (array([1., 0., 1.]), None)
    """
    try:
        arr = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise UsageError(f"metric {name!r} returned {type(values).__name__}, not numbers: {e}") from e
    if arr.ndim == 0:
        if not np.isfinite(arr):
            raise UsageError(f"metric {name!r} is {float(arr)} on the split of {n} samples")
        return None
    if arr.shape != (n,):
        raise UsageError(
            f"metric {name!r} returned shape {arr.shape}; allowed: one value per sample, shape ({n},), "
            "or a single float for the split"
        )
    bad = int((~np.isfinite(arr)).sum())
    if bad:
        raise UsageError(f"metric {name!r} is NaN or infinite on {bad} of {n} samples")
    return arr


def metric_by_chunks(
    metric_fn: MetricFn, outputs: np.ndarray, targets: np.ndarray, *, chunks: int = 30, name: str = "metric"
) -> tuple[np.ndarray, np.ndarray]:
    """A split-level metric on ``chunks`` consecutive, near-equal slices of the split.

    For a metric that is one float per split: the per-chunk values and sizes are what
    :func:`hawqtool.confidence.paired_drop_batches` bounds a drop with. The slices depend only on the
    number of samples, so the float model's and a candidate's chunks hold the same samples.

    Returns:
        ``(values, sizes)``, each of shape (min(chunks, N),); a chunk's value is the metric's mean
        over the chunk when it returns per-sample values.

    Raises:
        UsageError: ``chunks < 1``, outputs and targets of different lengths, or a bad metric value.

    Example:
        >>> values, sizes = metric_by_chunks(top1, np.eye(4), np.array([0, 1, 0, 0]), chunks=2)
        >>> values.tolist(), sizes.tolist()
        ([1.0, 0.0], [2, 2])
    """
    n = len(outputs)
    if chunks < 1:
        raise UsageError(f"chunks must be at least 1; got {chunks}")
    if len(targets) != n:
        raise UsageError(f"outputs ({n} samples) and targets ({len(targets)}) must have the same length")
    values, sizes = [], []
    for idx in np.array_split(np.arange(n), min(chunks, n)):
        v = metric_fn(outputs[idx], targets[idx])
        ps = per_sample(v, len(idx), name=name)
        values.append(float(ps.mean()) if ps is not None else float(v))
        sizes.append(len(idx))
    return np.asarray(values), np.asarray(sizes)


def import_object(path: str, *, what: str) -> Any:
    """Import ``package.module:attribute`` (never ``eval``).

    Raises:
        UsageError: the path is malformed, the module does not import, or lacks the attribute.
    """
    module_name, sep, attr = path.partition(":")
    if not sep or not module_name or not attr:
        raise UsageError(f"{what} {path!r} is not an import path of the form 'package.module:name'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise UsageError(f"{what} {path!r}: cannot import module {module_name!r}: {e}") from e
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise UsageError(f"{what} {path!r}: module {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise UsageError(f"{what} {path!r} is not callable")
    return obj


def resolve_loss(name: str) -> LossFn:
    """A loss by name (``cross_entropy``, ``mse``, ``kl``) or import path.

    Example:
        >>> resolve_loss("kl") is kl
        True
    """
    if name in LOSSES:
        return LOSSES[name]
    if ":" in name:
        return import_object(name, what="task.loss")  # type: ignore[no-any-return]
    raise UsageError(f"unknown loss {name!r}; allowed: {', '.join(LOSSES)} or 'package.module:function'")


def resolve_metric(name: str) -> MetricFn:
    """A metric by name (``top1``, ``top1_agreement``, ``cosine``, ``mse``, ``neg_mse``) or import path.

    Example:
        >>> resolve_metric("cosine") is cosine
        True
    """
    if name in METRICS:
        return METRICS[name]
    if ":" in name:
        return import_object(name, what="task.metric")  # type: ignore[no-any-return]
    raise UsageError(f"unknown metric {name!r}; allowed: {', '.join(METRICS)} or 'package.module:function'")


def _same_shape(
    outputs: np.ndarray, targets: np.ndarray, *, name: str, min_ndim: int = 2
) -> tuple[np.ndarray, np.ndarray]:
    out, tgt = np.asarray(outputs), np.asarray(targets)
    if out.shape != tgt.shape or out.ndim < min_ndim:
        axes = "a batch and a class axis" if min_ndim == 2 else "a batch axis"
        raise UsageError(
            f"metric {name}: targets (the teacher's outputs) of shape {tgt.shape} must have the outputs' "
            f"shape {out.shape}, with {axes}"
        )
    return out, tgt


def _mean_per_sample(values: np.ndarray) -> np.ndarray:
    """Average every axis but the first: one value per sample."""
    return values.reshape(len(values), -1).mean(axis=1) if values.ndim > 1 else values
