"""Inter-layer dependency terms against known answers: a planted quadratic, an exact Hessian, real data."""

from __future__ import annotations

import itertools
import json
import math
import warnings
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hawqtool.dependency import (
    DependencyModel,
    build_dependency_model,
    candidates_for_search,
    interacting_keys,
    make_repair,
    measured_change,
    nondominated,
    planned_passes,
    repair,
    rescore,
)
from hawqtool.errors import UsageError
from hawqtool.formats import format_bits
from hawqtool.hvp import SplitHessian
from hawqtool.prepare import PreparedModel, prepare_model
from hawqtool.quantizer import quant_error
from hawqtool.types import Frontier, FrontierPoint, LayerOption, OptionTable


def option_table(
    prepared: PreparedModel, formats: tuple[str, ...], avg_trace: dict[str, float]
) -> OptionTable:
    """Ω = avg trace · ‖Q(W) − W‖², cost = weight bits (what sensitivity.py computes)."""
    opts = {}
    for layer in prepared.layers:
        w = prepared.module(layer.fqn).weight
        rows = []
        for fmt in formats:
            sq = float((quant_error(w, fmt).double() ** 2).sum())
            cost = float(layer.params * format_bits(fmt))
            rows.append(LayerOption(fmt, cost, sq, avg_trace[layer.fqn] * sq))
        opts[layer.fqn] = tuple(rows)
    return OptionTable(prepared.fqns, opts, "size", {layer.fqn: layer.params for layer in prepared.layers})


def all_allocations(options: OptionTable) -> list[dict[str, str]]:
    fmts = [[o.format for o in options.options[f]] for f in options.layers]
    return [dict(zip(options.layers, c, strict=True)) for c in itertools.product(*fmts)]


def spearman(a: list[float], b: list[float]) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(a, b).statistic)


# --------------------------------------------------------------------------------------------
# A planted pairwise interaction: the loss is exactly quadratic in the weights
# --------------------------------------------------------------------------------------------


