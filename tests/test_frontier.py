"""The frontier is exactly the brute-force Pareto set; selection picks the best point per target."""

from __future__ import annotations

import copy
import dataclasses
import itertools
import json
import math
import pickle

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hawqtool.errors import UsageError
from hawqtool.formats import format_bits
from hawqtool.frontier import pareto_frontier, select
from hawqtool.types import Frontier, LayerOption, OptionTable

PROPS = settings(derandomize=True, max_examples=80, deadline=None)
FORMATS = ("int4", "int8", "float")


@st.composite
def tables(draw: st.DrawFn, *, integer: bool = True, max_layers: int = 8) -> OptionTable:
    """Up to 8 layers × 3 formats. Integer costs and scores in a small range make many exact ties;
    a layer with one option is a pinned layer."""
    n = draw(st.integers(1, max_layers))
    value = st.integers(0, 12).map(float) if integer else st.floats(0.0, 1e3, allow_subnormal=False)
    layers = tuple(f"l{i}" for i in range(n))
    options = {}
    for fqn in layers:
        fmts = draw(st.lists(st.sampled_from(FORMATS), min_size=1, max_size=3, unique=True))
        options[fqn] = tuple(LayerOption(f, draw(value), 0.0, draw(value)) for f in fmts)
    params = {f: draw(st.integers(1, 1000)) for f in layers}
    return OptionTable(layers=layers, options=options, cost_model="size", params=params)


def all_allocations(table: OptionTable) -> list[tuple[float, float, dict[str, str]]]:
    rows = []
    for combo in itertools.product(*(table.options[f] for f in table.layers)):
        alloc = {f: o.format for f, o in zip(table.layers, combo, strict=True)}
        rows.append((math.fsum(o.cost for o in combo), math.fsum(o.omega for o in combo), alloc))
    return rows


def brute_force_pareto(table: OptionTable) -> list[tuple[float, float]]:
    pairs = {(c, o) for c, o, _ in all_allocations(table)}
    return sorted(p for p in pairs if not any(q[0] <= p[0] and q[1] <= p[1] and q != p for q in pairs))


def assert_points_are_their_allocations(table: OptionTable, frontier: Frontier) -> None:
    for p in frontier:
        assert set(p.allocation) == set(table.layers)
        assert p.cost == pytest.approx(table.cost(p.allocation), rel=1e-12, abs=1e-12)
        assert p.omega == pytest.approx(table.omega(p.allocation), rel=1e-12, abs=1e-12)
        bits = sum(format_bits(p.allocation[f]) * table.params[f] for f in table.layers)
        assert p.avg_bits == pytest.approx(bits / sum(table.params.values()))


@PROPS
@given(table=tables())
def test_equals_brute_force_with_ties(table: OptionTable) -> None:
    frontier = pareto_frontier(table)
    assert [(p.cost, p.omega) for p in frontier] == brute_force_pareto(table)
    assert_points_are_their_allocations(table, frontier)


@PROPS
@given(table=tables(integer=False, max_layers=6))
def test_equals_brute_force_with_real_values(table: OptionTable) -> None:
    frontier = pareto_frontier(table)
    expected = brute_force_pareto(table)
    assert len(frontier) == len(expected)
    for p, (c, o) in zip(frontier, expected, strict=True):
        assert p.cost == pytest.approx(c, rel=1e-12, abs=1e-9)
        assert p.omega == pytest.approx(o, rel=1e-12, abs=1e-9)
    assert_points_are_their_allocations(table, frontier)


@PROPS
@given(table=tables(max_layers=6), data=st.data())
def test_layer_order_and_reruns_do_not_change_it(table: OptionTable, data: st.DataObject) -> None:
    first = pareto_frontier(table)
    again = pareto_frontier(table)
    assert [(p.cost, p.omega, dict(p.allocation)) for p in first] == [
        (p.cost, p.omega, dict(p.allocation)) for p in again
    ]
    shuffled = data.draw(st.permutations(table.layers))
    other = OptionTable(tuple(shuffled), table.options, table.cost_model, table.params)
    assert [(p.cost, p.omega) for p in pareto_frontier(other)] == [(p.cost, p.omega) for p in first]


