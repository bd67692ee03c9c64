"""Bisection under an accuracy budget, against planted monotone accuracy curves with known answers."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
from hypothesis import given, seed, settings
from hypothesis import strategies as st

from hawqtool.errors import UsageError
from hawqtool.search import SearchResult, bisect, max_evaluations
from hawqtool.types import Budget, FrontierPoint, Trial


def points(n: int) -> list[FrontierPoint]:
    return [
        FrontierPoint(cost=float(i + 1), omega=float(n - i), allocation={"fc": f"p{i}"}, avg_bits=2 + i)
        for i in range(n)
    ]


class Planted:
    """Accuracy rises with the candidate index (cost); counts every call."""

    def __init__(self, curve: list[float]) -> None:
        self.curve = curve
        self.calls: list[int] = []

    def __call__(self, p: FrontierPoint) -> float:
        i = int(p.cost) - 1 if p.allocation["fc"].startswith("p") else -1
        self.calls.append(i)
        return self.curve[i] if i >= 0 else self.repaired

    repaired = 0.0


def curve_from_threshold(n: int, first_ok: int, baseline: float = 0.9) -> list[float]:
    """Monotone accuracies: index ≥ first_ok drops ≤ 0.01 from baseline, earlier ones more."""
    return [baseline - (0.005 if i >= first_ok else 0.02 + 0.01 * (first_ok - i)) for i in range(n)]


@seed(1234)
@settings(max_examples=200, deadline=None)
@given(st.integers(1, 300), st.data())
def test_bisection_finds_cheapest_feasible_point(n: int, data: st.DataObject) -> None:
    first_ok = data.draw(st.integers(0, n - 1))
    ev = Planted(curve_from_threshold(n, first_ok))
    r = bisect(points(n), ev, baseline=0.9, budget=Budget(0.01), progress=False)
    assert r.budget_met and r.chosen_index == first_ok and r.reason == "converged"
    assert r.chosen is not None and r.chosen.cost == first_ok + 1
    assert r.evaluations == len(ev.calls) <= math.ceil(math.log2(n)) + 2
    assert len(set(ev.calls)) == len(ev.calls)  # never the same candidate twice
    assert ev.calls[0] == n - 1  # the most precise point first
    assert all(t.met == (t.index >= first_ok) for t in r.trials)


@seed(4321)
@settings(max_examples=200, deadline=None)
@given(st.integers(2, 3000), st.data())
def test_a_cost_tolerance_stops_within_it_of_the_cheapest_feasible_point(n: int, data: st.DataObject) -> None:
    first_ok = data.draw(st.integers(0, n - 1))
    tol = data.draw(st.sampled_from([0.001, 0.01, 0.05]))
    curve = curve_from_threshold(n, first_ok)

    def ev(p: FrontierPoint) -> float:
        return curve[int(p.allocation["fc"][1:])]

    pts = [replace(p, cost=100.0 + p.cost) for p in points(n)]  # costs 101 … 100 + n, 1 apart
    exact = bisect(pts, ev, baseline=0.9, budget=Budget(0.01), progress=False)
    r = bisect(pts, ev, baseline=0.9, budget=Budget(0.01), progress=False, cost_tolerance=tol)
    assert exact.chosen is not None and r.chosen is not None and r.budget_met
    assert exact.chosen.cost <= r.chosen.cost <= exact.chosen.cost * (1 + tol)
    assert r.evaluations <= exact.evaluations
    if tol * exact.chosen.cost >= 4:  # the tolerance spans 4+ candidates there: a step is saved
        assert r.evaluations < exact.evaluations


@seed(99)
@settings(max_examples=60, deadline=None)
@given(st.integers(1, 100))
def test_impossible_budget_is_reported_with_the_trial(n: int) -> None:
    ev = Planted([0.5] * n)
    r = bisect(points(n), ev, baseline=0.9, budget=Budget(0.01), progress=False)
    assert not r.budget_met and r.chosen is None and r.chosen_index is None
    assert r.reason == "impossible" and len(r.trials) == 1
    t = r.trials[0]
    assert t.index == n - 1 and not t.met and t.drop == pytest.approx(0.4)
    assert t.allocation == {"fc": f"p{n - 1}"} and t.note == "most precise"


@seed(7)
@settings(max_examples=100, deadline=None)
@given(st.integers(2, 200), st.data())
def test_min_drop_range_stops_at_first_probe_inside(n: int, data: st.DataObject) -> None:
    # Drops decrease linearly with cost: 0.5 at the cheapest down to 0 at the most precise.
    curve = [0.9 - 0.5 * (n - 1 - i) / (n - 1) for i in range(n)]
    lo = data.draw(st.floats(0.0, 0.4))
    hi = lo + data.draw(st.floats(0.02, 0.1))
    ev = Planted(curve)
    budget = Budget(max_drop=hi, min_drop=lo)
    r = bisect(points(n), ev, baseline=0.9, budget=budget, progress=False)
    assert r.budget_met and r.chosen_index is not None
    inside = [budget.inside_range(0.9, m) for m in curve]
    if r.reason == "in_range":
        assert r.trials[-1].index == r.chosen_index and inside[r.chosen_index]
        assert sum(budget.inside_range(0.9, t.metric) for t in r.trials) == 1  # stopped at the first
    else:  # no probe fell inside: the cheapest feasible point, which drops less than min_drop
        assert r.reason == "converged" and not any(inside[t.index] for t in r.trials)
        assert r.chosen_index == min(i for i in range(n) if budget.meets(0.9, curve[i]))
    assert r.evaluations <= math.ceil(math.log2(n)) + 2


def test_min_drop_when_most_precise_is_already_inside() -> None:
    ev = Planted([0.5, 0.6, 0.88])
    r = bisect(points(3), ev, baseline=0.9, budget=Budget(0.05, min_drop=0.01), progress=False)
    assert r.reason == "in_range" and r.chosen_index == 2 and r.evaluations == 1


def test_relative_budget_differs_from_absolute() -> None:
    # Baseline 0.5: an absolute 0.02 drop is a relative 4 % drop.
    curve = [0.40, 0.47, 0.485, 0.495, 0.5]
    rel = bisect(
        points(5), Planted(curve), baseline=0.5, budget=Budget(0.02, mode="relative"), progress=False
    )
    ab = bisect(points(5), Planted(curve), baseline=0.5, budget=Budget(0.02), progress=False)
    assert rel.chosen_index == 3  # 0.485 is a 3 % relative drop > 2 %
    assert ab.chosen_index == 2  # 0.485 is a 0.015 absolute drop
    last = rel.trials[-1]
    assert last.drop == pytest.approx((0.5 - curve[last.index]) / 0.5)


def test_lower_is_better_metric() -> None:
    # A loss-like metric (e.g. perplexity): quantization raises it.
    curve = [3.0, 2.4, 2.15, 2.05, 2.0]
    budget = Budget(0.1, higher_is_better=False)
    r = bisect(points(5), Planted(curve), baseline=2.0, budget=budget, progress=False)
    assert r.chosen_index == 3 and r.budget_met
    assert all(t.drop == pytest.approx(t.metric - 2.0) for t in r.trials)


def test_non_finite_metric_is_a_miss() -> None:
    curve = [float("nan"), 0.895, 0.9]
    r = bisect(points(3), Planted(curve), baseline=0.9, budget=Budget(0.01), progress=False)
    assert r.chosen_index == 1


def test_repair_adds_one_evaluation_and_wins_when_cheaper() -> None:
    n = 16
    curve = curve_from_threshold(n, 9)
    ev = Planted(curve)
    ev.repaired = 0.898

    def repair(p: FrontierPoint) -> FrontierPoint:
        assert p.allocation == {"fc": "p8"}  # the cheapest failing neighbour of the chosen #9
        return FrontierPoint(cost=9.5, omega=0.0, allocation={"fc": "fixed"})

    r = bisect(points(n), ev, baseline=0.9, budget=Budget(0.01), repair=repair, progress=False)
    assert r.reason == "repaired" and r.chosen is not None and r.chosen.cost == 9.5
    assert r.chosen_index is None and r.trials[-1].note == "repair of #8"
    assert r.evaluations <= max_evaluations(n) == math.ceil(math.log2(n)) + 2

    ev2 = Planted(curve)
    ev2.repaired = 0.5  # repair probed but fails: keep the bisection's answer
    r2 = bisect(points(n), ev2, baseline=0.9, budget=Budget(0.01), repair=repair, progress=False)
    assert r2.reason == "converged" and r2.chosen_index == 9 and r2.trials[-1].note == "repair of #8"

    ev3 = Planted(curve)
    too_dear = bisect(
        points(n),
        ev3,
        baseline=0.9,
        budget=Budget(0.01),
        progress=False,
        repair=lambda p: FrontierPoint(cost=99.0, omega=0.0, allocation={"fc": "fixed"}),
    )
    assert too_dear.chosen_index == 9 and -1 not in ev3.calls  # not cheaper: not evaluated


def test_repair_returning_a_known_allocation_is_not_reevaluated() -> None:
    ev = Planted(curve_from_threshold(8, 5))
    r = bisect(
        points(8), ev, baseline=0.9, budget=Budget(0.01), progress=False, repair=lambda p: points(8)[3]
    )  # already evaluated, and failing
    assert r.chosen_index == 5 and len(ev.calls) == len(set(ev.calls)) == r.evaluations


def test_result_round_trips_and_rejects_bad_input() -> None:
    r = bisect(
        points(10), Planted(curve_from_threshold(10, 4)), baseline=0.9, budget=Budget(0.01), progress=False
    )
    d = r.to_dict()
    assert d["evaluations"] == r.evaluations and d["chosen"]["allocation"] == {"fc": "p4"}
    back = SearchResult.from_dict(d)
    assert back.chosen == r.chosen and back.trials == r.trials and back.reason == r.reason
    with pytest.raises(UsageError, match="no candidates"):
        bisect([], Planted([]), baseline=0.9, budget=Budget(0.01), progress=False)
    with pytest.raises(UsageError, match="sorted by increasing cost"):
        bisect(points(3)[::-1], Planted([0.9] * 3), baseline=0.9, budget=Budget(0.01), progress=False)


# --------------------------------------------------------------------------------------------
# Confidence bounds and frontier gaps (0.2)
# --------------------------------------------------------------------------------------------


def _binary(n: int, wrong: int) -> np.ndarray:
    v = np.ones(n)
    v[:wrong] = 0
    return v


def test_a_candidate_at_the_point_estimate_edge_fails_at_95_and_passes_at_0() -> None:
    from hawqtool.search import Measurement

    # 600 samples, float all right; the candidate loses exactly 6 = 1 point: at the edge of 0.01.
    ref = Measurement(1.0, _binary(600, 0))
    cand = Measurement(0.99, _binary(600, 6))
    pts = [FrontierPoint(cost=1.0, omega=1.0, allocation={"fc": "int4"})]
    for confidence, met in ((0.95, False), (0.0, True)):
        r = bisect(
            pts,
            lambda p: cand,
            baseline=1.0,
            budget=Budget(0.01, confidence=confidence),
            reference=ref,
            progress=False,
        )
        t = r.trials[0]
        assert t.met is met and math.isclose(t.drop, 0.01)
        if confidence:
            assert t.bound == "score-paired" and t.drop_upper > 0.01 > t.drop_lower
        else:
            assert t.bound == "point" and t.drop_upper == t.drop


def test_an_empty_bracket_in_the_candidates_is_filled_from_the_frontier() -> None:
    from hawqtool.search import Measurement

    # Candidates: cost 1 (misses) and cost 10 (meets). The frontier also has costs 2..9, of which
    # 6 and up meet: the search must end on cost 6, probing only frontier points in the gap.
    frontier = [
        FrontierPoint(cost=float(c), omega=10.0 - c, allocation={"fc": f"c{c}"}) for c in range(1, 11)
    ]
    candidates = [frontier[0], frontier[-1]]

    def measure(p: FrontierPoint) -> Measurement:
        return Measurement(0.99 if p.cost >= 6 else 0.9)

    r = bisect(candidates, measure, baseline=1.0, budget=Budget(0.02), gap_points=frontier, progress=False)
    assert r.budget_met and r.chosen is not None and r.chosen.cost == 6.0
    assert r.reason == "gap"
    gap_trials = [t for t in r.trials if t.source == "frontier"]
    assert gap_trials and all(1 < t.cost < 10 for t in gap_trials)
    assert len(gap_trials) <= math.ceil(math.log2(8)) + 1


def test_extra_points_are_probed_once_after_the_search_and_do_not_change_its_choice() -> None:
    curve = curve_from_threshold(8, first_ok=3)
    pts = points(8)
    planted = Planted(curve)
    plain = bisect(pts, Planted(curve), baseline=0.9, budget=Budget(0.01), progress=False)
    # One extra is new (cost 0.5, accuracy 0.895: meets), one is a candidate bisection probes anyway.
    new = FrontierPoint(cost=0.5, omega=9.0, allocation={"fc": "uniform"})
    planted.repaired = 0.895
    r = bisect(
        pts,
        planted,
        baseline=0.9,
        budget=Budget(0.01),
        progress=False,
        extra={"uniform": new, "top again": pts[-1]},
    )
    assert (r.chosen, r.chosen_index, r.reason) == (plain.chosen, plain.chosen_index, plain.reason)
    same = [(t.index, dict(t.allocation), t.met, t.source) for t in plain.trials]
    assert [(t.index, dict(t.allocation), t.met, t.source) for t in r.trials[: plain.evaluations]] == same
    (extra,) = [t for t in r.trials if t.source == "extra"]
    assert (extra.note, extra.index, extra.met, extra.cost) == ("uniform", 0, True, 0.5)
    assert r.evaluations == plain.evaluations + 1 and planted.calls.count(7) == 1
    # Nothing is probed after an impossible budget.
    low = Planted([0.5] * 8)
    r = bisect(pts, low, baseline=0.9, budget=Budget(0.01), progress=False, extra={"uniform": new})
    assert r.reason == "impossible" and [t.source for t in r.trials] == ["candidates"]


def test_a_declared_continuous_metric_bounds_exact_agreement_at_zero() -> None:
    # Teacher fidelity on a cosine metric: the float model scores exactly 1 on every sample, which
    # looks binary. Read off the values, a binary bound over 256 agreeing pairs allows about 0.014,
    # above a 1 % budget, and the float model itself "missed" (hawqtool 0.3.2 on MiniLM). Declared
    # continuous, agreement on every sample bounds the drop at 0.
    from hawqtool.search import Measurement, measure_trial

    ones = np.ones(256)
    ref = Measurement(1.0, ones)
    floaty = FrontierPoint(32.0, 0.0, {"a": "float", "b": "float"}, 32.0)

    def trial(budget: Budget, values: np.ndarray) -> Trial:
        return measure_trial(
            floaty,
            lambda p: Measurement(float(values.mean()), values),
            baseline=1.0,
            budget=budget,
            reference=ref,
        )

    inferred = Budget(0.01, "relative", confidence=0.95)
    t = trial(inferred, ones.copy())
    assert t.bound == "score-paired" and 0.01 < t.drop_upper < 0.02 and not t.met
    continuous = replace(inferred, binary=False)
    t = trial(continuous, ones.copy())
    assert t.met and t.bound == "bootstrap-paired" and (t.drop, t.drop_lower, t.drop_upper) == (0, 0, 0)
    # A model that scores differently is bounded from the samples' spread, above its drop.
    other = ones.copy()
    other[:2] = 0.999
    t = trial(continuous, other)
    assert t.bound == "bootstrap-paired" and t.drop_upper > t.drop > 0
    # Declared binary, values that are not 0/1 are a usage error naming the key.
    with pytest.raises(UsageError, match=r"task\.binary"):
        trial(replace(inferred, binary=True), other)


def test_a_cheaper_uniform_model_that_meets_the_budget_replaces_the_choice() -> None:
    # Candidates 0-7 (costs 1-8): bisection's choice is #5 (cost 6). The uniform models: cost 5.5
    # meets, 4.5 meets, 3.5 misses, 2.5 would meet (not monotone: never probed), 9 is costlier.
    curve = curve_from_threshold(8, first_ok=5)
    metric = {"u5.5": 0.895, "u4.5": 0.894, "u3.5": 0.85, "u2.5": 0.9, "u9": 0.9}
    uniform = {
        name: FrontierPoint(cost=float(name[1:]), omega=0.0, allocation={"fc": name}) for name in metric
    }

    def evaluate(p: FrontierPoint) -> float:
        fc = p.allocation["fc"]
        return metric[fc] if fc.startswith("u") else curve[int(p.cost) - 1]

    plain = bisect(points(8), evaluate, baseline=0.9, budget=Budget(0.01), progress=False)
    assert plain.chosen is not None and plain.chosen.cost == 6.0
    r = bisect(points(8), evaluate, baseline=0.9, budget=Budget(0.01), progress=False, uniform=uniform)
    assert r.chosen is not None and r.chosen.allocation == {"fc": "u4.5"}
    assert (r.reason, r.chosen_index, r.budget_met) == ("uniform", None, True)
    probed = [(t.note, t.met) for t in r.trials if t.source == "uniform"]
    assert probed == [("u5.5", True), ("u4.5", True), ("u3.5", False)]

    def same(trials: tuple[Trial, ...]) -> list[Trial]:
        return [replace(t, seconds=0.0) for t in trials]

    assert same(r.trials[: plain.evaluations]) == same(plain.trials)
    assert SearchResult.from_dict(r.to_dict()).reason == "uniform"
    # The first uniform model below the choice misses: the choice stands, one probe more.
    metric["u5.5"] = 0.85
    r = bisect(points(8), evaluate, baseline=0.9, budget=Budget(0.01), progress=False, uniform=uniform)
    assert (r.chosen, r.reason, r.evaluations) == (plain.chosen, plain.reason, plain.evaluations + 1)
    # No uniform model is cheaper than the choice: nothing more is probed.
    costly = {"u9": uniform["u9"]}
    r = bisect(points(8), evaluate, baseline=0.9, budget=Budget(0.01), progress=False, uniform=costly)
    assert same(r.trials) == same(plain.trials)
