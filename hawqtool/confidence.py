"""Paired confidence bounds on a candidate's metric drop, so a budget holds beyond the evaluation split.

The search used to accept the cheapest candidate whose *observed* drop on the evaluation split was
within ``budget.max_drop``; picked at the edge, it then missed the budget about half the time on a
fresh split. Here a candidate meets the budget when the one-sided upper confidence bound of its
*population* drop is within ``max_drop``. The bound is paired: the float model and the candidate are
scored on the same samples, so only the samples on which they differ add uncertainty.

What the pipeline calls:

- :func:`paired_drop` with per-sample metric values of the float model and of the candidate
  (the same samples, in the same order) → a :class:`DropEstimate`;
- :func:`paired_drop_batches` when the metric is one number per split: the same with per-batch
  (or per-chunk) values weighted by their sizes;
- :func:`meets` / :func:`in_range` to compare an estimate with ``budget.max_drop`` / ``min_drop``;
- :func:`resolvable_drop` / :func:`samples_needed` before the search, to refuse a budget the split
  cannot resolve (binary metrics such as top-1, see :func:`is_binary`).

Bounds by case (``method="auto"``):

- ``score-paired``: the metric is binary, as declared (``binary``, from ``task.binary`` or the
  built-in metric) or, undeclared, both value arrays are in {0, 1} (accuracy-like). Tango's
  asymptotic score bound for the difference of paired proportions (Tango 1998, Stat. Med. 17:891),
  inverted one-sided, with a half-sample continuity correction. Why: the plug-in normal (Wald) bound
  has zero width when no sample changes, and the conditional exact (McNemar / Clopper–Pearson on
  b/(b+c)) bound treats the number of changed samples as fixed, which badly under-covers when the
  candidate only loses samples (exactly 58 % coverage at a nominal 95 % with n = 300, a true drop of
  1 % and no gains). The score bound estimates the nuisance (how often the two models disagree)
  under each hypothesised drop, so its width stays honest with few discordant pairs; with no gains
  (c = 0) it reduces to the continuity-corrected Wilson bound on the loss rate. Exact coverage,
  enumerated over the trinomial for n from 20 to 1000 and drops from 1/n to 0.2, was never below
  nominal at confidence 0.8, 0.9, 0.95 and 0.99 (lowest 0.9513 at 0.95); without the correction it
  dipped to 0.940. In relative mode the bounds are divided by ``|mean(base)|``: the baseline's own
  sampling error is second order there (simulated coverage 0.958 to 0.978 at 0.95).
- ``bootstrap-paired``: a continuous metric, n ≤ 20 000. BCa bootstrap of the pairs (Efron 1987):
  bias and skew corrected, which matters for right-skewed drops such as per-sample MSE increases
  where a symmetric normal bound is too low; "expanded" (its normal quantiles replaced by
  sqrt(n/(n−1))·Student-t ones, Hesterberg 2015) so that it is not too narrow at small n.
- ``normal-paired``: a continuous metric, n > 20 000 (the bootstrap costs resamples × n and the
  skew error of the normal bound shrinks as 1/√n). Student-t bound on the mean paired difference;
  in relative mode the delta method for the ratio.
- ``bootstrap-batches``: :func:`paired_drop_batches`, the same expanded BCa bootstrap over batches.
- ``point``: ``confidence == 0``: the old rule, lower == upper == the observed drop.

Drops are in the budget's units: ``absolute`` (metric units) or ``relative`` (a fraction of the
float model's mean metric on the same samples, ``|mean(base)|``). A positive drop is a loss.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from statistics import NormalDist
from typing import Any

import numpy as np

from hawqtool.errors import UsageError

MODES = ("absolute", "relative")
METHODS = ("auto", "score-paired", "bootstrap-paired", "normal-paired")
TOLERANCE = 1e-12
"""Slack of :func:`meets`, :func:`in_range` and :func:`samples_needed`: float round-off in a mean
must not turn a drop of exactly ``max_drop`` into a miss."""

# Above this many samples "auto" uses the normal bound instead of the bootstrap (cost resamples × n).
BOOTSTRAP_MAX_N = 20_000
# Fewer batches than this give a bootstrap distribution with too little support to bound anything.
MIN_BATCHES = 5
# The half-sample continuity correction of the score bound (see the module docstring for why).
_CONTINUITY = 0.5
# Elements gathered per bootstrap chunk: bounds memory to ~100 MB whatever n and resamples are.
_CHUNK_ELEMENTS = 1 << 22
_NORMAL = NormalDist()


@dataclass(frozen=True)
class DropEstimate:
    """A candidate's drop against the float model on the same samples, with one-sided bounds.

    Attributes:
        drop: the observed drop on the split (the point estimate), in the budget's mode.
        lower: one-sided lower bound at ``confidence``: the population drop is at least this with
            probability ``confidence``. Equals ``drop`` when ``confidence == 0``.
        upper: one-sided upper bound at ``confidence``: the population drop is at most this with
            probability ``confidence``. Equals ``drop`` when ``confidence == 0``.
        se: standard error of ``drop`` (the bootstrap's standard deviation for bootstrap methods).
        confidence: the level of each one-sided bound, in [0, 1).
        method: ``score-paired``, ``bootstrap-paired``, ``normal-paired``, ``bootstrap-batches``
            or ``point``.
        n: samples compared (batches for ``bootstrap-batches``).
    """

    drop: float
    lower: float
    upper: float
    se: float
    confidence: float
    method: str
    n: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def is_binary(values: np.ndarray) -> bool:
    """Whether every value is 0 or 1 (an accuracy-like per-sample metric).

    Example:
        >>> is_binary(np.array([1.0, 0.0, 1.0])), is_binary(np.array([0.5, 1.0]))
        (True, False)
    """
    v = np.asarray(values)
    return bool(np.all((v == 0) | (v == 1)))


def paired_drop(
    base: np.ndarray,
    cand: np.ndarray,
    *,
    confidence: float = 0.95,
    mode: str = "absolute",
    higher_is_better: bool = True,
    method: str = "auto",
    binary: bool | None = None,
    seed: int | np.random.Generator = 0,
    resamples: int = 4000,
) -> DropEstimate:
    """Drop of a candidate against the float model, with one-sided bounds at ``confidence``.

    Per sample the drop is ``base - cand`` (``cand - base`` when lower is better); the drop is its
    mean (``absolute``) or its mean over ``|mean(base)|`` (``relative``, a ratio estimator).

    Args:
        base: per-sample metric values of the float model, shape (n,).
        cand: per-sample metric values of the candidate on the same samples, shape (n,).
        confidence: level of each one-sided bound, in [0, 1); 0 gives the point rule.
        mode: ``absolute`` (metric units) or ``relative`` (a fraction of the baseline mean).
        higher_is_better: the metric's direction.
        method: ``auto`` (see the module docstring), ``score-paired`` (values in {0, 1} only),
            ``bootstrap-paired`` or ``normal-paired``.
        binary: whether the metric is 0/1 per sample, for ``auto``: ``True`` bounds with the score
            method, ``False`` as a continuous metric even where the values happen to be all 0 or 1
            (a teacher-fidelity cosine of exactly 1); ``None`` reads it off the values
            (:func:`is_binary`).
        seed: seed or generator of the bootstrap resampling; the bound is a function of it.
        resamples: bootstrap resamples (≥ 100).

    Returns:
        The estimate; compare it with the budget through :func:`meets`.

    Raises:
        UsageError: arrays of different or bad shapes, non-finite values, a relative drop on a
            zero baseline, too few samples for the method, values not in {0, 1} for a binary metric,
            or a bad argument.

    Example:
        >>> base = np.ones(300)
        >>> cand = np.ones(300); cand[:3] = 0          # the candidate loses 3 of 300 samples
        >>> est = paired_drop(base, cand)
        >>> est.method, round(est.drop, 4), round(est.upper, 4)
        ('score-paired', 0.01, 0.0271)
        >>> meets(est, 0.01), meets(paired_drop(base, cand, confidence=0), 0.01)
        (False, True)
    """
    b, c = _pair(base, cand, what="base and cand")
    _check_options(confidence=confidence, mode=mode, method=method, resamples=resamples)
    d = b - c if higher_is_better else c - b
    n = d.size
    scale = _relative_scale(b, mode)
    drop = float(d.mean()) / scale

    values_binary = is_binary(b) and is_binary(c)
    if binary and not values_binary:
        raise UsageError(
            "the metric is declared binary (task.binary) but its per-sample values are not all 0 or 1; "
            "declare task.binary: false for a continuous metric"
        )
    if method == "auto":
        if values_binary if binary is None else binary:
            method = "score-paired"
        else:
            method = "bootstrap-paired" if n <= BOOTSTRAP_MAX_N else "normal-paired"
    if method == "score-paired" and not values_binary:
        raise UsageError(
            "method 'score-paired' needs per-sample values in {0, 1} (accuracy-like); "
            "use 'auto', 'bootstrap-paired' or 'normal-paired' for other metrics"
        )

    if method == "score-paired":
        losses, gains = int((d > 0).sum()), int((d < 0).sum())
        se = math.sqrt(max((losses + gains) / n - (drop * scale) ** 2, 0.0) / n) / scale
        if confidence == 0:
            return DropEstimate(drop, drop, drop, se, 0.0, "point", n)
        z = _NORMAL.inv_cdf(confidence)
        upper = _score_upper(losses, gains, n, z) / scale
        lower = -_score_upper(gains, losses, n, z) / scale
        return DropEstimate(drop, min(lower, drop), max(upper, drop), se, confidence, method, n)

    if n < 2:
        raise UsageError(f"method {method!r} needs at least 2 samples; got {n}")
    # Both remaining methods bound the ratio of sums Σd / |Σc|: c ≡ 1 (absolute) or c = base.
    denom = np.ones(n) if mode == "absolute" else b
    if method == "normal-paired" or confidence == 0:
        return _normal(d, denom, confidence=confidence, method=method)
    return _bca(d, denom, confidence=confidence, seed=seed, resamples=resamples, method=method)


def paired_drop_batches(
    base: np.ndarray,
    cand: np.ndarray,
    weights: np.ndarray,
    *,
    confidence: float = 0.95,
    mode: str = "absolute",
    higher_is_better: bool = True,
    seed: int | np.random.Generator = 0,
    resamples: int = 4000,
) -> DropEstimate:
    """:func:`paired_drop` for a metric that is one number per split: per-batch values instead.

    The split's metric is taken as the ``weights``-weighted mean of the batch values (exact for a
    metric that is a mean over samples, an approximation otherwise), and the bound is a BCa
    bootstrap over batches (method ``bootstrap-batches``). Batches must be paired: batch k of the
    float model and of the candidate hold the same samples. Use many small batches: with K batches
    the bound can only be as good as K samples allow (:func:`hawqtool.tasks.metric_by_chunks`
    cuts a split's outputs into equal chunks).

    Args:
        base: the float model's metric on each batch, shape (K,), K ≥ 5.
        cand: the candidate's metric on the same batches, shape (K,).
        weights: each batch's size (any positive weights), shape (K,).
        confidence: level of each one-sided bound, in [0, 1); 0 gives the point rule.
        mode: ``absolute`` or ``relative`` (a fraction of the weighted baseline mean).
        higher_is_better: the metric's direction.
        seed: seed or generator of the bootstrap resampling.
        resamples: bootstrap resamples (≥ 100).

    Raises:
        UsageError: shapes differ, fewer than 5 batches, a weight that is not positive, non-finite
            values, a relative drop on a zero baseline, or a bad argument.

    Example:
        >>> base = np.full(10, 0.9); cand = np.array([0.9, 0.85] * 5)
        >>> est = paired_drop_batches(base, cand, np.full(10, 30))
        >>> round(est.drop, 3), est.method, est.n, est.upper > est.drop
        (0.025, 'bootstrap-batches', 10, True)
    """
    b, c = _pair(base, cand, what="base and cand")
    w = np.asarray(weights, dtype=np.float64)
    if w.shape != b.shape:
        raise UsageError(f"weights must have the batches' shape {b.shape}; got {w.shape}")
    if not np.all(np.isfinite(w) & (w > 0)):
        raise UsageError(f"batch weights must be finite and positive; got {w.tolist()}")
    if b.size < MIN_BATCHES:
        raise UsageError(
            f"bootstrap-batches needs at least {MIN_BATCHES} batches; got {b.size}: "
            "score the split in more, smaller chunks"
        )
    _check_options(confidence=confidence, mode=mode, method="auto", resamples=resamples)
    d = b - c if higher_is_better else c - b
    denom = w if mode == "absolute" else w * b
    if mode == "relative" and float(denom.sum()) == 0:
        raise UsageError("a relative drop needs a nonzero baseline metric; got a weighted mean of 0")
    if confidence == 0:
        return _normal(w * d, denom, confidence=0.0, method="point")
    return _bca(
        w * d, denom, confidence=confidence, seed=seed, resamples=resamples, method="bootstrap-batches"
    )


def meets(est: DropEstimate, max_drop: float) -> bool:
    """Whether the candidate meets the budget: its upper bound is at most ``max_drop``.

    At ``confidence == 0`` this is the point rule ``drop <= max_drop``.

    Example:
        >>> meets(DropEstimate(0.004, 0.0, 0.012, 0.004, 0.95, "score-paired", 300), 0.01)
        False
    """
    return est.upper <= max_drop + TOLERANCE


def in_range(est: DropEstimate, *, min_drop: float, max_drop: float) -> bool:
    """Whether the candidate is inside a ``[min_drop, max_drop]`` budget range.

    It meets ``max_drop`` (:func:`meets`) and its lower bound is at least ``min_drop``: with
    confidence it uses at least ``min_drop`` of the budget, so a search may stop there. At
    ``confidence == 0`` this is ``min_drop <= drop <= max_drop``.

    Example:
        >>> in_range(DropEstimate(0.02, 0.012, 0.028, 0.005, 0.95, "score-paired", 300),
        ...          min_drop=0.01, max_drop=0.03)
        True
    """
    return meets(est, max_drop) and est.lower >= min_drop - TOLERANCE


def resolvable_drop(
    n: int,
    *,
    confidence: float,
    binary: bool = True,
    mode: str = "absolute",
    baseline: float | None = None,
) -> float:
    """The smallest ``max_drop`` that a split of ``n`` samples can resolve.

    Definition: the upper bound :func:`paired_drop` gives a candidate that agrees with the float model
    on every sample but one, which it loses (binary metric, b = 1 loss, c = 0 gains). A budget below
    it is unresolvable: only a candidate that loses no sample at all, or wins some back, could meet
    it, so the search has nothing to choose from. At ``confidence == 0`` it is 1/n (one sample's
    change); above, the one-sided bound's margin is added (the continuity-corrected Wilson upper
    bound of 1 loss in n, 5.2/n to 5.3/n at 0.95). Non-binary metrics have no such granularity: a
    candidate close enough to the float model has an arbitrarily small drop and spread, so 0.

    The pipeline: ``if max_drop < resolvable_drop(n, ...) - TOLERANCE``: refuse, quoting
    :func:`samples_needed`.

    Args:
        n: samples in the evaluation split.
        confidence: the level the budget is checked at, in [0, 1).
        binary: whether the metric is binary per sample (:func:`is_binary` on the baseline values).
        mode: the budget's mode; ``relative`` divides by ``|baseline|``.
        baseline: the float model's metric on the split; required in relative mode.

    Raises:
        UsageError: ``n < 1``, a bad ``confidence`` or ``mode``, or relative mode without a nonzero
            ``baseline``.

    Example:
        >>> round(resolvable_drop(300, confidence=0.0), 5), round(resolvable_drop(300, confidence=0.95), 5)
        (0.00333, 0.01743)
    """
    if n < 1:
        raise UsageError(f"the evaluation split needs at least 1 sample; got n={n}")
    _check_options(confidence=confidence, mode=mode, method="auto", resamples=100)
    scale = 1.0
    if mode == "relative":
        if baseline is None or baseline == 0 or not math.isfinite(baseline):
            raise UsageError(f"a relative budget needs the nonzero baseline metric; got baseline={baseline}")
        scale = abs(baseline)
    if not binary:
        return 0.0
    if confidence == 0:
        return 1.0 / n / scale
    return _score_upper(1, 0, n, _NORMAL.inv_cdf(confidence)) / scale


def samples_needed(
    max_drop: float, *, confidence: float, mode: str = "absolute", baseline: float | None = None
) -> int:
    """Samples a binary metric's evaluation split needs so that ``max_drop`` is resolvable.

    The smallest n with ``resolvable_drop(n, ...) <= max_drop`` (within :data:`TOLERANCE`): the split
    on which a candidate that loses one sample can still meet the budget.

    Raises:
        UsageError: ``max_drop`` is not positive and finite, or a bad ``confidence``, ``mode`` or
            ``baseline`` (see :func:`resolvable_drop`).

    Example:
        >>> samples_needed(0.01, confidence=0.0), samples_needed(0.01, confidence=0.95)
        (100, 525)
    """
    if not (math.isfinite(max_drop) and max_drop > 0):
        raise UsageError(f"max_drop must be positive and finite to be resolvable; got {max_drop}")

    def ok(n: int) -> bool:
        return resolvable_drop(n, confidence=confidence, mode=mode, baseline=baseline) <= max_drop + TOLERANCE

    hi = 1
    while not ok(hi):
        hi *= 2
        if hi > 1 << 50:
            raise UsageError(f"max_drop {max_drop} is too small to resolve with any split")
    lo = hi // 2  # not ok (or 0)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if ok(mid):
            hi = mid
        else:
            lo = mid
    return hi


def _pair(base: np.ndarray, cand: np.ndarray, *, what: str) -> tuple[np.ndarray, np.ndarray]:
    b = np.asarray(base, dtype=np.float64)
    c = np.asarray(cand, dtype=np.float64)
    if b.ndim != 1 or b.shape != c.shape or b.size == 0:
        raise UsageError(
            f"{what} must be 1-D, non-empty and of the same length (paired on the same samples); "
            f"got shapes {b.shape} and {c.shape}"
        )
    bad = int((~np.isfinite(b)).sum() + (~np.isfinite(c)).sum())
    if bad:
        raise UsageError(f"{what} hold {bad} NaN or infinite values; a drop needs finite metrics")
    return b, c


def _check_options(*, confidence: float, mode: str, method: str, resamples: int) -> None:
    if not (0 <= confidence < 1):
        raise UsageError(f"confidence must be in [0, 1) (0 = point estimate); got {confidence}")
    if mode not in MODES:
        raise UsageError(f"mode {mode!r} is not allowed; allowed: {', '.join(MODES)}")
    if method not in METHODS:
        raise UsageError(f"method {method!r} is not allowed; allowed: {', '.join(METHODS)}")
    if resamples < 100:
        raise UsageError(f"resamples must be at least 100; got {resamples}")


def _relative_scale(base: np.ndarray, mode: str) -> float:
    if mode == "absolute":
        return 1.0
    scale = abs(float(base.mean()))
    if scale == 0:
        raise UsageError("a relative drop needs a nonzero baseline metric; the float model's mean is 0")
    return scale


def _score_upper(losses: int, gains: int, n: int, z: float) -> float:
    """Upper bound on p10 − p01 from ``losses`` (1→0) and ``gains`` (0→1) among ``n`` pairs.

    The largest δ that Tango's one-sided score test does not reject: with q̂ the maximum-likelihood
    p01 under δ, ``(b − c + ½ − nδ) ≥ −z·sqrt(n(2q̂ + δ − δ²))``. The left side falls with δ, so
    bisection on [observed, 1] finds it.
    """
    b, c = float(losses), float(gains)

    def accepted(delta: float) -> bool:
        # Restricted MLE of p01 under p10 − p01 = delta (the positive root of the score equation).
        bq = (b + c) - delta * (2 * n - b + c)
        q = (bq + math.sqrt(max(bq * bq + 8 * n * c * delta * (1 - delta), 0.0))) / (4 * n)
        q = min(max(q, max(0.0, -delta)), (1 - delta) / 2)
        var = max(2 * q + delta - delta * delta, 0.0)
        return b - c + _CONTINUITY - n * delta >= -z * math.sqrt(n * var)

    lo, hi = (b - c) / n, 1.0
    if accepted(hi):
        return hi
    for _ in range(80):
        mid = 0.5 * (lo + hi)
        if accepted(mid):
            lo = mid
        else:
            hi = mid
    return hi


def _t_quantile(p: float, df: int) -> float:
    """Student-t quantile by the Cornish–Fisher expansion (Abramowitz & Stegun 26.7.5).

    Within 1e-3 of the exact value for df ≥ 4 at levels up to 0.99 (no scipy dependency).
    """
    z = _NORMAL.inv_cdf(p)
    v = float(df)
    g1 = (z**3 + z) / 4
    g2 = (5 * z**5 + 16 * z**3 + 3 * z) / 96
    g3 = (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / 384
    g4 = (79 * z**9 + 776 * z**7 + 1482 * z**5 - 1920 * z**3 - 945 * z) / 92160
    return z + g1 / v + g2 / v**2 + g3 / v**3 + g4 / v**4


def _normal(num: np.ndarray, denom: np.ndarray, *, confidence: float, method: str) -> DropEstimate:
    """t bound on θ = Σnum / |Σdenom| with the delta-method (linearised) standard error."""
    n = num.size
    total = float(denom.sum())
    if total == 0:
        raise UsageError("a relative drop needs a nonzero baseline metric; the float model's mean is 0")
    theta = float(num.sum()) / abs(total)
    # Influence of each sample on the ratio; for an absolute drop (denom ≡ 1) it is d_i − mean(d).
    psi = (num - theta * math.copysign(1.0, total) * denom) / (abs(total) / n)
    se = float(psi.std(ddof=1)) / math.sqrt(n)
    if confidence == 0:
        return DropEstimate(theta, theta, theta, se, 0.0, "point", n)
    margin = _t_quantile(confidence, n - 1) * se
    return DropEstimate(theta, theta - margin, theta + margin, se, confidence, method, n)


def _bca(
    num: np.ndarray,
    denom: np.ndarray,
    *,
    confidence: float,
    seed: int | np.random.Generator,
    resamples: int,
    method: str,
) -> DropEstimate:
    """BCa bootstrap bounds on θ = Σnum / |Σdenom|, resampling the units (samples or batches)."""
    n = num.size
    total_num, total_den = float(num.sum()), float(denom.sum())
    if total_den == 0:
        raise UsageError("a relative drop needs a nonzero baseline metric; the float model's mean is 0")
    theta = total_num / abs(total_den)
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    chunk = max(1, _CHUNK_ELEMENTS // n)
    constant = bool(np.all(denom == denom[0]))  # absolute drop, equal weights: skip half the work
    stats = np.empty(resamples)
    for start in range(0, resamples, chunk):
        stop = min(start + chunk, resamples)
        idx = rng.integers(0, n, size=(stop - start, n))
        den = abs(total_den) if constant else np.abs(denom[idx].sum(axis=1))
        stats[start:stop] = num[idx].sum(axis=1) / den
    se = float(stats.std(ddof=1))

    # Bias correction: where θ falls in its bootstrap distribution (ties count half).
    frac = (np.sum(stats < theta) + 0.5 * np.sum(stats == theta)) / resamples
    frac = min(max(frac, 0.5 / resamples), 1 - 0.5 / resamples)
    z0 = _NORMAL.inv_cdf(frac)
    # Acceleration from the jackknife (leave one unit out, in closed form for a ratio of sums).
    loo_den = total_den - denom
    with np.errstate(divide="ignore", invalid="ignore"):
        jack = (total_num - num) / np.abs(loo_den)
    jack = jack[np.isfinite(jack)]
    dev = jack.mean() - jack if jack.size else np.zeros(1)
    ss = float(np.sum(dev**2))
    accel = float(np.sum(dev**3)) / (6 * ss**1.5) if ss > 0 else 0.0

    def bound(level: float) -> float:
        # Expanded bootstrap (Hesterberg 2015): the normal quantile becomes sqrt(n/(n−1))·t(n−1),
        # undoing the percentile bootstrap's known narrowness at small n (few batches especially).
        zl = math.sqrt(n / (n - 1)) * _t_quantile(level, n - 1)
        shrink = 1 - accel * (z0 + zl)
        if shrink <= 0:  # extreme skew: the adjusted level runs off the end of the distribution
            return float(stats.max() if level > 0.5 else stats.min())
        adjusted = _NORMAL.cdf(z0 + (z0 + zl) / shrink)
        return float(np.quantile(stats, adjusted))

    upper, lower = bound(confidence), bound(1 - confidence)
    return DropEstimate(theta, min(lower, theta), max(upper, theta), se, confidence, method, n)
