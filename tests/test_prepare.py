"""BatchNorm folding against its closed form, on small modules with hand-set statistics; layer
handlers and their MAC counts."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hawqtool.errors import UsageError
from hawqtool.formats import layer_kind
from hawqtool.prepare import fold_batchnorm, handlers, prepare_model

EPS = 1e-5
C = 3  # output channels of the conv, features of the BN
# Running statistics and affine parameters set by hand (one γ negative).
MEAN = torch.linspace(-1.0, 2.0, C)
VAR = torch.linspace(0.25, 4.0, C)
GAMMA = torch.linspace(0.5, -1.5, C)
BETA = torch.linspace(0.1, 0.7, C)


def _bn(kind: type[nn.BatchNorm1d | nn.BatchNorm2d] = nn.BatchNorm2d) -> nn.BatchNorm1d | nn.BatchNorm2d:
    bn = kind(C, eps=EPS)
    with torch.no_grad():
        bn.running_mean.copy_(MEAN)  # type: ignore[union-attr]
        bn.running_var.copy_(VAR)  # type: ignore[union-attr]
        bn.weight.copy_(GAMMA)
        bn.bias.copy_(BETA)
    return bn


class ConvBN(nn.Module):
    def __init__(self, *, bias: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(2, C, 3, padding=1, bias=bias)
        self.bn = _bn()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x))


@pytest.mark.parametrize("bias", [False, True])
def test_conv_bn_folds_to_the_closed_form(bias: bool) -> None:
    model = ConvBN(bias=bias).eval()
    w = model.conv.weight.detach().clone()
    b = model.conv.bias.detach().clone() if model.conv.bias is not None else torch.zeros(C)
    folded = fold_batchnorm(model)

    # Closed form: W' = W · γ/√(σ² + ε) per output channel, b' = (b − μ) · γ/√(σ² + ε) + β.
    k = GAMMA / torch.sqrt(VAR + EPS)
    conv = folded.get_submodule("conv")
    assert isinstance(conv, nn.Conv2d) and conv.bias is not None
    assert isinstance(folded.get_submodule("bn"), nn.Identity)
    torch.testing.assert_close(conv.weight.detach(), w * k[:, None, None, None], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(conv.bias.detach(), (b - MEAN) * k + BETA, rtol=1e-6, atol=1e-7)

    x = torch.randn(4, 2, 5, 5, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), rtol=1e-5, atol=1e-5)


def test_one_channel_by_hand() -> None:
    # W = 2, no bias; μ = 1, σ² = 3 (so √(σ² + ε) = 2 with ε = 1), γ = 4, β = 0.5:
    # W' = 2 · 4 / 2 = 4 and b' = (0 − 1) · 4 / 2 + 0.5 = −1.5. Input 3 → 4 · 3 − 1.5 = 10.5.
    conv = nn.Conv1d(1, 1, 1, bias=False)
    bn = nn.BatchNorm1d(1, eps=1.0)
    with torch.no_grad():
        conv.weight.fill_(2.0)
        bn.running_mean.fill_(1.0)  # type: ignore[union-attr]
        bn.running_var.fill_(3.0)  # type: ignore[union-attr]
        bn.weight.fill_(4.0)
        bn.bias.fill_(0.5)
    folded = fold_batchnorm(nn.Sequential(conv, bn))
    fused = folded.get_submodule("0")
    assert isinstance(fused, nn.Conv1d) and fused.bias is not None
    assert fused.weight.item() == 4.0 and fused.bias.item() == -1.5
    assert folded(torch.tensor([[[3.0]]])).item() == 10.5


def test_folding_leaves_the_callers_model_alone() -> None:
    model = ConvBN(bias=False).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fold_batchnorm(model)
    assert model.training and isinstance(model.bn, nn.BatchNorm2d)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_a_bn_after_a_linear_is_not_folded() -> None:
    linear = nn.Linear(4, C)
    folded = fold_batchnorm(nn.Sequential(linear, _bn(nn.BatchNorm1d)).eval())
    assert isinstance(folded.get_submodule("1"), nn.BatchNorm1d)
    assert torch.equal(folded.get_parameter("0.weight"), linear.weight)


def test_prepare_model_measures_on_folded_weights() -> None:
    model = ConvBN(bias=False).eval()
    prepared = prepare_model(model, torch.zeros(2, 2, 5, 5))
    assert prepared.fqns == ("conv",)
    k = GAMMA / torch.sqrt(VAR + EPS)
    want = model.conv.weight.detach() * k[:, None, None, None]
    torch.testing.assert_close(prepared.weight("conv"), want, rtol=1e-6, atol=1e-7)


class BNBeforeConv(nn.Module):
    """Registered conv then BN, but the BN runs first: folding by registration order would be wrong."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(C, C, 1)
        self.bn = _bn()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.bn(x))


