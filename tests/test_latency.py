"""Measured latency (:mod:`hawqtool.latency`): the table and its cost model, pooling, paired timings,
and :func:`measure_latency` on a real exported model. Speed is never asserted: real-clock tests check
structure; known answers come from a virtual clock that advances by a fixed time per allocation."""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from hawqtool import latency
from hawqtool.errors import UsageError
from hawqtool.export import METADATA_ALLOCATION, QDQExporter
from hawqtool.frontier import pareto_frontier
from hawqtool.latency import (
    LatencyEntry,
    LatencySettings,
    LatencyTable,
    Timing,
    kernel_signature,
    latency_pairs,
    measure_latency,
    pool_deltas,
    predicted_latency,
    time_interleaved,
)
from hawqtool.options import build_options
from hawqtool.prepare import prepare_model
from hawqtool.types import LayerInfo, LayerTrace, SensitivityTable


def _traces(layers: tuple[LayerInfo, ...]) -> SensitivityTable:
    rows = tuple(LayerTrace(x.fqn, float(x.params), 1.0, 0.0, 2, True, x.params) for x in layers)
    return SensitivityTable(rows, 0, "cpu", 0.05, 0, 0.0)


class TinyMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(64, 96)
        self.fc2 = nn.Linear(96, 64)
        self.head = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.fc2(torch.relu(self.fc1(x.flatten(1))))))


