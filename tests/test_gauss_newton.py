"""Gauss–Newton traces against the exact Hessian of teacher-target losses; one backward per probe."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from hawqtool import hessian, tasks
from hawqtool.errors import UsageError
from hawqtool.gauss_newton import OutputCurvature, resolve_estimator
from hawqtool.hessian import estimate_traces
from hawqtool.prepare import prepare_model
from hawqtool.types import SensitivityTable


class SmallMLP(nn.Module):
    """6 -> 8 -> 5 with tanh: small enough for the exact Hessian block of every layer."""

    def __init__(self) -> None:
        super().__init__()
        self.hidden = nn.Linear(6, 8)
        self.head = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.hidden(x)))


def _teacher_setup(seed: int = 0, n: int = 64, batch: int = 16):
    torch.manual_seed(seed)
    model = SmallMLP().eval()
    x = torch.randn(n, 6)
    with torch.no_grad():
        y = model(x)
    batches = [(x[i : i + batch], y[i : i + batch]) for i in range(0, n, batch)]
    return prepare_model(model, batches[0][0]), batches


def _exact(prepared, batches, loss_fn) -> dict[str, float]:
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    out = {}
    for fqn in prepared.fqns:
        w = prepared.module(fqn).weight.detach()

        def loss_of(wi: torch.Tensor, fqn: str = fqn) -> torch.Tensor:
            return loss_fn(functional_call(prepared.model, {f"{fqn}.weight": wi}, (x,)), y)

        h = torch.autograd.functional.hessian(loss_of, w)
        out[fqn] = float(h.reshape(w.numel(), w.numel()).diagonal().sum())
    return out


@pytest.mark.parametrize("loss_fn", [F.mse_loss, tasks.kl], ids=["mse", "kl"])
@pytest.mark.parametrize("sub_batch", [16, None])
def test_gauss_newton_traces_equal_the_exact_hessian(loss_fn, sub_batch):
    prepared, batches = _teacher_setup()
    exact = _exact(prepared, batches, loss_fn)
    table = estimate_traces(
        prepared,
        batches,
        loss_fn,
        estimator="gauss_newton",
        rel_tol=0.05,
        sub_batch=sub_batch,
        device="cpu",
        progress=False,
    )
    assert table.estimator == "gauss_newton" and table.hvps == 0
    for row in table:
        want = exact[row.layer]
        assert want > 0 and row.converged
        assert abs(row.trace - want) <= 4 * row.stderr, (row, want)
        assert abs(row.trace - want) <= 4 * 0.05 * want
    costs = table.costs
    assert costs["forward_passes"] >= 1 and costs["backward_passes"] == costs["forward_passes"]
    assert costs["seconds"] > 0 and costs["peak_memory_mib"] > 0


def test_auto_is_gauss_newton_for_teacher_targets_and_agrees_with_hutchinson():
    prepared, batches = _teacher_setup(seed=1)
    kw = {"rel_tol": 0.05, "device": "cpu", "progress": False, "sub_batch": 16}
    gn = estimate_traces(prepared, batches, F.mse_loss, estimator="auto", targets="model", **kw)
    hu = estimate_traces(prepared, batches, F.mse_loss, estimator="hutchinson", **kw)
    assert gn.estimator == "gauss_newton" and hu.estimator == "hutchinson"
    assert gn.fingerprint != hu.fingerprint  # the estimator is part of the cache key
    for a, b in zip(gn, hu, strict=True):
        assert abs(a.trace - b.trace) <= 4 * math.hypot(a.stderr, b.stderr)


def test_one_backward_per_probe_serves_every_layer(monkeypatch):
    prepared, batches = _teacher_setup()
    calls = {"grad": 0, "create_graph": 0}
    real = torch.autograd.grad

    def counting(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls["grad"] += 1
        calls["create_graph"] += bool(kwargs.get("create_graph"))
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.autograd, "grad", counting)
    sampler_epochs = {"n": 0}
    real_sample = hessian.GaussNewtonSampler.sample

    def sample(self, fqns):  # type: ignore[no-untyped-def]
        sampler_epochs["n"] += 1
        return real_sample(self, fqns)

    monkeypatch.setattr(hessian.GaussNewtonSampler, "sample", sample)
    table = estimate_traces(
        prepared,
        batches,
        tasks.kl,
        estimator="gauss_newton",
        rel_tol=0.1,
        sub_batch=None,
        device="cpu",
        progress=False,
    )
    parts = len(batches)
    assert calls["create_graph"] == 0
    # One backward per part and epoch, whatever the number of layers.
    assert calls["grad"] == sampler_epochs["n"] * parts
    assert all(row.probes <= sampler_epochs["n"] * parts for row in table)


def test_cross_entropy_gauss_newton_is_the_fisher_of_the_model():
    # Labels: GN = E[Jᵀ(diag p − ppᵀ)J], p the model's softmax; for a linear model J is known exactly.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3)).eval()
    x = torch.randn(32, 4)
    y = torch.randint(0, 3, (32,))
    prepared = prepare_model(model, x)
    with torch.no_grad():
        p = torch.softmax(model(x), -1)
    # Tr over W (3×4): Σ_n Σ_c (p_c − p_c²) ‖x_n‖² / N
    want = float(((p - p * p).sum(1) * x.square().sum(1)).mean())
    table = estimate_traces(
        prepared,
        [(x, y)],
        F.cross_entropy,
        estimator="gauss_newton",
        rel_tol=0.03,
        device="cpu",
        progress=False,
    )
    (row,) = table.layers
    assert abs(row.trace - want) <= 4 * row.stderr


def test_curvature_and_estimator_choice():
    out = torch.randn(3, 4, 5)
    m = OutputCurvature.of("kl", out)
    assert m.scale == pytest.approx(1 / 12)
    assert OutputCurvature.of("mse", out).scale == pytest.approx(2 / 60)
    ce = OutputCurvature.of("cross_entropy", out)
    assert ce.dim == 1 and ce.scale == pytest.approx(1 / 15)
    assert resolve_estimator("auto", F.mse_loss, targets="labels") == "hutchinson"
    assert resolve_estimator("auto", tasks.cross_entropy, targets="labels") == "gauss_newton"
    assert resolve_estimator("auto", F.mse_loss, targets="model") == "gauss_newton"
    with pytest.raises(UsageError, match="gauss_newton"):
        resolve_estimator("gauss_newton", lambda o, t: (o - t).abs().mean())
    with pytest.raises(UsageError, match="allowed"):
        resolve_estimator("newton", F.mse_loss)


def test_old_tables_load_as_hutchinson():
    prepared, batches = _teacher_setup()
    table = estimate_traces(prepared, batches, F.mse_loss, rel_tol=0.2, device="cpu", progress=False)
    d = table.to_dict()
    d.pop("estimator")
    d.pop("costs")
    old = SensitivityTable.from_dict(d)
    assert old.estimator == "hutchinson" and dict(old.costs) == {}


def test_per_position_cross_entropy_uses_the_last_axis_and_skips_ignored_rows():
    out = torch.randn(2, 3, 4)
    labels = torch.tensor([[0, 1, -100], [2, -100, 3]])
    m = OutputCurvature.of("cross_entropy", out, labels)
    assert m.dim == -1 and m.scale == pytest.approx(1 / 4)
    u = torch.randn(2, 3, 4)
    bu = m.apply(u)
    assert float(bu[0, 2].abs().sum()) == 0.0 and float(bu[1, 1].abs().sum()) == 0.0
    # The quadratic form is the loss's own second derivative along u.
    f = out.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(tasks.cross_entropy(f, labels), f, create_graph=True)
    (hu,) = torch.autograd.grad((g * u).sum(), f)
    assert float((hu * u).sum()) == pytest.approx(m.scale * float(bu.square().sum()), rel=1e-5)


def test_the_recipe_offers_the_estimators_and_dependency_methods_the_modules_have():
    from typing import get_args

    from hawqtool.dependency import METHODS
    from hawqtool.gauss_newton import ESTIMATORS
    from hawqtool.recipe import HessianSection, SearchSection

    assert set(get_args(HessianSection.model_fields["estimator"].annotation)) == set(ESTIMATORS)
    assert set(get_args(SearchSection.model_fields["dependency_method"].annotation)) == {"auto", *METHODS}
    assert HessianSection().estimator == "auto" and SearchSection().dependency_method == "auto"


GN_WORKER = r"""
import json, sys
import torch
import torch.nn.functional as F
from hawqtool import distributed, tasks
from hawqtool.dependency import build_dependency_model
from hawqtool.hessian import estimate_traces
from hawqtool.hvp import SplitHessian
from hawqtool.interactions import output_terms
from hawqtool.prepare import prepare_model
from hawqtool.quantizer import quant_error

