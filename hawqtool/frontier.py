"""Allocate: the exact Pareto frontier of (Σ cost, Σ Ω) over per-layer formats, and target selection.

An allocation picks one option per layer; its cost and score are sums over layers. The frontier is
every (cost, ΣΩ) pair that no other allocation beats in both (one allocation per pair).
:func:`pareto_frontier` builds it exactly by merging layers one at a time: the partial frontier of
the layers merged so far (sorted by cost, ΣΩ strictly decreasing) is combined with each option of
the next layer and every dominated partial sum is dropped, which is safe because a dominated partial
sum stays dominated whatever the remaining layers add. Allocations are kept as back-pointers (parent
index + option index per layer and point) and rebuilt only for the final points, into one shared
``uint8`` matrix that the points' :class:`AllocationView` views read.

The frontier grows with the number of distinct costs: real networks repeat a few layer shapes and
stay small, while hundreds of layers of all-different sizes do not (sizes and times in
docs/benchmarks.md). ``cost_grid`` and ``omega_grid`` bound it for such models, with a proven bound
on what is lost.

Automatic bounds. Without grids, the merge is exact as long as no partial frontier holds more
than B points, which models of a few dozen layers never reach. Past that the merge starts again,
smallest layers first, and every partial frontier larger than B points is thinned to B buckets over
the table's cost range and B over its ln-ΣΩ range, with B chosen from the layer count for an
accepted ΣΩ error (:func:`auto_buckets`, :data:`AUTO_ERROR` at any cost target). The frontier
records the grids it used.
"""

from __future__ import annotations

import bisect
import dataclasses
import logging
import math
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

from hawqtool.costs import unit
from hawqtool.errors import UsageError
from hawqtool.formats import average_bits, format_bits, is_quantized, parse_format
from hawqtool.types import Frontier, FrontierPoint, OptionTable

log = logging.getLogger(__name__)

#: Relative slack for float rounding when comparing a target with summed costs.
_REL_TOL = 1e-12
#: Accepted relative ΣΩ error of the automatic bounds at any cost target (module doc).
AUTO_ERROR = 0.005


def auto_buckets(n_layers: int, max_error: float = AUTO_ERROR) -> int:
    """Buckets B (of cost, and of ln ΣΩ) that keep the automatic bounds within ``max_error``.

    Fitted on ``scripts/bench_frontier.py``'s synthetic tables against the ILP optimum
    (docs/benchmarks.md): the worst relative ΣΩ error at the cost targets grows as n^0.3 / B^1.1.
    B aims at half of ``max_error`` (the proven bounds in :func:`pareto_frontier` are far looser)
    and is at least 2·10⁴, so models of a few dozen layers stay exact. Time grows as n · B.

    Example:
        >>> auto_buckets(1000), auto_buckets(10_000)
        (20000, 33263)
    """
    b = 1e4 * (0.0047 * (n_layers / 1000) ** 0.3 / (0.5 * max_error)) ** (1 / 1.1)
    return int(min(max(b, 20_000), 2_000_000))


class _Choices:
    """The formats of every frontier point: ``matrix[layer, point]`` is a ``uint8`` option index."""

    __slots__ = ("formats", "index", "layers", "matrix")

    def __init__(self, layers: tuple[str, ...], formats: tuple[tuple[str, ...], ...], matrix: np.ndarray):
        self.layers = layers
        self.index = {f: i for i, f in enumerate(layers)}
        self.formats = formats
        self.matrix = matrix


class AllocationView(Mapping[str, str]):
    """A read-only ``{fqn: format}`` view of one frontier point, backed by a matrix shared by all.

    It behaves as a ``Mapping`` (``alloc["conv1"]``, ``dict(alloc)``, ``==`` with a dict). Deep
    copies and pickles are plain dicts, so ``dataclasses.asdict`` of a record that holds one gives
    JSON-ready data; ``json.dumps`` needs ``dict(alloc)``.
    """

    __slots__ = ("_choices", "_row")

    def __init__(self, choices: _Choices, row: int) -> None:
        self._choices = choices
        self._row = row

    def __getitem__(self, fqn: str) -> str:
        c = self._choices
        i = c.index[fqn]
        return c.formats[i][c.matrix[i, self._row]]

    def __iter__(self) -> Iterator[str]:
        return iter(self._choices.layers)

    def __len__(self) -> int:
        return len(self._choices.layers)

    def __repr__(self) -> str:
        return repr(dict(self))

    def __deepcopy__(self, memo: dict[int, Any]) -> dict[str, str]:
        return dict(self)

    def __reduce__(self) -> tuple[type, tuple[dict[str, str]]]:
        return (dict, (dict(self),))


