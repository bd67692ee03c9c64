"""Invariants of the one weight quantizer (hawqtool.quantizer), as property tests with a fixed seed.

Weights are drawn as integers times a power of ten, so that exact ties (w/scale = k + 0.5), repeated
values, zero channels and outliers all occur, without subnormal floats.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hawqtool.errors import UsageError
from hawqtool.formats import Format, parse_format
from hawqtool.quantizer import dequantize_as, int_range, quant_error, quantize_as, quantize_weight

PROPS = settings(derandomize=True, max_examples=150, deadline=None)


@st.composite
def weights(draw: st.DrawFn, *, max_channels: int = 6, max_width: int = 24) -> torch.Tensor:
    """A (channels, width) float32 weight; some channels may be all zero."""
    rows = draw(st.integers(1, max_channels))
    cols = draw(st.integers(1, max_width))
    ints = draw(st.lists(st.integers(-1000, 1000), min_size=rows * cols, max_size=rows * cols))
    w = torch.tensor(ints, dtype=torch.float32).reshape(rows, cols)
    zero_rows = draw(st.lists(st.booleans(), min_size=rows, max_size=rows))
    w[torch.tensor(zero_rows)] = 0.0
    return w * 10.0 ** draw(st.integers(-4, 1))


BITS = st.integers(2, 8)


@PROPS
@given(w=weights(), bits=BITS, clip=st.booleans())
def test_integers_in_range_and_dequantized_is_q_times_scale(w: torch.Tensor, bits: int, clip: bool) -> None:
    qw = quantize_weight(w, bits, clip_search=clip)
    qmin, qmax = int_range(bits)
    assert qw.q.dtype == torch.int8 and qw.q.shape == w.shape
    assert int(qw.q.min()) >= qmin and int(qw.q.max()) <= qmax
    assert qw.scale.shape == (w.shape[0],) and qw.scale.dtype == torch.float32
    assert torch.isfinite(qw.scale).all() and (qw.scale > 0).all()
    # Exactly what DequantizeLinear computes from the exported integers and scales.
    assert torch.equal(qw.dequantized, qw.q.float() * qw.scale[:, None])
    assert qw.sq_error == pytest.approx(float(((qw.dequantized - w).double() ** 2).sum()), rel=1e-9)


@PROPS
@given(w=weights(), bits=BITS, clip=st.booleans())
def test_error_at_most_half_a_step_inside_the_grid(w: torch.Tensor, bits: int, clip: bool) -> None:
    qw = quantize_weight(w, bits, clip_search=clip)
    qmin, qmax = int_range(bits)
    s = qw.scale[:, None]
    inside = (w >= (qmin - 0.5) * s) & (w <= (qmax + 0.5) * s)
    err = (qw.dequantized - w).abs()
    # A relative float32 slack for the division w / scale.
    assert (err[inside] <= (s * (0.5 + 1e-5)).expand_as(w)[inside]).all()
    # Outside the grid, values are clipped to the nearest end.
    assert torch.equal(qw.q[w > (qmax + 0.5) * s], torch.full_like(qw.q[w > (qmax + 0.5) * s], qmax))
    assert torch.equal(qw.q[w < (qmin - 0.5) * s], torch.full_like(qw.q[w < (qmin - 0.5) * s], qmin))


@PROPS
@given(w=weights(), bits=BITS)
def test_max_abs_scale_has_no_clipping_on_the_negative_side(w: torch.Tensor, bits: int) -> None:
    # clip_search=False is onnxruntime's symmetric grid: scale = max|w| / (qmax + 0.5).
    qw = quantize_weight(w, bits, clip_search=False)
    qmin, qmax = int_range(bits)
    absmax = w.abs().amax(dim=1)
    nz = absmax > 0
    torch.testing.assert_close(qw.scale[nz], absmax[nz] / (qmax + 0.5))
    assert (w >= (qmin - 0.5) * qw.scale[:, None] * (1 + 1e-6)).all()


@PROPS
@given(w=weights(), bits=BITS, clip=st.booleans())
def test_grid_mapping_is_idempotent_at_a_fixed_scale(w: torch.Tensor, bits: int, clip: bool) -> None:
    qw = quantize_weight(w, bits, clip_search=clip)
    assert torch.equal(torch.round(qw.dequantized / qw.scale[:, None]).to(torch.int8), qw.q)


@PROPS
@given(w=weights(), bits=BITS)
def test_requantizing_finds_the_same_grid(w: torch.Tensor, bits: int) -> None:
    # A scale the search picks puts some integer on qmin or qmax, and the no-clip candidate then
    # lands on that same scale for the dequantized weight: re-quantizing adds no error. (The one
    # exception is float rounding of the max-abs candidate, w/s = -127.49999 instead of -127.5; the
    # search then finds a grid at least as close.)
    qw = quantize_weight(w, bits)
    again = quantize_weight(qw.dequantized, bits)
    assert again.sq_error <= qw.sq_error * (1 + 1e-6) + 1e-20


def test_max_abs_grid_is_not_idempotent() -> None:
    # Why the search has a no-clip candidate: onnxruntime's max-abs grid (scale = max|w|/(qmax+0.5))
    # maps -1 to -2 · (1/1.5), and re-quantizing that uses a larger scale, so error grows.
    w = torch.tensor([[-1.0]])
    first = quantize_weight(w, 2, clip_search=False)
    again = quantize_weight(first.dequantized, 2, clip_search=False)
    assert again.scale.item() > first.scale.item()
    assert quantize_weight(first.dequantized, 2).sq_error < 1e-12


@PROPS
@given(w=weights(), bits=BITS)
def test_clip_search_never_worse_than_max_abs(w: torch.Tensor, bits: int) -> None:
    searched = quantize_weight(w, bits, clip_search=True)
    plain = quantize_weight(w, bits, clip_search=False)
    per_ch = lambda qw: ((qw.dequantized - w).double() ** 2).sum(dim=1)  # noqa: E731
    assert (per_ch(searched) <= per_ch(plain)).all()
    assert searched.sq_error <= plain.sq_error * (1 + 1e-12)


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("clip", [True, False])
def test_all_zero_channels(bits: int, clip: bool) -> None:
    w = torch.zeros(3, 5)
    w[1] = torch.tensor([0.3, -0.2, 0.0, 0.1, 0.05])
    qw = quantize_weight(w, bits, clip_search=clip)
    assert not torch.isnan(qw.dequantized).any()
    assert torch.isfinite(qw.scale).all() and (qw.scale > 0).all()
    assert (qw.q[0] == 0).all() and (qw.q[2] == 0).all()
    assert (qw.dequantized[0] == 0).all() and (qw.dequantized[2] == 0).all()
    assert math.isfinite(qw.sq_error)


@settings(derandomize=True, max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    dist=st.sampled_from(["normal", "laplace", "uniform", "student3"]),
    shape=st.sampled_from([(8, 64), (16, 9), (4, 3, 3, 3), (16, 128)]),
    clip=st.booleans(),
)
def test_error_decreases_with_bits(seed: int, dist: str, shape: tuple[int, ...], clip: bool) -> None:
    # Not a per-tensor theorem: the (b+1)-bit grid does not contain the b-bit grid at the scales
    # either rule picks, so hand-made weights sitting on the b-bit grid can quantize worse at b+1.
    # On weight-like tensors (continuous, >= 9 values per channel) it holds, and that is what
    # sensitivity relies on.
    rng = np.random.default_rng(seed)
    n = int(np.prod(shape))
    draw = {
        "normal": lambda: rng.normal(size=n),
        "laplace": lambda: rng.laplace(size=n),
        "uniform": lambda: rng.uniform(-1, 1, size=n),
        "student3": lambda: rng.standard_t(3, size=n),
    }[dist]
    w = torch.from_numpy(draw().astype(np.float32)).reshape(shape)
    errs = [quantize_weight(w, b, clip_search=clip).sq_error for b in range(2, 9)]
    assert all(a >= b for a, b in itertools.pairwise(errs)), errs


def test_quant_error_formats() -> None:
    w = torch.randn(4, 6, generator=torch.Generator().manual_seed(0))
    assert torch.equal(quant_error(w, "float"), torch.zeros_like(w))
    d4 = quant_error(w, "int4")
    assert torch.equal(d4, quantize_weight(w, 4).dequantized - w)


def test_dynamic_formats_parse_round_trip_and_quantize_like_their_static_twin() -> None:
    w = torch.randn(6, 10, generator=torch.Generator().manual_seed(0))
    for b in range(2, 9):
        f = parse_format(f"int{b}-d")
        assert f == Format(f"int{b}-d", b, activations=False, block=None, dynamic=True, family="intB-d")
        assert parse_format(f.name) == f and f.quantized and not f.weight_only
        d, s = quantize_as(w, f.name), quantize_as(w, f"int{b}")
        assert torch.equal(d.q, s.q) and torch.equal(d.scale, s.scale) and d.sq_error == s.sq_error
        assert torch.equal(quant_error(w, f.name), quant_error(w, f"int{b}"))
    assert not parse_format("int8").dynamic and not parse_format("int8-w").dynamic
    for bad in (
        "int8-d16",
        "int9-d",
        "int1-d",
        "int8-dw",
        "int8-w-d",
        "int8d",
        "int8-D",
        "float-d",
        "int8-b32-d",
    ):
        with pytest.raises(UsageError, match=r"allowed: .*intB-d \(weights per output channel in int8"):
            parse_format(bad)


def test_rejects_bad_bits() -> None:
    with pytest.raises(ValueError, match=r"2\.\.8"):
        quantize_weight(torch.ones(2, 2), 9)


def test_search_finds_an_exact_grid_by_hand() -> None:
    # w = [-1, 0.5] at 2 bits (grid [-2, 1]). The max-abs scale 1 / 1.5 = 2/3 gives
    # w/s = [-1.5, 0.75] -> [-2, 1] -> [-4/3, 2/3]: error 1/9 + 1/36 = 5/36. The no-clip scale
    # max(0.5 / 1, -1 / -2) = 0.5 gives [-2, 1] exactly: error 0. No clipping ratio reaches 0.5
    # (it would need alpha = 0.75, which CLIP_RATIOS skips), and no other scale is exact.
    w = torch.tensor([[-1.0, 0.5]])
    plain = quantize_weight(w, 2, clip_search=False)
    assert plain.q.tolist() == [[-2, 1]] and plain.sq_error == pytest.approx(5 / 36)
    searched = quantize_weight(w, 2)
    assert searched.scale.tolist() == [0.5] and searched.q.tolist() == [[-2, 1]]
    assert searched.sq_error == 0.0


@st.composite
def on_grid(draw: st.DrawFn) -> tuple[torch.Tensor, int]:
    """Weights that ARE a b-bit grid: integers in range times a power-of-two step per row (so the
    products are exact floats), each row holding qmin or qmax."""
    bits = draw(BITS)
    qmin, qmax = int_range(bits)
    rows, cols = draw(st.integers(1, 5)), draw(st.integers(1, 12))
    q = torch.tensor(draw(st.lists(st.integers(qmin, qmax), min_size=rows * cols, max_size=rows * cols)))
    q = q.reshape(rows, cols).float()
    q[:, 0] = torch.tensor(
        draw(st.lists(st.sampled_from([qmin, qmax]), min_size=rows, max_size=rows))
    ).float()
    steps = torch.tensor([2.0 ** draw(st.integers(-12, 3)) for _ in range(rows)])
    return q * steps[:, None], bits


@PROPS
@given(case=on_grid())
def test_weights_already_on_a_grid_quantize_exactly(case: tuple[torch.Tensor, int]) -> None:
    # The search's no-clip candidate is that grid's step, so the least-error choice is lossless.
    w, bits = case
    qw = quantize_weight(w, bits)
    assert qw.sq_error == 0.0 and torch.equal(qw.dequantized, w)
    assert (qw.scale > 0).all() and (qw.scale <= w.abs().amax(dim=1)).all()


def _ort_qint4_dequantized(w: torch.Tensor) -> torch.Tensor:
    """onnxruntime's symmetric per-channel QInt4 weight grid, via its own ``quantize_data``."""
    from onnx import TensorProto
    from onnxruntime.quantization.quant_utils import quantize_data

    rows = []
    for row in w.reshape(w.shape[0], -1).numpy():
        zp, scale, q = quantize_data(row, TensorProto.INT4, True)
        rows.append((q.astype(np.float32) - np.float32(zp)) * np.float32(scale))
    return torch.from_numpy(np.stack(rows)).reshape(w.shape)


