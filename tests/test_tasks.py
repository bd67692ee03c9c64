"""Built-in losses and per-sample metrics on hand-made arrays with worked-out answers."""

from __future__ import annotations

import math
import sys
import types

import numpy as np
import pytest
import torch

from hawqtool.confidence import paired_drop
from hawqtool.errors import UsageError
from hawqtool.recipe import load_recipe
from hawqtool.tasks import (
    cosine,
    get_loss,
    get_metric,
    kl,
    loss_names,
    metric_by_chunks,
    metric_names,
    mse,
    neg_mse,
    nll,
    per_sample,
    perplexity,
    register_loss,
    register_metric,
    resolve_loss,
    resolve_metric,
    token_kl,
    top1,
    top1_agreement,
    unregister_loss,
    unregister_metric,
)


def test_top1_is_per_sample() -> None:
    outputs = np.array([[0.1, 0.9, 0.0], [0.8, 0.1, 0.1], [0.2, 0.3, 0.5], [0.0, 0.0, 1.0]])
    targets = np.array([1, 2, 2, 0])
    # Arg-maxes 1, 0, 2, 2 against targets 1, 2, 2, 0: right, wrong, right, wrong.
    np.testing.assert_array_equal(top1(outputs, targets), [1.0, 0.0, 1.0, 0.0])
    # Per-position logits (N=2, T=2, C=2): sample 0 gets 1 of 2 positions right, sample 1 both.
    seq = np.array([[[1, 0], [1, 0]], [[0, 1], [1, 0]]])
    np.testing.assert_array_equal(top1(seq, np.array([[0, 1], [1, 0]])), [0.5, 1.0])
    with pytest.raises(
        UsageError, match=r"top1: targets of shape \(4, 1\) must be class indices of shape \(4,\)"
    ):
        top1(outputs, targets[:, None])


def test_top1_agreement_compares_arg_maxes_with_the_teacher() -> None:
    student = np.array([[0.1, 0.9], [0.8, 0.2], [0.4, 0.6]])
    teacher = np.array([[0.3, 0.7], [0.1, 0.9], [0.0, 5.0]])
    # Arg-maxes 1, 0, 1 against the teacher's 1, 1, 1.
    np.testing.assert_array_equal(top1_agreement(student, teacher), [1.0, 0.0, 1.0])
    # (N=2, T=3, C=2): sample 0 agrees at 2 of 3 tokens, sample 1 at 0 of 3.
    s = np.array([[[1, 0], [0, 1], [1, 0]], [[1, 0], [1, 0], [1, 0]]])
    t = np.array([[[1, 0], [0, 1], [0, 1]], [[0, 1], [0, 1], [0, 1]]])
    np.testing.assert_allclose(top1_agreement(s, t), [2 / 3, 0.0])
    with pytest.raises(
        UsageError, match=r"top1_agreement: targets .* shape \(3,\) must have the outputs' shape"
    ):
        top1_agreement(student, np.array([1, 0, 1]))


def test_cosine_per_sample() -> None:
    outputs = np.array([[3.0, 4.0], [1.0, 0.0], [0.0, 0.0], [0.0, 0.0], [1.0, 1.0]], dtype=np.float32)
    targets = np.array([[6.0, 8.0], [0.0, 2.0], [0.0, 0.0], [1.0, 0.0], [-1.0, -1.0]], dtype=np.float32)
    # Parallel: 1; orthogonal: 0; both zero: 1 by definition; one zero: 0; opposite: -1.
    got = cosine(outputs, targets)
    assert got.dtype == np.float64
    np.testing.assert_allclose(got, [1.0, 0.0, 1.0, 0.0, -1.0], atol=1e-15)
    # Each sample is flattened: (2, 2, 2) images, sample 1's target is sample 1 scaled by −2: −1.
    img = np.arange(8.0).reshape(2, 2, 2)
    np.testing.assert_allclose(cosine(img, img * np.array([1.0, -2.0])[:, None, None]), [1.0, -1.0])