@PROPS
@given(table=tables(), data=st.data())
def test_select_max_cost_and_fraction_match_brute_force(table: OptionTable, data: st.DataObject) -> None:
    frontier = pareto_frontier(table)
    rows = all_allocations(table)
    lo, hi = frontier.points[0].cost, frontier.float_cost
    target = data.draw(st.floats(lo, hi))
    best = min(o for c, o, _ in rows if c <= target)
    chosen = select(frontier, max_cost=target)
    assert chosen.cost <= target and chosen.omega == best
    if target > 0:
        frac = target / hi
        by_fraction = select(frontier, fraction=frac)
        assert by_fraction.omega == min(o for c, o, _ in rows if c <= frac * hi)


@PROPS
@given(table=tables(), data=st.data())
def test_select_avg_bits_is_best_frontier_point_within_bits(table: OptionTable, data: st.DataObject) -> None:
    frontier = pareto_frontier(table)
    lowest = min(p.avg_bits for p in frontier)
    target = data.draw(st.floats(lowest, 32.0))
    chosen = select(frontier, avg_bits=target)
    assert chosen.avg_bits <= target + 1e-9
    assert chosen.omega == min(p.omega for p in frontier if p.avg_bits <= target + 1e-9)


@PROPS
@given(
    table=tables(integer=False, max_layers=7),
    grid_frac=st.floats(0.002, 0.3) | st.none(),
    omega_grid=st.floats(1e-3, 0.5) | st.none(),
    data=st.data(),
)
def test_grid_bounds(
    table: OptionTable, grid_frac: float | None, omega_grid: float | None, data: st.DataObject
) -> None:
    exact = pareto_frontier(table)
    span = exact.float_cost - exact.points[0].cost
    grid = None if grid_frac is None or span <= 0 else span * grid_frac
    coarse = pareto_frontier(table, cost_grid=grid, omega_grid=omega_grid)
    assert coarse.cost_grid == grid and coarse.omega_grid == omega_grid
    assert len(coarse) <= len(exact)
    assert_points_are_their_allocations(table, coarse)
    # Both ends survive: the cheapest allocation and the best one.
    assert (coarse.points[0].cost, coarse.points[-1].omega) == (exact.points[0].cost, exact.points[-1].omega)
    target = data.draw(st.floats(coarse.points[0].cost, exact.float_cost))
    got = select(coarse, max_cost=target).omega
    opt = select(exact, max_cost=target).omega
    assert got >= opt - 1e-9 * max(1.0, opt)
    n = len(table.layers)
    bounds = []
    if grid is not None and target - n * grid >= exact.points[0].cost:
        bounds.append(select(exact, max_cost=target - n * grid).omega)
    if omega_grid is not None:
        bounds.append(math.exp(n * omega_grid) * opt)
    if bounds:
        assert got <= min(bounds) * (1 + 1e-9) + 1e-9


def test_built_points_equal_constructed_ones() -> None:
    import dataclasses

    from hawqtool.types import FrontierPoint

    opts = {"a": (LayerOption("int4", 1.0, 0.0, 1.0), LayerOption("float", 4.0, 0.0, 0.0))}
    p = pareto_frontier(OptionTable(("a",), opts, "size", {"a": 4})).points[0]
    assert p == FrontierPoint(cost=1.0, omega=1.0, allocation={"a": "int4"}, avg_bits=4.0)
    assert p.score is None
    assert dataclasses.replace(p, score=0.5).score == 0.5
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.cost = 2.0  # type: ignore[misc]


def test_known_small_frontier_and_pinned_layer() -> None:
    opts = {
        "a": (
            LayerOption("int4", 1.0, 0.0, 8.0),
            LayerOption("int8", 2.0, 0.0, 1.0),
            LayerOption("float", 8.0, 0.0, 0.0),
        ),
        # pinned: a single option, not float, so float_cost counts it as it is
        "b": (LayerOption("int8", 3.0, 0.0, 0.5),),
        "c": (
            LayerOption("int4", 1.0, 0.0, 2.0),
            LayerOption("int8", 2.0, 0.0, 2.0),
            LayerOption("float", 8.0, 0.0, 0.0),
        ),
    }
    table = OptionTable(("a", "b", "c"), opts, "size", {"a": 10, "b": 10, "c": 20})
    f = pareto_frontier(table)
    # c's int8 is dominated by its int4 (same Ω, dearer): it never appears.
    assert [(p.cost, p.omega) for p in f] == [(5.0, 10.5), (6.0, 3.5), (12.0, 2.5), (13.0, 1.5), (19.0, 0.5)]
    assert dict(f.points[1].allocation) == {"a": "int8", "b": "int8", "c": "int4"}
    assert all(p.allocation["b"] == "int8" for p in f)
    assert f.float_cost == 19.0 and f.cost_model == "size" and f.cost_grid is None
    assert f.points[0].avg_bits == pytest.approx((4 * 10 + 8 * 10 + 4 * 20) / 40)