def test_max_abs_int4_is_onnxruntime_qint4() -> None:
    pytest.importorskip("onnxruntime")
    w = torch.randn(16, 3, 3, 3, generator=torch.Generator().manual_seed(1))
    w[3] = 0.0
    ours = quantize_weight(w, 4, clip_search=False).dequantized
    torch.testing.assert_close(ours, _ort_qint4_dequantized(w), rtol=1e-6, atol=1e-7)
    # And the searched grid is at least as close to the weights.
    assert quantize_weight(w, 4).sq_error <= float(((_ort_qint4_dequantized(w) - w) ** 2).sum())


@pytest.mark.slow
def test_int4_small_cnn_mnist_at_least_as_accurate_as_onnxruntime_qint4() -> None:
    """The issue's goal, in torch with fake-quantized weights and float activations."""
    pytest.importorskip("onnxruntime")
    from hawqtool import zoo
    from hawqtool.prepare import prepare_model, swapped_weights

    splits = zoo.mnist5k()
    prepared = prepare_model(zoo.small_cnn_mnist(), next(iter(splits.calibration))[0])

    def top1(weights: dict[str, torch.Tensor]) -> float:
        correct = total = 0
        with swapped_weights(prepared, weights) as model, torch.no_grad():
            for x, y in splits.evaluation:
                correct += int((model(x).argmax(1) == y).sum())
                total += len(y)
        return correct / total

    w = {f: t.detach().clone() for f, t in zip(prepared.fqns, prepared.weights(), strict=True)}
    ours = top1({f: quantize_weight(t, 4).dequantized for f, t in w.items()})
    ort = top1({f: _ort_qint4_dequantized(t) for f, t in w.items()})
    assert ours >= ort, (ours, ort)


