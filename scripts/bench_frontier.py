"""Exact Pareto frontier vs one ILP per target (HAWQ-V3's formulation), on synthetic option tables.

For each table: 20 cost targets spread between the cheapest and the all-float cost, each solved as
an ILP with PuLP/CBC (binary x[l,f], Σ_f x[l,f] = 1, Σ cost·x <= target, minimise Σ Ω·x, gap 0),
against the whole frontier: exact (up to ``--exact-up-to`` layers), and bounded by a cost grid
alone or by a cost grid plus a log-ΣΩ grid with the same bucket count (``--grid``), each followed by
``select(max_cost=target)``. Prints times, frontier sizes and the relative ΣΩ difference from the
ILP at the targets (negative: the frontier found a better allocation than CBC).

Two families of synthetic networks, both with 4 formats (int2, int4, int8, float), cost = bytes
with ideal bit packing + one float32 scale per output channel, Ω = avg trace · params · σ² · 4^-b
with log-normal traces and a ±20 % per-option jitter (what ‖Q_b(W) − W‖² does for Gaussian weights):

- ``zoo``: layers drawn from the shapes of real CNNs / transformers (many layers share a shape, as
  in every real network), so many allocations share a cost;
- ``distinct``: every layer a different, log-uniform size (1k–3M params): the worst case for the
  frontier's size.

Run: ``python scripts/bench_frontier.py`` (5–10 minutes on 2 cores), or ``--layers 50 200``.
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np

from hawqtool.frontier import pareto_frontier, select
from hawqtool.types import LayerOption, OptionTable

FORMATS = (("int2", 2), ("int4", 4), ("int8", 8), ("float", 32))
# (out_channels, params) of layers in ResNets, MobileNets and transformer blocks.
ZOO_SHAPES = [
    (64, 64 * 64 * 9),
    (128, 128 * 128 * 9),
    (256, 256 * 256 * 9),
    (512, 512 * 512 * 9),
    (128, 64 * 128),
    (256, 128 * 256),
    (512, 256 * 512),  # 1×1 projections
    (144, 144 * 9),
    (384, 384 * 9),  # depthwise
    (768, 768 * 768),
    (3072, 768 * 3072),
    (768, 3072 * 768),  # attention / MLP
]


def synthetic_table(n_layers: int, family: str, seed: int) -> OptionTable:
    rng = np.random.default_rng(seed)
    if family == "zoo":
        pick = rng.integers(0, len(ZOO_SHAPES), n_layers)
        shapes = [ZOO_SHAPES[i] for i in pick]
    else:
        params = np.exp(rng.uniform(math.log(1e3), math.log(3e6), n_layers)).astype(int)
        shapes = [(max(1, int(math.sqrt(p / 9))), int(p)) for p in params]
    traces = np.exp(rng.normal(0.0, 2.0, n_layers))
    sigma2 = np.exp(rng.normal(-7.0, 1.0, n_layers))
    layers = tuple(f"layer{i}" for i in range(n_layers))
    options = {}
    for i, (out_ch, params) in enumerate(shapes):
        row = []
        for fmt, bits in FORMATS:
            if fmt == "float":
                row.append(LayerOption(fmt, float(params * 4), 0.0, 0.0))
                continue
            sq = params * sigma2[i] * 4.0 ** (-bits) * rng.uniform(0.8, 1.2)
            row.append(LayerOption(fmt, float(math.ceil(params * bits / 8) + 4 * out_ch), sq, traces[i] * sq))
        options[layers[i]] = tuple(row)
    return OptionTable(layers, options, "size", {layers[i]: s[1] for i, s in enumerate(shapes)})


def solve_ilp(table: OptionTable, target: float) -> tuple[float, float, float]:
    """(ΣΩ, wall seconds incl. model building, CBC seconds) of the HAWQ-V3 ILP at ``target``."""
    import pulp

    t0 = time.perf_counter()
    prob = pulp.LpProblem("alloc", pulp.LpMinimize)
    x = {
        (fqn, j): pulp.LpVariable(f"x_{li}_{j}", cat="Binary")
        for li, fqn in enumerate(table.layers)
        for j in range(len(table.options[fqn]))
    }
    # Costs in MB keep CBC's absolute tolerances meaningful.
    prob += pulp.lpSum(table.options[f][j].omega * v for (f, j), v in x.items())
    for fqn in table.layers:
        prob += pulp.lpSum(x[fqn, j] for j in range(len(table.options[fqn]))) == 1
    prob += pulp.lpSum(table.options[f][j].cost / 1e6 * v for (f, j), v in x.items()) <= target / 1e6
    prob.solve(pulp.PULP_CBC_CMD(msg=False, gapRel=0.0, gapAbs=0.0))
    wall = time.perf_counter() - t0
    assert pulp.LpStatus[prob.status] == "Optimal", pulp.LpStatus[prob.status]
    omega = math.fsum(table.options[f][j].omega for (f, j), v in x.items() if v.value() > 0.5)
    return omega, wall, float(prob.solutionTime)


def solve_highs(table: OptionTable, target: float) -> tuple[float, float]:
    """(ΣΩ, seconds) of the same ILP with HiGHS (scipy.optimize.milp, relative gap 0): a second
    reference, because CBC's absolute tolerances show once ΣΩ is small."""
    import os

    from scipy.optimize import Bounds, LinearConstraint, milp

    t0 = time.perf_counter()
    rows = [table.options[f] for f in table.layers]
    omega = np.array([o.omega for row in rows for o in row])
    cost = np.array([o.cost for row in rows for o in row]) / 1e6
    one = np.zeros((len(rows), len(omega)))
    start = 0
    for i, row in enumerate(rows):
        one[i, start : start + len(row)] = 1.0
        start += len(row)
    # HiGHS prints some solver chatter straight to fd 1.
    saved = os.dup(1)
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 1)
    try:
        res = milp(
            omega,
            constraints=[LinearConstraint(one, 1, 1), LinearConstraint(cost[None, :], -np.inf, target / 1e6)],
            integrality=np.ones(len(omega)),
            bounds=Bounds(0, 1),
            options={"mip_rel_gap": 0.0},
        )
    finally:
        os.dup2(saved, 1)
        os.close(saved)
        os.close(null)
    assert res.success, res.message
    return float(omega @ np.round(res.x)), time.perf_counter() - t0


