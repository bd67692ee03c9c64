"""Losses and metrics named in recipes (``task.loss``, ``task.metric``).

A loss is ``fn(outputs, targets) -> scalar tensor``: the MEAN over the batch, differentiable twice.
A metric is ``fn(outputs, targets) -> float`` over a whole split, on numpy arrays (outputs of the
split's batches concatenated), so it serves torch and onnxruntime outputs alike.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from hawqtool.errors import UsageError

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
MetricFn = Callable[[np.ndarray, np.ndarray], float]


def top1(outputs: np.ndarray, targets: np.ndarray) -> float:
    """Fraction of rows whose arg-max is the target class."""
    return float((np.asarray(outputs).argmax(axis=-1) == np.asarray(targets)).mean())


def neg_mse(outputs: np.ndarray, targets: np.ndarray) -> float:
    """Negative mean squared error (higher is better)."""
    return -float(((np.asarray(outputs) - np.asarray(targets)) ** 2).mean())


LOSSES: dict[str, LossFn] = {"cross_entropy": F.cross_entropy, "mse": F.mse_loss}
METRICS: dict[str, MetricFn] = {"top1": top1, "neg_mse": neg_mse}


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
    """A loss by name (``cross_entropy``, ``mse``) or import path."""
    if name in LOSSES:
        return LOSSES[name]
    if ":" in name:
        return import_object(name, what="task.loss")  # type: ignore[no-any-return]
    raise UsageError(f"unknown loss {name!r}; allowed: {', '.join(LOSSES)} or 'package.module:function'")


def resolve_metric(name: str) -> MetricFn:
    """A metric by name (``top1``, ``neg_mse``) or import path."""
    if name in METRICS:
        return METRICS[name]
    if ":" in name:
        return import_object(name, what="task.metric")  # type: ignore[no-any-return]
    raise UsageError(f"unknown metric {name!r}; allowed: {', '.join(METRICS)} or 'package.module:function'")