def test_allocation_is_a_mapping_that_serializes() -> None:
    opts = {"a": (LayerOption("int4", 1.0, 0.0, 1.0), LayerOption("float", 4.0, 0.0, 0.0))}
    f = pareto_frontier(OptionTable(("a",), opts, "size", {"a": 4}))
    alloc = f.points[0].allocation
    assert alloc == {"a": "int4"} and len(alloc) == 1 and list(alloc) == ["a"]
    assert type(copy.deepcopy(alloc)) is dict and pickle.loads(pickle.dumps(alloc)) == {"a": "int4"}
    with pytest.raises(KeyError):
        alloc["nope"]
    back = Frontier.from_dict(json.loads(json.dumps(f.to_dict())))
    assert [(p.cost, p.omega, dict(p.allocation)) for p in back] == [
        (p.cost, p.omega, dict(p.allocation)) for p in f
    ]


@pytest.fixture
def small_frontier() -> Frontier:
    opts = {
        "a": (
            LayerOption("int4", 10.0, 0.0, 4.0),
            LayerOption("int8", 20.0, 0.0, 1.0),
            LayerOption("float", 80.0, 0.0, 0.0),
        ),
        "b": (
            LayerOption("int4", 10.0, 0.0, 2.0),
            LayerOption("int8", 20.0, 0.0, 0.5),
            LayerOption("float", 80.0, 0.0, 0.0),
        ),
    }
    return pareto_frontier(OptionTable(("a", "b"), opts, "size", {"a": 20, "b": 20}))


def test_select_each_target_kind(small_frontier: Frontier) -> None:
    f = small_frontier
    assert f.float_cost == 160.0
    assert select(f, max_cost=20.0).omega == 6.0
    assert select(f, max_cost=30.0).omega == 3.0  # a int8 + b int4 (1 + 2) beats a int4 + b int8
    assert select(f, max_cost=40.0).omega == 1.5
    assert select(f, fraction=0.25).cost == 40.0
    assert select(f, fraction=1.0).omega == 0.0
    assert dict(select(f, avg_bits=6.0).allocation) == {"a": "int8", "b": "int4"}
    assert select(f, avg_bits=32).omega == 0.0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({}, "exactly one target"),
        ({"max_cost": 30.0, "fraction": 0.5}, "exactly one target"),
        ({"max_cost": 19.0}, r"allowed 20 to 160 bytes"),
        ({"max_cost": 161.0}, r"allowed 20 to 160 bytes"),
        ({"max_cost": float("nan")}, "finite"),
        ({"fraction": 1.5}, r"allowed 0\.125 to 1"),
        ({"fraction": 0.1}, r"allowed 0\.125 to 1"),
        ({"fraction": 0.0}, r"allowed 0\.125 to 1"),
        ({"avg_bits": 3.0}, r"allowed 4 to 32 bits"),
        ({"avg_bits": 33.0}, r"allowed 4 to 32 bits"),
    ],
)
def test_select_bad_targets(small_frontier: Frontier, kwargs: dict[str, float], match: str) -> None:
    with pytest.raises(UsageError, match=match):
        select(small_frontier, **kwargs)