def _plain_point_defaults() -> dict[str, Any] | None:
    """Default values of FrontierPoint's other fields, or None if it cannot be built by hand."""
    if hasattr(FrontierPoint, "__slots__") or hasattr(FrontierPoint, "__post_init__"):
        return None
    defaults = {}
    for f in dataclasses.fields(FrontierPoint):
        if f.name in ("cost", "omega", "allocation", "avg_bits"):
            continue
        if f.default is dataclasses.MISSING:
            return None
        defaults[f.name] = f.default
    return defaults


_POINT_DEFAULTS = _plain_point_defaults()


def _new_point(cost: float, omega: float, allocation: AllocationView, avg_bits: float) -> FrontierPoint:
    """A FrontierPoint, built faster than through the frozen dataclass's ``__init__``.

    A frontier can hold a million points, and a frozen dataclass sets each field through
    ``object.__setattr__``; filling ``__dict__`` directly gives the same object. Falls back to the
    constructor if the class ever gains slots, validation or a field without a plain default.
    """
    if _POINT_DEFAULTS is None:
        return FrontierPoint(cost=cost, omega=omega, allocation=allocation, avg_bits=avg_bits)
    p = object.__new__(FrontierPoint)
    p.__dict__.update(_POINT_DEFAULTS, cost=cost, omega=omega, allocation=allocation, avg_bits=avg_bits)
    return p


