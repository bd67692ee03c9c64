"""Export of every layer kind on transformer models: a TransformerEncoder with an embedding and a
Linear read in two layouts, a tiny Hugging Face BERT and a tiny GPT-2 with tied embeddings.

Known answers: every layer and every node that reads its weight is found; each format kind's ONNX
weights decode (numpy, and onnxruntime for the contrib ops) bit-exactly to the quantizer's
``dequantized``; op counts per kind; onnxruntime against the fake-quantized torch model at another
sequence length than calibration; weight bytes in the file against the size cost model; external
data. Every file lives under ``tmp_path``."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from hawqtool.errors import UsageError
from hawqtool.export import QDQExporter, external_data_path
from hawqtool.formats import layer_cost, parse_format
from hawqtool.modelio import ModelIO
from hawqtool.prepare import prepare_model, swapped_weights
from hawqtool.quantizer import quantize_as

#: Per format kind: the format of Linear-like layers and of embeddings.
KINDS = {
    "int8": ("int8", "int8-w"),
    "int4-w": ("int4-w", "int4-w"),
    "int4-b32": ("int4-b32", "int4-b32"),
    "int8-b32": ("int8-b32", "int8-w"),
    "int8-d": ("int8-d", "int8-w"),
    "uint4-b32": ("uint4-b32", "uint4-b32"),
    "uint8-b32": ("uint8-b32", "uint8-b32"),
}
#: Per model and kind: (MatMulNBits, GatherBlockQuantized) nodes in the exported graph, counted by
#: hand. Encoder: 2 in_proj + 2 linear1 + 2 linear2 (MatMul), 2 out_proj + head (Gemm), proj read
#: by a MatMul and a Gemm = 11; one embedding. BERT: 12 MatMul, 3 embeddings. GPT-2: 8 Conv1D Gemms
#: + lm_head MatMul (tied to wte) = 9, 2 embeddings; a per-row format on the tied wte dequantizes
#: it for both of its readers (MatMulNBits takes block formats only), leaving wpe's Gather alone.
OP_COUNTS = {
    "encoder": {"int8": (0, 1), "int4-w": (0, 1), "int4-b32": (11, 1), "int8-b32": (11, 1), "int8-d": (0, 1)},
    "bert": {"int8": (0, 3), "int4-w": (0, 3), "int4-b32": (12, 3), "int8-b32": (12, 3), "int8-d": (0, 3)},
    "gpt2": {"int8": (0, 1), "int4-w": (0, 1), "int4-b32": (9, 2), "int8-b32": (8, 1), "int8-d": (0, 1)},
}
# The asymmetric block kinds (zero points) reach the same ops as int4-b32 on every model: the tied
# GPT-2 table in uint8-b32 is one decision read by a GatherBlockQuantized and a MatMulNBits (an
# int8 head).
for _counts in OP_COUNTS.values():
    _counts["uint4-b32"] = _counts["uint8-b32"] = _counts["int4-b32"]
#: Per model: MatMulInteger nodes of ``int8-d`` (every Linear-like use, the GPT-2 lm_head being the
#: embedding's weight-only format).
DYNAMIC_COUNTS = {"encoder": 11, "bert": 12, "gpt2": 8}
CALIBRATION_TOKENS, TEST_TOKENS = 12, 7  # the exported models run at another length than calibration


def _ids(n: int, tokens: int, vocab: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "input_ids": torch.randint(0, vocab, (n, tokens), generator=g),
        "attention_mask": torch.ones(n, tokens, dtype=torch.long),
    }


class Encoder(nn.Module):
    """An embedding, a 2-layer TransformerEncoder, and ``proj`` called on a 3-D tensor (a MatMul on a
    transposed copy of its weight) and on a 2-D one (a Gemm on the weight itself)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(50, 32)
        layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.proj = nn.Linear(32, 32)
        self.head = nn.Linear(32, 5)
        with torch.no_grad():  # the encoder's layers start as copies: the exporter would merge them
            for p in self.parameters():
                p.add_(0.05 * torch.randn_like(p))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        h = self.enc(self.emb(input_ids), src_key_padding_mask=attention_mask == 0)
        return self.head(self.proj(h.mean(1)) + self.proj(h).mean(1))


def _bert() -> nn.Module:
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        attn_implementation="eager",
    )
    torch.manual_seed(0)
    return transformers.BertModel(config, add_pooling_layer=True).eval()


