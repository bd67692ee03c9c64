"""Losses and metrics named in recipes (``task.loss``, ``task.metric``): two registries.

A metric is ONE registration (:func:`register_metric`): its function, direction, whether it is
binary, whether it compares with a teacher, and its chance level; :func:`get_metric` returns it as a
frozen :class:`Metric`. Losses likewise (:func:`register_loss`, :class:`Loss`).

A loss is ``fn(outputs, targets) -> scalar tensor``: the MEAN over the batch, differentiable twice.

A metric is ``fn(outputs, targets) -> np.ndarray | float`` on numpy arrays (the outputs of a split's
batches concatenated), so it serves torch and onnxruntime outputs alike. The built-in metrics return
ONE VALUE PER SAMPLE, shape (N,) with N the leading dimension of ``outputs``: the split's metric is
their mean, and paired per-sample values are what :mod:`hawqtool.confidence` bounds a drop with. A
user's metric may return per-sample values or one float for the whole split; :func:`per_sample`
tells which.

``top1_agreement``, ``cosine`` and the ``kl`` loss compare with a teacher: their ``targets`` are the
float model's outputs on the same inputs (``Metric.teacher``, ``Loss.teacher``), computed without
gradients.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F

from hawqtool.errors import UsageError
from hawqtool.registry import Registry

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
MetricFn = Callable[[np.ndarray, np.ndarray], np.ndarray | float]
ChanceFn = Callable[[np.ndarray], float | None]


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


def perplexity(outputs: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Per sequence: pseudo-values whose mean is the split's perplexity exp(mean token NLL).

    ``outputs`` are logits (N, T, V) (or (N, V)); ``targets`` are the next tokens (N, T), positions
    with target -100 left out, or a teacher's logits of the outputs' shape, whose softmax then
    replaces the one-hot next token (the perplexity on text the teacher would write).

    The split's perplexity is exp(m), m the mean NLL over ALL its tokens, not a mean of per-sequence
    perplexities, so each sequence's value is its delta-method pseudo-value
    ``exp(m) · (1 + (n_i / n̄) · (m_i − m))`` (m_i its mean NLL over its n_i tokens, n̄ the mean n_i):
    their mean is exactly exp(m), the mean of paired differences is exactly the difference of two
    models' perplexities, and its spread is the delta-method spread, so :mod:`hawqtool.confidence`'s
    paired bounds (and ``relative`` budgets, e.g. +3 %) apply unchanged. A single value may be
    negative; only means are meaningful. The values are centred on the outputs given, so the
    metric must see a whole split at once (``Metric.whole_split``): called batch by batch, their
    mean is the token-weighted mean of the batches' perplexities. :func:`nll` has no such need.

    Example:
        >>> uniform = np.zeros((2, 3, 5))                     # every token equally likely, V = 5
        >>> np.round(perplexity(uniform, np.array([[0, 1, 2], [3, 4, -100]])), 12).tolist()
        [5.0, 5.0]
    """
    sums, counts = _token_nll(outputs, targets, name="perplexity")
    m = sums.sum() / counts.sum()
    with np.errstate(invalid="ignore", divide="ignore"):
        m_i = np.where(counts > 0, sums / np.where(counts > 0, counts, 1), m)
    return np.exp(m) * (1.0 + counts / counts.mean() * (m_i - m))


