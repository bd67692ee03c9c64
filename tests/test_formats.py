"""Formats and layer kinds: parsing, grammar errors, storage bits, scales, costs and capability by hand."""

from __future__ import annotations

import subprocess
import sys

import pytest

from hawqtool.errors import UsageError
from hawqtool.formats import (
    ACTIVATION_KINDS,
    FORMAT_GRAMMAR,
    KNOWN_FORMATS,
    MATMUL_KINDS,
    Format,
    FormatFamily,
    LayerKind,
    format_family,
    is_format,
    kinds,
    layer_cost,
    layer_kind,
    parse_format,
    register_family,
    register_kind,
    scale_count,
    storage_bits,
    supports,
    unsupported_reason,
)
from hawqtool.types import LayerInfo

CONV = LayerInfo("conv", "conv2d", (32, 16, 3, 3), params=4608, macs=294912)


@pytest.mark.parametrize(
    ("name", "want"),
    [
        ("float", Format("float", 32, False, family="float")),
        ("int2", Format("int2", 2, True, family="intB")),
        ("int8", Format("int8", 8, True, family="intB")),
        ("int3-w", Format("int3-w", 3, False, family="intB-w")),
        ("int4-d", Format("int4-d", 4, False, dynamic=True, family="intB-d")),
        ("int4-b16", Format("int4-b16", 4, False, block=16, family="intB-bK")),
        ("int8-b1024", Format("int8-b1024", 8, False, block=1024, family="intB-bK")),
    ],
)
def test_names_parse_to_their_format(name: str, want: Format) -> None:
    assert parse_format(name) == want
    assert format_family(name).name == want.family


def test_every_known_format_parses_to_one_family_and_float_comes_last() -> None:
    assert KNOWN_FORMATS[-1] == "float" and len(set(KNOWN_FORMATS)) == len(KNOWN_FORMATS) == 26
    by_family: dict[str, list[str]] = {}
    for name in KNOWN_FORMATS:
        by_family.setdefault(parse_format(name).family, []).append(name)
    assert {k: len(v) for k, v in by_family.items()} == {
        "intB": 7,
        "intB-w": 7,
        "intB-d": 7,
        "intB-bK": 2,
        "uintB-bK": 2,
        "float": 1,
    }
    assert FORMAT_GRAMMAR.startswith("float, intB (B = 2..8") and FORMAT_GRAMMAR.count("intB") == 5


@pytest.mark.parametrize(
    ("name", "match"),
    [
        ("int9", r"unknown format 'int9'; allowed: float, intB"),
        ("int1", r"unknown format 'int1'"),
        ("fp16", r"unknown format 'fp16'"),
        ("Float", r"unknown format 'Float'"),
        ("int4-x", r"unknown format 'int4-x'"),
        ("int4-b8", r"format 'int4-b8': block size 8 must be a power of two >= 16"),
        ("int4-b48", r"format 'int4-b48': block size 48 must be a power of two >= 16"),
        (4, r"unknown format 4"),
    ],
)
def test_bad_names_are_errors_naming_them(name: str, match: str) -> None:
    with pytest.raises(UsageError, match=match):
        parse_format(name)
    assert not is_format(name)


@pytest.mark.parametrize(
    ("fmt", "packed", "container"),
    [
        ("int2", 2, 8),
        ("int3", 4, 8),
        ("int4", 4, 8),
        ("int5", 8, 8),
        ("int8", 8, 8),
        ("int4-w", 4, 8),
        ("int4-b32", 4, 8),
        ("int4-d", 8, 8),  # MatMulInteger reads int8 whatever the storage
        ("int8-d", 8, 8),
        ("float", 32, 32),
    ],
)
def test_storage_bits(fmt: str, packed: int, container: int) -> None:
    assert storage_bits(fmt) == packed
    assert storage_bits(fmt, storage="container") == container
    # Before opset 25 there is no INT2: int2 is packed as INT4.
    assert storage_bits(fmt, opset=21) == (4 if fmt == "int2" else packed)


def test_scales_per_channel_and_per_block() -> None:
    fc = LayerInfo("fc", "linear", (8, 40), params=320)
    assert scale_count(fc, "int4") == scale_count(fc, "int4-w") == scale_count(fc, "int4-d") == 8
    assert scale_count(fc, "int4-b32") == 8 * 2  # 40 inputs: one full block of 32 and a partial one
    assert scale_count(fc, "int4-b16") == 8 * 3


def test_size_of_a_conv_by_hand() -> None:
    scales = 32 * 4  # one float32 scale per output channel
    assert layer_cost(CONV, "int4") == 4608 / 2 + scales == 2432
    assert layer_cost(CONV, "int2") == 4608 / 4 + scales  # INT2 at the default opset 25
    assert layer_cost(CONV, "int2", opset=21) == 2432  # packed into INT4 before opset 25
    assert layer_cost(CONV, "int4", storage="container") == 4608 + scales
    assert layer_cost(CONV, "int8") == layer_cost(CONV, "int4-d") == 4608 + scales
    assert layer_cost(CONV, "float") == 4608 * 4
    odd = LayerInfo("fc", "linear", (3, 5), params=15)
    assert layer_cost(odd, "int4") == 8 + 3 * 4  # 7.5 bytes round up to whole bytes
    fc = LayerInfo("fc", "linear", (8, 64), params=512)
    assert layer_cost(fc, "int4-b32") == 512 / 2 + 8 * 2 * 4