def test_bad_tables_and_grids() -> None:
    ok = {"a": (LayerOption("int4", 1.0, 0.0, 1.0),)}
    with pytest.raises(UsageError, match="no layers"):
        pareto_frontier(OptionTable((), {}, "size"))
    with pytest.raises(UsageError, match="'b' has no candidate options"):
        pareto_frontier(OptionTable(("a", "b"), ok, "size"))
    with pytest.raises(UsageError, match="non-finite"):
        pareto_frontier(OptionTable(("a",), {"a": (LayerOption("int4", 1.0, 0.0, math.nan),)}, "size"))
    for grid in (0.0, -1.0, math.inf):
        with pytest.raises(UsageError, match="cost_grid must be a positive number"):
            pareto_frontier(OptionTable(("a",), ok, "size"), cost_grid=grid)
        with pytest.raises(UsageError, match="omega_grid must be a positive number"):
            pareto_frontier(OptionTable(("a",), ok, "size"), omega_grid=grid)


def test_without_params_layers_count_equally() -> None:
    opts = {
        "a": (LayerOption("int4", 1.0, 0.0, 1.0),),
        "b": (LayerOption("int8", 1.0, 0.0, 1.0),),
    }
    f = pareto_frontier(OptionTable(("a", "b"), opts, "size"))
    assert f.points[0].avg_bits == 6.0


def _distinct_table(n: int, seed: int) -> OptionTable:
    """``n`` layers of all-different sizes and log-normal sensitivities: the frontier's worst case."""
    import random

    rng = random.Random(seed)
    layers = tuple(f"l{i}" for i in range(n))
    options, params = {}, {}
    for fqn in layers:
        size = int(math.exp(rng.uniform(math.log(1e3), math.log(1e6))))
        trace = math.exp(rng.gauss(0.0, 2.0))
        row = [LayerOption("float", 4.0 * size, 0.0, 0.0)]
        for bits in (2, 4, 8):
            err = size * 4.0**-bits * rng.uniform(0.8, 1.2)
            row.append(LayerOption(f"int{bits}", math.ceil(size * bits / 8) + 64.0, err, trace * err))
        options[fqn] = tuple(row)
        params[fqn] = size
    return OptionTable(layers, options, "size", params)


def test_auto_bounds_keep_small_frontiers_exact() -> None:
    from hawqtool.frontier import auto_buckets

    table = _distinct_table(24, seed=0)
    exact = pareto_frontier(table, max_error=None)
    assert exact.cost_grid is None and exact.omega_grid is None
    assert len(exact) < auto_buckets(24)  # far below the bucket count: nothing to thin
    default = pareto_frontier(table)
    assert [(p.cost, p.omega) for p in default] == [(p.cost, p.omega) for p in exact]
    assert default.cost_grid is None and default.omega_grid is None


def test_auto_bounds_thin_large_frontiers_within_the_accepted_error() -> None:
    from hawqtool.frontier import AUTO_ERROR, auto_buckets

    table = _distinct_table(56, seed=0)
    n = len(table.layers)
    exact = pareto_frontier(table, max_error=None)
    assert len(exact) > 2 * auto_buckets(n)  # big enough to be thinned
    auto = pareto_frontier(table)
    assert auto.cost_grid is not None and auto.omega_grid is not None  # it thinned, and says so
    assert len(auto) < len(exact)
    sample = dataclasses.replace(auto, points=auto.points[::97] + auto.points[-1:])
    assert_points_are_their_allocations(table, sample)
    assert (auto.points[0].cost, auto.points[-1].omega) == (exact.points[0].cost, exact.points[-1].omega)
    lo, hi = exact.points[0].cost, exact.float_cost
    worst = 0.0
    for i in range(1, 60):
        target = lo + (hi - lo) * i / 60
        got, opt = select(auto, max_cost=target).omega, select(exact, max_cost=target).omega
        # The grids' proven bounds ...
        assert opt * (1 - 1e-12) <= got <= math.exp(n * auto.omega_grid) * opt * (1 + 1e-12)
        if target - n * auto.cost_grid >= lo:
            assert got <= select(exact, max_cost=target - n * auto.cost_grid).omega * (1 + 1e-12)
        worst = max(worst, got / opt - 1)
    assert worst <= AUTO_ERROR, worst  # ... and the accepted error, which is far tighter


@pytest.mark.parametrize("bad", [0.0, 1.0, -0.1, float("nan"), "0.5"])
def test_bad_max_error_is_a_usage_error(bad: object) -> None:
    table = _distinct_table(2, seed=1)
    with pytest.raises(UsageError, match="max_error"):
        pareto_frontier(table, max_error=bad)  # type: ignore[arg-type]