@pytest.fixture(scope="module")
def exported():  # type: ignore[no-untyped-def]
    """The tiny MLP with ``head`` pinned to float, its exporter (built once: export takes seconds)
    and a batch to time."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    batches = [(torch.randn(32, 64, generator=gen), torch.randint(0, 10, (32,), generator=gen))]
    prepared = prepare_model(TinyMLP().eval(), batches[0][0], pins={"head": "float"})
    return prepared, QDQExporter.build(prepared, batches), {"input": batches[0][0].numpy()}


# --------------------------------------------------------------------------------------------
# The table, its cost model, pooling
# --------------------------------------------------------------------------------------------


def _table() -> LatencyTable:
    entries = {
        "a": {
            "float": LatencyEntry(0.0, 0.0),
            "int8": LatencyEntry(-0.5, 0.01),
            "int8-w": LatencyEntry(0.2, 0.01),
        },
        "b": {"float": LatencyEntry(0.0, 0.0), "int8": LatencyEntry(0.25, 0.01)},
    }
    return LatencyTable(
        2.0, 0.01, {"a": 1.5, "b": 0.5}, entries, "cpu", 2, {"input": (8, 4)}, "both", 10, 1.0, "fp"
    )


def test_predicted_latency_and_pairs_have_known_answers() -> None:
    t = _table()
    assert predicted_latency(t, {"a": "int8", "b": "int8"}) == pytest.approx(1.75)
    assert predicted_latency(t, {"a": "float", "b": "float"}) == 2.0
    assert latency_pairs(t, [({"a": "int8-w", "b": "float"}, 2.3)]) == [(pytest.approx(2.2), 2.3)]
    model = t.cost_model()
    a = LayerInfo("a", "linear", (4, 4), params=16)
    # Σ layer costs of an allocation is its predicted latency; costs may be negative.
    assert (model.name, model.unit) == ("latency", "ms")
    assert model.layer_cost(a, "int8") == pytest.approx(1.0)
    assert model.fingerprint() == "latency/fp"
    with pytest.raises(
        UsageError,
        match=r"format 'int4' of layer 'a' has no latency measurement; measured: float, int8, int8-w",
    ):
        model.layer_cost(a, "int4")
    assert LatencyTable.from_dict(t.to_dict()) == t


def _same_kernels(n: int, **kw: Any) -> list[LayerInfo]:
    return [LayerInfo(f"l{i}", "linear", (8, 8), params=64, macs=64, **kw) for i in range(n)]


def test_pooling_deltas_of_layers_with_one_kernel_removes_noise_not_differences() -> None:
    rng = np.random.default_rng(0)
    layers, se = _same_kernels(12), 0.1
    # Same true delta (-0.2 ms) everywhere, measured with noise se: pooling leaves the mean and
    # cuts each layer's error; its standard errors stay honest.
    raw_err, pooled_err, covered = [], [], 0
    for _ in range(200):
        raw = {
            x.fqn: {
                "float": LatencyEntry(0.0, 0.0),
                "int8": LatencyEntry(-0.2 + se * rng.standard_normal(), se),
            }
            for x in layers
        }
        pooled = pool_deltas(raw, layers)
        for x in layers:
            e = pooled[x.fqn]["int8"]
            raw_err.append(raw[x.fqn]["int8"].delta_ms + 0.2)
            pooled_err.append(e.delta_ms + 0.2)
            covered += abs(e.delta_ms + 0.2) <= 2 * e.stderr_ms
            assert (e.measured_ms, e.measured_stderr_ms) == (raw[x.fqn]["int8"].delta_ms, se)
            assert pooled[x.fqn]["float"] == LatencyEntry(0.0, 0.0)
    rms = lambda v: math.sqrt(float(np.mean(np.square(v))))  # noqa: E731
    assert rms(pooled_err) < 0.5 * rms(raw_err)
    assert covered / len(pooled_err) > 0.9
    # True deltas 1 ms apart, noise 0.01 ms: each layer keeps its own measurement.
    truth = np.linspace(-1.0, 1.0, len(layers))
    raw = {
        x.fqn: {"int8": LatencyEntry(float(t + 0.01 * rng.standard_normal()), 0.01)}
        for x, t in zip(layers, truth, strict=True)
    }
    for x in layers:
        assert pool_deltas(raw, layers)[x.fqn]["int8"].delta_ms == pytest.approx(
            raw[x.fqn]["int8"].delta_ms, abs=1e-3
        )
    # Other kernels, pinned layers and a layer alone in its signature are not pooled.
    other = LayerInfo("wide", "linear", (16, 8), params=128, macs=128)
    pinned = _same_kernels(1, pinned="int8")[0]
    two = _same_kernels(2)
    raw = {
        "l0": {"int8": LatencyEntry(-0.25, 0.1)},
        "l1": {"int8": LatencyEntry(-0.15, 0.1), "int8-w": LatencyEntry(0.2, 0.1)},
        "wide": {"int8": LatencyEntry(0.5, 0.1)},
    }
    assert kernel_signature(other) != kernel_signature(two[0]) == kernel_signature(pinned)
    pooled = pool_deltas(raw, [*two, other])
    assert pooled["wide"] == raw["wide"] and pooled["l1"]["int8-w"] == raw["l1"]["int8-w"]
    assert pooled["l0"]["int8"].delta_ms == pooled["l1"]["int8"].delta_ms == pytest.approx(-0.2)
    assert pool_deltas(raw, [dataclasses.replace(two[0], pinned="int8"), two[1]]) == raw
    # The table keeps the measurements: unpooled() gives them back, and they survive the cache.
    t = dataclasses.replace(_table(), entries=pooled)
    assert t.unpooled().entries["l0"]["int8"] == LatencyEntry(-0.25, 0.1)
    assert LatencyTable.from_dict(t.to_dict()) == t


def test_bad_settings_name_what_is_allowed(exported) -> None:  # type: ignore[no-untyped-def]
    _, exporter, feeds = exported
    with pytest.raises(UsageError, match=r"unknown latency context 'mixed'; allowed: float, quantized, both"):
        LatencySettings(context="mixed")
    with pytest.raises(UsageError, match=r"unknown clock 'gpu'; allowed: wall, cpu"):
        LatencySettings(clock="gpu")
    with pytest.raises(UsageError, match=r"need runs >= 4"):
        LatencySettings(runs=2)
    with pytest.raises(UsageError, match=r"threads must be an integer >= 1"):
        LatencySettings(threads=0)
    with pytest.raises(UsageError, match=r"unknown execution provider 'tpu'; allowed: cpu, cuda, tensorrt"):
        LatencySettings(provider="tpu")
    with pytest.raises(UsageError, match=r"bad candidate formats \['int9'\]"):
        measure_latency(exporter, feeds, formats=("int9", "float"))


# --------------------------------------------------------------------------------------------
# measure_latency: known answers on a virtual clock
# --------------------------------------------------------------------------------------------

#: Seconds a layer's format adds to one run of the virtual clock (float adds nothing). Formats
#: with one graph (int7 / int8, every intB-d) add the same; dyadic values keep the sums exact.
ADDS = {"fc1": {"int8": 0.25, "int8-d": -0.5}, "fc2": {"int8": 0.125, "int8-d": 0.75}}
SAME_GRAPH = {"int7": "int8", "int6-d": "int8-d"}


class VirtualClock:
    """A clock that stands still except while a session runs, which takes 1 s plus what its
    allocation's formats add (:data:`ADDS`): every timing, and so every delta, is known."""

    def __init__(self) -> None:
        self.now = 0.0
        self.sessions = 0

    def __call__(self) -> float:
        return self.now

    def session(self, real: Any) -> Any:
        clock = self

        def make_session(model: bytes | onnx.ModelProto, **kw: Any) -> Any:
            clock.sessions += 1
            session = real(model, **kw)
            proto = model if isinstance(model, onnx.ModelProto) else onnx.ModelProto.FromString(model)
            props = {p.key: p.value for p in proto.metadata_props}
            allocation: Mapping[str, str] = json.loads(props[METADATA_ALLOCATION])
            seconds = 1.0 + sum(ADDS.get(f, {}).get(SAME_GRAPH.get(k, k), 0.0) for f, k in allocation.items())

            class Timed:
                def run(self, *args: Any) -> Any:
                    out = session.run(*args)
                    clock.now += seconds
                    return out

            return Timed()

        return make_session


