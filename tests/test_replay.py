"""Prefix replay: the replayed pass gives the full pass's output, skips the prefix's work, and stays
correct (or does not replay) on shared modules, weights read elsewhere and in-place mutation."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hawqtool import tasks
from hawqtool.hvp import SplitHessian
from hawqtool.interactions import output_terms
from hawqtool.prepare import prepare_model
from hawqtool.quantizer import quant_error
from hawqtool.replay import ReplayError, record


class Counted(nn.Conv2d):
    """A conv that counts how often its computation runs."""

    runs = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        Counted.runs += 1
        return super().forward(x)


def _cnn() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        Counted(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.ReLU(),
        nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.Tanh(), nn.Conv2d(8, 4, 1)),
        nn.Flatten(),
        nn.Linear(4 * 6 * 6, 5),
    ).eval()


def _weights(model: nn.Module) -> list[torch.Tensor]:
    kinds = (nn.Linear, nn.Conv2d, nn.Embedding)
    return [m.weight for m in model.modules() if isinstance(m, kinds)]


def _compare(model: nn.Module, run: Callable[[], torch.Tensor], params: list[torch.Tensor]) -> dict[int, Any]:
    """Per parameter: the replayed and the full pass's output change agree to 1e-6; returns the plans."""
    g = torch.Generator().manual_seed(1)
    plans = {}
    with torch.no_grad():
        rec = record(model, run, params=params)
        base = run()
        assert torch.equal(rec.result, base)
        for i, p in enumerate(params):
            saved = p.data
            p.data = saved + 0.05 * torch.randn(saved.shape, generator=g) * saved.std()
            try:
                full = run() - base
                with rec.replaying(p) as plan:
                    fast = run() - base
            finally:
                p.data = saved
            assert full.abs().max() > 0
            torch.testing.assert_close(fast, full, rtol=1e-6, atol=1e-6 * float(full.abs().max()))
            plans[i] = plan
    return plans


def test_replay_on_a_sequential_cnn_gives_the_full_output_change_and_skips_the_prefix() -> None:
    model, x = _cnn(), torch.randn(4, 3, 6, 6)
    params = _weights(model)
    plans = _compare(model, lambda: model(x), params)
    assert plans[0].names == () and plans[0].skipped == 0
    assert plans[1].names == ("0", "1")
    assert plans[2].names == ("0", "1", "2", "3")  # inside the nested block: its earlier siblings
    assert plans[3].names == ("0", "1", "2", "3", "4.0", "4.1")
    assert plans[4].names == ("0", "1", "2", "3", "4", "5")
    assert 0 < plans[1].skipped < plans[4].skipped < 1
    with torch.no_grad():
        rec = record(model, lambda: model(x), params=params)
        Counted.runs = 0
        with rec.replaying(params[2]):
            model(x)
        assert Counted.runs == 0  # the first conv's computation did not run
        model(x)
        assert Counted.runs == 1
    assert "forward" not in model[0].__dict__  # patches removed


def test_replay_on_a_tiny_bert_gives_the_full_output_change_of_every_layer() -> None:
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(
        vocab_size=50,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=16,
        attn_implementation="eager",
    )
    torch.manual_seed(0)
    model = transformers.BertModel(cfg).eval()
    ids = torch.randint(1, 50, (3, 7))
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[0, 4:] = 0

    def run() -> torch.Tensor:
        return model(input_ids=ids, attention_mask=mask).pooler_output

    params = _weights(model)
    plans = _compare(model, run, params)
    last = next(i for i, p in enumerate(params) if p is model.pooler.dense.weight)
    assert "embeddings" in plans[last].names and "encoder" in plans[last].names
    assert plans[last].skipped > 0.9
    calls = []
    hook = model.embeddings.word_embeddings.register_forward_hook(lambda *a: calls.append(1))
    try:
        with torch.no_grad():
            rec = record(model, run, params=params)
            calls.clear()
            with rec.replaying(model.encoder.layer[1].intermediate.dense.weight):
                run()
    finally:
        hook.remove()
    assert calls == []  # the embeddings were replayed whole


class Shared(nn.Module):
    """``a`` is called twice; ``b`` reads ``d``'s weight without calling ``d``."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.c, self.d = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 3)
        self.b = Reader(self.d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        h = self.b(torch.tanh(h))
        h = self.a(torch.tanh(h))
        return self.d(self.c(h))


class Reader(nn.Module):
    def __init__(self, other: nn.Linear) -> None:
        super().__init__()
        self.other = [other]  # not registered: a weight read from outside its module

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + F.linear(h, self.other[0].weight[:, :4].T @ self.other[0].weight[:, :4])


class Residual(nn.Module):
    """A residual reads ``a``'s output after the later layers; ``act`` mutates its input in place;
    ``e``'s output is changed in place after it returned."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c, self.e = (nn.Linear(4, 4) for _ in range(4))
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h0 = self.a(x)
        t = h0 * 1.5
        self.act(t)  # output unused: only the in-place change of t carries on
        u = self.e(x)
        u.mul_(2)
        h1 = self.b(t + u)
        return self.c(h1) + h0


