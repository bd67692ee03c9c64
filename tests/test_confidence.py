"""Paired confidence bounds on a drop: closed forms, exact and simulated coverage, budget rules."""

from __future__ import annotations

import math
from statistics import NormalDist

import numpy as np
import pytest

from hawqtool.confidence import (
    BOOTSTRAP_MAX_N,
    DropEstimate,
    in_range,
    is_binary,
    meets,
    paired_drop,
    paired_drop_batches,
    resolvable_drop,
    samples_needed,
)
from hawqtool.errors import UsageError

Z95 = NormalDist().inv_cdf(0.95)


def binary_pair(
    n: int, losses: int, gains: int, *, both_right: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Float-model / candidate correctness: ``losses`` samples 1→0, ``gains`` 0→1, the rest equal.

    Of the equal samples, ``both_right`` (default half) are right for both models.
    """
    base, cand = np.zeros(n), np.zeros(n)
    base[:losses] = 1.0
    cand[losses : losses + gains] = 1.0
    start = losses + gains
    right = (n - start) // 2 if both_right is None else both_right
    base[start : start + right] = cand[start : start + right] = 1.0
    return base, cand


def wilson_cc_upper(k: int, n: int, z: float) -> float:
    """Continuity-corrected Wilson upper bound of a proportion k/n (the score bound when c = 0).

    Solves (n·p − k − ½)² = z²·n·p(1 − p) for its larger root.
    """
    kk = k + 0.5
    a, b, c = n + z * z, 2 * kk + z * z, kk * kk / n
    return (b + math.sqrt(b * b - 4 * a * c)) / (2 * a)


def clopper_pearson_upper(k: int, n: int, alpha: float) -> float:
    """Exact one-sided upper bound: the p at which P(X ≤ k | n, p) = alpha, binomial tails by math.comb."""
    if k == n:
        return 1.0
    lo, hi = k / n, 1.0
    for _ in range(60):
        p = (lo + hi) / 2
        tail = sum(math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(k + 1))
        lo, hi = (p, hi) if tail > alpha else (lo, p)
    return hi


# ---------------------------------------------------------------------------------- binary: closed forms


@pytest.mark.parametrize("n", [50, 300, 1000])
@pytest.mark.parametrize("losses", [0, 1, 3, 10])
def test_binary_bound_without_gains_is_the_wilson_bound_and_near_clopper_pearson(n: int, losses: int) -> None:
    base, cand = binary_pair(n, losses, 0)
    est = paired_drop(base, cand, confidence=0.95)
    assert est.method == "score-paired" and est.n == n
    assert est.drop == pytest.approx(losses / n)
    # Only losses: the drop is the loss rate, and the score bound is its corrected Wilson bound.
    assert est.upper == pytest.approx(wilson_cc_upper(losses, n, Z95), rel=1e-9)
    # ... which is never below the exact binomial bound, and at most 0.7 of a sample above it.
    cp = clopper_pearson_upper(losses, n, 0.05)
    assert cp <= est.upper <= cp + 0.7 / n


def test_binary_bounds_are_symmetric_and_scale_in_relative_mode() -> None:
    base, cand = binary_pair(300, 7, 2)
    est = paired_drop(base, cand)
    swapped = paired_drop(cand, base)  # the candidate's losses become gains
    assert est.drop == pytest.approx(5 / 300) and swapped.drop == pytest.approx(-5 / 300)
    assert est.lower == pytest.approx(-swapped.upper) and est.upper == pytest.approx(-swapped.lower)
    assert est.lower < est.drop < est.upper
    # Lower-is-better metrics (an error indicator) give the same drop from the flipped values.
    assert paired_drop(1 - base, 1 - cand, higher_is_better=False) == est
    rel = paired_drop(base, cand, mode="relative")
    acc = base.mean()
    assert (rel.drop, rel.lower, rel.upper) == pytest.approx(
        (est.drop / acc, est.lower / acc, est.upper / acc)
    )


def test_exact_binary_coverage_is_at_least_the_confidence() -> None:
    # Enumerate every outcome (losses b, gains c) of n paired samples under a trinomial population
    # with P(loss) = (π + δ)/2, P(gain) = (π − δ)/2, and add up the probability that upper ≥ δ.
    n = 40
    upper = {}
    for b in range(n + 1):
        for c in range(n + 1 - b):
            base, cand = binary_pair(n, b, c, both_right=0)
            upper[b, c] = paired_drop(base, cand, confidence=0.95).upper
    for delta, pi in [(1 / n, 1 / n), (0.05, 0.05), (0.05, 0.15), (0.1, 0.3), (0.025, 0.5), (0.2, 0.6)]:
        p_loss, p_gain = (pi + delta) / 2, (pi - delta) / 2
        coverage = sum(
            math.comb(n, b) * math.comb(n - b, c) * p_loss**b * p_gain**c * (1 - pi) ** (n - b - c)
            for (b, c), u in upper.items()
            if u >= delta - 1e-12
        )
        assert coverage >= 0.95, (delta, pi, coverage)


@pytest.mark.parametrize(("delta", "pi"), [(0.01, 0.01), (0.02, 0.06), (0.05, 0.3)])
def test_simulated_binary_coverage_at_the_budget_edge(delta: float, pi: float) -> None:
    # The true drop is exactly max_drop = δ; a split must fail the candidate at least 95 % of the time.
    rng = np.random.default_rng(1)
    splits, n = 500, 300
    misses = 0
    for _ in range(splits):
        u = rng.random(n)
        base = (rng.random(n) < 0.8).astype(float)
        base[u < pi] = (u[u < pi] < (pi + delta) / 2).astype(float)  # discordant: loss or gain
        cand = base.copy()
        cand[u < pi] = 1 - base[u < pi]
        misses += meets(paired_drop(base, cand), delta)  # upper ≤ δ: the bound failed to cover
    slack = 3 * math.sqrt(0.05 * 0.95 / splits)
    assert misses / splits <= 0.05 + slack
    # Measured: 0.000, 0.038, 0.046 of splits (the point rule, confidence 0: 0.67, 0.52, 0.52).


def test_simulated_relative_binary_coverage() -> None:
    # Base accuracy 0.6, true absolute drop 0.03, so the true relative drop is 0.05 exactly.
    rng = np.random.default_rng(9)
    splits, n = 500, 300
    p_loss, p_gain, p_both = 0.06, 0.03, 0.54  # P(1→0), P(0→1), P(1→1); the rest 0→0
    misses = 0
    for _ in range(splits):
        cell = rng.choice(4, size=n, p=[p_loss, p_gain, p_both, 1 - p_loss - p_gain - p_both])
        base, cand = np.isin(cell, [0, 2]).astype(float), np.isin(cell, [1, 2]).astype(float)
        misses += meets(paired_drop(base, cand, mode="relative"), 0.03 / 0.6)
    assert misses / splits <= 0.05 + 3 * math.sqrt(0.05 * 0.95 / splits)
    # Measured: 0.042 of splits.


def test_candidate_exactly_at_the_point_edge() -> None:
    base, cand = binary_pair(300, 3, 0)  # observed drop 1 % == max_drop
    assert not meets(paired_drop(base, cand, confidence=0.95), 0.01)
    point = paired_drop(base, cand, confidence=0.0)
    assert point.method == "point" and point.lower == point.drop == point.upper == pytest.approx(0.01)
    assert meets(point, 0.01)
    cont = paired_drop(np.full(300, 0.5), np.full(300, 0.5) - np.linspace(0, 0.02, 300), confidence=0.0)
    assert cont.method == "point" and meets(cont, 0.01) and not meets(cont, 0.0099)


# ------------------------------------------------------------------------------ continuous: closed forms


def test_bootstrap_bound_matches_the_normal_closed_form() -> None:
    rng = np.random.default_rng(2)
    n = 400
    base = rng.normal(5.0, 1.0, n)
    cand = base - rng.normal(0.01, 0.3, n)  # per-sample drops: N(0.01, 0.3²)
    d = base - cand
    est = paired_drop(base, cand, resamples=20000, seed=3)
    assert est.method == "bootstrap-paired" and est.n == n
    assert est.drop == pytest.approx(d.mean())
    margin = Z95 * d.std() / math.sqrt(n)
    assert est.upper - est.drop == pytest.approx(margin, rel=0.05)
    assert est.drop - est.lower == pytest.approx(margin, rel=0.05)
    assert est.se == pytest.approx(d.std() / math.sqrt(n), rel=0.05)
    # The same seed gives the same bound; another seed moves it by Monte-Carlo error only.
    assert paired_drop(base, cand, resamples=20000, seed=3) == est
    other = paired_drop(base, cand, resamples=20000, seed=4)
    assert other != est and other.upper == pytest.approx(est.upper, abs=0.05 * margin)


def test_normal_bound_is_the_student_t_bound() -> None:
    d = np.array([0.1, -0.2, 0.3, 0.0, 0.25, -0.05, 0.15, 0.2, -0.1, 0.05, 0.3])  # n = 11
    est = paired_drop(d, np.zeros(11), method="normal-paired")
    # t quantile 0.95 with 10 degrees of freedom, from tables: 1.812461.
    se = d.std(ddof=1) / math.sqrt(11)
    assert est.method == "normal-paired" and est.se == pytest.approx(se)
    assert est.upper == pytest.approx(d.mean() + 1.812461 * se, abs=1e-4 * se)
    assert est.lower == pytest.approx(d.mean() - 1.812461 * se, abs=1e-4 * se)


def test_relative_bootstrap_and_delta_method_agree() -> None:
    rng = np.random.default_rng(5)
    base = rng.uniform(0.5, 1.0, 500)
    cand = base - rng.normal(0.02, 0.05, 500)
    boot = paired_drop(base, cand, mode="relative", seed=0)
    normal = paired_drop(base, cand, mode="relative", method="normal-paired")
    assert boot.drop == normal.drop == pytest.approx((base - cand).mean() / base.mean())
    assert boot.upper == pytest.approx(normal.upper, rel=0.03)
    assert boot.lower == pytest.approx(normal.lower, rel=0.05)


def test_auto_picks_the_method_by_data() -> None:
    rng = np.random.default_rng(0)
    assert paired_drop(np.ones(10), np.ones(10)).method == "score-paired"
    assert paired_drop(rng.random(10), rng.random(10)).method == "bootstrap-paired"
    big = rng.random(BOOTSTRAP_MAX_N + 1)
    assert paired_drop(big, big - 0.01).method == "normal-paired"
    # A candidate identical to the float model on a continuous metric: no spread, no margin.
    same = paired_drop(big[:50], big[:50])
    assert same.drop == same.lower == same.upper == 0.0
    # Declared, the metric's kind wins over what its values look like.
    assert paired_drop(np.ones(10), np.ones(10), binary=False).method == "bootstrap-paired"
    assert paired_drop(np.ones(10), np.ones(10), binary=True).method == "score-paired"
    with pytest.raises(UsageError, match="declared binary"):
        paired_drop(np.ones(10), np.full(10, 0.5), binary=True)


@pytest.mark.parametrize("skewed", [False, True])
def test_simulated_continuous_coverage(skewed: bool) -> None:
    rng = np.random.default_rng(6)
    splits, n, true_drop = 400, 60, 0.05
    misses = 0
    for i in range(splits):
        base = rng.normal(1.0, 0.2, n)
        # Per-sample drop with mean exactly true_drop: normal, or right-skewed (exponential), as an
        # MSE increase is.
        d = rng.exponential(true_drop, n) if skewed else rng.normal(true_drop, 0.1, n)
        est = paired_drop(base, base - d, resamples=500, seed=i)
        misses += est.upper < true_drop
    slack = 3 * math.sqrt(0.05 * 0.95 / splits)
    assert misses / splits <= 0.05 + slack
    # Measured: 0.0525 (normal) and 0.060 (exponential) of splits; the point rule: 0.51 and 0.53.


# ---------------------------------------------------------------------------------------------- batches


def test_batch_bound_is_a_weighted_bootstrap_over_batches() -> None:
    rng = np.random.default_rng(7)
    k = 200
    base = rng.uniform(0.8, 1.0, k)
    d = rng.normal(0.01, 0.02, k)
    w = np.full(k, 32.0)
    est = paired_drop_batches(base, base - d, w, resamples=20000, seed=1)
    assert est.method == "bootstrap-batches" and est.n == k
    assert est.drop == pytest.approx(d.mean())
    assert est.upper - est.drop == pytest.approx(Z95 * d.std() / math.sqrt(k), rel=0.06)
    # Weights: the drop is the size-weighted mean of the batch drops.
    w2 = np.where(np.arange(k) % 2 == 0, 10.0, 30.0)
    assert paired_drop_batches(base, base - d, w2).drop == pytest.approx((w2 * d).sum() / w2.sum())
    rel = paired_drop_batches(base, base - d, w2, mode="relative")
    assert rel.drop == pytest.approx((w2 * d).sum() / (w2 * base).sum())
    assert paired_drop_batches(base, base - d, w, confidence=0).method == "point"


def test_simulated_batch_coverage() -> None:
    rng = np.random.default_rng(8)
    splits, k, true_drop = 1000, 20, 0.02
    misses = 0
    for i in range(splits):
        base = rng.uniform(0.8, 1.0, k)
        d = rng.normal(true_drop, 0.03, k)
        w = rng.integers(20, 40, k).astype(float)  # unequal batch sizes, independent of the drops
        misses += paired_drop_batches(base, base - d, w, resamples=500, seed=i).upper < true_drop
    assert misses / splits <= 0.05 + 3 * math.sqrt(0.05 * 0.95 / splits)
    # Measured: 0.064 of splits; 0.052 to 0.059 in runs of 2000 splits with 10 to 100 batches.


def test_batch_errors_name_the_problem() -> None:
    with pytest.raises(UsageError, match="at least 5 batches; got 3"):
        paired_drop_batches(np.ones(3), np.ones(3), np.ones(3))
    with pytest.raises(UsageError, match="finite and positive"):
        paired_drop_batches(np.ones(6), np.ones(6), np.array([1, 1, 1, 1, 1, 0]))
    with pytest.raises(UsageError, match=r"weights must have the batches' shape \(6,\); got \(5,\)"):
        paired_drop_batches(np.ones(6), np.ones(6), np.ones(5))


# ----------------------------------------------------------------------------------------- budget rules


def test_meets_and_in_range() -> None:
    est = DropEstimate(drop=0.02, lower=0.012, upper=0.028, se=0.005, confidence=0.95, method="x", n=300)
    assert meets(est, 0.028) and meets(est, 0.03) and not meets(est, 0.0279)
    assert meets(est, 0.028 - 1e-13)  # round-off in a mean is not a miss
    assert in_range(est, min_drop=0.012, max_drop=0.03)
    assert not in_range(est, min_drop=0.015, max_drop=0.03)  # the drop may be below min_drop
    assert not in_range(est, min_drop=0.0, max_drop=0.025)
    assert est.to_dict()["upper"] == 0.028


def test_resolvable_drop_and_samples_needed_hand_checked() -> None:
    # Point rule: one sample of 300 is 1/300.
    assert resolvable_drop(300, confidence=0.0) == pytest.approx(1 / 300)
    # At 0.95: the Wilson bound of 1 loss in 300 with continuity correction, by hand:
    # k = 1.5, z² = 2.70554; a = 302.70554, b = 5.70554, c = 0.0075;
    # (5.70554 + sqrt(32.5532 − 9.08117)) / 605.41108 = (5.70554 + 4.84480) / 605.41108 = 0.017427
    r = resolvable_drop(300, confidence=0.95)
    assert r == pytest.approx(0.017427, abs=1e-6)
    base, cand = binary_pair(300, 1, 0)
    assert paired_drop(base, cand).upper == pytest.approx(r)  # the definition: one lost sample
    assert resolvable_drop(300, confidence=0.95, mode="relative", baseline=0.9) == pytest.approx(r / 0.9)
    assert resolvable_drop(300, confidence=0.95, binary=False) == 0.0

    assert samples_needed(0.01, confidence=0.0) == 100
    assert samples_needed(0.0001, confidence=0.0) == 10000
    n = samples_needed(0.01, confidence=0.95)
    assert n == 525  # the same equation solved for n at p = 0.01: 525 (524 gives 0.0100187)
    assert resolvable_drop(n, confidence=0.95) <= 0.01 < resolvable_drop(n - 1, confidence=0.95)
    assert samples_needed(0.02, confidence=0.95, mode="relative", baseline=0.5) == 525
    assert samples_needed(1.0, confidence=0.95) == 1


# ----------------------------------------------------------------------------------------------- errors


def test_bad_input_is_named() -> None:
    ones = np.ones(5)
    with pytest.raises(UsageError, match=r"same length.*\(5,\) and \(4,\)"):
        paired_drop(ones, np.ones(4))
    with pytest.raises(UsageError, match="1 NaN or infinite"):
        paired_drop(ones, np.array([1, 1, np.nan, 1, 1]))
    with pytest.raises(UsageError, match=r"confidence must be in \[0, 1\).*got 1.0"):
        paired_drop(ones, ones, confidence=1.0)
    with pytest.raises(UsageError, match="mode 'percent' is not allowed; allowed: absolute, relative"):
        paired_drop(ones, ones, mode="percent")
    with pytest.raises(UsageError, match="method 'exact' is not allowed; allowed: auto, score-paired"):
        paired_drop(ones, ones, method="exact")
    with pytest.raises(UsageError, match=r"'score-paired' needs per-sample values in \{0, 1\}"):
        paired_drop(ones * 0.5, ones, method="score-paired")
    with pytest.raises(UsageError, match="nonzero baseline"):
        paired_drop(np.zeros(5), -np.ones(5), mode="relative")
    with pytest.raises(UsageError, match="at least 2 samples; got 1"):
        paired_drop(np.array([0.5]), np.array([0.4]))
    with pytest.raises(UsageError, match="resamples must be at least 100; got 10"):
        paired_drop(ones * 0.5, ones, resamples=10)
    with pytest.raises(UsageError, match=r"positive and finite.*got 0"):
        samples_needed(0, confidence=0.95)
    with pytest.raises(UsageError, match="nonzero baseline metric; got baseline=None"):
        resolvable_drop(300, confidence=0.95, mode="relative")
    assert is_binary(np.array([0.0, 1.0])) and not is_binary(np.array([0.0, 0.5]))