@pytest.mark.parametrize(("context", "sessions"), [("float", 5), ("quantized", 6), ("both", 10)])
def test_measured_deltas_have_known_answers_on_a_virtual_clock(
    exported, monkeypatch, context, sessions
) -> None:  # type: ignore[no-untyped-def]
    prepared, exporter, feeds = exported
    clock = VirtualClock()
    monkeypatch.setitem(latency.CLOCKS, "virtual", clock)
    monkeypatch.setattr(latency, "make_session", clock.session(latency.make_session))
    settings = LatencySettings(threads=1, runs=4, warmup=1, clock="virtual", context=context)
    formats = ("int8", "int7", "int8-d", "int6-d", "float")
    t = measure_latency(exporter, feeds, formats=formats, settings=settings)
    # Formats with one graph are timed once: float context, the float model and int8 and int8-d
    # of fc1 and fc2 (head is pinned); quantized, the int8 model, float and int8-d of each layer,
    # and the float model alone; both, the two.
    assert clock.sessions == sessions
    assert (t.float_ms, t.float_stderr_ms, t.context, t.clock) == (1000.0, 0.0, context, "virtual")
    # Every context measures what each format adds to the float model, exactly (the clock is
    # additive); nothing to pool (no standard error).
    assert {f: dict(row) for f, row in t.entries.items()} == {
        f: {
            k: LatencyEntry(1e3 * ADDS[f][SAME_GRAPH.get(k, k)] if k != "float" else 0.0, 0.0)
            for k in formats
        }
        for f in ("fc1", "fc2")
    } | {"head": {"float": LatencyEntry(0.0, 0.0)}}
    # Base shares by MACs (6144, 6144, 640), summing to the float latency.
    assert dict(t.base_ms) == pytest.approx(
        {"fc1": 6144e3 / 12928, "fc2": 6144e3 / 12928, "head": 640e3 / 12928}
    )
    allocation = {"fc1": "int8-d", "fc2": "int7", "head": "float"}
    assert t.predict(allocation) == 1000.0 - 500.0 + 125.0
    model = t.cost_model()
    assert math.fsum(model.layer_cost(prepared.info(f), k) for f, k in allocation.items()) == pytest.approx(
        625.0
    )