def _gpt2() -> nn.Module:
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100)
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(config).eval()


MODELS = {
    "encoder": (lambda: Encoder().eval(), "output", 50),
    "bert": (_bert, "last_hidden_state", 100),
    "gpt2": (_gpt2, "logits", 100),
}


@pytest.fixture(scope="module", params=list(MODELS))
def built(request) -> tuple[str, QDQExporter]:  # type: ignore[no-untyped-def]
    """One exporter per model for the module: the float export is the expensive part."""
    factory, output, vocab = MODELS[request.param]
    model = factory()
    x = _ids(4, CALIBRATION_TOKENS, vocab, seed=1)
    io = ModelIO.from_batches([(x, None)], output=None if output == "output" else output)
    prepared = prepare_model(model, x, io=io)
    return request.param, QDQExporter.build(prepared, [(x, None)])


def _allocation(exporter: QDQExporter, kind: str) -> dict[str, str]:
    linear, embedding = KINDS[kind]
    return {i.fqn: embedding if i.kind == "embedding" else linear for i in exporter.prepared.layers}


def _session(model: onnx.ModelProto | str, *, optimized: Path | None = None, level: int = 99):  # type: ignore[no-untyped-def]
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.graph_optimization_level = ort.GraphOptimizationLevel(level)
    if optimized is not None:
        options.optimized_model_filepath = str(optimized)
    data = model if isinstance(model, str) else model.SerializeToString()
    return ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])


# ------------------------------------------------------------------------------------------------
# An independent decoder of the weights in an exported graph
# ------------------------------------------------------------------------------------------------


def _unpack_rows(data: np.ndarray, bits: int) -> np.ndarray:
    """Unsigned ``bits``-bit values packed along the last axis, first in the lowest bits."""
    per = 8 // bits
    parts = [(data >> (bits * j)) & (2**bits - 1) for j in range(per)]
    return np.stack(parts, axis=-1).reshape(*data.shape[:-1], -1).astype(np.int64)


class _Graph:
    def __init__(self, model: onnx.ModelProto) -> None:
        self.inits = {t.name: t for t in model.graph.initializer}
        self.producer = {o: n for n in model.graph.node for o in n.output}
        self.by_name = {n.name: n for n in model.graph.node}

    def constant(self, name: str, used: set[str]) -> np.ndarray:
        """A tensor computed from initializers through Cast / Transpose / Reshape; records the
        initializers holding its values in ``used`` (not a Reshape's shape)."""
        if name in self.inits:
            used.add(name)
            return numpy_helper.to_array(self.inits[name])
        node = self.producer[name]
        x = self.constant(node.input[0], used)
        if node.op_type == "Cast":
            return x.astype(np.int8)
        if node.op_type == "Transpose":
            return x.T
        assert node.op_type == "Reshape", node.op_type
        return x.reshape(numpy_helper.to_array(self.inits[node.input[1]]))

    def weight(self, use, used: set[str]) -> np.ndarray:  # type: ignore[no-untyped-def]
        """The weight one use computes with, in the weight-view layout (out, in)."""
        attrs = {}
        if f"{use.node}_MatMulNBits" in self.by_name:
            node = self.by_name[f"{use.node}_MatMulNBits"]
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            q = _unpack_rows(self.constant(node.input[1], used), attrs["bits"]).reshape(attrs["N"], -1)
            scale = self.constant(node.input[2], used)
            zp = self._packed_zero_points(node, 3, scale.shape, attrs["bits"], used)
            return (
                (q - np.repeat(zp, attrs["block_size"], axis=1))
                * np.repeat(scale, attrs["block_size"], axis=1)
            ).astype(np.float32)
        if f"{use.node}_dynamic_MatMulInteger" in self.by_name:
            node = self.by_name[f"{use.node}_dynamic_MatMulInteger"]
            assert len(node.input) == 3  # no weight zero point
            q = self.constant(node.input[1], used).astype(np.int64).T  # stored (K, N)
            scale = self.constant(self.by_name[f"{use.node}_dynamic_ScaleMul"].input[1], used)
            return (q * scale[:, None]).astype(np.float32)
        if f"{use.node}_GatherBlockQuantized" in self.by_name:
            node = self.by_name[f"{use.node}_GatherBlockQuantized"]
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            q = _unpack_rows(self.constant(node.input[0], used), attrs["bits"])
            scale = self.constant(node.input[2], used)
            zp = self._packed_zero_points(node, 3, scale.shape, attrs["bits"], used)
            zp = np.repeat(zp, attrs["block_size"], axis=1)[:, : q.shape[1]]
            scale = np.repeat(scale, attrs["block_size"], axis=1)[:, : q.shape[1]]
            return ((q - zp) * scale).astype(np.float32)
        node = self.producer.get(use.tensor)
        if node is None or node.op_type == "Transpose":  # float, maybe a transposed copy
            w = self.constant(use.tensor, used)
            return w.T if use.transposed else w
        assert node.op_type == "DequantizeLinear", node.op_type
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        q = self.constant(node.input[0], used).astype(np.int64)
        scale = self.constant(node.input[1], used)
        zp = (
            self.constant(node.input[2], used).astype(np.int64)
            if len(node.input) > 2
            else np.zeros_like(scale)
        )
        if "block_size" in attrs:
            axis = attrs["axis"]
            scale, zp = (
                np.repeat(a, attrs["block_size"], axis=axis)[tuple(slice(0, d) for d in q.shape)]
                for a in (scale, zp)
            )
        else:
            shape = [1] * q.ndim
            shape[attrs["axis"]] = -1
            scale, zp = scale.reshape(shape), zp.reshape(shape)
        w = ((q - zp) * scale).astype(np.float32)
        return w.T if use.transposed else w

    def _packed_zero_points(
        self, node: onnx.NodeProto, index: int, shape: tuple[int, ...], bits: int, used: set[str]
    ) -> np.ndarray:
        """A contrib op's unsigned zero points (rows packed like its data), or its default midpoint."""
        if len(node.input) <= index or not node.input[index]:
            return np.full(shape, 2 ** (bits - 1), np.int64)
        return _unpack_rows(self.constant(node.input[index], used), bits)[:, : shape[1]]