def nll(outputs: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Per sequence: the mean token negative log-likelihood in nats (lower is better), as
    :func:`perplexity` reads ``outputs`` and ``targets``.

    Unlike :func:`perplexity`'s pseudo-values each sequence's value depends on that sequence alone,
    so any batching gives the same values. On blocks of equal length the split's value is the mean
    token NLL, exp of it the split's perplexity, and an ``absolute`` budget of ln(1 + r) nats is
    exactly a relative budget r on perplexity (+3 %: 0.02956).

    Example:
        >>> np.round(nll(np.zeros((2, 3, 5)), np.zeros((2, 3), dtype=np.int64)), 6).tolist()  # ln 5
        [1.609438, 1.609438]
    """
    sums, counts = _token_nll(outputs, targets, name="nll")
    if (counts == 0).any():
        raise UsageError(f"metric nll: {int((counts == 0).sum())} sequences have no scored token (all -100)")
    return sums / counts


def _token_nll(outputs: np.ndarray, targets: np.ndarray, *, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Per sequence: the sum of its tokens' NLL and how many tokens were scored."""
    out = np.asarray(outputs)
    tgt = np.asarray(targets)
    if out.ndim < 2:
        raise UsageError(f"metric {name}: outputs of shape {out.shape} must be logits with a vocabulary axis")
    teacher = np.issubdtype(tgt.dtype, np.floating)
    if (tgt.shape != out.shape) if teacher else (tgt.shape != out.shape[:-1]):
        raise UsageError(
            f"metric {name}: targets of shape {tgt.shape} must be next tokens of shape {out.shape[:-1]} "
            f"or a teacher's logits of the outputs' shape {out.shape}"
        )
    sums = np.zeros(len(out))
    counts = np.zeros(len(out))
    for i in range(len(out)):  # one sequence at a time: (T, V) float64 stays small
        log_q = _log_softmax(out[i].reshape(-1, out.shape[-1]))
        if teacher:
            log_p = _log_softmax(tgt[i].reshape(-1, out.shape[-1]))
            tok_nll = -(np.exp(log_p) * log_q).sum(axis=-1)
        else:
            tok = tgt[i].reshape(-1).astype(np.int64)
            keep = tok != -100
            if ((tok[keep] < 0) | (tok[keep] >= out.shape[-1])).any():
                raise UsageError(
                    f"metric {name}: sample {i} has tokens outside [0, {out.shape[-1] - 1}] (the vocabulary)"
                )
            tok_nll = -log_q[np.flatnonzero(keep), tok[keep]]
        sums[i], counts[i] = tok_nll.sum(), tok_nll.size
    if counts.sum() == 0:
        raise UsageError(f"metric {name}: every target is -100; there is no token to score")
    return sums, counts


def token_kl(outputs: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Per sample: KL(softmax(teacher) ‖ softmax(outputs)) averaged over positions (float64, nats).

    ``targets`` are the teacher's logits of the outputs' shape, e.g. (N, T, V). The metric ``kl``
    (lower is better): exactly 0 for identical logits, so budgets in it are ``absolute``.

    Example:
        >>> t = np.array([[[0.0, np.log(3.0)], [1.0, 1.0]]])
        >>> token_kl(t, t).tolist(), np.round(token_kl(np.zeros((1, 2, 2)), t), 6).tolist()
        ([0.0], [0.065406])
    """
    out, tgt = _same_shape(outputs, targets, name="kl")
    values = np.empty(len(out))
    for i in range(len(out)):
        log_q = _log_softmax(out[i].reshape(-1, out.shape[-1]))
        log_p = _log_softmax(tgt[i].reshape(-1, out.shape[-1]))
        values[i] = (np.exp(log_p) * (log_p - log_q)).sum(axis=-1).mean()
    return values


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    x = np.asarray(logits, dtype=np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def cross_entropy(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """:func:`torch.nn.functional.cross_entropy`, also on per-position logits (N, T, C) with class
    targets (N, T) (a language model's next tokens): the mean over positions whose target is not -100.

    Example:
        >>> logits = torch.zeros(2, 3, 4)                   # uniform over 4 classes at every position
        >>> round(float(cross_entropy(logits, torch.zeros(2, 3, dtype=torch.long))), 4)  # ln 4
        1.3863
    """
    if (
        outputs.ndim > 2
        and tuple(targets.shape) == tuple(outputs.shape[:-1])
        and not targets.is_floating_point()
    ):
        return F.cross_entropy(outputs.reshape(-1, outputs.shape[-1]), targets.reshape(-1))
    return F.cross_entropy(outputs, targets)


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


@dataclass(frozen=True)
class Metric:
    """One metric named in recipes: its function and everything the pipeline needs to know about it.

    Attributes:
        name: the name recipes use (``task.metric``).
        fn: ``fn(outputs, targets)`` on numpy arrays: per-sample values (N,) or one float per split.
        higher_is_better: the direction, the default of ``task.higher_is_better``.
        binary: whether the per-sample values are 0 or 1 (accuracy-like), the default of
            ``task.binary``; it decides how a drop is bounded (:mod:`hawqtool.confidence`). Declared,
            not read off the values: a teacher-fidelity ``cosine`` scores the float model exactly 1 on
            every sample, which looks binary. ``None``: read off the float model's values.
        teacher: its ``targets`` are the float model's outputs, not labels.
        chance: ``chance(targets) -> float | None``, the value a model that ignores its inputs scores
            (``top1`` on class labels: the most frequent class's share); ``None`` where it does not
            apply. A float baseline at or below chance means the targets do not match the model.
        per_position: on outputs with more than 2 axes (per-token logits (N, T, C)) each sample's
            value is a mean over positions, a fraction, so the metric is continuous there.
        whole_split: its per-sample values depend on the whole split (``perplexity``'s pseudo-values):
            evaluate it once on a split's outputs, not batch by batch.
    """

    name: str
    fn: MetricFn
    higher_is_better: bool = True
    binary: bool | None = None
    teacher: bool = False
    chance: ChanceFn | None = None
    per_position: bool = False
    whole_split: bool = False

    def binary_for(self, output_ndim: int) -> bool | None:
        """Whether the metric is binary on outputs with ``output_ndim`` axes.

        Example:
            >>> get_metric("top1_agreement").binary_for(2), get_metric("top1_agreement").binary_for(3)
            (True, False)
        """
        if self.binary and self.per_position and output_ndim > 2:
            return False
        return self.binary


@dataclass(frozen=True)
class Loss:
    """One loss named in recipes (``task.loss``): ``fn(outputs, targets)`` is the MEAN over the
    batch, differentiable twice; ``teacher``: its targets are the float model's outputs."""

    name: str
    fn: LossFn
    teacher: bool = False


_METRICS = Registry[Metric]("metric")
_LOSSES = Registry[Loss]("loss")


def register_metric(
    name: str,
    fn: MetricFn,
    *,
    higher_is_better: bool = True,
    binary: bool | None = None,
    teacher: bool = False,
    chance: ChanceFn | None = None,
    per_position: bool = False,
    whole_split: bool = False,
    replace: bool = False,
) -> Metric:
    """Make ``fn`` a metric recipes can name: one registration holds everything said about it.

    Raises:
        UsageError: a name that is empty or holds ``:`` (that is an import path), or one already
            registered without ``replace=True``.

    Example:
        >>> m = register_metric("max_abs", lambda o, t: np.abs(o - t).max(axis=-1), higher_is_better=False)
        >>> "max_abs" in metric_names(), get_metric("max_abs").higher_is_better
        (True, False)
        >>> unregister_metric("max_abs").name
        'max_abs'
    """
    _check_word(name, what="metric")
    metric = Metric(name, fn, higher_is_better, binary, teacher, chance, per_position, whole_split)
    _METRICS.add(name, metric, replace=replace)
    return metric


def unregister_metric(name: str) -> Metric:
    """Remove a registered metric (for tests and plug-ins); returns it.

    Raises:
        UsageError: no metric of that name is registered.
    """
    metric = _METRICS.remove(name)
    assert metric is not None
    return metric


def metric_names() -> tuple[str, ...]:
    """The registered metrics' names, in registration order.

    Example:
        >>> metric_names()[:5]
        ('top1', 'top1_agreement', 'cosine', 'mse', 'neg_mse')
    """
    return _METRICS.names()


def get_metric(name: str) -> Metric:
    """A metric by registered name, or a user's function by import path ``package.module:function``
    (higher is better, binary read off the values, no teacher, no chance level: the recipe's
    ``task.higher_is_better`` and ``task.binary`` say otherwise).

    Raises:
        UsageError: an unknown name or an import path that does not resolve.

    Example:
        >>> m = get_metric("top1")
        >>> m.fn is top1, m.higher_is_better, m.binary, m.teacher
        (True, True, True, False)
        >>> float(m.chance(np.array([0, 1, 1, 1])))
        0.75
    """
    if name in _METRICS:
        return _METRICS[name]
    if ":" in name:
        return Metric(name, import_object(name, what="task.metric"))
    raise UsageError(f"unknown metric {name!r}; allowed: {', '.join(_METRICS)} or 'package.module:function'")


def resolve_metric(name: str) -> MetricFn:
    """A metric's function by name or import path (:func:`get_metric`).

    Example:
        >>> resolve_metric("cosine") is cosine
        True
    """
    return get_metric(name).fn


def register_loss(name: str, fn: LossFn, *, teacher: bool = False, replace: bool = False) -> Loss:
    """Make ``fn`` a loss recipes can name (see :func:`register_metric`).

    Example:
        >>> _ = register_loss("l1", torch.nn.functional.l1_loss)
        >>> get_loss("l1").fn is torch.nn.functional.l1_loss, unregister_loss("l1").name
        (True, 'l1')
    """
    _check_word(name, what="loss")
    loss = Loss(name, fn, teacher)
    _LOSSES.add(name, loss, replace=replace)
    return loss


def unregister_loss(name: str) -> Loss:
    """Remove a registered loss; returns it.

    Raises:
        UsageError: no loss of that name is registered.
    """
    loss = _LOSSES.remove(name)
    assert loss is not None
    return loss


def loss_names() -> tuple[str, ...]:
    """The registered losses' names, in registration order.

    Example:
        >>> loss_names()[:3]
        ('cross_entropy', 'mse', 'kl')
    """
    return _LOSSES.names()


def get_loss(name: str) -> Loss:
    """A loss by registered name or import path ``package.module:function``.

    Raises:
        UsageError: an unknown name or an import path that does not resolve.
    """
    if name in _LOSSES:
        return _LOSSES[name]
    if ":" in name:
        return Loss(name, import_object(name, what="task.loss"))
    raise UsageError(f"unknown loss {name!r}; allowed: {', '.join(_LOSSES)} or 'package.module:function'")


def resolve_loss(name: str) -> LossFn:
    """A loss's function by name (``cross_entropy``, ``mse``, ``kl``) or import path.

    Example:
        >>> resolve_loss("kl") is kl
        True
    """
    return get_loss(name).fn


def label_chance(targets: np.ndarray) -> float | None:
    """The most frequent class's share of integer class ``targets``; ``None`` for other targets.

    Example:
        >>> label_chance(np.array([2, 2, 0, 1])), label_chance(np.array([0.5, 1.0]))
        (0.5, None)
    """
    tgt = np.asarray(targets)
    if not np.issubdtype(tgt.dtype, np.integer) or tgt.size == 0 or int(tgt.min()) < 0:
        return None
    return float(np.bincount(tgt.reshape(-1).astype(np.int64)).max() / tgt.size)


def _check_word(name: str, *, what: str) -> None:
    # A recipe names a user's function by import path, so a registered name cannot hold ':'.
    if not isinstance(name, str) or ":" in name:
        raise UsageError(f"a {what} name must be a word without ':' (an import path); got {name!r}")


register_loss("cross_entropy", cross_entropy)
register_loss("mse", F.mse_loss)
register_loss("kl", kl, teacher=True)
register_metric("top1", top1, binary=True, chance=label_chance, per_position=True)
register_metric("top1_agreement", top1_agreement, binary=True, teacher=True, per_position=True)
register_metric("cosine", cosine, binary=False, teacher=True)
register_metric("mse", mse, higher_is_better=False, binary=False)
register_metric("neg_mse", neg_mse, binary=False)
register_metric("perplexity", perplexity, higher_is_better=False, binary=False, whole_split=True)
register_metric("nll", nll, higher_is_better=False, binary=False)
register_metric("kl", token_kl, higher_is_better=False, binary=False, teacher=True)


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
