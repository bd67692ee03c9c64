"""Per-layer Hutchinson traces against exact Hessian traces, determinism, cache and bad input."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from hawqtool import hessian
from hawqtool.errors import UsageError
from hawqtool.hessian import TraceState, estimate_traces
from hawqtool.hvp import SplitHessian
from hawqtool.prepare import prepare_model
from hawqtool.types import SensitivityTable


class TinyCNN(nn.Module):
    """A 4-channel conv, pooling and a classifier: small enough for exact Hessian blocks."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 2 * 2, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv(x)), 2)
        return self.fc(F.adaptive_avg_pool2d(x, 2).flatten(1))


class TinyMLP(nn.Module):
    """64-8-10, plus a Linear that forward never calls (its Hessian block is exactly zero)."""

    def __init__(self) -> None:
        super().__init__()
        self.hidden = nn.Linear(64, 8)
        self.head = nn.Linear(8, 10)
        self.unused = nn.Linear(3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.hidden(x.flatten(1))))


def _trained(model: nn.Module, splits, steps: int = 60) -> nn.Module:
    torch.manual_seed(0)
    x = torch.cat([b[0] for b in splits.evaluation])
    y = torch.cat([b[1] for b in splits.evaluation])
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return model.eval()


def _exact_traces(prepared, batches, loss_fn) -> dict[str, float]:
    """Tr(H_ii) of the mean loss over ``batches`` from the full Hessian block of each layer."""
    model = prepared.model
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    out = {}
    for fqn in prepared.fqns:
        w = prepared.module(fqn).weight.detach()

        def loss_of(wi: torch.Tensor, fqn: str = fqn) -> torch.Tensor:
            return loss_fn(functional_call(model, {f"{fqn}.weight": wi}, (x,)), y)

        h = torch.autograd.functional.hessian(loss_of, w, vectorize=True)
        out[fqn] = float(h.reshape(w.numel(), w.numel()).diagonal().sum())
    return out


@pytest.fixture(scope="module")
def tiny_models(digits_splits):
    torch.manual_seed(0)
    mlp = _trained(TinyMLP(), digits_splits)
    torch.manual_seed(1)
    cnn = _trained(TinyCNN(), digits_splits)
    calib = digits_splits.calibration
    return {
        "mlp": prepare_model(mlp, calib[0][0]),
        "cnn": prepare_model(cnn, calib[0][0]),
    }


@pytest.fixture(scope="module")
def exact_traces(tiny_models, digits_splits):
    return {k: _exact_traces(p, digits_splits.calibration, F.cross_entropy) for k, p in tiny_models.items()}


@pytest.mark.parametrize(("name", "sub_batch"), [("mlp", 64), ("mlp", None), ("cnn", 64), ("cnn", None)])
def test_traces_match_exact_hessian(tiny_models, exact_traces, digits_splits, name, sub_batch):
    prepared = tiny_models[name]
    exact = exact_traces[name]
    table = estimate_traces(
        prepared,
        digits_splits.calibration,
        F.cross_entropy,
        rel_tol=0.03,
        sub_batch=sub_batch,
        device="cpu",
        progress=False,
    )
    assert [r.layer for r in table] == list(prepared.fqns)
    for row in table:
        want = exact[row.layer]
        assert row.converged
        assert row.probes >= 16
        assert math.isfinite(row.trace) and math.isfinite(row.stderr)
        assert row.avg_trace == pytest.approx(row.trace / row.params)
        if want == 0.0:  # the layer forward never uses
            assert row.trace == 0.0 and row.stderr == 0.0
            continue
        assert want > 0  # cross-entropy through tanh / ReLU: a positive trace is the usual case
        assert abs(row.trace - want) <= 4 * row.stderr, (row, want)
        # Converged means the reported stderr meets rel_tol; the truth is within 4·rel_tol too.
        assert row.stderr <= 0.03 * abs(row.trace) + 1e-12
        assert abs(row.trace - want) <= 4 * 0.03 * abs(want)