# ------------------------------------------------------------------------------------------------
# Layers and uses
# ------------------------------------------------------------------------------------------------


def test_every_layer_and_every_reader_of_its_weight_is_found(built) -> None:  # type: ignore[no-untyped-def]
    name, exporter = built
    prepared = exporter.prepared
    kinds = Counter(i.kind for i in prepared.layers)
    uses = {f: [(u.op_type, u.transposed) for u in s.uses] for f, s in exporter.sites.items()}
    assert set(exporter.sites) == set(prepared.fqns)
    if name == "encoder":
        assert kinds == {"embedding": 1, "mha_in_proj": 2, "linear": 8}
        assert uses["proj"] == [("Gemm", False), ("MatMul", True)]  # both layouts of one weight
    elif name == "bert":
        assert kinds == {"embedding": 3, "linear": 12} and prepared.unused == ("pooler.dense",)
    else:
        assert kinds == {"embedding": 2, "hf_conv1d": 8}
        assert uses["transformer.wte"] == [("Gather", False), ("MatMul", True)]  # tied lm_head
    # Each weight is stored once in the float model: no initializer but the site's holds its values.
    inits = {t.name: numpy_helper.to_array(t) for t in exporter.float_model.graph.initializer}
    for fqn, site in exporter.sites.items():
        w = prepared.weight(fqn).numpy()
        holders = [
            n
            for n, a in inits.items()
            if (a.shape == w.shape and np.array_equal(a, w))
            or (a.shape == w.T.shape and np.array_equal(a, w.T))
        ]
        assert holders == [site.weight], (fqn, holders)
    assert exporter.weight_bytes({}) == 4 * sum(i.params for i in prepared.layers)


