"""The model-I/O contract and layer discovery: known answers on small hand-built models."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from hawqtool import modelio
from hawqtool.errors import UsageError
from hawqtool.modelio import ModelIO, output_selector
from hawqtool.prepare import prepare_model, swapped_weights


def _ids(n: int, t: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "input_ids": torch.randint(0, 40, (n, t), generator=g),
        "attention_mask": torch.ones(n, t, dtype=torch.long),
    }


# --------------------------------------------------------------------------------------------
# Pytrees
# --------------------------------------------------------------------------------------------


def test_batch_size_take_concat_on_a_dict() -> None:
    a, b = _ids(3, 5), _ids(2, 5, seed=1)
    assert modelio.batch_size(a) == 3
    both = modelio.concat([a, b])
    assert both["input_ids"].shape == (5, 5)
    assert torch.equal(both["input_ids"][3:], b["input_ids"])
    rows = modelio.take(both, torch.tensor([4, 0]))
    assert torch.equal(rows["input_ids"][0], b["input_ids"][1])
    assert torch.equal(rows["input_ids"][1], a["input_ids"][0])


def test_batch_size_errors_name_the_problem() -> None:
    with pytest.raises(UsageError, match=r"disagree on the batch size \(leading dimensions \[2, 3\]\)"):
        modelio.batch_size((torch.zeros(2, 4), torch.zeros(3, 4)))
    with pytest.raises(UsageError, match="0-d tensor"):
        modelio.batch_size(torch.tensor(1.0))
    with pytest.raises(UsageError, match="holds a str"):
        modelio.as_tensors({"x": "text"}, what="batch 0 inputs")


def test_concat_refuses_ragged_token_batches() -> None:
    with pytest.raises(UsageError, match="do not concatenate"):
        modelio.concat([_ids(2, 5), _ids(2, 7)])


def test_model_io_names_dtypes_and_dynamic_axes() -> None:
    # Token inputs: every axis of an integer tensor is dynamic; a float input's feature axis is not,
    # unless it varies across the batches.
    batches = [((torch.zeros(4, 3), torch.zeros(4, 6, dtype=torch.long)), None)]
    io = ModelIO.from_batches(batches)
    assert io.input_names == ("input_0", "input_1")
    assert dict(io.dynamic_axes) == {"input_0": (0,), "input_1": (0, 1)}
    feeds = io.feeds((torch.zeros(2, 3, dtype=torch.float64), torch.ones(2, 9, dtype=torch.long)))
    assert feeds["input_0"].dtype == np.float32 and feeds["input_1"].dtype == np.int64
    varying = ModelIO.from_batches([(torch.zeros(2, 3, 8), None), (torch.zeros(2, 3, 9), None)])
    assert varying.input_names == ("input",) and dict(varying.dynamic_axes) == {"input": (0, 2)}
    named = ModelIO.from_batches([(_ids(2, 4), None)])
    assert named.input_names == ("input_ids", "attention_mask")  # the dict's own order


def test_model_io_rejects_a_different_structure() -> None:
    io = ModelIO.from_batches([(_ids(2, 4), None)])
    with pytest.raises(UsageError, match="structure"):
        io.feeds({"input_ids": torch.zeros(2, 4, dtype=torch.long)})


def test_output_selector_by_name_index_default_and_errors() -> None:
    out = {"logits": torch.ones(2, 3), "last_hidden_state": torch.zeros(2, 4, 5)}
    assert output_selector(None)(out).shape == (2, 3)  # logits first
    assert output_selector("last_hidden_state")(out).shape == (2, 4, 5)
    assert output_selector(1)((torch.zeros(1), torch.ones(2)))[1] == 1
    with pytest.raises(
        UsageError, match=r"task.output 'pooled' is not among the model's outputs \(keys: logits"
    ):
        output_selector("pooled")(out)
    with pytest.raises(UsageError, match=r"set task\.output"):
        output_selector(None)({"a": torch.ones(1)})


# --------------------------------------------------------------------------------------------
# Layer handlers
# --------------------------------------------------------------------------------------------


class TinyEncoder(nn.Module):
    """Embedding + torch's own TransformerEncoder + a head, an unused pooler and a bare matrix."""

    def __init__(self, vocab: int = 40, d: int = 16) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        layer = nn.TransformerEncoderLayer(d, 2, 32, dropout=0.0, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(d, 3)
        self.pooler = nn.Linear(d, d)  # never called by forward
        self.scale = nn.Parameter(torch.ones(d, 2))  # a matrix no handler knows

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.enc(self.emb(input_ids), src_key_padding_mask=attention_mask == 0)
        h = h + (h @ self.scale).sum(-1, keepdim=True)
        return {"logits": self.head(h.mean(1)), "hidden": h}


def _encoder() -> TinyEncoder:
    torch.manual_seed(0)
    m = TinyEncoder()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))  # cloned encoder layers start identical
    return m.eval()


