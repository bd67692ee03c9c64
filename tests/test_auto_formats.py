"""``allocation.formats: auto``: each layer is offered the formats its kind runs well.

Known answers: the documented sets (``hawqtool.options.AUTO_FORMATS``) on a conv net and on
transformers (the zoo's TinyTransformer, a tiny GPT-2 with a tied head), written out here by hand;
explicit lists and pins keep their meaning; ``auto`` is the recipe default while the built-in
recipes keep their lists; the report records what each layer and kind was offered."""

from __future__ import annotations

import pytest
import torch

from hawqtool.formats import AUTO, LayerKind, register_kind, unregister_kind
from hawqtool.options import AUTO_FORMATS, auto_formats, build_options, candidate_formats, offered_formats
from hawqtool.prepare import prepare_model
from hawqtool.recipe import AllocationSection, Recipe, builtin_path, load_recipe
from hawqtool.report import candidate_report
from hawqtool.types import LayerInfo, LayerTrace, SensitivityTable
from hawqtool.zoo import SmallCNN, TinyTransformer

MATMUL = ("uint4-b32", "int8-b32", "int8-d", "int8-w", "float")
MATMUL_SMALL_K = ("int8-d", "int8-w", "float")  # K not a multiple of 32: no MatMulNBits blocks
EMBEDDING = ("uint4-b32", "int8-b32", "int8-w", "float")
CONV = ("int4", "int8", "float")


def _traces(layers: tuple[LayerInfo, ...]) -> SensitivityTable:
    rows = tuple(LayerTrace(x.fqn, float(x.params), 1.0, 0.01, 8, True, x.params) for x in layers)
    return SensitivityTable(rows, 0, "cpu", 0.05, 0, 0.0)


def test_the_table_is_the_documented_one() -> None:
    cpu = AUTO_FORMATS["cpu"]
    assert cpu == {
        "linear": MATMUL,
        "mha_in_proj": MATMUL,
        "hf_conv1d": MATMUL,
        "embedding": EMBEDDING,
        "conv1d": CONV,
        "conv2d": CONV,
    }


def test_auto_on_a_conv_net() -> None:
    torch.manual_seed(0)
    prepared = prepare_model(SmallCNN().eval(), torch.randn(2, 1, 8, 8))
    got = candidate_formats(prepared.layers, AUTO)
    # conv: static uint8 activations; fc1 (K = 256) and fc2 (K = 64): the MatMul set
    assert got == {"conv1": CONV, "conv2": CONV, "fc1": MATMUL, "fc2": MATMUL}
    assert offered_formats(prepared.layers, AUTO) == ("int4", "int8", "float", *MATMUL[:-1])
    # An explicit list keeps its meaning: every layer is offered what it can take of it.
    listed = candidate_formats(prepared.layers, ("int2", "int4", "int8", "float"))
    assert set(listed.values()) == {("int2", "int4", "int8", "float")}


def test_auto_on_the_zoo_transformer() -> None:
    torch.manual_seed(0)
    prepared = prepare_model(TinyTransformer().eval(), torch.randn(2, 8, 8))
    got = candidate_formats(prepared.layers, AUTO)
    assert got.pop("embed") == MATMUL_SMALL_K  # a Linear over 8-wide tokens
    assert len(got) == 13 and set(got.values()) == {MATMUL}


def test_auto_on_a_tiny_gpt2_with_a_tied_head() -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config).eval()
    ids = {"input_ids": torch.randint(0, 64, (2, 6))}
    from hawqtool.modelio import ModelIO

    prepared = prepare_model(model, ids, io=ModelIO.from_batches([(ids, None)], output="logits"))
    got = candidate_formats(prepared.layers, AUTO)
    # The tied wte/lm_head is one embedding decision: int8-b32 on it is an int8 head.
    assert got.pop("transformer.wte") == got.pop("transformer.wpe") == EMBEDDING
    assert set(got) == {
        f"transformer.h.0.{n}" for n in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    }
    assert set(got.values()) == {MATMUL}


def test_pins_providers_and_kinds_without_a_row() -> None:
    fc = LayerInfo("fc", "linear", (8, 64), params=512)
    pinned = LayerInfo("p", "linear", (8, 64), params=512, pinned="int4")
    assert candidate_formats([fc, pinned], AUTO) == {"fc": MATMUL, "p": ("int4",)}
    assert auto_formats(fc, "cuda") == auto_formats(fc, "cpu")  # no table of its own: the CPU one
    register_kind(LayerKind("gate", activations=True, matmul_only=True, matrix=True))
    try:
        assert auto_formats(LayerInfo("g", "gate", (8, 64), params=512)) == MATMUL
    finally:
        unregister_kind("gate")


def test_build_options_offers_the_resolved_sets() -> None:
    fc = LayerInfo("fc", "linear", (8, 64), params=512)
    conv = LayerInfo("conv", "conv2d", (8, 4, 3, 3), params=288)
    g = torch.Generator().manual_seed(0)
    weights = {"fc": torch.randn(8, 64, generator=g), "conv": torch.randn(8, 4, 3, 3, generator=g)}
    opts = build_options([fc, conv], _traces((fc, conv)), weights, formats=AUTO)
    assert {f: tuple(o.format for o in row) for f, row in opts.options.items()} == {
        "fc": MATMUL,
        "conv": CONV,
    }


def test_auto_is_the_default_and_the_builtin_recipes_keep_their_lists() -> None:
    assert AllocationSection().formats == AUTO == Recipe().allocation.formats
    assert AllocationSection(formats="auto").formats == AUTO
    assert load_recipe(builtin_path("default")).allocation.formats == ("int2", "int4", "int8", "float")


def test_the_report_records_what_each_layer_and_kind_was_offered() -> None:
    torch.manual_seed(0)
    prepared = prepare_model(SmallCNN().eval(), torch.randn(2, 1, 8, 8))
    g = torch.Generator().manual_seed(0)
    weights = {i.fqn: torch.randn(*i.weight_shape, generator=g) for i in prepared.layers}
    opts = build_options(prepared.layers, _traces(prepared.layers), weights, formats=AUTO)
    got = candidate_report(Recipe(), prepared, opts)
    assert got["requested"] == "auto" and got["provider"] == "cpu"
    assert got["by_kind"] == {"conv2d": list(CONV), "linear": list(MATMUL)}
    assert got["by_layer"]["conv1"] == list(CONV) and got["by_layer"]["fc2"] == list(MATMUL)