# ------------------------------------------------------------------------------------------------
# Weights, op counts
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(KINDS))
def test_weights_decode_bit_exactly_with_the_op_counts_of_each_kind(built, kind, tmp_path) -> None:  # type: ignore[no-untyped-def]
    name, exporter = built
    allocation = _allocation(exporter, kind)
    model = exporter.quantized_model(allocation)
    ops = Counter(n.op_type for n in model.graph.node)
    assert (ops["MatMulNBits"], ops["GatherBlockQuantized"]) == OP_COUNTS[name][kind], ops
    graph = _Graph(model)
    for fqn, fmt in allocation.items():
        ref = quantize_as(exporter.prepared.weight(fqn), fmt).dequantized.numpy()
        for use in exporter.sites[fqn].uses:
            np.testing.assert_array_equal(graph.weight(use, set()), ref, err_msg=f"{fqn} {use.node}")
    # onnxruntime reads the contrib ops' packed weights the same way.
    _check_contrib_ops_in_onnxruntime(model, exporter, allocation)
    if parse_format(KINDS[kind][0]).block is not None:
        optimized = tmp_path / "optimized.onnx"
        _session(model, optimized=optimized)
        opt = Counter(n.op_type for n in onnx.load(optimized).graph.node)
        assert opt["MatMulNBits"] == ops["MatMulNBits"] and opt["Gemm"] == 0, opt
        assert opt["GatherBlockQuantized"] == ops["GatherBlockQuantized"], opt
    if parse_format(KINDS[kind][0]).dynamic:
        # Fused at load: one DynamicQuantizeMatMul per MatMulInteger, except where onnxruntime's
        # common-subexpression pass first merges the DynamicQuantizeLinear of a shared input
        # (BERT's query / key / value), which leaves one DynamicQuantizeLinear and a
        # MatMulIntegerToFloat per reader.
        assert ops["MatMulInteger"] == ops["DynamicQuantizeLinear"] == DYNAMIC_COUNTS[name], ops
        optimized = tmp_path / "optimized.onnx"
        _session(model, optimized=optimized)
        opt = Counter(n.op_type for n in onnx.load(optimized).graph.node)
        assert opt["DynamicQuantizeMatMul"] + opt["MatMulIntegerToFloat"] == ops["MatMulInteger"], opt
        assert opt["MatMulInteger"] == 0 and opt["MatMulIntegerToFloat"] <= 6, opt


def _check_contrib_ops_in_onnxruntime(
    model: onnx.ModelProto, exporter: QDQExporter, allocation: dict[str, str]
) -> None:
    """Each MatMulNBits times an identity matrix, and each GatherBlockQuantized of every row, in
    onnxruntime, equal the quantizer's weights bit for bit (accuracy_level 0 for the probe: float
    inputs, so I · W is exact)."""
    nodes, outputs, inits, want = [], [], [], []
    for fqn, site in exporter.sites.items():
        ref = quantize_as(exporter.prepared.weight(fqn), allocation[fqn]).dequantized.numpy()
        for use in site.uses:
            for node in model.graph.node:
                if node.name == f"{use.node}_MatMulNBits":
                    probe = onnx.NodeProto()
                    probe.CopyFrom(node)
                    eye = f"{node.name}_eye"
                    inits.append(numpy_helper.from_array(np.eye(ref.shape[1], dtype=np.float32), eye))
                    probe.input[0] = eye
                    del probe.input[4:]  # no bias (zero points, if any, stay)
                    for a in probe.attribute:
                        if a.name == "accuracy_level":
                            a.i = 0
                    want.append(ref.T)
                elif node.name == f"{use.node}_GatherBlockQuantized":
                    probe = onnx.NodeProto()
                    probe.CopyFrom(node)
                    rows = f"{node.name}_rows"
                    inits.append(numpy_helper.from_array(np.arange(ref.shape[0], dtype=np.int64), rows))
                    probe.input[1] = rows
                    want.append(ref)
                else:
                    continue
                probe.output[0] = f"{node.name}_probe"
                nodes.append(probe)
                outputs.append(helper.make_tensor_value_info(probe.output[0], TensorProto.FLOAT, None))
    if not nodes:
        return
    needed = {i for n in nodes for i in n.input}
    reshapes = [n for n in model.graph.node if n.op_type == "Reshape" and n.output[0] in needed]
    needed |= {i for n in reshapes for i in n.input}
    probe_model = helper.make_model(
        helper.make_graph(
            [*reshapes, *nodes],
            "probe",
            [],
            outputs,
            initializer=[t for t in model.graph.initializer if t.name in needed] + inits,
        ),
        opset_imports=list(model.opset_import),
    )
    for got, ref in zip(_session(probe_model).run(None, {}), want, strict=True):
        np.testing.assert_array_equal(got, ref)