def run(n_layers: int, family: str, grids: list[int], exact: bool, n_targets: int, seed: int) -> None:
    table = synthetic_table(n_layers, family, seed)
    lo = math.fsum(min(o.cost for o in table.options[f]) for f in table.layers)
    hi = math.fsum(table.option(f, "float").cost for f in table.layers)
    targets = np.linspace(lo, hi, n_targets + 2)[1:-1]
    ilp = [solve_ilp(table, float(t)) for t in targets]
    t_ilp = sum(w for _, w, _ in ilp)
    t_cbc = sum(c for _, _, c in ilp)
    highs = [solve_highs(table, float(t)) for t in targets]
    print(
        f"{family} {n_layers} layers × 4 formats: {n_targets} ILPs {t_ilp:.2f} s with PuLP/CBC "
        f"(CBC {t_cbc:.2f} s of it), {sum(s for _, s in highs):.2f} s with HiGHS",
        flush=True,
    )
    o_max = math.fsum(max(o.omega for o in table.options[f]) for f in table.layers)
    o_min = min(o.omega for f in table.layers for o in table.options[f] if o.omega > 0)
    log_range = math.log(o_max / o_min)
    configs: list[tuple[str, float | None, float | None]] = [("exact", None, None)] if exact else []
    for b in grids:
        configs.append((f"cost grid {b:,} (≤{n_layers / b:.1%} of range)", (hi - lo) / b, None))
        bound = f"≤{n_layers / b:.1%} cost or ≤{math.expm1(n_layers * log_range / b):.0%} ΣΩ"
        configs.append((f"cost+ΣΩ grid {b:,} ({bound})", (hi - lo) / b, log_range / b))
    for label, cost_grid, omega_grid in configs:
        t0 = time.perf_counter()
        frontier = pareto_frontier(table, cost_grid=cost_grid, omega_grid=omega_grid)
        t_front = time.perf_counter() - t0
        t0 = time.perf_counter()
        picked = [select(frontier, max_cost=float(t)) for t in targets]
        t_select = time.perf_counter() - t0
        rel = [(p.omega - o) / max(abs(o), 1e-300) for p, (o, _, _) in zip(picked, ilp, strict=True)]
        assert all(p.cost <= t * (1 + 1e-12) for p, t in zip(picked, targets, strict=True))
        worst = max(rel, key=abs)
        rel_h = [(p.omega - o) / max(abs(o), 1e-300) for p, (o, _) in zip(picked, highs, strict=True)]
        print(
            f"   {label:38s} {len(frontier):9,d} points  {t_front:7.2f} s (+{t_select * 1e3:3.0f} ms for "
            f"{n_targets} selects)  {t_ilp / t_front:5.1f}x vs ILPs  ΣΩ vs ILP: max {worst:+.1e}, "
            f"mean {np.mean(rel):+.1e}; equal at {sum(abs(r) <= 1e-9 for r in rel)}/{n_targets}, "
            f"lower at {sum(r < -1e-9 for r in rel)}  |  vs HiGHS: max {max(rel_h, key=abs):+.1e}, "
            f"equal at {sum(abs(r) <= 1e-9 for r in rel_h)}/{n_targets}",
            flush=True,
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, nargs="+", default=[50, 200, 1000])
    ap.add_argument("--families", nargs="+", default=["zoo", "distinct"])
    ap.add_argument("--targets", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--grid",
        type=int,
        nargs="+",
        default=[10_000, 100_000],
        help="cost-grid bucket counts over the table's cost range (0 for none)",
    )
    ap.add_argument("--exact-up-to", type=int, default=200, help="largest layer count also run exactly")
    args = ap.parse_args()
    grids = [g for g in args.grid if g > 0]
    for n in args.layers:
        for fam in args.families:
            run(n, fam, grids, n <= args.exact_up_to, args.targets, args.seed)


if __name__ == "__main__":
    main()
