"""Loading the user's model and data, and the checks the float model answers before any Hessian work."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import hawqtool
from hawqtool.errors import UsageError
from hawqtool.recipe import parse_recipe
from hawqtool.workspace import budget_for, check_budget_resolvable, check_float_model, check_task, load

VOCAB, TOKENS = 16, 6


class TinyLM(nn.Module):
    """Per-token logits (N, T, VOCAB) of token ids (N, T): what a language model's head returns."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(VOCAB, 8)
        self.head = nn.Linear(8, VOCAB)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.emb(x)))  # type: ignore[no-any-return]


def _tokens(*, labels: bool) -> dict[str, list[Any]]:
    """Token splits; with ``labels``, the float model's own next tokens except at the first position
    (each sequence then scores 5/6 on per-token top-1)."""
    g, model = torch.Generator().manual_seed(0), TinyLM()

    def batch() -> Any:
        x = torch.randint(0, VOCAB, (8, TOKENS), generator=g)
        if not labels:
            return x
        with torch.no_grad():
            y = model(x).argmax(-1)
        y[:, 0] = (y[:, 0] + 1) % VOCAB
        return x, y

    return {"calibration": [batch()], "evaluation": [batch(), batch()], "test": [batch()]}


def _recipe(**task: Any) -> Any:
    return parse_recipe({"task": task, "budget": {"max_drop": 0.05, "mode": "absolute"}})


def test_per_token_agreement_is_continuous_and_a_binary_declaration_stops_before_the_hessian(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The float model agrees with itself everywhere (every value 1.0), but per-token agreement of
    # any other model is a fraction of positions per sequence: the registered metric says so.
    ws = load(_recipe(targets="model"), model=TinyLM(), data=_tokens(labels=False))
    checked = check_float_model(ws)
    assert checked.metric == 1.0 and checked.budget.binary is False
    # Declared binary by the recipe: refused on the float model, before any Hessian work.
    declared = _recipe(targets="model", binary=True)
    with pytest.raises(UsageError, match=r"declared binary .* not all 0 or 1"):
        check_task(load(declared, model=TinyLM(), data=_tokens(labels=False)))
    monkeypatch.setenv("HAWQTOOL_CACHE", str(tmp_path / "cache"))
    with pytest.raises(UsageError, match="declared binary"):
        hawqtool.quantize(
            TinyLM(), _tokens(labels=False), recipe=declared, out=tmp_path / "out", progress=False
        )
    assert not (tmp_path / "cache" / "hessian").exists() and not (tmp_path / "out").exists()


def test_per_token_top1_on_labels_is_a_fraction_per_sequence() -> None:
    ws = load(_recipe(), model=TinyLM(), data=_tokens(labels=True))
    metric, values = check_task(ws)
    assert values is not None and values.shape == (16,)
    assert np.allclose(values, (TOKENS - 1) / TOKENS) and metric == pytest.approx((TOKENS - 1) / TOKENS)
    assert check_float_model(ws).budget.binary is False
    with pytest.raises(UsageError, match="declared binary"):
        check_task(load(_recipe(binary=True), model=TinyLM(), data=_tokens(labels=True)))


def test_a_batchwise_metric_is_checked_batch_by_batch_with_the_whole_splits_values() -> None:
    # nll is scored batch by batch: the float model's check keeps one batch's logits, not the split's,
    # and gets exactly the values of the whole split scored at once.
    data = _tokens(labels=True)
    ws = load(_recipe(metric="nll"), model=TinyLM(), data=data)
    seen: list[int] = []
    metric_fn = ws.metric_fn
    metric, values = check_task(
        dataclasses.replace(ws, metric_fn=lambda o, t: (seen.append(len(o)), metric_fn(o, t))[1])
    )
    assert seen[:2] == [8, 8]  # one call per evaluation batch (then the binary probe's)
    with torch.no_grad():
        logits = torch.cat([TinyLM()(x) for x, _ in data["evaluation"]]).numpy()
    whole = metric_fn(logits, torch.cat([y for _, y in data["evaluation"]]).numpy())
    assert (
        values is not None and np.allclose(values, whole, rtol=1e-6) and metric == pytest.approx(whole.mean())
    )


@pytest.mark.parametrize(
    ("metric", "declared", "binary"),
    [
        ("cosine", None, False),  # built-in, continuous
        ("top1_agreement", None, True),  # built-in, binary
        ("hawqtool.tasks:cosine", None, True),  # a user's metric, read off the values: all exactly 1
        ("hawqtool.tasks:cosine", False, False),  # ... unless the recipe says
    ],
)
def test_the_metric_kind_is_declared_not_read_off_a_teachers_perfect_score(
    metric: str, declared: bool | None, binary: bool, digits_splits: Any, mlp_digits: Any
) -> None:
    # Teacher fidelity: the float model agrees with itself on every one of the 300 evaluation
    # digits, so every per-sample value is exactly 1 and looks binary. A 0.5 % budget is below what
    # 300 binary samples resolve at 95 % (0.0174), but a continuous metric has no such floor.
    overrides = ["task.targets=model", f"task.metric={metric}", "budget.max_drop=0.005"]
    if declared is not None:
        overrides.append(f"task.binary={str(declared).lower()}")
    unlabelled = {
        name: [x for x, _ in getattr(digits_splits, name)] for name in ("calibration", "evaluation", "test")
    }
    ws = load("tiny", model=mlp_digits, data=unlabelled, overrides=overrides)
    base, values = check_task(ws)
    assert values is not None and np.all(values == 1.0)
    assert budget_for(ws, values).binary is binary
    if binary:
        with pytest.raises(UsageError, match="cannot be resolved with 300 evaluation samples"):
            check_budget_resolvable(ws, base, values)
    else:
        check_budget_resolvable(ws, base, values)
