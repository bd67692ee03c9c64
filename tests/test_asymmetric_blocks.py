"""The asymmetric block family (``uintB-bK``): a scale and a zero point per output channel and block.

Known answers: the grid by hand, 0 exact, codes and zero points in range, the clip search never
worse than plain min/max, all-positive blocks far better than the symmetric grid; the size cost
counts the zero points; Ω (options) uses the one quantizer; the DequantizeLinear fallback (a
MatMul that cannot take MatMulNBits) dequantizes in onnxruntime bit-exactly to the quantizer's
weight. MatMulNBits / GatherBlockQuantized with zero points, tied tables and the bytes in the file
are checked on three transformers in ``tests/test_export_kinds.py``."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper
from torch import nn

from hawqtool.export import QDQExporter
from hawqtool.formats import format_family, layer_cost, parse_format, scale_count, supports
from hawqtool.options import build_options
from hawqtool.prepare import prepare_model
from hawqtool.quantizer import CLIP_RATIOS, quantize_as, quantize_asymmetric, quantize_weight
from hawqtool.types import LayerInfo, LayerTrace, SensitivityTable


def test_the_format_names_its_family_and_fits_matrices_only() -> None:
    f = parse_format("uint4-b32")
    assert (f.bits, f.block, f.activations, f.dynamic, f.family) == (4, 32, False, False, "uintB-bK")
    assert format_family(f).zero_points and not format_family("int4-b32").zero_points
    fc = LayerInfo("fc", "linear", (8, 64), params=512)
    emb = LayerInfo("emb", "embedding", (100, 64), params=6400)
    conv = LayerInfo("conv", "conv2d", (8, 4, 3, 3), params=288)
    assert supports(fc, "uint4-b32") and supports(emb, "uint8-b32") and not supports(conv, "uint4-b32")


def test_the_size_cost_counts_one_zero_point_per_scale_in_the_storage_bits() -> None:
    fc = LayerInfo("fc", "linear", (10, 96), params=960)  # 3 blocks of 32 per row
    assert scale_count(fc, "uint4-b32") == 30
    # 480 bytes of nibbles + 30 float32 scales + 10 rows of 3 nibbles (2 bytes each)
    assert layer_cost(fc, "uint4-b32") == 480 + 120 + 20
    assert layer_cost(fc, "uint8-b32") == 960 + 120 + 30
    assert layer_cost(fc, "uint4-b32") - layer_cost(fc, "int4-b32") == 20


def test_a_block_by_hand() -> None:
    # [-1, 2] at 2 bits: scale 1, zero point 1 (unsigned) -> codes 0..3 = -2..1 signed
    qw = quantize_asymmetric(torch.tensor([[-1.0, 0.0, 1.0, 2.0]]), 2, 4, clip_search=False)
    assert qw.scale.tolist() == [[1.0]] and qw.zero_point.tolist() == [[-1]]  # type: ignore[union-attr]
    assert qw.q.tolist() == [[-2, -1, 0, 1]] and qw.dequantized.tolist() == [[-1.0, 0.0, 1.0, 2.0]]
    assert qw.sq_error == 0.0


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_codes_zero_points_and_zero_are_on_the_grid(bits: int) -> None:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(6, 80, generator=g) + torch.linspace(-2, 2, 6)[:, None]  # shifted rows
    w[2, :40] = 0.0  # an all-zero block
    qw = quantize_as(w, f"uint{bits}-b32")
    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    assert qw.scale.shape == qw.zero_point.shape == (6, 3)  # type: ignore[union-attr]
    assert lo <= int(qw.q.min()) and int(qw.q.max()) <= hi
    assert lo <= int(qw.zero_point.min()) and int(qw.zero_point.max()) <= hi  # type: ignore[union-attr]
    zp = qw.zero_point.repeat_interleave(32, dim=1)[:, :80]  # type: ignore[union-attr]
    scale = qw.scale.repeat_interleave(32, dim=1)[:, :80]
    assert torch.equal(qw.dequantized, (qw.q.float() - zp.float()) * scale)
    assert torch.all(qw.dequantized[w == 0] == 0)  # 0 is exact: the range always holds it
    assert qw.sq_error == pytest.approx(float(((qw.dequantized - w).double() ** 2).sum()))


def test_clip_search_is_never_worse_and_min_max_beats_the_symmetric_grid_off_centre() -> None:
    g = torch.Generator().manual_seed(1)
    w = torch.rand(16, 64, generator=g) + 0.5  # all positive: a symmetric grid wastes half its codes
    plain = quantize_asymmetric(w, 4, 32, clip_search=False)
    searched = quantize_asymmetric(w, 4, 32, clip_search=True)
    assert searched.sq_error <= plain.sq_error
    assert len(CLIP_RATIOS) > 1
    symmetric = quantize_weight(w, 4, block=32, clip_search=True)
    assert searched.sq_error < 0.5 * symmetric.sq_error


def test_omega_is_the_quantizers_error() -> None:
    g = torch.Generator().manual_seed(2)
    w = torch.randn(4, 64, generator=g)
    layer = LayerInfo("fc", "linear", (4, 64), params=256)
    trace = LayerTrace("fc", 2.0 * 256, 2.0, 0.1, 10, True, 256)
    table = SensitivityTable((trace,), 0, "cpu", 0.05, 10, 0.1)
    opts = build_options([layer], table, {"fc": w}, formats=("uint4-b32", "int4-b32", "float"))
    by_format = {o.format: o for o in opts.options["fc"]}
    assert by_format["uint4-b32"].sq_error == quantize_as(w, "uint4-b32").sq_error
    assert by_format["uint4-b32"].omega == pytest.approx(2.0 * by_format["uint4-b32"].sq_error)
    assert by_format["uint4-b32"].cost == layer_cost(layer, "uint4-b32")


class _Mix(nn.Module):
    """``a`` is also read as ``x @ W`` (not Wᵀ), which MatMulNBits cannot take, so ``uintB-bK``
    falls back to a blocked DequantizeLinear with zero points; ``b`` is a plain Linear (MatMulNBits)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(64, 32, bias=False)
        self.b = nn.Linear(32, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x) + (x[..., :32] @ self.a.weight)[..., :32]
        return self.b(torch.relu(h))


@pytest.mark.parametrize("fmt", ["uint4-b32", "uint8-b16"])
def test_dequantize_linear_fallback_and_matmulnbits_are_bit_exact_in_onnxruntime(fmt: str) -> None:
    x = torch.randn(2, 3, 64, generator=torch.Generator().manual_seed(3))
    prepared = prepare_model(_Mix().eval(), x)
    exporter = QDQExporter.build(prepared, [(x, None)])
    allocation = {"a": fmt, "b": fmt}
    kinds = exporter.emitters(allocation)
    assert set(kinds["b"].values()) == {"MatMulNBits"}
    model = exporter.quantized_model(allocation)
    # Expose every DequantizeLinear output (the weights the float ops read) and run the graph.
    dq = [n.output[0] for n in model.graph.node if n.op_type == "DequantizeLinear"]
    assert dq, kinds
    model.graph.output.extend(helper.make_tensor_value_info(t, TensorProto.FLOAT, None) for t in dq)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    assert prepared.io is not None
    outputs = session.run(dq, prepared.io.feeds(x))
    ref = quantize_as(prepared.weight("a"), fmt).dequantized.numpy()
    site = exporter.sites["a"]
    for name, got in zip(dq, outputs, strict=True):
        assert name in site.tensors
        np.testing.assert_array_equal(got, ref.T if got.shape != ref.shape else ref)
    onnx.checker.check_model(exporter.quantized_model(allocation), full_check=True)