def test_the_table_is_reproducible_cached_and_a_cost_model(exported, monkeypatch, tmp_path) -> None:  # type: ignore[no-untyped-def]
    prepared, exporter, feeds = exported
    clock = VirtualClock()
    monkeypatch.setitem(latency.CLOCKS, "virtual", clock)
    monkeypatch.setattr(latency, "make_session", clock.session(latency.make_session))
    formats = ("int4", "int8", "int8-w", "float")
    settings = LatencySettings(threads=1, runs=4, clock="virtual", context="float")
    first = measure_latency(exporter, feeds, formats=formats, settings=settings, cache_dir=tmp_path)
    timed = clock.sessions
    again = measure_latency(exporter, feeds, formats=formats, settings=settings, cache_dir=tmp_path)
    assert again == first and clock.sessions == timed  # loaded from the cache, nothing timed
    second = measure_latency(exporter, feeds, formats=formats, settings=settings)
    assert dataclasses.replace(second, seconds=first.seconds) == first
    other = measure_latency(exporter, feeds, formats=formats, settings=dataclasses.replace(settings, runs=5))
    assert other.fingerprint != first.fingerprint
    options = build_options(
        prepared.layers,
        _traces(prepared.layers),
        dict(zip(prepared.fqns, prepared.weights(), strict=True)),
        formats=formats,
        cost=first.cost_model(),
    )
    assert options.cost_model == "latency"
    assert options.option("fc1", "int8").cost == pytest.approx(first.base_ms["fc1"] + 250.0)
    assert options.option("head", "float").cost == first.base_ms["head"]  # pinned: its float share
    assert pareto_frontier(options).float_cost == pytest.approx(first.float_ms)


# --------------------------------------------------------------------------------------------
# Real clocks: structure only
# --------------------------------------------------------------------------------------------


def test_a_real_measurement_has_the_known_structure(exported) -> None:  # type: ignore[no-untyped-def]
    prepared, exporter, feeds = exported
    settings = LatencySettings(threads=1, runs=4, clock="cpu")
    t = measure_latency(exporter, feeds, formats=("int8", "int8-d", "int6-d", "float"), settings=settings)
    assert set(t.entries) == set(prepared.fqns)
    assert set(t.entries["fc1"]) == set(t.entries["fc2"]) == {"int8", "int8-d", "int6-d", "float"}
    assert dict(t.entries["head"]) == {"float": LatencyEntry(0.0, 0.0)}  # pinned: nothing measured
    for row in t.entries.values():
        assert row["float"] == LatencyEntry(0.0, 0.0)
        assert all(math.isfinite(e.delta_ms) and e.stderr_ms >= 0 for e in row.values())
    assert t.entries["fc1"]["int6-d"] == t.entries["fc1"]["int8-d"]  # one graph, one measurement
    assert t.float_ms > 0 and math.fsum(t.base_ms.values()) == pytest.approx(t.float_ms)
    assert t.predict(dict.fromkeys(prepared.fqns, "float")) == t.float_ms


def test_time_interleaved_pairs_rounds_of_real_sessions(exported) -> None:  # type: ignore[no-untyped-def]
    _, exporter, feeds = exported
    models = {
        "float": exporter.float_model.SerializeToString(),
        "int8": exporter.quantized_model({"fc1": "int8", "fc2": "int8"}).SerializeToString(),
    }
    got = time_interleaved(models, feeds, threads=1, rounds=3, runs=2, clock="cpu")
    assert list(got) == ["float", "int8"]
    for t in got.values():
        assert len(t.rounds_ms) == 3 and t.median_ms == sorted(t.rounds_ms)[1] and t.stderr_ms >= 0
    d, se = got["int8"].minus(got["float"])
    pairs = [a - b for a, b in zip(got["int8"].rounds_ms, got["float"].rounds_ms, strict=True)]
    assert d == sorted(pairs)[1] and se >= 0
    with pytest.raises(UsageError, match=r"different rounds"):
        got["int8"].minus(Timing(1.0, 0.0, (1.0, 1.0, 1.0, 1.0)))
    with pytest.raises(UsageError, match=r"need rounds >= 3"):
        time_interleaved(models, feeds, rounds=2)
    with pytest.raises(UsageError, match=r"unknown clock"):
        time_interleaved(models, feeds, clock="gpu")


def test_timing_verdicts_have_known_answers() -> None:
    a, b = Timing.of_rounds([1.0, 1.0, 1.0]), Timing.of_rounds([2.0, 2.0, 2.0])
    assert a.compare(b) == (-1.0, 0.0, "faster") and b.compare(a) == (1.0, 0.0, "slower")
    noisy = Timing.of_rounds([1.0, 3.0, 1.5, 2.5, 2.0])
    diff, se, verdict = noisy.compare(Timing.of_rounds([2.0] * 5))
    assert (diff, verdict) == (0.0, "within noise") and se > 0
