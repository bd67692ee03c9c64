"""Measured latency: per-layer latency tables, the latency cost model, and paired timings of models.

A latency table says, per layer and format, how many milliseconds that format adds to the exported
model (negative when an integer kernel beats the float one). Each layer's cost is its share of the
float latency (by MACs) plus its delta, so Σ cost over an allocation is the model's predicted latency
and the frontier can use it like any other cost model (:meth:`LatencyTable.cost_model`). Timings are
paired and interleaved with a reference, so load from other processes hits both alike.

This module sits above :mod:`hawqtool.export` and :mod:`hawqtool.evaluate`: it times the exporter's
models in onnxruntime sessions.

Example:
    >>> t = LatencyTable(1.0, 0.01, {"a": 1.0}, {"a": {"float": LatencyEntry(0, 0),
    ...     "int8": LatencyEntry(-0.25, 0.01)}}, "cpu", 2, {"input": (1, 4)}, "float", 10, 0.0, "")
    >>> predicted_latency(t, {"a": "int8"}), predicted_latency(t, {"a": "float"})
    (0.75, 1.0)
"""

from __future__ import annotations

import hashlib
import json
import math
import statistics
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from tqdm.auto import tqdm

from hawqtool.cache import load_cached, settings_key
from hawqtool.errors import ExportError, UsageError
from hawqtool.evaluate import PROVIDERS, make_session
from hawqtool.export import QDQExporter
from hawqtool.files import write_json_atomic
from hawqtool.formats import (
    FLOAT,
    check_choice,
    format_grammar,
    is_format,
    parse_format,
    quantizes_nothing,
    supports,
)
from hawqtool.types import LayerInfo

if TYPE_CHECKING:
    import onnx
    import onnxruntime

#: Version of the measurement; part of the cache key.
LATENCY_SCHEDULE = "paired-interleaved/v4"
#: :attr:`LatencySettings.context`: the reference each layer's variants are timed against.
LATENCY_CONTEXTS = ("float", "quantized", "both")
#: :attr:`LatencySettings.clock`: ``wall`` (latency) or ``cpu`` (the process's CPU time: blind to
#: other processes on a loaded machine; with more than one thread it adds the workers' time).
CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.process_time}
# A normal distribution's median has a standard error 1.2533 σ/√n; σ from the MAD (× 1.4826) so a
# few stalls from other processes do not inflate it.
_MEDIAN_SE = 1.2533 * 1.4826


# --------------------------------------------------------------------------------------------
# The table and the cost model
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LatencyEntry:
    """The latency one layer's format adds to the model, in milliseconds, with its standard error.

    ``measured_ms`` / ``measured_stderr_ms`` are the layer's own measurement when ``delta_ms`` was
    pooled with the layers that run the same kernels (:func:`pool_deltas`); ``None`` when not.
    """

    delta_ms: float
    stderr_ms: float
    measured_ms: float | None = None
    measured_stderr_ms: float | None = None


