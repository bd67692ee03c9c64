"""Output-space dependency terms against the exact Hessian, and the sketch's convergence."""

from __future__ import annotations

import itertools
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hawqtool import tasks
from hawqtool.dependency import build_dependency_model
from hawqtool.errors import UsageError
from hawqtool.hvp import SplitHessian
from hawqtool.interactions import CountSketch, output_terms
from hawqtool.prepare import prepare_model
from hawqtool.quantizer import quant_error
from hawqtool.types import LayerOption, OptionTable


def _linear_net(seed: int = 0, out: int = 3, n: int = 64):
    """y = W2 W1 x with teacher targets: each layer's output change is exactly linear in its error."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 5, bias=False), nn.Linear(5, out, bias=False)).eval()
    x = torch.randn(n, 6)
    with torch.no_grad():
        y = model(x)
    batches = [(x[: n // 2], y[: n // 2]), (x[n // 2 :], y[n // 2 :])]
    return prepare_model(model, x[:4]), batches, x


def _exact_hessian(prepared, x: torch.Tensor, loss_fn) -> tuple[torch.Tensor, list[int]]:
    fqns = prepared.fqns
    shapes = [prepared.module(f).weight.shape for f in fqns]
    sizes = [s.numel() for s in shapes]
    base = {n: p.detach().double() for n, p in prepared.model.named_parameters()}
    with torch.no_grad():
        y = prepared.model(x).double()

    def loss(flat: torch.Tensor) -> torch.Tensor:
        params = dict(base)
        for f, piece, shape in zip(fqns, flat.split(sizes), shapes, strict=True):
            params[f"{f}.weight"] = piece.reshape(shape)
        return loss_fn(torch.func.functional_call(prepared.model, params, (x.double(),)), y)

    w0 = torch.cat([prepared.module(f).weight.detach().reshape(-1) for f in fqns]).double()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return torch.func.hessian(loss)(w0), sizes


def test_output_cross_terms_equal_the_exact_hessian_on_a_linear_model() -> None:
    prepared, batches, x = _linear_net()
    H, sizes = _exact_hessian(prepared, x, F.mse_loss)
    hessian = SplitHessian(prepared, batches, F.mse_loss, device="cpu")
    formats = ("int2", "int3", "int4")
    deltas = {(f, fmt): quant_error(prepared.weight(f), fmt) for f in prepared.fqns for fmt in formats}
    terms = output_terms(hessian, deltas, progress=False)
    assert not terms.sketched and terms.forward_passes == 1 + len(deltas)
    assert np.abs(terms.linear).max() < 1e-9  # teacher targets: no first-order term
    offsets = dict(zip(prepared.fqns, np.cumsum([0, *sizes[:-1]]).tolist(), strict=True))

    def flat(key: tuple[str, str]) -> torch.Tensor:
        v = torch.zeros(sum(sizes), dtype=torch.float64)
        d = deltas[key].double().reshape(-1)
        v[offsets[key[0]] : offsets[key[0]] + d.numel()] = d
        return v

    for (i, ki), (j, kj) in itertools.product(enumerate(terms.keys), repeat=2):
        exact = float(flat(ki) @ H @ flat(kj))
        assert terms.gram[i, j] == pytest.approx(exact, rel=1e-6, abs=1e-9)


def test_sketched_inner_products_converge_to_the_exact_ones() -> None:
    prepared, batches, _ = _linear_net(out=300)  # 32 × 300 = 9600 output elements per batch
    hessian = SplitHessian(prepared, batches, tasks.kl, device="cpu")
    deltas = {
        (f, fmt): quant_error(prepared.weight(f), fmt) for f in prepared.fqns for fmt in ("int2", "int4")
    }
    exact = output_terms(hessian, deltas, sketch_dim=10_000, progress=False)
    assert not exact.sketched
    scale = np.sqrt(np.outer(np.diag(exact.gram), np.diag(exact.gram)))
    errors = []
    for dim in (16, 256, 4096):
        runs = [output_terms(hessian, deltas, sketch_dim=dim, seed=s, progress=False) for s in range(4)]
        assert all(r.sketched for r in runs)
        errors.append(np.mean([np.abs(r.gram - exact.gram) / scale for r in runs]))
        again = output_terms(hessian, deltas, sketch_dim=dim, seed=0, progress=False)
        assert np.array_equal(again.gram, runs[0].gram)  # seeded
    assert errors[0] > errors[1] > errors[2] and errors[2] < 0.03, errors


def test_count_sketch_is_unbiased() -> None:
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(5000, generator=g), torch.randn(5000, generator=g)
    b = a + b  # correlated: <a, b> ≈ 5000
    sketches = [CountSketch(a.numel(), 64, seed=s) for s in range(400)]
    est = [float(sk(a) @ sk(b)) for sk in sketches]
    se = np.std(est) / np.sqrt(len(est))
    assert abs(np.mean(est) - float(a @ b)) <= 4 * se


def test_the_output_method_in_the_dependency_model_and_its_errors() -> None:
    prepared, batches, _ = _linear_net()
    hessian = SplitHessian(prepared, batches, F.mse_loss, device="cpu")
    rows = {}
    for layer in prepared.layers:
        w = prepared.weight(layer.fqn)
        rows[layer.fqn] = tuple(
            LayerOption(fmt, float(layer.params * b), float(quant_error(w, fmt).square().sum()), 1.0)
            for fmt, b in (("int2", 2), ("int4", 4), ("float", 32))
        )
    options = OptionTable(prepared.fqns, rows, "size", {layer.fqn: layer.params for layer in prepared.layers})
    out = build_dependency_model(hessian, prepared, options, method="output", tolerance=0.0, progress=False)
    hvp = build_dependency_model(hessian, prepared, options, method="hvp", tolerance=0.0, progress=False)
    assert out.method == "output" and out.hvps == 0 and hvp.hvps == 4
    np.testing.assert_allclose(out.matrix, hvp.matrix, rtol=1e-4, atol=1e-7 * np.abs(hvp.matrix).max())
    assert out.costs["backward_passes"] == 0 and out.costs["seconds"] > 0
    with pytest.raises(UsageError, match="allowed: output, hvp"):
        build_dependency_model(hessian, prepared, options, method="exact", progress=False)
    custom = SplitHessian(prepared, batches, lambda o, t: (o - t).abs().mean(), device="cpu")
    with pytest.raises(UsageError, match="dependency_method: hvp"):
        build_dependency_model(custom, prepared, options, method="output", progress=False)