def _layer_options(options: OptionTable, fqn: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A layer's non-dominated options as (cost, omega, original option index), cost ascending."""
    if fqn not in options.options or not options.options[fqn]:
        raise UsageError(f"layer {fqn!r} has no candidate options in the option table")
    row = options.options[fqn]
    if len(row) > 255:
        raise UsageError(f"layer {fqn!r} has {len(row)} options; at most 255 are supported")
    cost = np.array([o.cost for o in row], dtype=np.float64)
    omega = np.array([o.omega for o in row], dtype=np.float64)
    if not (np.isfinite(cost).all() and np.isfinite(omega).all()):
        raise UsageError(
            f"layer {fqn!r} has a non-finite cost or Ω: {[(o.format, o.cost, o.omega) for o in row]}"
        )
    order = np.lexsort((omega, cost))  # cost, then Ω, then table order (lexsort is stable)
    cost, omega = cost[order], omega[order]
    keep = _pareto_mask(cost, omega)
    return cost[keep], omega[keep], order[keep]


def _pareto_mask(cost: np.ndarray, omega: np.ndarray) -> np.ndarray:
    """Non-dominated entries of a list sorted by cost (stable among equal costs).

    Keeps an entry when its Ω is below every earlier one (so of exact ties, the first), then of
    several kept entries with the same cost only the last, which has the lowest Ω.
    """
    keep = np.empty(len(omega), dtype=bool)
    keep[0] = True
    np.less(omega[1:], np.minimum.accumulate(omega)[:-1], out=keep[1:])
    kept = np.flatnonzero(keep)
    keep[kept] = _last_of_equal_costs(cost[kept])
    return keep


def _last_of_equal_costs(cost: np.ndarray) -> np.ndarray:
    """Of a run of equal costs in a list whose Ω strictly decreases, keep the last (lowest Ω)."""
    return np.append(cost[1:] != cost[:-1], True)


def _grid_mask(
    cost: np.ndarray, omega: np.ndarray, cost_grid: float | None, omega_grid: float | None
) -> np.ndarray:
    """Of a Pareto list sorted by cost: the last (lowest-ΣΩ) point of each cost bucket, the first
    (cheapest) point of each log-ΣΩ bucket, and both ends (the cheapest and the best allocation)."""
    keep = np.zeros(len(cost), dtype=bool)
    keep[0] = keep[-1] = True
    if cost_grid is not None:
        bucket = np.floor(cost / cost_grid)
        keep[:-1] |= bucket[1:] != bucket[:-1]
    if omega_grid is not None:
        with np.errstate(divide="ignore", invalid="ignore"):
            # ΣΩ <= 0 (all float, or nothing quantized) shares one bucket, below every other.
            bucket = np.where(
                omega > 0, np.floor(np.log(np.where(omega > 0, omega, 1.0)) / omega_grid), -np.inf
            )
        keep[1:] |= bucket[1:] != bucket[:-1]
    return keep


def pareto_frontier(
    options: OptionTable,
    *,
    cost_grid: float | None = None,
    omega_grid: float | None = None,
    max_error: float | None = AUTO_ERROR,
    progress: bool = False,
) -> Frontier:
    """The Pareto frontier of (Σ cost, Σ Ω) over all allocations of ``options``: exact, unless it
    would be too large (``auto``) or grids are given.

    Points are sorted by increasing cost, with strictly decreasing ΣΩ. Of several allocations with
    the same (cost, ΣΩ), one is kept, chosen deterministically (it depends only on the table).
    Layers are merged largest cost span first, which keeps exact partial frontiers smaller (the
    result does not depend on the order), or smallest first when the frontier may be thinned.

    Args:
        options: the per-layer options (:func:`hawqtool.formats.build_options`).
        cost_grid: optional bucket width, in cost units. After each layer is merged, only the
            lowest-ΣΩ point per bucket ``floor(cost / cost_grid)`` is kept (plus those kept by
            ``omega_grid``), which bounds the size at ``cost range / cost_grid`` points. Every
            point is still a real allocation with its true cost and ΣΩ, and for a cost target T
            the best point found has ``OPT(T) <= ΣΩ <= OPT(T - n_layers · cost_grid)``.
            ``None`` (default): exact.
        omega_grid: optional bucket width in ln(ΣΩ) (1e-4 ≈ 0.01 % buckets): after each merge
            also keep the cheapest point per bucket ``floor(ln ΣΩ / omega_grid)``. On its own it
            gives ``ΣΩ <= exp(n_layers · omega_grid) · OPT(T)`` at cost <= T (for Ω >= 0); with
            ``cost_grid`` the better of both bounds holds. It keeps the steep, cheap end of the
            frontier that a cost grid alone blurs: together with ``cost_grid`` at the same bucket
            count it was 5–10× closer to the exact ΣΩ at the benchmark's targets.
        max_error: without grids, the accepted relative ΣΩ error at any cost target: the merge
            stays exact while the partial frontier has at most B = :func:`auto_buckets` points,
            and is thinned to B buckets of cost and of ln ΣΩ past that (module doc); the result's
            ``cost_grid`` / ``omega_grid`` then say which grids were used. ``None``: exact
            whatever the size.
        progress: show a tqdm bar over layers.

    Returns:
        The :class:`~hawqtool.types.Frontier`; ``float_cost`` is the cost of keeping every layer
        float (a layer that cannot be float counts its dearest option).

    Raises:
        UsageError: no layers, a layer without options, non-finite costs or scores, a
            ``cost_grid`` or ``omega_grid`` that is not a positive number, or a ``max_error``
            outside (0, 1).

    Example:
        >>> from hawqtool.types import LayerOption
        >>> opts = {
        ...     "a": (LayerOption("int4", 1.0, 0.0, 5.0), LayerOption("float", 4.0, 0.0, 0.0)),
        ...     "b": (LayerOption("int4", 2.0, 0.0, 1.0), LayerOption("float", 8.0, 0.0, 0.0)),
        ... }
        >>> f = pareto_frontier(OptionTable(("a", "b"), opts, "size", {"a": 1, "b": 2}))
        >>> [(p.cost, p.omega, dict(p.allocation)) for p in f]  # doctest: +NORMALIZE_WHITESPACE
        [(3.0, 6.0, {'a': 'int4', 'b': 'int4'}), (6.0, 1.0, {'a': 'float', 'b': 'int4'}),
         (12.0, 0.0, {'a': 'float', 'b': 'float'})]
        >>> f.float_cost
        12.0
    """
    for name, grid in (("cost_grid", cost_grid), ("omega_grid", omega_grid)):
        if grid is not None and not (isinstance(grid, (int, float)) and math.isfinite(grid) and grid > 0):
            raise UsageError(f"{name} must be a positive number or None, got {grid!r}")
    layers = tuple(options.layers)
    if not layers:
        raise UsageError("the option table has no layers")
    per_layer = [_layer_options(options, fqn) for fqn in layers]
    if max_error is not None and not (isinstance(max_error, (int, float)) and 0 < max_error < 1):
        raise UsageError(f"max_error must be a number in (0, 1) or None (exact), got {max_error!r}")
    fixed = cost_grid is not None or omega_grid is not None
    cap = auto_buckets(len(layers), max_error) if max_error is not None and not fixed else 0
    spans = [float(c[-1] - c[0]) for c, _, _ in per_layer]
    # Stable sorts: equal spans keep model order. Exact: largest cost span first keeps the partial
    # frontiers smallest. Thinned: smallest first, so the big layers, merged last, go through few
    # thinnings: 10-15x closer to the optimum at the same size on the 1000-layer benchmarks.
    largest_first = sorted(range(len(layers)), key=lambda i: -spans[i])
    smallest_first = sorted(range(len(layers)), key=lambda i: spans[i])
    auto_grids = None
    if fixed:  # as before automatic bounds existed: the grids' documented measurements hold
        merge_order = largest_first
        merged = _merge(per_layer, merge_order, grids=(cost_grid, omega_grid), cap=0, progress=progress)
    else:
        merge_order = largest_first
        merged = _merge(per_layer, merge_order, grids=None, cap=cap, progress=progress)
        if merged is None:  # past B points: start again, thinned (module doc)
            auto_grids = _auto_grids(per_layer, cap)
            merge_order = smallest_first
            merged = _merge(per_layer, merge_order, grids=auto_grids, cap=cap, progress=progress)
    assert merged is not None
    cost, omega, parents, picks, thinned = merged

    # Walk the back-pointers from the final points to fill each layer's row (layer-major, so each
    # write is contiguous).
    matrix = np.empty((len(layers), len(cost)), dtype=np.uint8)
    idx = np.arange(len(cost))
    for step in range(len(merge_order) - 1, -1, -1):
        matrix[merge_order[step]] = picks[step][idx]
        idx = parents[step][idx]
    del parents, picks
    formats = tuple(tuple(o.format for o in options.options[f]) for f in layers)
    choices = _Choices(layers, formats, matrix)

    if all(f in options.params for f in layers):
        weight = [float(options.params[f]) for f in layers]
    else:  # a hand-made table without parameter counts: every layer counts the same
        weight = [1.0] * len(layers)
    bit_sum = np.zeros(len(cost))
    for i, fmts in enumerate(formats):
        bit_sum += weight[i] * np.array([format_bits(f) for f in fmts], dtype=np.float64)[matrix[i]]
    avg_bits = bit_sum / max(sum(weight), 1.0)
    points = tuple(
        _new_point(c, o, AllocationView(choices, i), b)
        for i, (c, o, b) in enumerate(zip(cost.tolist(), omega.tolist(), avg_bits.tolist(), strict=True))
    )
    float_cost = 0.0
    for fqn in layers:
        row = options.options[fqn]
        floats = [o.cost for o in row if o.format == "float"]
        float_cost += floats[0] if floats else max(o.cost for o in row)
    if thinned and auto_grids is not None:
        cost_grid, omega_grid = auto_grids
        log.info(
            "frontier of %d layers thinned automatically (cost grid %.4g, ln-ΣΩ grid %.3g): %d points",
            len(layers),
            cost_grid or 0.0,
            omega_grid or 0.0,
            len(points),
        )
    return Frontier(
        points=points,
        cost_model=options.cost_model,
        cost_grid=cost_grid,
        float_cost=float_cost,
        omega_grid=omega_grid,
    )


def _merge(
    per_layer: list[tuple[np.ndarray, np.ndarray, np.ndarray]],
    merge_order: list[int],
    *,
    grids: tuple[float | None, float | None] | None,
    cap: int,
    progress: bool,
) -> tuple[np.ndarray, np.ndarray, list[np.ndarray], list[np.ndarray], bool] | None:
    """Merge the layers in ``merge_order`` into one frontier: (cost, ΣΩ, back-pointers, picks,
    thinned). ``grids`` thin every merged frontier larger than ``cap`` points; without grids, a
    frontier larger than a positive ``cap`` stops the merge (``None``)."""
    from tqdm import tqdm

    cost = np.zeros(1)
    omega = np.zeros(1)
    parents: list[np.ndarray] = []
    picks: list[np.ndarray] = []
    thinned = False
    for li in tqdm(merge_order, desc="frontier", unit="layer", disable=not progress):
        oc, oo, oidx = per_layer[li]
        n = len(cost)
        # Option-major candidates: len(oc) runs, each sorted by cost, which the stable sort merges.
        cand_c = (oc[:, None] + cost[None, :]).ravel()
        cand_o = (oo[:, None] + omega[None, :]).ravel()
        order = np.argsort(cand_c, kind="stable")
        omega = cand_o.take(order)
        # Running-minimum pass first, so that costs are gathered for the survivors only. Survivors
        # are picked with flatnonzero + take: several times faster than boolean indexing here.
        keep = np.empty(len(omega), dtype=bool)
        keep[0] = True
        np.less(omega[1:], np.minimum.accumulate(omega)[:-1], out=keep[1:])
        at = np.flatnonzero(keep)
        order, omega = order.take(at), omega.take(at)
        cost = cand_c.take(order)
        keep = _last_of_equal_costs(cost)
        if not keep.all():
            at = np.flatnonzero(keep)
            order, cost, omega = order.take(at), cost.take(at), omega.take(at)
        if len(cost) > cap:
            if grids is None:
                if cap > 0:
                    return None
            else:
                thinned = True
                at = np.flatnonzero(_grid_mask(cost, omega, *grids))
                order, cost, omega = order.take(at), cost.take(at), omega.take(at)
        pick, parent = np.divmod(order, n)
        parents.append(parent.astype(np.int64 if n > 2**31 - 1 else np.int32))
        picks.append(oidx.take(pick).astype(np.uint8))
    return cost, omega, parents, picks, thinned


def _auto_grids(
    per_layer: list[tuple[np.ndarray, np.ndarray, np.ndarray]], buckets: int
) -> tuple[float | None, float | None]:
    """``buckets`` buckets over the table's whole cost range and over its ln-ΣΩ range (from the
    smallest positive Ω of any option to the largest ΣΩ); ``None`` for a range that is empty."""
    span = math.fsum(float(c[-1] - c[0]) for c, _, _ in per_layer)
    top = math.fsum(float(o.max()) for _, o, _ in per_layer)
    positive = [float(o[o > 0].min()) for _, o, _ in per_layer if (o > 0).any()]
    cost_grid = span / buckets if span > 0 else None
    omega_grid = math.log(top / min(positive)) / buckets if positive and top > min(positive) else None
    return cost_grid, omega_grid


def _unit(frontier: Frontier) -> str:
    try:
        return unit(frontier.cost_model)
    except UsageError:
        return frontier.cost_model


def select(
    frontier: Frontier,
    *,
    max_cost: float | None = None,
    fraction: float | None = None,
    avg_bits: float | None = None,
) -> FrontierPoint:
    """The lowest-ΣΩ frontier point within a cost target (give exactly one kind of target).

    Args:
        frontier: from :func:`pareto_frontier`.
        max_cost: at most this cost, in the frontier's unit (bytes for ``size``, BOPs for ``bops``).
        fraction: at most this fraction of the all-float cost, in (0, 1].
        avg_bits: at most this parameter-weighted average of weight bits (float counts 32). The
            frontier is optimal in cost, not in bits, so this is the best *frontier* point within
            the bits (with the ``size`` cost model the two nearly coincide).

    Raises:
        UsageError: not exactly one target, a non-finite target, or a target outside the range the
            frontier covers (cheaper than its cheapest point, or dearer than all-float); the
            message gives the allowed range.

    Example:
        >>> from hawqtool.types import LayerOption
        >>> opts = {"a": (LayerOption("int4", 1.0, 0.0, 5.0), LayerOption("float", 4.0, 0.0, 0.0))}
        >>> f = pareto_frontier(OptionTable(("a",), opts, "size", {"a": 1}))
        >>> select(f, max_cost=3.0).allocation["a"], select(f, fraction=1.0).allocation["a"]
        ('int4', 'float')
        >>> select(f, avg_bits=8).cost
        1.0
    """
    given = {
        k: v
        for k, v in (("max_cost", max_cost), ("fraction", fraction), ("avg_bits", avg_bits))
        if v is not None
    }
    if len(given) != 1:
        raise UsageError(
            "give exactly one target: max_cost, fraction or avg_bits; got "
            + (", ".join(f"{k}={v!r}" for k, v in given.items()) or "none")
        )
    ((kind, value),) = given.items()
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        raise UsageError(f"{kind} must be a finite number, got {value!r}")
    points = frontier.points
    if not points:
        raise UsageError("the frontier is empty")
    unit = _unit(frontier)
    cheapest, dearest = points[0].cost, frontier.float_cost or points[-1].cost
    cost_range = f"{cheapest:.6g} to {dearest:.6g} {unit} (all float)"

    if kind == "avg_bits":
        lowest = min(p.avg_bits for p in points)
        if value < lowest - 1e-9 or value > 32:
            raise UsageError(
                f"avg_bits={value:g} is outside the frontier's range: allowed {lowest:.4g} to 32 bits"
            )
        fitting = [p for p in points if p.avg_bits <= value + 1e-9]
        return min(fitting, key=lambda p: (p.omega, p.cost))

    if kind == "fraction":
        lo = cheapest / dearest if dearest > 0 else 0.0
        if not 0 < value <= 1 + _REL_TOL or value * dearest < cheapest * (1 - _REL_TOL):
            raise UsageError(
                f"fraction={value:g} of the all-float cost is outside the frontier's range: "
                f"allowed {lo:.4g} to 1 ({cost_range})"
            )
        target = value * dearest
    else:
        target = value
        if target < cheapest * (1 - _REL_TOL) or target > dearest * (1 + _REL_TOL):
            raise UsageError(
                f"max_cost={value:.6g} {unit} is outside the frontier's range: allowed {cost_range}"
            )
    # Points are sorted by cost with ΣΩ decreasing: the last one within the target is the best.
    i = bisect.bisect_right(points, target + _REL_TOL * abs(target), key=lambda p: p.cost) - 1
    return points[max(i, 0)]


def uniform_points(
    options: OptionTable, formats: tuple[str, ...] = ("int4", "int8", "float")
) -> dict[str, tuple[float, float]]:
    """(cost, ΣΩ) of putting every layer in one format, for reference on plots and in reports.

    A layer with a single option (pinned) keeps it. A format that some unpinned layer does not
    offer is left out.

    Example:
        >>> from hawqtool.types import LayerOption
        >>> opts = {"a": (LayerOption("int4", 1.0, 0.0, 5.0), LayerOption("float", 4.0, 0.0, 0.0))}
        >>> uniform_points(OptionTable(("a",), opts, "size"))
        {'int4': (1.0, 5.0), 'float': (4.0, 0.0)}
    """
    out = {}
    for fmt in formats:
        alloc = {}
        for fqn in options.layers:
            row = options.options[fqn]
            offered = [o.format for o in row]
            if fmt in offered:
                alloc[fqn] = fmt
            elif len(row) == 1:
                alloc[fqn] = row[0].format
            else:
                break
        else:
            out[fmt] = (options.cost(alloc), options.omega(alloc))
    return out


def point_of(options: OptionTable, allocation: Mapping[str, str]) -> FrontierPoint:
    """``allocation`` as a point of ``options``: its cost, ΣΩ and average bits.

    Example:
        >>> from hawqtool.types import LayerOption
        >>> opts = OptionTable(("a",), {"a": (LayerOption("int4", 1.0, 0.0, 5.0),)}, "size")
        >>> p = point_of(opts, {"a": "int4"}); (p.cost, p.omega)
        (1.0, 5.0)
    """
    alloc = dict(allocation)
    bits = average_bits(alloc, options.params) if set(options.params) >= set(alloc) else 0.0
    return FrontierPoint(options.cost(alloc), options.omega(alloc), alloc, bits)


def uniform_models(options: OptionTable) -> dict[str, FrontierPoint]:
    """Per quantized format offered (most bits first), the uniform model ``"uniform F"``: every layer
    that offers F takes it, every other layer keeps its most precise option (float where offered; a
    pin is a layer's only option).

    These are the one-line models a user would try first (onnxruntime's ``quantize_static`` is
    ``uniform int8``): the search probes those cheaper than its choice, so it never returns a model
    costlier than a uniform one it could have found to meet the budget (:func:`hawqtool.search.bisect`).

    Example:
        >>> from hawqtool.types import LayerOption
        >>> row = (LayerOption("int4", 1.0, 2.0, 5.0), LayerOption("int8-w", 2.0, 1.0, 1.0),
        ...        LayerOption("float", 4.0, 0.0, 0.0))
        >>> opts = OptionTable(("a", "b"), {"a": row, "b": row[1:]}, "size")
        >>> {k: dict(p.allocation) for k, p in uniform_models(opts).items()}
        {'uniform int8-w': {'a': 'int8-w', 'b': 'int8-w'}, 'uniform int4': {'a': 'int4', 'b': 'float'}}
    """
    offered = {o.format for row in options.options.values() for o in row if is_quantized(o.format)}
    out = {}
    for fmt in sorted(offered, key=lambda f: (-parse_format(f).bits, f)):
        alloc = {}
        for fqn in options.layers:
            row = options.options[fqn]
            alloc[fqn] = fmt if any(o.format == fmt for o in row) else min(row, key=lambda o: o.omega).format
        out[f"uniform {fmt}"] = point_of(options, alloc)
    return out