class Planted(nn.Module):
    """Outputs (a(x) + b(x), c(x)): under MSE, layers a and b interact, c interacts with neither."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(6, 2, bias=False)
        self.b = nn.Linear(6, 2, bias=False)
        self.c = nn.Linear(6, 2, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.a(x) + self.b(x), self.c(x)], dim=1)


@pytest.fixture(scope="module", params=["output", "hvp"])
def planted(request):
    g = torch.Generator().manual_seed(0)
    model = Planted()
    with torch.no_grad():
        for m in (model.a, model.b, model.c):
            m.weight.copy_(torch.randn(m.weight.shape, generator=g))
    x = torch.randn(96, 6, generator=g)
    y = torch.randn(96, 4, generator=g)
    batches = [(x[:64], y[:64]), (x[64:], y[64:])]  # uneven batches: weighting must be exact
    prepared = prepare_model(model, x[:4])
    hessian = SplitHessian(prepared, batches, F.mse_loss, device="cpu")
    options = option_table(prepared, ("int2", "int3", "int4", "float"), dict.fromkeys(prepared.fqns, 1.0))
    # The model is linear in all its weights jointly: both methods are exact. Every key interacts.
    dep = build_dependency_model(
        hessian, prepared, options, method=request.param, tolerance=0.0, progress=False
    )
    return prepared, hessian, options, dep, x


def test_planted_pair_is_the_largest_cross_term(planted) -> None:
    prepared, _, _, dep, x = planted
    cross = {}
    for (fa, ma), (fb, mb) in itertools.product(dep.keys, repeat=2):
        if fa < fb:
            cross[(fa, ma, fb, mb)] = abs(dep.term(fa, ma, fb, mb))
    top = max(cross, key=cross.__getitem__)
    assert (top[0], top[2]) == ("a", "b")
    # c is independent of a and b: exactly zero, not merely small.
    assert max(v for k, v in cross.items() if "c" in (k[0], k[2])) == 0.0
    # Closed form: L = mean((out − y)²) over N·4 entries, so Δ_aᵀH_abΔ_b = 2/(4N) Σ_n (Δ_a x_n)·(Δ_b x_n).
    da = quant_error(prepared.module("a").weight, "int2").double()
    db = quant_error(prepared.module("b").weight, "int3").double()
    exact = 2.0 / (4 * len(x)) * float(((x.double() @ da.T) * (x.double() @ db.T)).sum())
    assert dep.term("a", "int2", "b", "int3") == pytest.approx(exact, rel=1e-5)
    assert dep.term("b", "int3", "a", "int2") == dep.term("a", "int2", "b", "int3")  # symmetric


def test_prediction_is_exact_on_a_quadratic_loss(planted) -> None:
    prepared, hessian, options, dep, _ = planted
    for alloc in all_allocations(options):
        measured = measured_change(hessian, prepared, alloc)
        assert dep.predict(alloc) == pytest.approx(measured, rel=1e-4, abs=1e-6)
        shares = dep.contributions(alloc)
        assert sum(shares.values()) == pytest.approx(dep.score(alloc), rel=1e-9, abs=1e-12)
        assert dep.predict(alloc) == pytest.approx(dep.first_order(alloc) + dep.quadratic(alloc))
    floats = dict.fromkeys(options.layers, "float")
    assert dep.predict(floats) == 0.0
    # Quantizing a and b with errors that cancel in a(x) + b(x) is where the cross term matters:
    # the diagonal alone (no cross terms) misses that.
    alloc = {"a": "int2", "b": "int2", "c": "float"}
    assert dep.quadratic(alloc) - dep.diagonal(alloc) == pytest.approx(dep.term("a", "int2", "b", "int2"))
    # One HVP, or one forward pass, per quantized (layer, format); float costs nothing.
    if dep.method == "hvp":
        assert dep.hvps == 9 and dep.costs["backward_passes"] == 1 + 2 * 9
    else:
        assert dep.hvps == 0 and dep.costs["backward_passes"] == 0
        assert dep.costs["term_forward_passes"] == 1 + 9
    # The forecast's count (hawqtool.forecast) is what the stage spends, a backward as two forwards.
    spent = dep.costs["forward_passes"] + 2 * dep.costs["backward_passes"]
    assert planned_passes(options, method=dep.method, exported=False, tolerance=0.0) == (spent, 0)


def test_own_terms_are_measured_out_of_context(planted) -> None:
    prepared, hessian, options, dep, _ = planted
    floats = dict.fromkeys("abc", "float")
    for f, fmt in dep.keys:
        if fmt == "float":
            assert dep.own_source[dep.index(f, fmt)] == "float" and dep.measured[dep.index(f, fmt)] == 0.0
            continue
        # Only layer f quantized: on a quadratic loss its change is exactly gᵀΔ + ½ΔᵀH_ffΔ, a and b alike
        # (their interaction is not in it: that is the cross term's job).
        alone = {**floats, f: fmt}
        own = dep.first_order(alone) + 0.5 * dep.term(f, fmt, f, fmt)
        assert dep.measured[dep.index(f, fmt)] == pytest.approx(own, rel=1e-4, abs=1e-9)
        assert dep.own_source[dep.index(f, fmt)] == "torch"
    # So own terms plus cross terms are the whole second-order model: score = predict everywhere.
    for alloc in all_allocations(options):
        assert dep.score(alloc) == pytest.approx(dep.predict(alloc), rel=3e-4, abs=1e-6)  # 3 own terms
    # The output method's own terms come from its term passes; the HVP method takes a pass per key.
    assert dep.forward_passes == (0 if dep.method == "output" else 9)
    assert dep.summary()["own_terms"] == {"torch": 9, "float": 3}
    plain = build_dependency_model(
        hessian, prepared, options, measure_singles=False, method=dep.method, tolerance=0.0, progress=False
    )
    assert plain.measured is None and plain.forward_passes == 0 and plain.own_source == ()
    for alloc in all_allocations(options)[::7]:
        assert plain.score(alloc) == pytest.approx(plain.predict(alloc))


def test_keys_left_out_of_the_interactions(planted) -> None:
    prepared, hessian, options, full, _ = planted
    # Ω by hand: layer a's errors weigh most, so the tolerance leaves out c's and b's small ones.
    weight = {"a": 100.0, "b": 1.0, "c": 0.01}
    table = OptionTable(
        options.layers,
        {
            f: tuple(replace(o, omega=o.sq_error * weight[f]) for o in options.options[f])
            for f in options.layers
        },
        "size",
        options.params,
    )
    kept = interacting_keys(table, 0.2)
    root = {k: math.sqrt(table.option(*k).omega) for k in full.keys if k[1] != "float"}
    out = set(root) - kept
    assert out and kept and ("a", "int2") in kept
    assert (
        sum(root[k] for k in out)
        <= 0.2 * sum(root.values())
        < sum(root[k] for k in out) + min(root[k] for k in kept)
    )  # the smallest keys, as many as fit in the share
    assert interacting_keys(table, 0.0) == set(root)
    dep = build_dependency_model(hessian, prepared, table, method=full.method, tolerance=0.2, progress=False)
    assert dep.interacting == len(kept) and dep.summary()["interacting"] == len(kept)
    for k in full.keys:
        i = dep.index(*k)
        if k in kept:  # the kept keys' terms are the full model's, exactly
            for j, other in enumerate(full.keys):
                if other in kept:
                    assert dep.matrix[i, j] == pytest.approx(full.matrix[i, j], rel=1e-12, abs=1e-15)
        elif k in out:  # a key left out: no cross terms, Ω on the diagonal
            assert np.count_nonzero(dep.matrix[i]) == 1 and dep.matrix[i, i] == table.option(*k).omega
            expected = (
                ("estimate", 0.5 * table.option(*k).omega) if dep.method == "output" else ("torch", None)
            )
            assert dep.own_source[i] == expected[0]
            if expected[1] is not None:
                assert dep.measured[i] == expected[1]
    # One term pass (or HVP) per kept key: what the forecast counts too.
    spent = dep.costs["forward_passes"] + 2 * dep.costs["backward_passes"]
    assert planned_passes(table, method=dep.method, exported=False, tolerance=0.2) == (spent, 0)
    assert dep.hvps == (len(kept) if dep.method == "hvp" else 0)
    # What leaving them out can change in any score is bounded: √Ω_k √Ω_j per dropped cross term
    # (Cauchy–Schwarz; here Ω_k = Δ_kᵀH_kkΔ_k only up to the hand-made weights, so the bound uses the
    # exact diagonal), plus the own term's estimate.
    diag = np.diag(full.matrix)
    for alloc in all_allocations(options)[::5]:
        idx = [full.index(f, alloc[f]) for f in full.layers]
        bound = sum(
            abs(dep.measured[i] - full.measured[i]) + sum(math.sqrt(diag[i] * diag[j]) for j in idx if j != i)
            for i in idx
            if full.keys[i] in out
        )
        assert abs(dep.score(alloc) - full.score(alloc)) <= bound + 1e-12
    with pytest.raises(UsageError, match=r"tolerance must be in \[0, 1\), got 1.5"):
        interacting_keys(table, 1.5)


def test_round_trip_and_errors(planted, tmp_path) -> None:
    dep = planted[3]
    path = tmp_path / "dep.json"
    path.write_text(json.dumps(dep.to_dict()))
    back = DependencyModel.from_dict(json.loads(path.read_text()))
    alloc = {"a": "int2", "b": "int4", "c": "int3"}
    assert back.predict(alloc) == dep.predict(alloc) and back.keys == dep.keys
    assert back.score(alloc) == dep.score(alloc) and back.own_source == dep.own_source
    assert back.interacting == dep.interacting == 9
    assert back.method == dep.method and dict(back.costs) == dict(dep.costs)
    old = dep.to_dict()
    del old["method"], old["costs"]
    assert DependencyModel.from_dict(old).method == "hvp"  # a cache from before 0.4
    with pytest.raises(UsageError, match="formats of 'a'"):
        dep.predict({"a": "int8", "b": "int4", "c": "int3"})
    with pytest.raises(UsageError, match="missing"):
        dep.predict({"a": "int2"})


# --------------------------------------------------------------------------------------------
# Exact Hessian of a small MLP on real digits
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mlp_exact(digits_splits):
    from hawqtool.zoo import MLP

    torch.manual_seed(0)
    model = MLP(64, hidden=(8,), num_classes=10)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(8):
        for x, y in digits_splits.calibration:
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
    calib = digits_splits.calibration
    prepared = prepare_model(model, calib[0][0][:4])
    hessian = SplitHessian(prepared, calib, F.cross_entropy, device="cpu")
    fqns = prepared.fqns
    shapes = [prepared.module(f).weight.shape for f in fqns]
    sizes = [s.numel() for s in shapes]
    base = {n: p.detach().double() for n, p in prepared.model.named_parameters()}
    x_all = torch.cat([x for x, _ in calib]).double()
    y_all = torch.cat([y for _, y in calib])

    def loss(flat: torch.Tensor) -> torch.Tensor:
        params = dict(base)
        for f, piece, shape in zip(fqns, flat.split(sizes), shapes, strict=True):
            params[f"{f}.weight"] = piece.reshape(shape)
        return F.cross_entropy(torch.func.functional_call(prepared.model, params, (x_all,)), y_all)

    # The full 592 × 592 Hessian of the mean loss over the whole split, in float64.
    w0 = torch.cat([prepared.module(f).weight.detach().reshape(-1) for f in fqns]).double()
    with warnings.catch_warnings():
        # torch.func's transforms call the deprecated torch.jit.script internally: not ours to fix.
        warnings.simplefilter("ignore", DeprecationWarning)
        H = torch.func.hessian(loss)(w0)
        g = torch.func.grad(loss)(w0)
    return prepared, hessian, H.detach(), g.detach(), sizes


def test_hvp_terms_match_the_exact_hessian(mlp_exact) -> None:
    prepared, hessian, H, g, sizes = mlp_exact
    assert H.shape == (sum(sizes), sum(sizes)) == (64 * 8 + 8 * 10,) * 2
    options = option_table(prepared, ("int2", "int4", "int8"), dict.fromkeys(prepared.fqns, 1.0))
    dep = build_dependency_model(hessian, prepared, options, method="hvp", tolerance=0.0, progress=False)
    offsets = dict(zip(prepared.fqns, np.cumsum([0, *sizes[:-1]]).tolist(), strict=True))

    def flat_delta(fqn: str, fmt: str) -> torch.Tensor:
        v = torch.zeros(sum(sizes), dtype=torch.float64)
        d = quant_error(prepared.module(fqn).weight, fmt).double().reshape(-1)
        v[offsets[fqn] : offsets[fqn] + d.numel()] = d
        return v

    deltas = {k: flat_delta(*k) for k in dep.keys}
    scale = max(abs(float(deltas[k] @ H @ deltas[k])) for k in dep.keys)
    for k1, k2 in itertools.product(dep.keys, repeat=2):
        if k1[0] != k2[0] or k1 == k2:
            exact = float(deltas[k1] @ H @ deltas[k2])
            assert dep.term(*k1, *k2) == pytest.approx(exact, rel=1e-3, abs=1e-5 * scale)
    for alloc in all_allocations(options):
        d = sum(deltas[(f, fmt)] for f, fmt in alloc.items())
        assert dep.quadratic(alloc) == pytest.approx(0.5 * float(d @ H @ d), rel=1e-3)
        blocks = sum(0.5 * float(deltas[(f, fmt)] @ H @ deltas[(f, fmt)]) for f, fmt in alloc.items())
        assert dep.diagonal(alloc) == pytest.approx(blocks, rel=1e-3)
        assert dep.first_order(alloc) == pytest.approx(float(g @ d), rel=1e-3, abs=1e-7)


# --------------------------------------------------------------------------------------------
# Real model: the augmented score ranks allocations by measured loss change better than ΣΩ
# --------------------------------------------------------------------------------------------


def layer_traces(prepared: PreparedModel, hessian: SplitHessian) -> dict[str, float]:
    """Average Hessian trace per layer from the Hessian stage, to 20 % (the ranking needs no more:
    the small CNN's layers' average traces span two orders of magnitude)."""
    from hawqtool.hessian import estimate_traces

    table = estimate_traces(
        prepared,
        hessian.batches,
        hessian.loss_fn,
        seed=0,
        rel_tol=0.2,
        max_probes=64,
        device="cpu",
        progress=False,
    )
    return {row.layer: row.avg_trace for row in table}


@pytest.fixture(scope="module")
def cnn(small_cnn_digits, digits_splits):
    prepared = prepare_model(small_cnn_digits, digits_splits.calibration[0][0][:4])
    # 256 of the 512 calibration images keep this test quick on 2 cores.
    hessian = SplitHessian(prepared, digits_splits.calibration[:2], F.cross_entropy, device="cpu")
    traces = layer_traces(prepared, hessian)
    options = option_table(prepared, ("int2", "int3", "int4"), traces)
    dep = build_dependency_model(hessian, prepared, options, progress=False)
    return prepared, hessian, options, dep


class TwoBranches(nn.Module):
    """y = A x₁ + B x₂: with an MSE loss the loss is exactly quadratic in (A, B) jointly, and the
    cross block H_AB is nonzero when x₁ and x₂ are correlated."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 3, bias=False)
        self.b = nn.Linear(4, 3, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a(x[:, :4]) + self.b(x[:, 4:])


def test_on_a_quadratic_loss_the_prediction_is_the_measured_change_and_cross_terms_matter() -> None:
    # Known answer: for a loss that is exactly quadratic, gᵀΔ + ½ΔᵀHΔ IS the loss change, for every
    # allocation, cross-layer terms included; dropping the cross terms (ΣΩ's additivity) is not.
    g = torch.Generator().manual_seed(0)
    x1 = torch.randn(256, 4, generator=g)
    x = torch.cat([x1, x1 + 0.3 * torch.randn(256, 4, generator=g)], dim=1)  # correlated halves
    y = torch.randn(256, 3, generator=g)
    torch.manual_seed(0)
    prepared = prepare_model(TwoBranches().eval(), x[:8])
    hessian = SplitHessian(prepared, [(x[:128], y[:128]), (x[128:], y[128:])], F.mse_loss, device="cpu")
    traces = layer_traces(prepared, hessian)
    options = option_table(prepared, ("int2", "int3", "int4"), traces)
    dep = build_dependency_model(
        hessian, prepared, options, measure_singles=False, tolerance=0.0, progress=False
    )
    cross_share = []
    for fa, fb in itertools.product(("int2", "int3", "int4"), repeat=2):
        alloc = {"a": fa, "b": fb}
        measured = measured_change(hessian, prepared, alloc, base_loss=dep.base_loss)
        assert dep.predict(alloc) == pytest.approx(measured, rel=1e-4, abs=1e-7)
        cross = dep.quadratic(alloc) - dep.diagonal(alloc)
        cross_share.append(abs(cross) / abs(measured))
    assert max(cross_share) > 0.1  # the cross block carries a real part of the change


# --------------------------------------------------------------------------------------------
# Candidates and repair (hand-built frontier on the small CNN)
# --------------------------------------------------------------------------------------------


def brute_frontier(options: OptionTable) -> Frontier:
    allocs = all_allocations(options)
    pts = sorted(
        (FrontierPoint(options.cost(a), options.omega(a), a) for a in allocs), key=lambda p: (p.cost, p.omega)
    )
    keep, best = [], np.inf
    for p in pts:
        if p.omega < best:
            keep.append(p)
            best = p.omega
    return Frontier(tuple(keep), options.cost_model)


@pytest.mark.slow
def test_candidates_are_monotone_and_on_the_frontier(cnn) -> None:
    _, _, options, dep = cnn
    front = brute_frontier(options)
    scored = rescore(front, dep)
    assert [p.allocation for p in scored] == [p.allocation for p in front]
    assert all(p.score == pytest.approx(dep.score(p.allocation)) for p in scored)
    on_front = [dict(p.allocation) for p in front]
    cands = candidates_for_search(front, dep, options)
    assert cands[-1].allocation == front.points[-1].allocation  # the most precise point is kept
    costs = [p.cost for p in cands]
    assert costs == sorted(costs)
    assert all(a > b for a, b in itertools.pairwise([p.score for p in cands[:-1]]))
    assert all(dict(p.allocation) in on_front for p in cands)
    # nondominated over every allocation (81) is the (cost, score) staircase: no point beats it.
    allp = [FrontierPoint(options.cost(a), 0.0, a, score=dep.score(a)) for a in all_allocations(options)]
    stair = nondominated(allp, keep_last=False)
    for p in allp:
        below = [q for q in stair if q.cost <= p.cost]
        assert below and min(q.score for q in below) <= p.score + 1e-12


@pytest.mark.slow
def test_repair_promotes_toward_a_target_under_a_cost_cap(cnn) -> None:
    _, _, options, dep = cnn
    cheap = dict.fromkeys(options.layers, "int2")
    one = repair(cheap, dep, options)
    assert one is not None and sum(a != b for a, b in zip(one.values(), cheap.values(), strict=True)) == 1
    assert dep.score(one) < dep.score(cheap)
    # The promoted layer is the one with the best predicted gain per added bit.
    gains = {}
    for f in options.layers:
        for fmt in ("int3", "int4"):
            trial = {**cheap, f: fmt}
            added = options.cost(trial) - options.cost(cheap)
            gains[(f, fmt)] = (dep.score(cheap) - dep.score(trial)) / added
    f_best, fmt_best = max(gains, key=gains.__getitem__)
    assert one[f_best] == fmt_best
    target = dep.score(dict.fromkeys(options.layers, "int3"))
    fixed = repair(cheap, dep, options, target=target)
    assert fixed is not None and dep.score(fixed) <= target
    assert repair(cheap, dep, options, target=target, max_cost=options.cost(cheap) + 1) is None
    cands = candidates_for_search(brute_frontier(options), dep, options)
    fix = make_repair(cands, dep, options)
    for i, p in enumerate(cands[:-1]):
        r = fix(p)
        if r is not None:
            assert r.cost < cands[i + 1].cost and r.score is not None
            assert r.score <= cands[i + 1].score + 1e-12