def test_quantize_as_searches_each_weight_and_format_once(monkeypatch: pytest.MonkeyPatch) -> None:
    from hawqtool import quantizer

    calls: list[str] = []

    def counting(weight: torch.Tensor, fmt: Format, *, clip_search: bool) -> quantizer.QuantizedWeight:
        calls.append(fmt.name)
        return quantizer.symmetric(weight, fmt, clip_search=clip_search)

    quantizer.clear_cache()
    quantizer.register("intB", counting, replace=True)
    try:
        w = torch.randn(16, 40, generator=torch.Generator().manual_seed(0))
        first = quantize_as(w, "int4")
        # The same values (another tensor, another layout in memory): the kept result, no search.
        assert quantize_as(w.T.contiguous().T, "int4") is first and calls == ["int4"]
        assert torch.equal(first.q, quantize_weight(w, 4).q)
        quantize_as(w, "int3")
        w2 = w.clone()
        w2[3, 7] += 1e-3  # one value changed: searched again
        assert quantize_as(w2, "int4") is not first and calls == ["int4", "int3", "int4"]
        # What callers get to keep is theirs: changing it leaves the kept result alone.
        mine = dequantize_as(w, "int4")
        mine.zero_()
        assert (
            torch.equal(quantize_as(w, "int4").dequantized, first.dequantized)
            and first.dequantized.abs().sum() > 0
        )
        # Bounded: past CACHE_BYTES the least recently used go first.
        monkeypatch.setattr(quantizer, "CACHE_BYTES", quantizer._nbytes(first) + 1)
        quantize_as(w, "int4")  # the most recent now; the next result evicts everything older
        quantize_as(w, "int2")
        assert quantize_as(w, "int2") is not None and calls[-1] == "int2"
        quantize_as(w, "int4")
        assert calls[-1] == "int4" and len(calls) == 5
    finally:
        quantizer.register("intB", quantizer.symmetric, replace=True)
        quantizer.clear_cache()