def test_negative_traces_of_a_concave_loss(tiny_models, digits_splits):
    # -cross_entropy has Hessian -H: traces are negative and must be estimated as such, not NaN.
    def neg_ce(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return -F.cross_entropy(out, y)

    prepared = tiny_models["cnn"]
    calib = digits_splits.calibration
    exact = _exact_traces(prepared, calib, neg_ce)
    table = estimate_traces(prepared, calib, neg_ce, rel_tol=0.05, device="cpu", progress=False)
    for row in table:
        assert exact[row.layer] < 0 and row.trace < 0 and row.converged
        assert abs(row.trace - exact[row.layer]) <= 4 * row.stderr


def test_same_seed_same_table_other_seed_agrees(tiny_models, digits_splits):
    calib = digits_splits.calibration
    prepared = tiny_models["mlp"]
    kw = {"rel_tol": 0.1, "device": "cpu", "progress": False}
    a = estimate_traces(prepared, calib, F.cross_entropy, seed=3, **kw).to_dict()
    b = estimate_traces(prepared, calib, F.cross_entropy, seed=3, **kw).to_dict()
    c = estimate_traces(prepared, calib, F.cross_entropy, seed=4, **kw)
    for d in (a, b):
        d.pop("seconds")
        d.pop("costs")  # wall time and peak memory
    assert a == b  # bit for bit: floats compare exactly
    for ra, rc in zip(a["layers"], c.layers, strict=True):
        assert ra["trace"] != rc.trace or ra["trace"] == 0.0  # other probes (the unused layer is 0)
        assert abs(ra["trace"] - rc.trace) <= 4 * math.hypot(ra["stderr"], rc.stderr)


def test_cache_reuses_and_invalidates(tiny_models, digits_splits, tmp_path, monkeypatch):
    calib = digits_splits.calibration
    prepared = prepare_model(tiny_models["cnn"].model, calib[0][0])  # a copy: its weights change below
    calls = {"n": 0}
    real = hessian.EpochSampler.sample

    def counting(self, fqns):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        return real(self, fqns)

    monkeypatch.setattr(hessian.EpochSampler, "sample", counting)
    kw = {"rel_tol": 0.2, "device": "cpu", "progress": False, "cache_dir": tmp_path}
    first = estimate_traces(prepared, calib, F.cross_entropy, **kw)
    assert calls["n"] > 0 and first.hvps > 0
    assert len(first.fingerprint) == 64 and first.settings["rel_tol"] == 0.2
    assert len(list(tmp_path.glob("traces-*.json"))) == 1

    calls["n"] = 0
    again = estimate_traces(prepared, calib, F.cross_entropy, **kw)
    assert calls["n"] == 0
    assert again == first and isinstance(again, SensitivityTable)

    estimate_traces(prepared, calib, F.cross_entropy, **{**kw, "rel_tol": 0.25})
    assert calls["n"] > 0
    calls["n"] = 0
    estimate_traces(prepared, calib, F.cross_entropy, **{**kw, "seed": 1})
    assert calls["n"] > 0
    calls["n"] = 0
    estimate_traces(prepared, calib[:-1], F.cross_entropy, **kw)  # other data
    assert calls["n"] > 0
    calls["n"] = 0
    with torch.no_grad():
        prepared.module("fc").weight.mul_(1.5)  # other weights
    estimate_traces(prepared, calib, F.cross_entropy, **kw)
    assert calls["n"] > 0
    assert len(list(tmp_path.glob("traces-*.json"))) == 5


def test_not_converged_is_flagged_and_logged(tiny_models, digits_splits, caplog):
    with caplog.at_level(logging.WARNING, logger="hawqtool.hessian"):
        table = estimate_traces(
            tiny_models["cnn"],
            digits_splits.calibration,
            F.cross_entropy,
            rel_tol=1e-4,
            min_probes=4,
            max_probes=6,
            device="cpu",
            progress=False,
        )
    # 512 images in sub-batches of 128: 4 probes per epoch; max_probes=6 caps it at 2 epochs (the
    # least a layer ever runs when it cannot stop), which wins over any floor.
    assert all(not r.converged and r.probes == 8 for r in table)
    assert "conv" in caplog.text and "fc" in caplog.text and "did not reach" in caplog.text


def test_empty_calibration_is_a_usage_error(tiny_models):
    with pytest.raises(UsageError, match="empty"):
        estimate_traces(tiny_models["mlp"], [], F.cross_entropy, progress=False)


def test_non_finite_loss_is_a_usage_error(tiny_models, digits_splits):
    def nan_loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(out, y) * float("nan")

    with pytest.raises(UsageError, match="nan"):
        estimate_traces(tiny_models["mlp"], digits_splits.calibration, nan_loss, device="cpu", progress=False)


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"rel_tol": 0.0}, "rel_tol"),
        ({"rel_tol": float("nan")}, "rel_tol"),
        ({"min_probes": 1}, "min_probes"),
        ({"min_probes": 8, "max_probes": 4}, "max_probes"),
        ({"sub_batch": 0}, "sub_batch"),
        ({"device": "tpu"}, "device"),
        ({"probes_per_part": 0}, "probes_per_part"),
        ({"dtype": "bfloat16", "device": "cpu"}, r"'bfloat16' needs a CUDA device.*allowed on cpu: float32"),
        ({"dtype": "int8", "device": "cpu"}, "allowed: float32, bfloat16, float16"),
    ],
)
def test_bad_settings_are_usage_errors(tiny_models, digits_splits, kw, match):
    with pytest.raises(UsageError, match=match):
        estimate_traces(tiny_models["mlp"], digits_splits.calibration, F.cross_entropy, progress=False, **kw)


