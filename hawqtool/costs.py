"""Cost models: what one layer in one format costs, behind one small protocol and a registry.

The frontier, the plots and the report only ever ask a :class:`CostModel` (its ``name``, ``unit``,
``layer_cost`` and ``fingerprint``); a new cost model is one class and one :func:`register` call.
Built in:

- ``size`` (bytes of the weights as stored) and ``bops`` (MACs × weight bits × activation bits):
  :func:`hawqtool.formats.layer_cost`, wrapped.
- ``latency`` (milliseconds on the target execution provider), *measured* by
  :func:`measure_latency` on the exported model: per layer and format, the model with that layer
  changed is timed against the all-float model and against the all-int8 one, and the two deltas are
  averaged (weight-only formats dequantize the weight and run the float op; activation formats add
  the uint8 Q/DQ pairs the exporter puts around the layer, so the requantize nodes at a region's
  boundary are charged to the layer that causes them). Each variant is timed in runs interleaved
  with the reference, and a delta is the median of the paired differences (load from other
  processes hits both alike). A layer's
  cost is its share of the float latency (by MACs) plus its delta, so Σ cost over an allocation is
  the predicted latency of the whole model (:func:`predicted_latency`). Deltas, and so costs, can
  be negative (an integer kernel faster than the float one): the frontier only adds and compares
  costs, which it does for any sign.

Example:
    >>> from hawqtool.types import LayerInfo
    >>> conv = LayerInfo("conv", "conv2d", (32, 16, 3, 3), params=4608, macs=294912)
    >>> size = get("size")
    >>> size.name, size.unit, size.layer_cost(conv, "int4")
    ('size', 'bytes', 2432.0)
    >>> get("bops", CostSettings(activation_bits=8)).layer_cost(conv, "int4") == 294912 * 4 * 8
    True
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import statistics
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np

from hawqtool.cache import load_cached, settings_key
from hawqtool.errors import ExportError, UsageError
from hawqtool.files import write_json_atomic
from hawqtool.formats import DEFAULT_OPSET, FLOAT, STORAGES, is_format
from hawqtool.types import LayerInfo

if TYPE_CHECKING:
    import onnxruntime

    from hawqtool.export import QDQExporter

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# The protocol and the registry
# --------------------------------------------------------------------------------------------


@runtime_checkable
class CostModel(Protocol):
    """What the frontier needs from a cost model.

    Attributes:
        name: the short name recipes use (``allocation.cost``) and tables record.
        unit: the unit of :meth:`layer_cost` (``bytes``, ``BOPs``, ``ms``), for axes and reports.
    """

    @property
    def name(self) -> str: ...

    @property
    def unit(self) -> str: ...

    def layer_cost(self, layer: LayerInfo, fmt: str) -> float:
        """The cost of ``layer`` in format ``fmt``, in :attr:`unit` (any finite number)."""
        ...

    def fingerprint(self) -> str:
        """A string that changes whenever the costs could (settings, measurements): a cache key."""
        ...


@dataclass(frozen=True)
class CostSettings:
    """The export settings a cost model may depend on (a registry factory's one argument).

    Attributes:
        storage: integer storage, ``packed`` or ``container`` (``size``).
        opset: the exported model's opset, which decides packed int2 storage (``size``).
        activation_bits: bits of quantized activations (``bops``).
    """

    storage: str = "packed"
    opset: int = DEFAULT_OPSET
    activation_bits: int = 8

    def __post_init__(self) -> None:
        if self.storage not in STORAGES:
            raise UsageError(f"unknown storage {self.storage!r}; allowed: {', '.join(STORAGES)}")
        if not 1 <= self.activation_bits <= 32:
            raise UsageError(f"activation_bits must be in 1..32, got {self.activation_bits}")


CostFactory = Callable[[CostSettings], CostModel]
_REGISTRY: dict[str, CostFactory] = {}


def register(name: str, factory: CostFactory, *, replace: bool = False) -> None:
    """Make a cost model available by name (``allocation.cost: NAME``, ``build_options(cost=NAME)``).

    Args:
        name: the short name; the model the factory builds should report the same ``name``.
        factory: builds the model from the export settings (:class:`CostSettings`).
        replace: allow replacing an already registered name.

    Raises:
        UsageError: an empty name, or a name already registered without ``replace``.

    Example:
        >>> from hawqtool.formats import parse_format
        >>> class Params:
        ...     name, unit = "params", "weights"
        ...     def layer_cost(self, layer, fmt): return layer.params * parse_format(fmt).bits / 8
        ...     def fingerprint(self): return "params/v1"
        >>> register("params", lambda settings: Params(), replace=True)
        >>> get("params").unit
        'weights'
    """
    if not isinstance(name, str) or not name:
        raise UsageError(f"a cost model needs a non-empty name, got {name!r}")
    if name in _REGISTRY and not replace:
        raise UsageError(
            f"cost model {name!r} is already registered (registered: {', '.join(_REGISTRY)}); "
            "pass replace=True to replace it"
        )
    _REGISTRY[name] = factory


def names() -> tuple[str, ...]:
    """The registered cost models' names."""
    return tuple(_REGISTRY)


def get(name: str, settings: CostSettings | None = None) -> CostModel:
    """The registered cost model ``name``, built for ``settings`` (defaults when ``None``).

    ``latency`` by name is the unmeasured model: it has a name and a unit but no costs; the
    measured one comes from :func:`measure_latency` (:meth:`LatencyTable.cost_model`).

    Raises:
        UsageError: an unknown name, naming the registered ones.
    """
    if name not in _REGISTRY:
        raise UsageError(f"unknown cost model {name!r}; registered: {', '.join(_REGISTRY)}")
    model = _REGISTRY[name](settings or CostSettings())
    if not isinstance(model, CostModel):
        raise UsageError(
            f"the factory registered as cost model {name!r} returned {type(model).__name__}, which lacks "
            "name, unit, layer_cost or fingerprint"
        )
    return model


def unit(name: str) -> str:
    """The unit of a registered cost model (for axis labels and reports), e.g. ``bytes``.

    Raises:
        UsageError: an unknown name, naming the registered ones.
    """
    return get(name).unit


@dataclass(frozen=True)
class SizeCost:
    """Bytes of the weights as stored (:func:`hawqtool.formats.layer_cost` with ``size``)."""

    settings: CostSettings = CostSettings()
    name: str = field(default="size", init=False)
    unit: str = field(default="bytes", init=False)

    def layer_cost(self, layer: LayerInfo, fmt: str) -> float:
        from hawqtool.formats import layer_cost  # imports torch: kept out of ``import hawqtool.costs``

        s = self.settings
        return layer_cost(layer, fmt, cost="size", storage=s.storage, opset=s.opset)

    def fingerprint(self) -> str:
        return f"size/v1/storage={self.settings.storage}/opset={self.settings.opset}"


@dataclass(frozen=True)
class BopsCost:
    """Bit operations per sample (:func:`hawqtool.formats.layer_cost` with ``bops``)."""

    settings: CostSettings = CostSettings()
    name: str = field(default="bops", init=False)
    unit: str = field(default="BOPs", init=False)

    def layer_cost(self, layer: LayerInfo, fmt: str) -> float:
        from hawqtool.formats import layer_cost

        return layer_cost(layer, fmt, cost="bops", activation_bits=self.settings.activation_bits)

    def fingerprint(self) -> str:
        return f"bops/v1/activation_bits={self.settings.activation_bits}"


# --------------------------------------------------------------------------------------------
# Latency: the table, the cost model, predictions
# --------------------------------------------------------------------------------------------

#: Version of the measurement; part of the cache key.
LATENCY_SCHEDULE = "paired-interleaved/v3"
#: ``context`` of :func:`measure_latency`: the reference each layer's variants are timed against.
LATENCY_CONTEXTS = ("float", "quantized", "both", "random")
# A normal distribution's median has a standard error 1.2533 σ/√n; σ from the MAD (× 1.4826) so a
# few stalls from other processes do not inflate it.
_MEDIAN_SE = 1.2533 * 1.4826


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
        clock: ``wall`` or ``cpu`` (:func:`measure_latency`).
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
        """This table as a :class:`CostModel` (``build_options(..., cost=table.cost_model())``)."""
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

    Without a table (``get("latency")``) it has a name and unit but no costs.
    """

    table: LatencyTable | None = None
    name: str = field(default="latency", init=False)
    unit: str = field(default="ms", init=False)

    def _table(self) -> LatencyTable:
        if self.table is None:
            raise UsageError(
                "latency costs are measured per model: build the cost model with "
                "hawqtool.costs.measure_latency(exporter, feeds, formats=...).cost_model()"
            )
        return self.table

    def layer_cost(self, layer: LayerInfo, fmt: str) -> float:
        t = self._table()
        return t.base_ms.get(layer.fqn, 0.0) + t.delta(layer.fqn, fmt)

    def fingerprint(self) -> str:
        return f"latency/{self._table().fingerprint}"


def predicted_latency(table: LatencyTable, allocation: Mapping[str, str]) -> float:
    """Predicted latency (ms) of an allocation: the float model's plus each layer's delta.

    Example:
        >>> t = LatencyTable(1.0, 0.01, {"a": 1.0}, {"a": {"float": LatencyEntry(0, 0),
        ...     "int8": LatencyEntry(-0.25, 0.01)}}, "cpu", 2, {"input": (1, 4)}, "float", 10, 0.0, "")
        >>> predicted_latency(t, {"a": "int8"}), predicted_latency(t, {"a": "float"})
        (0.75, 1.0)
    """
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


# --------------------------------------------------------------------------------------------
# Measuring latency
# --------------------------------------------------------------------------------------------


def _model_digest(exporter: QDQExporter) -> str:
    h = hashlib.sha256(exporter.float_model.SerializeToString(deterministic=True))
    acts = {k: asdict(v) for k, v in sorted(exporter.activations.items())}
    h.update(json.dumps(acts, sort_keys=True).encode())
    h.update(
        json.dumps([exporter.int4_storage, exporter.opset, exporter.clip_search, exporter.fqns]).encode()
    )
    return h.hexdigest()


def _layer_formats(layers: Sequence[LayerInfo], formats: Sequence[str]) -> dict[str, tuple[str, ...]]:
    from hawqtool.formats import supports

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


def _reference_format(formats: Sequence[str]) -> str | None:
    """The activation format with the most bits: the quantized context's format."""
    from hawqtool.formats import parse_format

    acts = [parse_format(f) for f in formats if parse_format(f).activations]
    return max(acts, key=lambda f: f.bits).name if acts else None


#: ``clock`` of :func:`measure_latency`.
CLOCKS = ("wall", "cpu")


class _Timer:
    """Times sessions on one batch: paired, interleaved runs against a reference session."""

    def __init__(self, feeds: Mapping[str, np.ndarray], *, runs: int, warmup: int, clock: str) -> None:
        self.feeds = dict(feeds)
        self.runs = runs
        self.warmup = warmup
        self.clock = time.perf_counter if clock == "wall" else time.process_time

    def once(self, session: onnxruntime.InferenceSession) -> float:
        t = self.clock()
        try:
            session.run(None, self.feeds)
        except Exception as e:  # onnxruntime's pybind errors share only Exception
            raise ExportError(f"onnxruntime failed to run a latency variant: {e}") from e
        return 1e3 * (self.clock() - t)

    def paired(
        self, ref: onnxruntime.InferenceSession, var: onnxruntime.InferenceSession, runs: int | None = None
    ) -> tuple[list[float], list[float]]:
        """(reference times, variant − reference differences), in ms, the order alternating;
        ``runs`` pairs (default: the timer's)."""
        ref_t, diffs = [], []
        for r in range(runs or self.runs):
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
    models: Mapping[str, bytes | str],
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
        models: name -> serialized model (or path of an ``.onnx`` file).
        feeds: the timed batch, input name -> array.
        threads: onnxruntime intra-op threads.
        provider: execution provider (:data:`hawqtool.evaluate.PROVIDERS`).
        rounds: interleaved rounds (at least 3).
        runs: timed runs per model per round.
        warmup: untimed runs of each session first.
        clock: ``wall`` or ``cpu`` (:func:`measure_latency`).

    Raises:
        UsageError: a bad setting.
        ExportError: onnxruntime cannot load or run a model.
    """
    from hawqtool.evaluate import make_session

    if clock not in CLOCKS:
        raise UsageError(f"unknown clock {clock!r}; allowed: {', '.join(CLOCKS)}")
    if not (isinstance(rounds, int) and rounds >= 3 and isinstance(runs, int) and runs >= 1):
        raise UsageError(f"need rounds >= 3 and runs >= 1, got rounds={rounds!r}, runs={runs!r}")
    timer = _Timer(
        {k: np.ascontiguousarray(v) for k, v in feeds.items()}, runs=runs, warmup=warmup, clock=clock
    )
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


def _one_at_a_time(
    per_layer: Mapping[str, tuple[str, ...]],
    reference: Mapping[str, str],
    timer: _Timer,
    session: Callable[[Mapping[str, str]], onnxruntime.InferenceSession],
    bar: Any,
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
                bar.update(1)
        out[fqn] = {
            fmt: (d[fmt][0] - d[FLOAT][0], math.hypot(d[fmt][1], d[FLOAT][1]) if fmt != FLOAT else 0.0)
            for fmt in fmts
        }
    return out, ref_times


def _random_contexts(
    per_layer: Mapping[str, tuple[str, ...]],
    timer: _Timer,
    session: Callable[[Mapping[str, str]], onnxruntime.InferenceSession],
    bar: Any,
    same: Mapping[str, Mapping[str, str]],
    *,
    allocations: int,
    seed: int,
) -> tuple[dict[str, dict[str, tuple[float, float]]], list[float]]:
    """Least-squares deltas: ``t(a) − t(float) = Σ_i δ_i(a_i)`` over random allocations ``a``
    (each layer's format drawn uniformly), δ_i(float) = 0, formats with one graph (``same``)
    sharing one unknown; standard errors from the residuals."""
    rng = np.random.default_rng(seed)
    columns = [
        (f, fmt) for f, fmts in per_layer.items() for fmt in fmts if same[f][fmt] == fmt != same[f][FLOAT]
    ]
    index = {c: k for k, c in enumerate(columns)}
    ref = session({})
    ref_times: list[float] = []
    rows, ys = [], []
    for _ in range(allocations):
        alloc = {f: str(rng.choice(fmts)) for f, fmts in per_layer.items()}
        ref_t, diffs = timer.paired(ref, session(alloc))
        ref_times += ref_t
        row = np.zeros(len(columns))
        for f, fmt in alloc.items():
            if (f, same[f][fmt]) in index:
                row[index[(f, same[f][fmt])]] = 1.0
        rows.append(row)
        ys.append(statistics.median(diffs))
        bar.update(1)
    X, y = np.array(rows).reshape(len(rows), len(columns)), np.array(ys)
    coef, *_ = np.linalg.lstsq(X, y, rcond=None)
    dof = max(len(y) - len(columns), 1)
    sigma2 = float(np.sum((y - X @ coef) ** 2)) / dof
    cov = sigma2 * np.linalg.pinv(X.T @ X)
    out: dict[str, dict[str, tuple[float, float]]] = {}
    for f, fmts in per_layer.items():
        out[f] = {}
        for fmt in fmts:
            k = index.get((f, same[f][fmt]))
            out[f][fmt] = (0.0, 0.0) if k is None else (float(coef[k]), math.sqrt(max(float(cov[k, k]), 0.0)))
    return out, ref_times


def kernel_signature(layer: LayerInfo) -> tuple[Any, ...]:
    """What decides which kernels a layer runs, and on how much data: its kind, weight shape and
    MACs per sample. Layers with one signature (a transformer's 24 attention projections, a ResNet
    stage's convolutions) run the same kernels on the same shapes."""
    return (layer.kind, tuple(layer.weight_shape), int(layer.macs))


def pool_deltas(
    entries: Mapping[str, Mapping[str, LatencyEntry]], layers: Sequence[LayerInfo]
) -> dict[str, dict[str, LatencyEntry]]:
    """Shrink each layer's measured delta toward the mean of the layers with its kernel signature.

    One layer's delta is the difference of two noisy timings, and a search that picks, per layer,
    the format with the lowest delta picks noise as well as speed (at batch 1 a MiniLM layer's
    deltas are ~0.1–0.4 ms with standard errors near 0.1 ms, and the allocation of every layer's
    lowest delta was predicted at 2.4 ms and measured 5.2 ms; pooled, 3.9 and 4.9). Layers with one
    :func:`kernel_signature` measure the same kernels, so per (signature, format) this is the
    random-effects estimate: the between-layer variance τ² by DerSimonian–Laird (what the deltas'
    spread shows beyond their standard errors), the precision-weighted mean m, and each layer's
    delta moved toward m by ``s² / (s² + τ²)``. Deltas that differ by more than their noise (a
    layer whose Q/DQ boundary costs more) keep their difference (τ² large); deltas that differ by
    noise alone become their group's mean (τ² = 0). A layer alone in its signature, or without a
    standard error, is kept.

    Args:
        entries: ``fqn -> format ->`` :class:`LatencyEntry` as measured.
        layers: the layers, for their signatures (entries of layers not listed are kept).

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


def measure_latency(
    exporter: QDQExporter,
    feeds: Mapping[str, np.ndarray],
    *,
    formats: Sequence[str],
    provider: str = "cpu",
    threads: int = 2,
    runs: int = 20,
    warmup: int = 3,
    context: str = "both",
    clock: str = "wall",
    allocations: float = 3.0,
    seed: int = 0,
    pool: bool = True,
    cache_dir: Path | None = None,
    progress: bool = False,
) -> LatencyTable:
    """Measure, per layer and format, the latency that format adds to the exported model.

    Every variant is the exporter's model of a whole allocation, so it carries exactly the Q/DQ
    (and requantize) nodes that allocation causes. Each variant is timed in ``runs`` runs
    alternating with a reference session's, and its time is the median of the paired differences
    (load from other processes hits both alike). Formats that give a layer the same graph
    (:meth:`hawqtool.export.QDQExporter.structure`: ``int7`` and ``int8``, every ``intB-d``) share
    one measurement with ``runs`` × their number of pairs: timed apart, noise alone would make one
    look faster and a search would pick it for that. ``context`` says which allocations:

    - ``float``: each layer in each format, the rest float (the layer pays its own Q/DQ boundaries);
    - ``quantized``: each layer changed inside the reference allocation that puts every layer that
      can take one in the activation format with the most bits (e.g. ``int8``; pins kept), as
      ``t(layer in fmt) − t(layer float)`` (what a layer costs inside an integer region);
    - ``both`` (default): the mean of those two deltas. Measured on ResNet-20 (digits, batch 64,
      22 random and uniform allocations): ``float`` alone ranks allocations backwards (Spearman
      −0.70 with the measured latency; each layer pays Q/DQ boundaries that an integer region
      shares), ``quantized`` alone ranks them well (0.85) but predicts half the latency; ``both``
      0.64 with a 9 % median error, ``random`` 0.55 and 10 % (one thread, CPU time, loaded VM);
    - ``random``: ``allocations`` × (number of unknown deltas) random allocations (each layer's format
      uniform), and the deltas that best explain them in least squares (what a layer costs on
      average over mixed neighbourhoods).

    Args:
        exporter: the QDQ exporter of the model (:meth:`hawqtool.export.QDQExporter.build`).
        feeds: the timed batch, input name -> array: the evaluation batch shape
            (``workspace.io.feeds(workspace.evaluation[0][0])``).
        formats: candidate formats; each layer is measured in those it supports, or its pin.
        provider: execution provider (:data:`hawqtool.evaluate.PROVIDERS`).
        threads: onnxruntime intra-op threads.
        runs: paired runs per variant (at least 4).
        warmup: untimed runs of each new session.
        context: ``float``, ``quantized``, ``both`` or ``random`` (above).
        clock: ``wall`` (latency) or ``cpu`` (the process's CPU time: insensitive to other processes
            on a loaded machine; equal to the latency on an idle one with ``threads=1``; with more
            threads it adds the workers' time, spinning included).
        allocations: for ``random``, random allocations per unknown delta (> 1).
        seed: for ``random``, seeds the allocations.
        pool: shrink each layer's deltas toward those of the layers that run the same kernels
            (:func:`pool_deltas`; the measurements stay in the entries, :meth:`LatencyTable.unpooled`).
        cache_dir: when given, the table is cached there under a fingerprint of the exported model
            and its calibration, the formats, provider, batch shapes, threads and settings.
        progress: a tqdm bar over the variants.

    Returns:
        The :class:`LatencyTable`.

    Raises:
        UsageError: a bad setting, an unknown format or provider.
        ExportError: onnxruntime cannot load or run a variant.

    Example:
        >>> exp = QDQExporter.build(prepared, calib)                          # doctest: +SKIP
        >>> table = measure_latency(exp, io.feeds(evaluation[0][0]), formats=("int8", "float"))  # doctest: +SKIP
        >>> options = build_options(layers, traces, weights, cost=table.cost_model())            # doctest: +SKIP
    """
    from tqdm.auto import tqdm

    from hawqtool.evaluate import make_session

    if context not in LATENCY_CONTEXTS:
        raise UsageError(f"unknown latency context {context!r}; allowed: {', '.join(LATENCY_CONTEXTS)}")
    if clock not in CLOCKS:
        raise UsageError(f"unknown clock {clock!r}; allowed: {', '.join(CLOCKS)}")
    if not isinstance(runs, int) or runs < 4 or not isinstance(warmup, int) or warmup < 0:
        raise UsageError(f"need runs >= 4 and warmup >= 0, got runs={runs!r}, warmup={warmup!r}")
    if not isinstance(threads, int) or threads < 1:
        raise UsageError(f"threads must be an integer >= 1, got {threads!r}")
    if not (isinstance(allocations, (int, float)) and allocations > 1):
        raise UsageError(f"allocations must be a number > 1 (per unknown delta), got {allocations!r}")
    bad = [f for f in formats if not is_format(f)]
    if bad or not formats:
        from hawqtool.formats import FORMAT_GRAMMAR

        raise UsageError(f"bad candidate formats {bad or list(formats)}; allowed: {FORMAT_GRAMMAR}")
    import onnxruntime as ort

    layers = exporter.prepared.layers
    per_layer = _layer_formats(layers, formats)
    feeds = {k: np.ascontiguousarray(v) for k, v in feeds.items()}
    shapes = {k: tuple(int(d) for d in v.shape) for k, v in feeds.items()}
    settings = {
        "model": _model_digest(exporter),
        "formats": per_layer,
        "provider": provider,
        "threads": threads,
        "shapes": shapes,
        "dtypes": {k: str(v.dtype) for k, v in feeds.items()},
        "runs": runs,
        "warmup": warmup,
        "context": context,
        "clock": clock,
        "allocations": allocations if context == "random" else None,
        "seed": seed if context == "random" else None,
        "pool": pool,
        "onnxruntime": ort.__version__,
        "schedule": LATENCY_SCHEDULE,
    }
    fp = settings_key(settings)
    path = Path(cache_dir) / f"latency-{fp}.json" if cache_dir is not None else None
    cached = load_cached(path, fp, LatencyTable.from_dict, what="latency table")
    if cached is not None:
        return cached

    start = time.perf_counter()
    timer = _Timer(feeds, runs=runs, warmup=warmup, clock=clock)
    # Which formats share a graph follows from the model, its export settings and the formats (all
    # in the key above); worked out on a cache miss only: it quantizes every layer in every format.
    same = _same_graph(exporter, per_layer)

    def session(allocation: Mapping[str, str]) -> onnxruntime.InferenceSession:
        model = exporter.quantized_model(allocation)
        s = make_session(model.SerializeToString(), threads=threads, provider=provider)
        for _ in range(warmup):
            timer.once(s)
        return s

    unknowns = sum(len(set(same[f].values())) - 1 for f in per_layer)
    n_random = math.ceil(allocations * (unknowns + 1)) if context == "random" else 0
    ref_fmt = _reference_format(formats)
    q_ref = {}
    for layer in layers:
        if layer.pinned:
            q_ref[layer.fqn] = layer.pinned
        else:
            q_ref[layer.fqn] = ref_fmt if ref_fmt in per_layer[layer.fqn] else FLOAT
    measured: list[dict[str, dict[str, tuple[float, float]]]] = []
    float_times: list[float] = []
    total = {"float": unknowns, "quantized": unknowns, "both": 2 * unknowns, "random": n_random}[context]
    bar = tqdm(total=total, desc="latency", unit="variant", disable=not progress)
    try:
        if context in ("float", "both"):
            f_ref = dict.fromkeys(per_layer, FLOAT)
            d, float_times = _one_at_a_time(per_layer, f_ref, timer, session, bar, same)
            measured.append(d)
        if context in ("quantized", "both"):
            measured.append(_one_at_a_time(per_layer, q_ref, timer, session, bar, same)[0])
        if context == "random":
            d, float_times = _random_contexts(
                per_layer, timer, session, bar, same, allocations=n_random, seed=seed
            )
            measured.append(d)
    finally:
        bar.close()
    if len(float_times) < runs:  # nothing timed against float: time it alone
        ref = session({})
        float_times += [timer.once(ref) for _ in range(runs)]
    float_ms, float_se = _median_se(float_times)
    entries = {
        fqn: {
            fmt: LatencyEntry(
                delta_ms=math.fsum(m[fqn][fmt][0] for m in measured) / len(measured),
                stderr_ms=math.sqrt(math.fsum(m[fqn][fmt][1] ** 2 for m in measured)) / len(measured),
            )
            for fmt in fmts
        }
        for fqn, fmts in per_layer.items()
    }
    if pool:
        entries = pool_deltas(entries, layers)
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
        provider=provider,
        threads=threads,
        shapes=shapes,
        context=context,
        runs=runs,
        seconds=time.perf_counter() - start,
        fingerprint=fp,
        clock=clock,
    )
    if path is not None:
        write_json_atomic(path, table.to_dict())
    return table


register("size", SizeCost)
register("bops", BopsCost)
register("latency", lambda settings: LatencyCost())