data, out = sys.argv[1], sys.argv[2]
distributed.init_from_env(timeout=600)
try:
    model, batches = torch.load(data, weights_only=False)
    prepared = prepare_model(model, batches[0][0])
    table = estimate_traces(
        prepared, batches, tasks.kl, estimator="gauss_newton", sub_batch=16, rel_tol=0.1, device="cpu",
        progress=False,
    )
    H = SplitHessian(prepared, batches, tasks.kl, device="cpu")
    deltas = {(f, "int2"): quant_error(prepared.weight(f), "int2") for f in prepared.fqns}
    terms = output_terms(H, deltas, sketch_dim=64, progress=False)
    if distributed.is_main():
        with open(out, "w") as fh:
            json.dump({"table": table.to_dict(), "gram": terms.gram.tolist()}, fh)
finally:
    distributed.shutdown()
"""


@pytest.mark.slow
def test_two_processes_give_the_gauss_newton_traces_and_output_terms_of_one(tmp_path):
    import json
    import sys

    import numpy as np
    from test_distributed import _spawn

    from hawqtool.hvp import SplitHessian
    from hawqtool.interactions import output_terms
    from hawqtool.quantizer import quant_error

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 5)).eval()
    x = torch.randn(64, 6)
    with torch.no_grad():
        y = model(x)
    batches = [(x[i : i + 16], y[i : i + 16]) for i in range(0, 64, 16)]
    prepared = prepare_model(model, x[:16])
    torch.save((model, batches), tmp_path / "data.pt")
    (tmp_path / "worker.py").write_text(GN_WORKER)
    cmd = [sys.executable, str(tmp_path / "worker.py"), str(tmp_path / "data.pt"), str(tmp_path / "out.json")]
    codes, errs, _ = _spawn(cmd, world=2, timeout=600)
    assert codes == [0, 0], errs
    two = json.loads((tmp_path / "out.json").read_text())
    one = estimate_traces(
        prepared,
        batches,
        tasks.kl,
        estimator="gauss_newton",
        sub_batch=16,
        rel_tol=0.1,
        device="cpu",
        progress=False,
    )
    for a, b in zip(two["table"]["layers"], one.layers, strict=True):
        assert a["trace"] == pytest.approx(b.trace, rel=1e-6) and a["probes"] == b.probes
    H = SplitHessian(prepared, batches, tasks.kl, device="cpu")
    deltas = {(f, "int2"): quant_error(prepared.weight(f), "int2") for f in prepared.fqns}
    gram = output_terms(H, deltas, sketch_dim=64, progress=False).gram
    np.testing.assert_allclose(two["gram"], gram, rtol=1e-6, atol=1e-12)