def test_sub_batches_are_gathered_rows_of_the_whole_split(tiny_models) -> None:
    # Uneven batches, never concatenated: each part is the split's rows at its indices.
    gen = torch.Generator().manual_seed(0)
    batches = [
        (torch.randn(n, 64, generator=gen), torch.randint(0, 10, (n,), generator=gen)) for n in (100, 60, 37)
    ]
    H = SplitHessian(tiny_models["mlp"], batches, F.cross_entropy, device="cpu")
    sampler = hessian.EpochSampler(H, sub_batch=50, seed=0)
    x_all = torch.cat([x for x, _ in batches])
    y_all = torch.cat([y for _, y in batches])
    parts = sampler.partition(3)
    assert sampler.parts == len(parts) == 4
    assert torch.equal(torch.sort(torch.cat(parts)).values, torch.arange(197))  # a partition
    for idx in parts:
        x, y = sampler.gather(idx)
        assert torch.equal(x, x_all[idx]) and torch.equal(y, y_all[idx])
    assert all(torch.equal(a, b) for a, b in zip(parts, sampler.partition(3), strict=True))  # seeded by epoch
    assert not all(torch.equal(a, b) for a, b in zip(parts, sampler.partition(4), strict=True))


def test_probes_depend_on_position_not_on_which_layers_are_active(tiny_models, digits_splits) -> None:
    H = SplitHessian(tiny_models["cnn"], digits_splits.calibration, F.cross_entropy, device="cpu")
    both, _ = hessian.EpochSampler(H, sub_batch=128, seed=5).sample(["conv", "fc"])
    alone, _ = hessian.EpochSampler(H, sub_batch=128, seed=5).sample(["fc"])
    assert alone[0] == pytest.approx(both[1], rel=1e-6)


def test_unstackable_batches_need_whole_batches(tiny_models) -> None:
    # The MLP flattens its input, so both layouts run, but rows of the two cannot share a sub-batch.
    y = torch.zeros(4, dtype=torch.long)
    batches = [(torch.randn(4, 64), y), (torch.randn(4, 1, 8, 8), y)]
    H = SplitHessian(tiny_models["mlp"], batches, F.cross_entropy, device="cpu")
    with pytest.raises(UsageError, match=r"batch 1 differs.*sub_batch to null"):
        hessian.EpochSampler(H, sub_batch=2, seed=0)
    assert hessian.EpochSampler(H, sub_batch=None, seed=0).parts == 2
    table = estimate_traces(
        tiny_models["mlp"],
        batches,
        F.cross_entropy,
        sub_batch=None,
        rel_tol=0.5,
        device="cpu",
        progress=False,
    )
    assert all(math.isfinite(r.trace) for r in table)