def test_mse_and_neg_mse_per_sample() -> None:
    outputs = np.array([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
    targets = np.array([[1.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    # Sample 0: (0 + 4 + 9) / 3 = 13/3; sample 1: (1 + 1 + 1) / 3 = 1.
    np.testing.assert_allclose(mse(outputs, targets), [13 / 3, 1.0])
    np.testing.assert_allclose(neg_mse(outputs, targets), [-13 / 3, -1.0])
    # (N, 1) outputs against (N,) targets: per sample, not an (N, N) broadcast.
    np.testing.assert_allclose(mse(np.array([[1.0], [2.0]]), np.array([0.0, 0.0])), [1.0, 4.0])
    # The split value (mean over samples) is the old whole-split mean squared error.
    assert mse(outputs, targets).mean() == pytest.approx(((outputs - targets) ** 2).mean())
    with pytest.raises(UsageError, match=r"metric mse: targets of shape \(3,\) must hold as many values"):
        mse(outputs, np.zeros(3))


def test_registries_and_directions() -> None:
    builtin = {"top1", "top1_agreement", "cosine", "mse", "neg_mse"}
    assert builtin <= set(metric_names())
    assert [m for m in builtin if not get_metric(m).higher_is_better] == ["mse"]
    assert {m for m in builtin if get_metric(m).binary} == {"top1", "top1_agreement"}
    assert {"cross_entropy", "mse", "kl"} <= set(loss_names())
    teacher = {m for m in metric_names() if get_metric(m).teacher} | {
        n for n in loss_names() if get_loss(n).teacher
    }
    assert {"top1_agreement", "cosine", "kl"} <= teacher and not {"top1", "mse", "cross_entropy"} & teacher
    assert resolve_metric("top1") is top1 and resolve_loss("kl") is kl
    with pytest.raises(UsageError, match="unknown metric 'acc'; allowed: top1, top1_agreement, cosine, mse"):
        resolve_metric("acc")
    with pytest.raises(UsageError, match="unknown loss 'ce'; allowed: cross_entropy, mse, kl"):
        resolve_loss("ce")


def test_chance_level_and_binary_by_output_rank() -> None:
    # top1 on labels: chance is the most frequent class's share (3 of 4 samples are class 1).
    top = get_metric("top1")
    assert top.chance is not None and top.chance(np.array([1, 1, 0, 1])) == 0.75
    assert top.chance(np.array([0.5, 1.0])) is None  # not class labels: no chance level
    assert get_metric("cosine").chance is None
    # Per-token outputs (N, T, C) make top1/top1_agreement a per-sequence fraction: continuous.
    for name in ("top1", "top1_agreement"):
        assert get_metric(name).binary_for(2) is True and get_metric(name).binary_for(3) is False
    assert get_metric("cosine").binary_for(3) is False and get_metric("mse").binary_for(2) is False


def test_a_registered_metric_and_loss_are_one_registration_each() -> None:
    def max_abs(o: np.ndarray, t: np.ndarray) -> np.ndarray:
        return np.abs(o - t).reshape(len(o), -1).max(axis=1)

    m = register_metric("max_abs", max_abs, higher_is_better=False, binary=False, teacher=True)
    register_loss("l1", torch.nn.functional.l1_loss)
    try:
        assert get_metric("max_abs") is m and resolve_metric("max_abs") is max_abs
        assert "max_abs" in metric_names() and "l1" in loss_names()
        # The recipe reads the registry: direction and kind come from the one registration.
        base = load_recipe("tiny").to_dict()
        base["task"] = {"targets": "model", "metric": "max_abs", "loss": "l1"}
        from hawqtool.recipe import parse_recipe

        task = parse_recipe(base).task
        assert task.higher_is_better_resolved is False and task.binary_resolved is False
        with pytest.raises(UsageError, match="metric 'max_abs' is already registered"):
            register_metric("max_abs", max_abs)
        with pytest.raises(UsageError, match="without ':'"):
            register_metric("pkg.mod:f", max_abs)
    finally:
        unregister_metric("max_abs")
        unregister_loss("l1")
    assert "max_abs" not in metric_names() and "l1" not in loss_names()
    with pytest.raises(UsageError, match="unknown metric 'max_abs'"):
        get_metric("max_abs")
    with pytest.raises(UsageError, match=r"task\.metric"):
        parse_recipe(base)
    with pytest.raises(UsageError, match="no metric 'max_abs' is registered"):
        unregister_metric("max_abs")


def test_import_paths_resolve(monkeypatch: pytest.MonkeyPatch) -> None:
    module = types.ModuleType("my_tasks")

    def accuracy(outputs: np.ndarray, targets: np.ndarray) -> float:
        return 0.5

    module.accuracy = accuracy  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "my_tasks", module)
    assert resolve_metric("my_tasks:accuracy") is accuracy
    with pytest.raises(UsageError, match="module 'my_tasks' has no attribute 'nope'"):
        resolve_loss("my_tasks:nope")


def test_kl_is_zero_with_zero_gradient_at_the_teacher_and_curved() -> None:
    torch.manual_seed(0)
    teacher = torch.randn(4, 3, 5, dtype=torch.float64)  # per-token logits: N=4, T=3, C=5
    out = teacher.clone().requires_grad_(True)
    loss = kl(out, teacher)
    (grad,) = torch.autograd.grad(loss, out, create_graph=True)
    assert loss.item() == 0.0
    assert grad.abs().max().item() < 1e-15  # exactly 0 up to float64 round-off
    # Hessian-vector product along v: at the teacher H = (diag(p) − ppᵀ) / 12 per position, so
    # vᵀHv = Σ_positions Var_p(v) / 12, positive for v not constant across classes.
    v = torch.randn(4, 3, 5, dtype=torch.float64)
    (hv,) = torch.autograd.grad(grad, out, grad_outputs=v, retain_graph=True)
    p = torch.softmax(teacher, dim=-1)
    var = (p * v**2).sum(-1) - (p * v).sum(-1) ** 2
    assert (hv * v).sum().item() == pytest.approx(var.sum().item() / 12, rel=1e-12)
    assert (hv * v).sum().item() > 0
    # A direction constant across classes (logit shift) changes nothing: zero curvature.
    (h_shift,) = torch.autograd.grad(grad, out, grad_outputs=torch.ones_like(v))
    assert h_shift.abs().max().item() < 1e-15


def test_kl_value_and_mean_over_positions() -> None:
    # Teacher [0, ln 3] → p = (1/4, 3/4); student uniform → q = (1/2, 1/2):
    # KL = 1/4·ln(1/2) + 3/4·ln(3/2) = 0.130812...
    teacher = torch.tensor([[0.0, math.log(3.0)], [0.0, 0.0]])
    student = torch.zeros(2, 2)
    expected = (0.25 * math.log(0.5) + 0.75 * math.log(1.5)) / 2  # the second row contributes 0
    assert kl(student, teacher).item() == pytest.approx(expected, rel=1e-6)
    with pytest.raises(
        UsageError, match=r"loss kl: targets .* shape \(2,\) must have the outputs' shape \(2, 2\)"
    ):
        kl(student, torch.zeros(2))


def test_per_sample() -> None:
    np.testing.assert_array_equal(per_sample([1, 0, 1], 3), [1.0, 0.0, 1.0])
    assert per_sample(0.25, 3) is None and per_sample(np.float32(0.5), 3) is None
    with pytest.raises(UsageError, match=r"metric 'f1' returned shape \(3, 1\); allowed: .* shape \(3,\)"):
        per_sample(np.ones((3, 1)), 3, name="f1")
    with pytest.raises(UsageError, match="metric 'top1' is NaN or infinite on 2 of 4 samples"):
        per_sample(np.array([1.0, np.nan, np.inf, 0.0]), 4, name="top1")
    with pytest.raises(UsageError, match="metric 'f1' is nan on the split of 4 samples"):
        per_sample(float("nan"), 4, name="f1")
    with pytest.raises(UsageError, match="metric 'f1' returned str, not numbers"):
        per_sample("high", 4, name="f1")  # type: ignore[arg-type]


def test_metric_by_chunks_pairs_the_same_samples() -> None:
    outputs = np.eye(3)[[0, 1, 2, 0, 1, 2, 0]]  # predictions 0,1,2,0,1,2,0
    targets = np.array([0, 1, 0, 0, 0, 2, 1])
    values, sizes = metric_by_chunks(top1, outputs, targets, chunks=3)
    # Slices [0:3], [3:5], [5:7]: 2/3 right, 1/2 right, 1/2 right.
    np.testing.assert_allclose(values, [2 / 3, 0.5, 0.5])
    np.testing.assert_array_equal(sizes, [3, 2, 2])
    assert (values * sizes).sum() / sizes.sum() == pytest.approx(top1(outputs, targets).mean())

    def scalar(o: np.ndarray, t: np.ndarray) -> float:
        return float(len(o))

    values, sizes = metric_by_chunks(scalar, outputs, targets, chunks=100)  # at most one per sample
    assert values.tolist() == [1.0] * 7 and sizes.tolist() == [1] * 7
    with pytest.raises(UsageError, match="chunks must be at least 1; got 0"):
        metric_by_chunks(top1, outputs, targets, chunks=0)


def test_perplexity_of_uniform_logits_is_the_vocabulary_size() -> None:
    for vocab in (2, 7, 1000):
        values = perplexity(np.zeros((3, 4, vocab), dtype=np.float32), np.zeros((3, 4), dtype=np.int64))
        np.testing.assert_allclose(values, vocab, rtol=1e-12)
    assert not get_metric("perplexity").higher_is_better and get_metric("perplexity").binary is False


def test_perplexity_split_value_is_exp_of_the_mean_token_nll() -> None:
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(5, 6, 11)) * 2
    tokens = rng.integers(0, 11, size=(5, 6))
    tokens[1, 3:] = -100  # sequence 1 scores 3 tokens, sequence 4 none
    tokens[4, :] = -100
    nll = torch.nn.functional.cross_entropy(
        torch.tensor(logits).reshape(-1, 11), torch.tensor(tokens).reshape(-1), reduction="mean"
    ).item()  # the mean over every scored token of the split
    values = perplexity(logits, tokens)
    assert values.mean() == pytest.approx(math.exp(nll), rel=1e-12)
    assert values[4] == pytest.approx(math.exp(nll), rel=1e-12)  # no tokens: no say in the difference
    # Paired differences average to the difference of the two perplexities exactly.
    other = logits + rng.normal(size=logits.shape)
    nll_other = torch.nn.functional.cross_entropy(
        torch.tensor(other).reshape(-1, 11), torch.tensor(tokens).reshape(-1)
    ).item()
    diff = perplexity(other, tokens) - values
    assert diff.mean() == pytest.approx(math.exp(nll_other) - math.exp(nll), rel=1e-10)
    # A relative budget bounds (ppl_c − ppl_b) / ppl_b through the paired bounds.
    est = paired_drop(values, perplexity(other, tokens), mode="relative", higher_is_better=False)
    assert est.drop == pytest.approx(math.exp(nll_other - nll) - 1, rel=1e-10)
    assert est.method == "bootstrap-paired" and est.lower <= est.drop <= est.upper
    with pytest.raises(UsageError, match=r"tokens outside \[0, 10\]"):
        perplexity(logits, np.full((5, 6), 11))
    with pytest.raises(UsageError, match=r"next tokens of shape \(5, 6\)"):
        perplexity(logits, tokens[:, :2])


def test_perplexity_on_teacher_logits_is_exp_of_the_cross_entropy() -> None:
    # Teacher p = (1/4, 3/4) at one position; the model's own logits: exp(H(p)).
    teacher = np.array([[[0.0, math.log(3.0)]]])
    entropy = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    assert perplexity(teacher, teacher)[0] == pytest.approx(math.exp(entropy), rel=1e-12)
    # Uniform model against it: exp(ln 2) = 2 whatever the teacher.
    assert perplexity(np.zeros((1, 1, 2)), teacher)[0] == pytest.approx(2.0, rel=1e-12)


def test_kl_metric_is_zero_on_identical_logits_and_matches_the_loss() -> None:
    rng = np.random.default_rng(1)
    teacher = rng.normal(size=(4, 3, 9)).astype(np.float32)
    assert token_kl(teacher, teacher).tolist() == [0.0] * 4
    student = teacher + rng.normal(size=teacher.shape).astype(np.float32)
    values = token_kl(student, teacher)
    assert (values > 0).all()
    assert values.mean() == pytest.approx(kl(torch.tensor(student), torch.tensor(teacher)).item(), rel=1e-5)
    m = get_metric("kl")
    assert m.fn is token_kl and m.teacher and not m.higher_is_better and m.binary is False
    assert get_loss("kl").fn is kl  # the loss of the same name is the torch one


def test_cross_entropy_on_per_token_logits() -> None:
    logits = torch.randn(2, 3, 5)
    tokens = torch.tensor([[1, 2, -100], [0, 4, 3]])
    flat = torch.nn.functional.cross_entropy(logits.reshape(-1, 5), tokens.reshape(-1))
    assert resolve_loss("cross_entropy")(logits, tokens).item() == pytest.approx(flat.item())


def test_nll_is_batch_invariant_and_its_exp_is_the_perplexity() -> None:
    rng = np.random.default_rng(2)
    logits = rng.normal(size=(6, 5, 9)) * 2
    tokens = rng.integers(0, 9, size=(6, 5))
    whole = nll(logits, tokens)
    # Batch by batch: the same values (perplexity's pseudo-values are centred on the batch given).
    np.testing.assert_allclose(
        np.concatenate([nll(logits[:2], tokens[:2]), nll(logits[2:], tokens[2:])]), whole
    )
    assert math.exp(whole.mean()) == pytest.approx(perplexity(logits, tokens).mean(), rel=1e-12)
    assert get_metric("perplexity").whole_split and not get_metric("nll").whole_split
    assert not get_metric("nll").higher_is_better and get_metric("nll").binary is False
    with pytest.raises(UsageError, match="1 sequences have no scored token"):
        nll(logits[:2], np.array([[1, 2, 3, 4, 5], [-100] * 5]))