def test_a_bn_that_does_not_follow_its_conv_is_never_folded_silently() -> None:
    model = BNBeforeConv().eval()
    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(2))
    try:
        prepared = prepare_model(model, x)
    except UsageError as e:
        assert "folding changed the model's outputs" in str(e)
    else:
        with torch.no_grad():
            torch.testing.assert_close(prepared.model(x), model(x), rtol=1e-5, atol=1e-5)


def test_fold_batchnorm_alone_keeps_outputs_when_bn_runs_before_conv() -> None:
    model = BNBeforeConv().eval()
    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        folded = fold_batchnorm(model, x)
        torch.testing.assert_close(folded(x), model(x), rtol=1e-5, atol=1e-5)
    # Traced by data flow, the BN that runs first is not paired with the conv registered before it.
    assert isinstance(folded.bn, nn.BatchNorm2d)


class SkipAfterConv(nn.Module):
    """conv -> bn, but the raw conv output also feeds a skip connection: folding would change it."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.conv = nn.Conv2d(C, C, 1)
        self.bn = _bn()
        self.conv2 = nn.Conv2d(C, C, 1)
        self.bn2 = _bn()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return self.bn(y) + y + self.bn2(self.conv2(x))


def test_a_conv_output_used_twice_keeps_its_bn_and_other_pairs_still_fold() -> None:
    model = SkipAfterConv().eval()
    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(3))
    folded = fold_batchnorm(model, x)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), rtol=1e-5, atol=1e-5)
    assert isinstance(folded.bn, nn.BatchNorm2d)  # not folded: y is also used raw
    assert isinstance(folded.bn2, nn.Identity)  # folded into conv2


def test_macs_are_counted_by_each_handler_from_a_real_forward_pass() -> None:
    model = nn.Sequential(
        nn.Conv2d(16, 32, 3, padding=1, bias=False), nn.ReLU(), nn.Flatten(), nn.Linear(2048, 10)
    )
    conv, fc = prepare_model(model, torch.zeros(2, 16, 8, 8)).layers
    assert conv.macs == 32 * 8 * 8 * (16 * 3 * 3)  # output elements × one filter's size
    assert fc.macs == 2048 * 10


class Attend(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(20, 8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.emb(ids)
        return self.attn(x, x, x, need_weights=False)[0]


def test_attention_macs_include_the_out_proj_it_applies_functionally() -> None:
    prepared = prepare_model(Attend(), torch.zeros(3, 5, dtype=torch.long))
    layers = {x.fqn: x for x in prepared.layers}
    assert set(layers) == {"emb", "attn.in_proj", "attn.out_proj"}
    assert layers["emb"].macs == 0  # a lookup
    assert layers["attn.in_proj"].macs == 5 * 8 * 24  # 5 tokens × 8 features × 3E outputs
    assert layers["attn.out_proj"].macs == 5 * 8 * 8


def test_built_in_handlers_agree_with_the_kind_table() -> None:
    """A kind is Linear-like (takes dynamic formats) exactly when MatMul / Gemm are its only ops."""
    assert [h.kind.name for h in handlers()] == [
        "linear", "conv1d", "conv2d", "mha_in_proj", "embedding", "hf_conv1d",
    ]  # fmt: skip
    for h in handlers():
        assert layer_kind(h.kind.name) == h.kind
        assert h.kind.matmul_only == (h.kind.activations and set(h.onnx_ops) <= {"Gemm", "MatMul"})