def test_several_probes_per_part_match_exact_hessian(tiny_models, exact_traces, digits_splits) -> None:
    table = estimate_traces(
        tiny_models["cnn"],
        digits_splits.calibration,
        F.cross_entropy,
        rel_tol=0.03,
        sub_batch=128,
        probes_per_part=4,
        device="cpu",
        progress=False,
    )
    for row in table:
        assert row.converged and row.probes % 16 == 0  # 4 parts x 4 probes per epoch
        assert abs(row.trace - exact_traces["cnn"][row.layer]) <= 4 * row.stderr


def _replay_rule(decay: float, *, parts: int, replicas: int = 400) -> tuple[float, float, float]:
    """The stopping rule on Hutchinson samples z'Az of a fixed 64 × 64 matrix (eigenvalues
    exp(-i / decay), random eigenvectors) with a known trace: the share of runs whose truth is within
    2 reported standard errors, the mean |relative error|, and the mean probes per run."""
    rng = np.random.default_rng(0)
    q, _ = np.linalg.qr(rng.standard_normal((64, 64)))
    eig = np.exp(-np.arange(64) / decay)
    a = (q * eig) @ q.T
    truth = float(eig.sum())
    within, errors, probes = [], [], []
    for _ in range(replicas):
        first = max(1, math.ceil(hessian.MIN_SAMPLES / parts))
        state = TraceState("layer", 64, target=first, random_parts=parts > 1)
        while not state.done:
            z = rng.choice([-1.0, 1.0], size=(parts, 64))
            state.add(np.einsum("pi,ij,pj->p", z, a, z).tolist(), [1 / parts] * parts)
            if state.n >= state.target:
                state.check(floor=0.0, rel_tol=0.05, max_epochs=1000)
        row = state.result()
        within.append(abs(row.trace - truth) <= 2 * row.stderr)
        errors.append(abs(row.trace - truth) / truth)
        probes.append(row.probes)
    return float(np.mean(within)), float(np.mean(errors)), float(np.mean(probes))


@pytest.fixture
def stop_confidence(monkeypatch):
    def set_to(value: float) -> None:
        monkeypatch.setattr(hessian, "STOP_CONFIDENCE", value)
        hessian._chi2_factor.cache_clear()

    yield set_to
    hessian._chi2_factor.cache_clear()


@pytest.mark.parametrize("parts", [1, 4])
def test_a_layer_with_small_variance_stops_early_and_its_error_bars_cover(parts):
    # A flat spectrum: each sample is within a few % of Tr(A), so 0.2's fixed floor of 16 samples
    # was most of the cost. The bound lets it stop from 4 samples, and ±2 stderr still covers the
    # known trace (nominal 95 %) with the error well inside the 5 % tolerance.
    coverage, error, probes = _replay_rule(64.0, parts=parts)
    assert probes <= 8, probes
    assert coverage >= 0.93, coverage
    assert error <= 0.025, error


def test_stopping_on_the_bound_not_the_estimate_keeps_early_stops_honest(stop_confidence):
    # A decaying spectrum: samples are skewed, and a run that has not yet drawn a large one looks
    # both small and precise. From the same 4-sample floor, stopping on the point estimate
    # (confidence 0.5) leaves a larger error than stopping on the 90 % bound.
    stop_confidence(0.5)
    _, error_estimate, probes_estimate = _replay_rule(16.0, parts=1)
    stop_confidence(0.9)
    coverage, error_bound, probes_bound = _replay_rule(16.0, parts=1)
    assert error_bound < 0.8 * error_estimate, (error_bound, error_estimate)
    assert probes_bound > probes_estimate
    assert coverage >= 0.9, coverage