def test_tied_block_weight_is_stored_once_for_both_readers(built) -> None:  # type: ignore[no-untyped-def]
    name, exporter = built
    if name != "gpt2":
        pytest.skip("GPT-2 ties its embedding to lm_head")
    site = exporter.sites["transformer.wte"]
    model = exporter.quantized_model({"transformer.wte": "int4-b32"})
    by_name = {n.name: n for n in model.graph.node}
    gather = by_name[f"{site.uses[0].node}_GatherBlockQuantized"]
    matmul = by_name[f"{site.uses[1].node}_MatMulNBits"]
    reshape = next(n for n in model.graph.node if n.output[0] == matmul.input[1])
    # One packed table (100 × 32 int4 = 1600 bytes) and one scale tensor, read by both.
    assert reshape.op_type == "Reshape" and reshape.input[0] == gather.input[0]
    assert matmul.input[2] == gather.input[2]
    data = next(t for t in model.graph.initializer if t.name == gather.input[0])
    assert len(data.raw_data) == 100 * 32 // 2
    weights = [t for t in model.graph.initializer if t.name.startswith(site.weight)]
    assert sorted(t.name for t in weights) == sorted(
        [gather.input[0], gather.input[2], reshape.input[1]]
    )  # integers, scales, the Reshape's shape: no float copy left


@pytest.mark.parametrize("fmt", ["int8-b32", "uint8-b32"])
def test_an_int8_head_tied_to_the_embedding_is_one_decision(built, fmt) -> None:  # type: ignore[no-untyped-def]
    """GPT-2's wte in an 8-bit block format: its Gather and the lm_head MatMul read one packed table
    (and one set of scales and zero points) through GatherBlockQuantized and MatMulNBits."""
    name, exporter = built
    if name != "gpt2":
        pytest.skip("GPT-2 ties its embedding to lm_head")
    site = exporter.sites["transformer.wte"]
    kinds = exporter.emitters({"transformer.wte": fmt})["transformer.wte"]
    assert kinds == {site.uses[0].node: "GatherBlockQuantized", site.uses[1].node: "MatMulNBits"}
    model = exporter.quantized_model({"transformer.wte": fmt})
    by_name = {n.name: n for n in model.graph.node}
    gather = by_name[f"{site.uses[0].node}_GatherBlockQuantized"]
    matmul = by_name[f"{site.uses[1].node}_MatMulNBits"]
    assert matmul.input[2:] == gather.input[2:]  # the same scales (and zero points)
    assert len(gather.input) == (4 if fmt.startswith("u") else 3)
    data = next(t for t in model.graph.initializer if t.name == gather.input[0])
    assert len(data.raw_data) == 100 * 32  # one byte per weight, stored once


def test_activation_qdq_goes_on_every_reader_of_a_weight(built, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """int8 on a Linear read by a Gemm (2-D input) and a MatMul (3-D input, transposed copy): both
    inputs get Q→DQ, both weights dequantize one int8 tensor, and onnxruntime runs both on
    integer kernels."""
    name, exporter = built
    if name != "encoder":
        pytest.skip("the encoder's proj is read in two layouts")
    model = exporter.quantized_model({"proj": "int8"})
    graph = _Graph(model)
    site = exporter.sites["proj"]
    ints: set[str] = set()
    for use in site.uses:
        node = graph.by_name[use.node]
        dq = graph.producer[node.input[0]]
        assert dq.op_type == "DequantizeLinear" and graph.producer[dq.input[0]].op_type == "QuantizeLinear"
        graph.weight(use, ints)
    assert ints == {f"{site.weight}_quantized", f"{site.weight}_scale", f"{site.weight}_zero_point"}
    _session(model, optimized=tmp_path / "optimized.onnx")
    ops = Counter(n.op_type for n in onnx.load(tmp_path / "optimized.onnx").graph.node)
    assert ops["QGemm"] == 1 and ops["MatMulIntegerToFloat"] + ops["QLinearMatMul"] == 1, ops


# ------------------------------------------------------------------------------------------------
# onnxruntime against torch
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["int4-w", "int4-b32", "int8-b32", "uint4-b32"])
def test_onnxruntime_matches_the_fake_quantized_model(built, kind) -> None:  # type: ignore[no-untyped-def]
    """Weight-only kinds: onnxruntime vs torch with every weight replaced by the quantizer's
    ``dequantized``, on 7 tokens (calibration had 12).

    Tolerance in steps of the output's int8 grid (max |y| / 127): MatMulNBits runs at
    accuracy_level 4, which quantizes its input to int8 per block, so each such layer may differ
    from float torch by a fraction of a step of its input's grid (measured: at most 1.15 steps,
    0.4 on average, across the three models)."""
    name, exporter = built
    vocab = MODELS[name][2]
    allocation = _allocation(exporter, kind)
    x = _ids(3, TEST_TOKENS, vocab, seed=5)
    prepared = exporter.prepared
    assert prepared.io is not None
    got = _session(exporter.quantized_model(allocation)).run(None, prepared.io.feeds(x))[0]
    weights = {f: quantize_as(prepared.weight(f), fmt).dequantized for f, fmt in allocation.items()}
    with torch.no_grad():
        base = prepared.forward(x).numpy()
        with swapped_weights(prepared, weights):
            ref = prepared.forward(x).numpy()
    assert got.shape == ref.shape
    step = np.abs(ref).max() / 127
    err = np.abs(got - ref) / step
    assert err.max() <= 2.0 and err.mean() <= 0.5, (err.max(), err.mean())
    if parse_format(KINDS[kind][0]).bits == 4:
        # The model that runs is the quantized one: 4-bit weights move outputs by many steps.
        assert np.abs(got - ref).max() < 0.1 * np.abs(base - ref).max()