def test_bops_by_hand() -> None:
    macs = CONV.macs
    assert layer_cost(CONV, "int4", cost="bops") == macs * 4 * 8
    assert layer_cost(CONV, "int8", cost="bops") == macs * 8 * 8
    assert layer_cost(CONV, "int4-w", cost="bops") == macs * 4 * 32  # weight-only: float activations
    assert layer_cost(CONV, "int4-d", cost="bops", activation_bits=16) == macs * 4 * 8  # run-time uint8
    assert layer_cost(CONV, "float", cost="bops") == macs * 32 * 32
    assert layer_cost(CONV, "int4", cost="bops", activation_bits=16) == macs * 4 * 16
    # Nominal bits: int4 in an int8 container still counts 4.
    assert layer_cost(CONV, "int4", cost="bops", storage="container") == macs * 4 * 8


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"fmt": "int9"}, r"unknown format 'int9'; allowed: float, intB"),
        ({"fmt": "fp16"}, r"unknown format 'fp16'"),
        ({"fmt": "int4", "cost": "latency"}, r"unknown cost model 'latency'; allowed: size, bops"),
        ({"fmt": "int4", "storage": "nibbles"}, r"unknown storage 'nibbles'; allowed: packed, container"),
        ({"fmt": "int4", "cost": "bops", "activation_bits": 0}, r"activation_bits must be in 1\.\.32"),
    ],
)
def test_layer_cost_bad_input(kwargs: dict[str, object], match: str) -> None:
    fmt = kwargs.pop("fmt")
    with pytest.raises(UsageError, match=match):
        layer_cost(CONV, fmt, **kwargs)  # type: ignore[arg-type]


LAYERS = {
    "linear": LayerInfo("a", "linear", (10, 64), params=640),
    "conv1d": LayerInfo("b", "conv1d", (8, 4, 3), params=96),
    "conv2d": CONV,
    "mha_in_proj": LayerInfo("d", "mha_in_proj", (24, 8), params=192),
    "embedding": LayerInfo("e", "embedding", (100, 8), params=800),
    "hf_conv1d": LayerInfo("f", "hf_conv1d", (5, 3), params=15),
}
#: Per kind, whether it takes (float, int8, int8-w, int8-d, int4-b32).
TAKES = {
    "linear": (True, True, True, True, True),
    "conv1d": (True, True, True, False, False),
    "conv2d": (True, True, True, False, False),
    "mha_in_proj": (True, True, True, True, True),
    "embedding": (True, False, True, False, True),  # ids in: weight-only formats
    "hf_conv1d": (True, True, True, True, True),
}


@pytest.mark.parametrize("kind", sorted(TAKES))
def test_supports_per_kind(kind: str) -> None:
    got = tuple(supports(LAYERS[kind], f) for f in ("float", "int8", "int8-w", "int8-d", "int4-b32"))
    assert got == TAKES[kind]


def test_the_kind_table_and_its_views() -> None:
    assert [k.name for k in kinds()][:6] == list(TAKES)
    assert set(ACTIVATION_KINDS) == {"linear", "conv1d", "conv2d", "mha_in_proj", "hf_conv1d"}
    assert set(MATMUL_KINDS) == {"linear", "mha_in_proj", "hf_conv1d"}
    assert "embedding" not in ACTIVATION_KINDS and 3 not in ACTIVATION_KINDS
    with pytest.raises(UsageError, match=r"unknown layer kind 'lstm'; registered: linear, conv1d"):
        layer_kind("lstm")
    with pytest.raises(UsageError, match=r"unknown layer kind 'lstm'"):
        supports(LayerInfo("x", "lstm", (4, 4), params=16), "int8")
    # Registering an equal record again is a no-op; a different one under the name is an error.
    register_kind(layer_kind("linear"))
    with pytest.raises(UsageError, match=r"layer kind 'linear' is already registered"):
        register_kind(LayerKind("linear", activations=False, matmul_only=False, matrix=True))


def test_unsupported_reasons_name_what_the_layer_can_take() -> None:
    emb, conv = LAYERS["embedding"], LAYERS["conv2d"]
    assert unsupported_reason(emb, "int8-w") is None
    assert unsupported_reason(emb, "int8") == (
        "its input is not an activation; allowed: "
        "int2-w, int3-w, int4-w, int5-w, int6-w, int7-w, int8-w, int4-b32, int8-b32, uint4-b32, uint8-b32, "
        "float"
    )
    assert unsupported_reason(conv, "int8-d").startswith("dynamic formats are for MatMul/Gemm")  # type: ignore[union-attr]
    assert "block formats need a 2-D weight, it has (32, 16, 3, 3)" in unsupported_reason(conv, "int4-b32")  # type: ignore[operator]


@pytest.mark.parametrize(
    ("family", "match"),
    [
        (FormatFamily("intB", r"int(?P<bits>[2-8])", "again"), r"'intB' is already registered"),
        (FormatFamily("", r"x(?P<bits>[2-8])", "no name"), r"needs a non-empty name"),
        (FormatFamily("bad", r"x(", "x"), r"bad pattern"),
        (FormatFamily("nobits", r"x", "x", ("x",)), r"needs a 'bits' group"),
        (FormatFamily("dup", r"int(?P<bits>[2-8])", "dup", ("int4",)), r"'int4' must parse to it alone"),
        (FormatFamily("wide", r"w(?P<bits>\d+)", "wide", ("w16",)), r"'w16' has 16 bits"),
    ],
)
def test_bad_family_registrations_are_refused(family: FormatFamily, match: str) -> None:
    before = KNOWN_FORMATS
    with pytest.raises(UsageError, match=match):
        register_family(family)
    assert parse_format("int4").family == "intB" and not is_format("x") and before == KNOWN_FORMATS


def test_importing_formats_imports_no_torch() -> None:
    code = "import sys, hawqtool.formats; print(sorted({'torch', 'onnx', 'numpy'} & set(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stdout) == (0, "[]\n"), done.stderr