def test_transformer_encoder_layers_are_found_with_their_macs() -> None:
    model = _encoder()
    x = _ids(4, 7)
    prepared = prepare_model(model, x, io=ModelIO.from_batches([(x, None)], output="logits"))
    expected = ["emb"]
    for i in range(2):
        p = f"enc.layers.{i}"
        expected += [f"{p}.self_attn.in_proj", f"{p}.self_attn.out_proj", f"{p}.linear1", f"{p}.linear2"]
    expected.append("head")
    assert list(prepared.fqns) == expected
    info = {layer.fqn: layer for layer in prepared.layers}
    # Per sample: 7 tokens; in_proj maps 16 -> 48, out_proj 16 -> 16, linear1 16 -> 32.
    assert info["enc.layers.0.self_attn.in_proj"].macs == 7 * 16 * 48
    assert info["enc.layers.0.self_attn.in_proj"].param == "enc.layers.0.self_attn.in_proj_weight"
    assert info["enc.layers.0.self_attn.in_proj"].weight_shape == (48, 16)
    assert info["enc.layers.0.self_attn.out_proj"].macs == 7 * 16 * 16
    assert info["enc.layers.1.linear1"].macs == 7 * 16 * 32
    assert info["emb"].kind == "embedding" and info["emb"].macs == 0
    assert prepared.unused == ("pooler",)
    assert prepared.unsupported == ("scale",)


def test_no_layer_the_output_uses_is_an_error() -> None:
    model = _encoder()
    x = _ids(2, 5)
    io = ModelIO.from_batches([(x, None)], output="my_tests_no_such:fn")
    with pytest.raises(UsageError, match="cannot import module"):
        prepare_model(model, x, io=io)


class Conv1D(nn.Module):
    """Hugging Face GPT-2's Conv1D, as transformers defines it: y = x @ W + b with W stored (in, out)."""

    def __init__(self, nf: int, nx: int) -> None:
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.3)
        self.bias = nn.Parameter(torch.zeros(nf))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight).reshape(*x.shape[:-1], self.nf)


def test_hf_conv1d_is_seen_output_channels_first() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(Conv1D(5, 3), nn.ReLU(), nn.Linear(5, 2)).eval()
    x = torch.randn(4, 3)
    prepared = prepare_model(model, x)
    info = prepared.info("0")
    assert info.kind == "hf_conv1d" and info.transposed and info.weight_shape == (5, 3)
    assert info.macs == 15
    assert torch.equal(prepared.weight("0"), model[0].weight.detach().T)
    # A weight view swapped in comes out in the stored (in, out) layout.
    new = torch.arange(15.0).reshape(5, 3)
    with swapped_weights(prepared, {"0": new}) as m:
        assert torch.equal(m[0].weight, new.T)
    assert torch.equal(prepared.weight("0"), model[0].weight.detach().T)


def test_tied_weights_are_one_layer() -> None:
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(10, 4)
            self.lm_head = nn.Linear(4, 10, bias=False)
            self.lm_head.weight = self.emb.weight

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return self.lm_head(self.emb(ids))

    x = torch.randint(0, 10, (2, 3))
    prepared = prepare_model(Tied().eval(), x)
    assert prepared.fqns == ("emb",)
    assert prepared.info("emb").shared == ("lm_head",)
    assert prepared.info("emb").macs == 3 * 4 * 10  # the lm_head's matmul, charged to the tensor


@pytest.mark.slow
def test_attention_hessian_takes_the_math_path_and_matches_the_exact_trace() -> None:
    # nn.MultiheadAttention runs scaled_dot_product_attention, whose fused CPU kernel has no double
    # backward; the Hessian stage routes it to the math kernel. Known answer: the exact trace of the
    # in_proj block, from the full Hessian of that block.
    import torch.nn.functional as F

    from hawqtool.hessian import estimate_traces
    from hawqtool.prepare import double_backward_attention

    torch.manual_seed(0)
    model = TinyEncoder(vocab=12, d=8)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.eval()
    x = _ids(8, 4)
    x["input_ids"] %= 12
    y = torch.randint(0, 3, (8,), generator=torch.Generator().manual_seed(1))
    io = ModelIO.from_batches([(x, y)], output="logits")
    prepared = prepare_model(model, x, io=io)
    fqn = "enc.layers.0.self_attn.in_proj"
    table = estimate_traces(
        prepared, [(x, y)], F.cross_entropy, rel_tol=0.05, max_probes=1000, sub_batch=None, progress=False
    )
    row = table[fqn]

    info = prepared.info(fqn)
    w0 = prepared.param(fqn).detach().reshape(-1)
    params = dict(prepared.model.named_parameters())

    def loss(w: torch.Tensor) -> torch.Tensor:
        ps = {**params, info.param: w.reshape(info.weight_shape)}
        out = torch.func.functional_call(prepared.model, ps, kwargs=x)["logits"]
        return F.cross_entropy(out, y)

    with double_backward_attention():
        exact = float(torch.autograd.functional.hessian(loss, w0).diagonal().sum())
    assert abs(row.trace - exact) <= 4 * row.stderr, (row.trace, exact, row.stderr)