# ------------------------------------------------------------------------------------------------
# Bytes
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["float", *KINDS])
def test_weight_bytes_are_the_files_and_the_size_cost_model(built, kind, tmp_path) -> None:  # type: ignore[no-untyped-def]
    _, exporter = built
    allocation = {} if kind == "float" else _allocation(exporter, kind)
    path = exporter.export(allocation, tmp_path / "m.onnx")
    model = onnx.load(path)
    graph = _Graph(model)
    used: set[str] = set()
    for site in exporter.sites.values():
        for use in site.uses:
            graph.weight(use, used)
    stored = sum(len(graph.inits[n].raw_data) for n in used)
    full = exporter.full_allocation(allocation)
    cost = sum(int(layer_cost(i, full[i.fqn], cost="size")) for i in exporter.prepared.layers)
    # The one extra over the cost model: an all-zero int8 zero point per output channel of an
    # activation format's weight that a Gemm reads (onnxruntime fuses QGemm only with it).
    zero_points = sum(
        i.out_channels
        for i in exporter.prepared.layers
        if parse_format(full[i.fqn]).activations
        and any(u.op_type == "Gemm" for u in exporter.sites[i.fqn].uses)
    )
    assert stored == cost + zero_points == exporter.weight_bytes(allocation)


def test_an_activation_format_on_an_embedding_is_a_usage_error(built) -> None:  # type: ignore[no-untyped-def]
    name, exporter = built
    if name != "encoder":
        pytest.skip("one model is enough")
    with pytest.raises(
        UsageError,
        match=r"'emb' \(embedding\) cannot take format 'int8': its input is not an activation; allowed: .*int8-w",
    ):
        exporter.quantized_model({"emb": "int8"})
    with pytest.raises(
        UsageError, match=r"'emb' \(embedding\) cannot take format 'int8-d'.*allowed: int2-w, "
    ):
        exporter.quantized_model({"emb": "int8-d"})


def test_external_data_past_the_inline_limit_loads_from_the_path(built, tmp_path) -> None:  # type: ignore[no-untyped-def]
    name, exporter = built
    if name != "encoder":
        pytest.skip("one model is enough")
    allocation = _allocation(exporter, "int4-b32")
    inline = exporter.export(allocation, tmp_path / "inline" / "m.onnx")
    assert not external_data_path(inline).exists()
    path = exporter.export(allocation, tmp_path / "big" / "m.onnx", max_inline_bytes=10_000)
    assert sorted(p.name for p in path.parent.iterdir()) == ["m.onnx", "m.onnx.data"]  # no temporaries
    # Tensors of 1 KiB or more moved to the data file: the encoder's packed integers and scales.
    bare = onnx.load(path, load_external_data=False)
    external = [t for t in bare.graph.initializer if t.data_location == TensorProto.EXTERNAL]
    assert external and all(len(t.raw_data) == 0 for t in external)
    assert path.stat().st_size < inline.stat().st_size
    loaded = onnx.load(path)
    expected = {t.name: numpy_helper.to_array(t) for t in onnx.load(inline).graph.initializer}
    assert {t.name for t in loaded.graph.initializer} == set(expected)
    for t in loaded.graph.initializer:
        np.testing.assert_array_equal(numpy_helper.to_array(t), expected[t.name])
    assert exporter.prepared.io is not None
    feeds = exporter.prepared.io.feeds(_ids(2, TEST_TOKENS, 50, seed=3))
    np.testing.assert_array_equal(
        _session(str(path)).run(None, feeds)[0], _session(str(inline)).run(None, feeds)[0]
    )