def test_shared_modules_weights_read_elsewhere_and_in_place_changes_stay_exact() -> None:
    torch.manual_seed(0)
    x = torch.randn(5, 4)
    shared = Shared().eval()
    plans = _compare(shared, lambda: shared(x), _weights(shared))
    assert all("a" not in p.names for p in plans.values())  # called twice
    assert plans[1].names == ("b",) and plans[2].names == ()  # b read d's weight: not for d
    res = Residual().eval()
    params = [res.a.weight, res.b.weight, res.c.weight, res.e.weight]
    plans = _compare(res, lambda: res(x), params)
    assert plans[1].names == ("a",) and plans[2].names == ("a", "b")  # not act, not e


def test_a_replay_that_departs_from_the_recording_raises() -> None:
    torch.manual_seed(0)
    first, last = nn.Linear(4, 4), nn.Linear(4, 2)
    model = nn.Sequential(first, last).eval()
    with torch.no_grad():
        rec = record(model, lambda: model(torch.randn(3, 4)), params=[last.weight])
        with pytest.raises(ReplayError, match="other input shapes"), rec.replaying(last.weight):
            model(torch.randn(6, 4))
        with pytest.raises(ReplayError, match="called 0 times"), rec.replaying(last.weight):
            last(torch.randn(3, 4))
    assert "forward" not in first.__dict__


def _cnn_split(loss: str) -> tuple[Any, SplitHessian]:
    model = _cnn()
    g = torch.Generator().manual_seed(2)
    xs = [torch.randn(6, 3, 6, 6, generator=g) for _ in range(2)]
    with torch.no_grad():
        batches = [(x, model(x)) for x in xs]
    prepared = prepare_model(model, xs[0][:2])
    loss_fn = F.mse_loss if loss == "mse" else tasks.kl
    return prepared, SplitHessian(prepared, batches, loss_fn, device="cpu")


@pytest.mark.parametrize("loss", ["mse", "kl"])
def test_output_terms_with_replay_equal_the_full_passes_and_own_loss_is_the_loss_change(loss: str) -> None:
    prepared, hessian = _cnn_split(loss)
    deltas = {
        (f, fmt): quant_error(prepared.weight(f), fmt) for f in prepared.fqns for fmt in ("int2", "int4")
    }
    fast = output_terms(hessian, deltas, sketch_dim=64, progress=False)
    full = output_terms(hessian, deltas, sketch_dim=64, progress=False, replay=False)
    assert fast.keys == full.keys and fast.forward_passes == full.forward_passes
    assert full.replayed_fraction == 0 and 0.2 < fast.replayed_fraction < 1
    scale = np.abs(full.gram).max()
    np.testing.assert_allclose(fast.gram, full.gram, rtol=1e-6, atol=1e-6 * scale)
    np.testing.assert_allclose(fast.linear, full.linear, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(fast.own_loss, full.own_loss, rtol=1e-6, atol=1e-12)
    base = hessian.loss()
    direct = [hessian.loss({f: prepared.weight(f) + d}) - base for (f, _), d in deltas.items()]
    np.testing.assert_allclose(fast.own_loss, direct, rtol=1e-5, atol=1e-9)
    assert (fast.own_loss > 0).all()  # teacher targets: every weight error raises the loss


class Branchy(nn.Module):
    """Calls ``a`` a second time only when ``b``'s weight differs from the float one: a replayed
    pass for ``b`` departs from the recorded pass."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 3)
        self.w0: torch.Tensor
        self.register_buffer("w0", self.b.weight.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.b(self.a(x))
        if not torch.equal(self.b.weight, self.w0):
            h = h + self.a(x)[:, :3]
        return h


def test_output_terms_fall_back_to_full_passes_when_a_replay_departs(
    caplog: pytest.LogCaptureFixture,
) -> None:
    torch.manual_seed(0)
    model = Branchy().eval()
    x = torch.randn(8, 4)
    with torch.no_grad():
        batches = [(x, model(x))]
    prepared = prepare_model(model, x[:2])
    hessian = SplitHessian(prepared, batches, F.mse_loss, device="cpu")
    deltas = {(f, "int2"): quant_error(prepared.weight(f), "int2") for f in prepared.fqns}
    with caplog.at_level("WARNING", logger="hawqtool.interactions"):
        fast = output_terms(hessian, deltas, progress=False)
    assert "fell back to full forward passes" in caplog.text
    full = output_terms(hessian, deltas, progress=False, replay=False)
    np.testing.assert_allclose(fast.gram, full.gram, rtol=1e-6)
    np.testing.assert_allclose(fast.own_loss, full.own_loss, rtol=1e-6)
    assert fast.replayed_fraction == 0  # a's key replays nothing; b's fell back