@dataclass(frozen=True)
class LatencyTable:
    """Measured per-layer latency deltas of one exported model on one EP, batch shape and thread count.

    Attributes:
        float_ms: median latency of the all-float model (one ``session.run`` on the batch).
        float_stderr_ms: its standard error.
        base_ms: each layer's share of ``float_ms`` (by MACs; equal shares when no layer has MACs),
            summing to ``float_ms``: a layer's cost is ``base_ms + delta_ms``.
        entries: ``fqn -> format ->`` :class:`LatencyEntry`; ``float`` is 0 ± 0.
        provider: the execution provider (short name, :data:`hawqtool.evaluate.PROVIDERS`).
        threads: onnxruntime intra-op threads.
        shapes: the timed batch, input name -> shape.
        context: the reference the deltas were measured against (:data:`LATENCY_CONTEXTS`).
        runs: paired runs per variant.
        seconds: wall time of the measurement.
        fingerprint: the cache key (model, calibration, storage, formats, EP, shapes, threads, ...).
        clock: ``wall`` or ``cpu`` (:data:`CLOCKS`).
    """

    float_ms: float
    float_stderr_ms: float
    base_ms: Mapping[str, float]
    entries: Mapping[str, Mapping[str, LatencyEntry]]
    provider: str
    threads: int
    shapes: Mapping[str, tuple[int, ...]]
    context: str
    runs: int
    seconds: float
    fingerprint: str
    clock: str = "wall"

    def entry(self, fqn: str, fmt: str) -> LatencyEntry:
        """The measured entry of one layer and format.

        Raises:
            UsageError: a layer or format that was not measured, naming what was.
        """
        if fqn not in self.entries:
            raise UsageError(f"layer {fqn!r} has no latency measurement; measured: {', '.join(self.entries)}")
        row = self.entries[fqn]
        if fmt not in row:
            raise UsageError(
                f"format {fmt!r} of layer {fqn!r} has no latency measurement; measured: {', '.join(row)}"
            )
        return row[fmt]

    def delta(self, fqn: str, fmt: str) -> float:
        """Milliseconds ``fmt`` adds to (or, negative, saves from) the float model at ``fqn``."""
        return self.entry(fqn, fmt).delta_ms

    def predict(self, allocation: Mapping[str, str]) -> float:
        """Predicted latency (ms) of an allocation: float latency + Σ deltas (unnamed layers float)."""
        return self.float_ms + math.fsum(self.delta(f, fmt) for f, fmt in allocation.items())

    def unpooled(self) -> LatencyTable:
        """The table of each layer's own measurements, before :func:`pool_deltas`."""
        entries = {
            f: {
                k: e if e.measured_ms is None else LatencyEntry(e.measured_ms, e.measured_stderr_ms or 0.0)
                for k, e in row.items()
            }
            for f, row in self.entries.items()
        }
        return replace(self, entries=entries)

    def cost_model(self) -> LatencyCost:
        """This table as a :class:`hawqtool.costs.CostModel` named ``latency``
        (``build_options(..., cost=table.cost_model())``)."""
        return LatencyCost(self)

    def to_dict(self) -> dict[str, Any]:
        return {
            "float_ms": self.float_ms,
            "float_stderr_ms": self.float_stderr_ms,
            "base_ms": dict(self.base_ms),
            "entries": {f: {k: asdict(e) for k, e in row.items()} for f, row in self.entries.items()},
            "provider": self.provider,
            "threads": self.threads,
            "shapes": {k: list(v) for k, v in self.shapes.items()},
            "context": self.context,
            "runs": self.runs,
            "seconds": self.seconds,
            "fingerprint": self.fingerprint,
            "clock": self.clock,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> LatencyTable:
        return cls(
            float_ms=float(d["float_ms"]),
            float_stderr_ms=float(d["float_stderr_ms"]),
            base_ms={k: float(v) for k, v in d["base_ms"].items()},
            entries={f: {k: LatencyEntry(**e) for k, e in row.items()} for f, row in d["entries"].items()},
            provider=str(d["provider"]),
            threads=int(d["threads"]),
            shapes={k: tuple(v) for k, v in d["shapes"].items()},
            context=str(d["context"]),
            runs=int(d["runs"]),
            seconds=float(d["seconds"]),
            fingerprint=str(d["fingerprint"]),
            clock=str(d.get("clock", "wall")),
        )


@dataclass(frozen=True)
class LatencyCost:
    """Measured latency as a cost model: ``layer_cost = base_ms + delta_ms`` (may be negative).

    The measured counterpart of the ``latency`` model in :mod:`hawqtool.costs`' registry, which has
    a name and a unit but no costs.
    """

    table: LatencyTable
    name: str = field(default="latency", init=False)
    unit: str = field(default="ms", init=False)

    def layer_cost(self, layer: LayerInfo, fmt: str) -> float:
        return self.table.base_ms.get(layer.fqn, 0.0) + self.table.delta(layer.fqn, fmt)

    def fingerprint(self) -> str:
        return f"latency/{self.table.fingerprint}"


def predicted_latency(table: LatencyTable, allocation: Mapping[str, str]) -> float:
    """Predicted latency (ms) of an allocation: the float model's plus each layer's delta."""
    return table.predict(allocation)


def latency_pairs(
    table: LatencyTable, measured: Iterable[tuple[Mapping[str, str], float]]
) -> list[tuple[float, float]]:
    """``(predicted ms, measured ms)`` per measured allocation, ready for a scatter plot.

    Args:
        table: the latency table the frontier was built on.
        measured: ``(allocation, measured latency in ms)`` pairs, e.g. every search probe timed by
            :func:`hawqtool.evaluate.evaluate_onnx` on the same batch shape, EP and threads.
    """
    return [(table.predict(alloc), float(ms)) for alloc, ms in measured]


def kernel_signature(layer: LayerInfo) -> tuple[Any, ...]:
    """What decides which kernels a layer runs, and on how much data: its kind, weight shape and
    MACs per sample. Layers with one signature (a transformer's attention projections, a ResNet
    stage's convolutions) run the same kernels on the same shapes."""
    return (layer.kind, tuple(layer.weight_shape), int(layer.macs))


def pool_deltas(
    entries: Mapping[str, Mapping[str, LatencyEntry]], layers: Sequence[LayerInfo]
) -> dict[str, dict[str, LatencyEntry]]:
    """Shrink each layer's measured delta toward the mean of the layers with its kernel signature.

    One layer's delta is the difference of two noisy timings, and a search that picks the format
    with the lowest delta per layer picks noise as well as speed. Layers with one
    :func:`kernel_signature` run the same kernels, so per (signature, format) this is the
    random-effects estimate: the between-layer variance τ² by DerSimonian–Laird, the
    precision-weighted mean m, and each delta moved toward m by ``s² / (s² + τ²)``. Deltas that
    differ by more than their noise keep their difference; deltas that differ by noise alone become
    their group's mean. A layer alone in its signature, pinned, or without a standard error is kept.

    Returns:
        The entries with ``delta_ms`` / ``stderr_ms`` pooled and the measurement in
        ``measured_ms`` / ``measured_stderr_ms`` (for every pooled entry).

    Example:
        >>> a, b = (LayerInfo(n, "linear", (4, 4), params=16, macs=16) for n in "ab")
        >>> raw = {"a": {"int8": LatencyEntry(-0.25, 0.1)}, "b": {"int8": LatencyEntry(-0.15, 0.1)}}
        >>> [round(r["int8"].delta_ms, 3) for r in pool_deltas(raw, [a, b]).values()]
        [-0.2, -0.2]
    """
    out = {f: dict(row) for f, row in entries.items()}
    groups: dict[tuple[Any, ...], list[str]] = {}
    for layer in layers:
        if layer.fqn in entries and not layer.pinned:
            groups.setdefault(kernel_signature(layer), []).append(layer.fqn)
    for fqns in groups.values():
        for fmt in {k for f in fqns for k in entries[f]} - {FLOAT}:
            members = [f for f in fqns if fmt in entries[f] and entries[f][fmt].stderr_ms > 0]
            if len(members) < 2:
                continue
            d = np.array([entries[f][fmt].delta_ms for f in members])
            v = np.array([entries[f][fmt].stderr_ms for f in members]) ** 2
            w = 1.0 / v
            fixed = float(np.sum(w * d) / np.sum(w))
            q = float(np.sum(w * (d - fixed) ** 2))
            tau2 = max(0.0, (q - (len(d) - 1)) / float(np.sum(w) - np.sum(w**2) / np.sum(w)))
            wr = 1.0 / (v + tau2)
            mean = float(np.sum(wr * d) / np.sum(wr))
            mean_var = 1.0 / float(np.sum(wr))
            keep = tau2 / (tau2 + v)  # the weight left on the layer's own measurement
            for k, f in enumerate(members):
                e = entries[f][fmt]
                out[f][fmt] = LatencyEntry(
                    delta_ms=float(mean + keep[k] * (d[k] - mean)),
                    stderr_ms=math.sqrt(float(keep[k] * v[k] + (1 - keep[k]) ** 2 * mean_var)),
                    measured_ms=e.delta_ms,
                    measured_stderr_ms=e.stderr_ms,
                )
    return out


# --------------------------------------------------------------------------------------------
# Timing sessions
# --------------------------------------------------------------------------------------------


class _Timer:
    """Times sessions on one batch: paired, interleaved runs against a reference session."""

    def __init__(self, feeds: Mapping[str, np.ndarray], *, runs: int, clock: str) -> None:
        self.feeds = {k: np.ascontiguousarray(v) for k, v in feeds.items()}
        self.runs = runs
        self.clock = CLOCKS[clock]

    def once(self, session: onnxruntime.InferenceSession) -> float:
        t = self.clock()
        try:
            session.run(None, self.feeds)
        except Exception as e:  # onnxruntime's pybind errors share only Exception
            raise ExportError(f"onnxruntime failed to run a latency variant: {e}") from e
        return 1e3 * (self.clock() - t)

    def paired(
        self, ref: onnxruntime.InferenceSession, var: onnxruntime.InferenceSession, runs: int
    ) -> tuple[list[float], list[float]]:
        """(reference times, variant − reference differences), in ms, over ``runs`` pairs, the
        order alternating."""
        ref_t, diffs = [], []
        for r in range(runs):
            if r % 2:
                tv, tr = self.once(var), self.once(ref)
            else:
                tr, tv = self.once(ref), self.once(var)
            ref_t.append(tr)
            diffs.append(tv - tr)
        return ref_t, diffs


def _median_se(values: Sequence[float]) -> tuple[float, float]:
    med = statistics.median(values)
    mad = statistics.median(abs(v - med) for v in values)
    return med, _MEDIAN_SE * mad / math.sqrt(len(values))


@dataclass(frozen=True)
class Timing:
    """End-to-end latency of one model, timed in rounds interleaved with other models'.

    Attributes:
        median_ms: median over rounds of each round's median time of one ``session.run``.
        stderr_ms: its standard error (from the rounds' spread, robust to a few stalls).
        rounds_ms: each round's median, in round order (paired with the other models' rounds).
    """

    median_ms: float
    stderr_ms: float
    rounds_ms: tuple[float, ...]

    @classmethod
    def of_rounds(cls, rounds_ms: Sequence[float]) -> Timing:
        """A timing from each round's time (its median and that median's standard error).

        Example:
            >>> Timing.of_rounds([1.0, 1.5, 1.25]).median_ms
            1.25
        """
        med, se = _median_se(rounds_ms)
        return cls(med, se, tuple(rounds_ms))

    def minus(self, other: Timing) -> tuple[float, float]:
        """``self − other`` in ms, as the median of the per-round differences, and its standard
        error: the rounds were interleaved, so load that drifts over seconds cancels in pairs.

        Example:
            >>> Timing(1.0, 0.1, (1.0, 1.25, 0.75)).minus(Timing(2.0, 0.1, (2.0, 2.25, 1.5)))[0]
            -1.0
        """
        if len(self.rounds_ms) != len(other.rounds_ms):
            raise UsageError("timings from different rounds cannot be paired")
        return _median_se([a - b for a, b in zip(self.rounds_ms, other.rounds_ms, strict=True)])

    def compare(self, other: Timing) -> tuple[float, float, str]:
        """:meth:`minus`, and a verdict: ``faster`` / ``slower`` when the difference is beyond twice
        its standard error (resolved), ``within noise`` otherwise.

        Example:
            >>> Timing(1.0, 0.1, (1.0, 1.0, 1.0)).compare(Timing(2.0, 0.1, (2.0, 2.0, 2.0)))
            (-1.0, 0.0, 'faster')
        """
        diff, se = self.minus(other)
        return diff, se, "within noise" if abs(diff) <= 2 * se else ("faster" if diff < 0 else "slower")


def time_interleaved(
    models: Mapping[str, bytes | str | onnx.ModelProto],
    feeds: Mapping[str, np.ndarray],
    *,
    threads: int = 2,
    provider: str = "cpu",
    rounds: int = 5,
    runs: int = 4,
    warmup: int = 3,
    clock: str = "wall",
) -> dict[str, Timing]:
    """Time several models on one batch in interleaved rounds: every round runs each model
    ``runs`` times (the order reversed every other round), so models measured together see the
    same load, and their :class:`Timing` can be compared pairwise (:meth:`Timing.minus`).

    Args:
        models: name -> model (an ``onnx.ModelProto`` of any size, its bytes, or the path of an
            ``.onnx`` file).
        feeds: the timed batch, input name -> array.
        threads: onnxruntime intra-op threads.
        provider: execution provider (:data:`hawqtool.evaluate.PROVIDERS`).
        rounds: interleaved rounds (at least 3).
        runs: timed runs per model per round.
        warmup: untimed runs of each session first.
        clock: a name of :data:`CLOCKS`.

    Raises:
        UsageError: a bad setting.
        ExportError: onnxruntime cannot load or run a model.
    """
    check_choice(clock, tuple(CLOCKS), "clock")
    if not (isinstance(rounds, int) and rounds >= 3 and isinstance(runs, int) and runs >= 1):
        raise UsageError(f"need rounds >= 3 and runs >= 1, got rounds={rounds!r}, runs={runs!r}")
    timer = _Timer(feeds, runs=runs, clock=clock)
    sessions = {k: make_session(v, threads=threads, provider=provider) for k, v in models.items()}
    for sess in sessions.values():
        for _ in range(warmup):
            timer.once(sess)
    per_round: dict[str, list[float]] = {k: [] for k in sessions}
    names = list(sessions)
    for r in range(rounds):
        for k in names if r % 2 == 0 else reversed(names):
            per_round[k].append(statistics.median(timer.once(sessions[k]) for _ in range(runs)))
    return {k: Timing.of_rounds(v) for k, v in per_round.items()}


# --------------------------------------------------------------------------------------------
# Measuring a latency table
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LatencySettings:
    """How :func:`measure_latency` times the variants.

    Attributes:
        provider: execution provider (:data:`hawqtool.evaluate.PROVIDERS`).
        threads: onnxruntime intra-op threads.
        runs: paired runs per variant (at least 4).
        warmup: untimed runs of each new session.
        context: ``float`` (each layer changed in the float model: it pays its own Q/DQ
            boundaries), ``quantized`` (each layer changed inside the model with every layer that
            can take it in the activation format with the most bits: what it costs inside an
            integer region) or ``both`` (the mean of the two deltas; the default).
        clock: a name of :data:`CLOCKS`.

    Raises:
        UsageError: a setting out of range, naming it and what is allowed.

    Example:
        >>> LatencySettings(threads=1, clock="cpu").runs
        20
    """

    provider: str = "cpu"
    threads: int = 2
    runs: int = 20
    warmup: int = 3
    context: str = "both"
    clock: str = "wall"

    def __post_init__(self) -> None:
        check_choice(self.context, LATENCY_CONTEXTS, "latency context")
        check_choice(self.clock, tuple(CLOCKS), "clock")
        check_choice(self.provider, tuple(PROVIDERS), "execution provider")
        if (
            not isinstance(self.runs, int)
            or self.runs < 4
            or not isinstance(self.warmup, int)
            or self.warmup < 0
        ):
            raise UsageError(
                f"need runs >= 4 and warmup >= 0, got runs={self.runs!r}, warmup={self.warmup!r}"
            )
        if not isinstance(self.threads, int) or self.threads < 1:
            raise UsageError(f"threads must be an integer >= 1, got {self.threads!r}")


def measure_latency(
    exporter: QDQExporter,
    feeds: Mapping[str, np.ndarray],
    *,
    formats: Sequence[str],
    settings: LatencySettings = LatencySettings(),
    cache_dir: Path | None = None,
    progress: bool = False,
) -> LatencyTable:
    """Measure, per layer and format, the latency that format adds to the exported model.

    Every variant is the exporter's model of a whole allocation, so it carries exactly the Q/DQ
    (and requantize) nodes that allocation causes, and is timed in runs paired with a reference
    (:attr:`LatencySettings.context`). Formats that give a layer the same graph
    (:meth:`hawqtool.export.QDQExporter.structure`) share one measurement with proportionally more
    runs: timed apart, noise alone would make one look faster and the search would pick it. The
    deltas are then pooled across layers that run the same kernels (:func:`pool_deltas`).

    Args:
        exporter: the QDQ exporter of the model.
        feeds: the timed batch, input name -> array (the evaluation batch shape).
        formats: candidate formats; each layer is measured in those it supports, or its pin.
        settings: how to time (:class:`LatencySettings`).
        cache_dir: when given, the table is cached there under a fingerprint of the exported model
            and its calibration, the formats, batch shapes and settings.
        progress: a tqdm bar over the variants.

    Raises:
        UsageError: an unknown format.
        ExportError: onnxruntime cannot load or run a variant.

    Example:
        >>> table = measure_latency(exp, io.feeds(batch), formats=("int8", "float"))  # doctest: +SKIP
        >>> options = build_options(layers, traces, weights, cost=table.cost_model())  # doctest: +SKIP
    """
    bad = [f for f in formats if not is_format(f)]
    if bad or not formats:
        raise UsageError(f"bad candidate formats {bad or list(formats)}; allowed: {format_grammar()}")
    s = settings
    layers = exporter.prepared.layers
    per_layer = _layer_formats(layers, formats)
    timer = _Timer(feeds, runs=s.runs, clock=s.clock)
    shapes = {k: tuple(int(d) for d in v.shape) for k, v in timer.feeds.items()}
    key = {
        "model": _model_digest(exporter),
        "formats": per_layer,
        "shapes": shapes,
        "dtypes": {k: str(v.dtype) for k, v in timer.feeds.items()},
        **asdict(s),
        "onnxruntime": _onnxruntime_version(),
        "schedule": LATENCY_SCHEDULE,
    }
    fp = settings_key(key)
    path = Path(cache_dir) / f"latency-{fp}.json" if cache_dir is not None else None
    cached = load_cached(path, fp, LatencyTable.from_dict, what="latency table")
    if cached is not None:
        return cached

    start = time.perf_counter()
    # Which formats share a graph follows from the model, its export settings and the formats (all
    # in the key above); worked out on a cache miss only: it quantizes every layer in every format.
    same = _same_graph(exporter, per_layer)

    def session(allocation: Mapping[str, str]) -> onnxruntime.InferenceSession:
        model = exporter.quantized_model(allocation)
        sess = make_session(model, threads=s.threads, provider=s.provider)
        for _ in range(s.warmup):
            timer.once(sess)
        return sess

    references = []
    if s.context in ("float", "both"):
        references.append(dict.fromkeys(per_layer, FLOAT))
    if s.context in ("quantized", "both"):
        references.append(_quantized_reference(layers, per_layer, formats))
    unknowns = sum(len(set(same[f].values())) - 1 for f in per_layer)
    measured: list[dict[str, dict[str, tuple[float, float]]]] = []
    float_times: list[float] = []
    with tqdm(total=len(references) * unknowns, desc="latency", unit="variant", disable=not progress) as bar:
        for reference in references:
            deltas, ref_times = _one_at_a_time(per_layer, reference, timer, session, bar.update, same)
            measured.append(deltas)
            if quantizes_nothing(reference):  # the float model: its times are the float latency
                float_times = ref_times
    if not float_times:  # nothing timed against float: time it alone
        ref = session({})
        float_times = [timer.once(ref) for _ in range(s.runs)]
    float_ms, float_se = _median_se(float_times)
    entries = pool_deltas(_mean_of_contexts(measured), layers)
    macs = {layer.fqn: float(layer.macs) for layer in layers}
    total_macs = math.fsum(macs.values())
    base = {
        f: float_ms * (m / total_macs if total_macs > 0 else 1.0 / max(len(macs), 1)) for f, m in macs.items()
    }
    table = LatencyTable(
        float_ms=float_ms,
        float_stderr_ms=float_se,
        base_ms=base,
        entries=entries,
        provider=s.provider,
        threads=s.threads,
        shapes=shapes,
        context=s.context,
        runs=s.runs,
        seconds=time.perf_counter() - start,
        fingerprint=fp,
        clock=s.clock,
    )
    if path is not None:
        write_json_atomic(path, table.to_dict())
    return table


def _onnxruntime_version() -> str:
    import onnxruntime  # lazy: keeps onnxruntime out of ``import hawqtool.latency`` (as in evaluate)

    return str(onnxruntime.__version__)


def _model_digest(exporter: QDQExporter) -> str:
    # Piece by piece: a model past protobuf's 2 GiB limit cannot be serialized whole.
    h = hashlib.sha256()
    graph = exporter.float_model.graph
    for part in (*graph.node, *graph.input, *graph.output, *exporter.float_model.opset_import):
        h.update(part.SerializeToString(deterministic=True))
    for init in graph.initializer:
        h.update(init.name.encode())
        h.update(init.raw_data if init.raw_data else init.SerializeToString(deterministic=True))
    acts = {k: asdict(v) for k, v in sorted(exporter.activations.items())}
    h.update(json.dumps(acts, sort_keys=True).encode())
    h.update(json.dumps([asdict(exporter.settings), exporter.fqns]).encode())
    return h.hexdigest()


def _layer_formats(layers: Sequence[LayerInfo], formats: Sequence[str]) -> dict[str, tuple[str, ...]]:
    out = {}
    for layer in layers:
        allowed = (layer.pinned,) if layer.pinned else tuple(f for f in formats if supports(layer, f))
        out[layer.fqn] = tuple(dict.fromkeys((*allowed, FLOAT)))
    return out


def _same_graph(exporter: QDQExporter, per_layer: Mapping[str, tuple[str, ...]]) -> dict[str, dict[str, str]]:
    """Per layer, format -> the first of the layer's formats that emits the same graph
    (:meth:`hawqtool.export.QDQExporter.structure`): those run the same kernels, so they are
    timed once."""
    same: dict[str, dict[str, str]] = {}
    for fqn, fmts in per_layer.items():
        first: dict[str, str] = {}
        same[fqn] = {fmt: first.setdefault(exporter.structure(fqn, fmt), fmt) for fmt in fmts}
    return same


def _quantized_reference(
    layers: Sequence[LayerInfo], per_layer: Mapping[str, tuple[str, ...]], formats: Sequence[str]
) -> dict[str, str]:
    """The ``quantized`` context's reference: every layer that can take it in the activation format
    with the most bits, pins kept, the rest float."""
    acts = [parse_format(f) for f in formats if parse_format(f).activations]
    ref = max(acts, key=lambda f: f.bits).name if acts else None
    return {layer.fqn: layer.pinned or (ref if ref in per_layer[layer.fqn] else FLOAT) for layer in layers}


def _one_at_a_time(
    per_layer: Mapping[str, tuple[str, ...]],
    reference: Mapping[str, str],
    timer: _Timer,
    session: Callable[[Mapping[str, str]], onnxruntime.InferenceSession],
    advance: Callable[[int], Any],
    same: Mapping[str, Mapping[str, str]],
) -> tuple[dict[str, dict[str, tuple[float, float]]], list[float]]:
    """Per layer and format, ``t(reference with the layer in fmt) − t(reference with it float)``
    (median of paired differences, standard error); and the reference's own times. Formats with
    one graph (``same``: format -> the first format of its layer with that graph) share one
    measurement of ``runs`` × (their number) pairs; one with the reference's graph adds nothing."""
    ref = session(reference)
    ref_times: list[float] = []
    out: dict[str, dict[str, tuple[float, float]]] = {}
    for fqn, fmts in per_layer.items():
        rep = same[fqn]
        d: dict[str, tuple[float, float]] = {}
        for fmt in fmts:
            if rep[fmt] == rep[reference[fqn]]:
                d[fmt] = (0.0, 0.0)
            elif rep[fmt] != fmt:  # its representative came first: measured already
                d[fmt] = d[rep[fmt]]
            else:
                runs = timer.runs * sum(1 for f in fmts if rep[f] == fmt)
                ref_t, diffs = timer.paired(ref, session({**reference, fqn: fmt}), runs)
                ref_times += ref_t
                d[fmt] = _median_se(diffs)
                advance(1)
        out[fqn] = {
            fmt: (d[fmt][0] - d[FLOAT][0], math.hypot(d[fmt][1], d[FLOAT][1]) if fmt != FLOAT else 0.0)
            for fmt in fmts
        }
    return out, ref_times


def _mean_of_contexts(
    measured: Sequence[Mapping[str, Mapping[str, tuple[float, float]]]],
) -> dict[str, dict[str, LatencyEntry]]:
    """Per layer and format, the mean of the contexts' ``(delta, standard error)`` measurements.

    Example:
        >>> e = _mean_of_contexts([{"a": {"int8": (-1.0, 3.0)}}, {"a": {"int8": (0.5, 4.0)}}])["a"]["int8"]
        >>> e.delta_ms, e.stderr_ms
        (-0.25, 2.5)
    """
    n = len(measured)
    return {
        fqn: {
            fmt: LatencyEntry(
                delta_ms=math.fsum(m[fqn][fmt][0] for m in measured) / n,
                stderr_ms=math.sqrt(math.fsum(m[fqn][fmt][1] ** 2 for m in measured)) / n,
            )
            for fmt in row
        }
        for fqn, row in measured[0].items()
    }
