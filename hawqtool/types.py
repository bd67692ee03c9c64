"""Typed records passed between pipeline stages: frozen dataclasses, nothing else.

The stage artifacts round-trip through JSON (``to_dict`` / ``from_dict``), so each stage can be
cached, resumed and tested on its own. Nothing here imports torch or onnx.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from hawqtool.errors import UsageError
from hawqtool.formats import DEFAULT_OPSET, STORAGES, check_choice

# Allocation arithmetic lives in formats.py; these names stay importable from here (0.3 imports).

# --------------------------------------------------------------------------------------------
# Layers and sensitivity
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ExportSettings:
    """How quantized weights are stored and activations calibrated: one object, built once from the
    recipe and passed to every stage that must agree on it (Ω, costs, dependency terms, exporter).

    Example:
        >>> ExportSettings(int4_storage="container").opset
        25
    """

    opset: int = DEFAULT_OPSET
    int4_storage: str = "packed"
    clip_search: bool = True
    calibration: str = "minmax"

    def __post_init__(self) -> None:
        check_choice(self.int4_storage, STORAGES, "int4 storage")


@dataclass(frozen=True)
class LayerInfo:
    """A quantizable weight tensor found by :mod:`hawqtool.prepare`.

    Attributes:
        fqn: the layer's name: the module's fully-qualified name (``layer1.0.conv1``), or for a
            packed parameter the module's name and a suffix (``encoder.0.self_attn.in_proj``).
        kind: its registered layer kind (:class:`hawqtool.formats.LayerKind`: ``linear``,
            ``conv1d``, ``conv2d``, ``mha_in_proj``, ``embedding``, ``hf_conv1d``, or one added).
        weight_shape: shape of the (BN-folded) weight view, output channels first.
        params: number of weight elements.
        macs: multiply-accumulates of one forward pass on one sample (0 when unknown or a lookup).
        pinned: format the recipe pins this layer to, or ``None``.
        param: fully-qualified name of the parameter tensor (``fqn + ".weight"`` by default).
        transposed: the parameter is stored as the transpose of the view (``(in, out)``).
        shared: other modules that use the same tensor (tied weights: one decision for all).
    """

    fqn: str
    kind: str
    weight_shape: tuple[int, ...]
    params: int
    macs: int = 0
    pinned: str | None = None
    param: str = ""
    transposed: bool = False
    shared: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.param:
            object.__setattr__(self, "param", f"{self.fqn}.weight")

    @property
    def out_channels(self) -> int:
        return self.weight_shape[0]


@dataclass(frozen=True)
class LayerTrace:
    """Per-layer Hutchinson estimate of Tr(H_ii), the block of the Hessian on one layer's weights."""

    layer: str
    trace: float
    avg_trace: float  # trace / params
    stderr: float  # standard error of ``trace``
    probes: int
    converged: bool
    params: int

    @property
    def rel_stderr(self) -> float:
        return self.stderr / abs(self.trace) if self.trace != 0 else float("inf")


@dataclass(frozen=True)
class SensitivityTable:
    """Output of the Hessian stage: one :class:`LayerTrace` per quantizable layer, in model order."""

    layers: tuple[LayerTrace, ...]
    seed: int
    device: str
    rel_tol: float
    hvps: int  # Hessian-vector products spent (each on a possibly partial batch)
    seconds: float
    fingerprint: str = ""
    settings: Mapping[str, Any] = field(default_factory=dict)
    estimator: str = "hutchinson"  # hutchinson | gauss_newton (hawqtool.hessian); older tables: hutchinson
    costs: Mapping[str, float] = field(default_factory=dict)  # passes, seconds, peak memory (hessian.py)

    def __iter__(self) -> Iterator[LayerTrace]:
        return iter(self.layers)

    def __len__(self) -> int:
        return len(self.layers)

    def __getitem__(self, fqn: str) -> LayerTrace:
        for row in self.layers:
            if row.layer == fqn:
                return row
        raise KeyError(fqn)

    def by_sensitivity(self) -> list[LayerTrace]:
        """Rows sorted most sensitive (largest average trace) first."""
        return sorted(self.layers, key=lambda r: r.avg_trace, reverse=True)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["layers"] = [asdict(r) for r in self.layers]
        d["settings"] = dict(self.settings)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SensitivityTable:
        d = dict(d)
        d["layers"] = tuple(LayerTrace(**r) for r in d["layers"])
        return cls(**d)


# --------------------------------------------------------------------------------------------
# Options, allocations, frontier
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LayerOption:
    """One candidate format for one layer.

    ``omega`` is the HAWQ-V2 score avg_trace · ‖Q(W) − W‖²; ``cost`` is in the table's cost unit.
    """

    format: str
    cost: float
    sq_error: float
    omega: float


@dataclass(frozen=True)
class OptionTable:
    """Per-layer candidate options, the input of the frontier solver.

    ``options[fqn]`` holds the formats allowed for the layer (a pinned layer has exactly one).
    ``cost_model`` names the cost model of the costs (``size``, ``bops``, ``latency``, ...).
    """

    layers: tuple[str, ...]
    options: Mapping[str, tuple[LayerOption, ...]]
    cost_model: str
    params: Mapping[str, int] = field(default_factory=dict)
    #: What the costs and Ω assumed about the export (storage, opset, clip search, the cost
    #: model): recorded with the table, and part of the dependency stage's cache key.
    settings: Mapping[str, Any] = field(default_factory=dict)

    def option(self, fqn: str, fmt: str) -> LayerOption:
        for o in self.options[fqn]:
            if o.format == fmt:
                return o
        allowed = ", ".join(o.format for o in self.options[fqn])
        raise UsageError(f"format {fmt!r} is not a candidate for layer {fqn!r}; allowed: {allowed}")

    def cost(self, allocation: Mapping[str, str]) -> float:
        return sum(self.option(f, allocation[f]).cost for f in self.layers)

    def omega(self, allocation: Mapping[str, str]) -> float:
        return sum(self.option(f, allocation[f]).omega for f in self.layers)

    def to_dict(self) -> dict[str, Any]:
        return {
            "layers": list(self.layers),
            "options": {k: [asdict(o) for o in v] for k, v in self.options.items()},
            "cost_model": self.cost_model,
            "params": dict(self.params),
            "settings": dict(self.settings),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> OptionTable:
        return cls(
            layers=tuple(d["layers"]),
            options={k: tuple(LayerOption(**o) for o in v) for k, v in d["options"].items()},
            cost_model=d["cost_model"],
            params=dict(d.get("params", {})),
            settings=dict(d.get("settings", {})),
        )


@dataclass(frozen=True)
class FrontierPoint:
    """One Pareto-optimal allocation: no other allocation is both cheaper and less sensitive."""

    cost: float
    omega: float  # Σ Ω over layers (HAWQ-V2)
    allocation: Mapping[str, str]  # fqn -> format
    avg_bits: float = 0.0
    # Filled by the dependency stage: predicted loss change gᵀΔ + ½ΔᵀHΔ (None before).
    score: float | None = None


@dataclass(frozen=True)
class Frontier:
    """The exact Pareto frontier of (cost, ΣΩ), sorted by increasing cost (so decreasing ΣΩ)."""

    points: tuple[FrontierPoint, ...]
    cost_model: str
    cost_grid: float | None = None  # bucket width when the frontier was bounded by a grid
    float_cost: float = 0.0  # cost of the all-float allocation, for fractions
    omega_grid: float | None = None  # log-ΣΩ bucket width when the frontier was bounded by one

    def __len__(self) -> int:
        return len(self.points)

    def __iter__(self) -> Iterator[FrontierPoint]:
        return iter(self.points)

    def to_dict(self) -> dict[str, Any]:
        return {
            "points": [{**asdict(p), "allocation": dict(p.allocation)} for p in self.points],
            "cost_model": self.cost_model,
            "cost_grid": self.cost_grid,
            "float_cost": self.float_cost,
            "omega_grid": self.omega_grid,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Frontier:
        return cls(
            points=tuple(FrontierPoint(**p) for p in d["points"]),
            cost_model=d["cost_model"],
            cost_grid=d.get("cost_grid"),
            float_cost=d.get("float_cost", 0.0),
            omega_grid=d.get("omega_grid"),
        )


# --------------------------------------------------------------------------------------------
# Search and results
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Budget:
    """The accuracy budget: the metric may drop by at most ``max_drop`` (and, if set, at least
    ``min_drop``, making it a range). ``mode`` says whether drops are ``absolute`` (metric units)
    or ``relative`` (fraction of the baseline)."""

    max_drop: float
    mode: str = "absolute"
    min_drop: float | None = None
    higher_is_better: bool = True
    #: One-sided confidence of the bound on the drop a candidate must keep within ``max_drop``
    #: (paired against the float model on the same samples); 0 = the point estimate decides.
    confidence: float = 0.0
    #: Whether the metric is 0/1 per sample (top-1), which decides how a drop is bounded; ``None``
    #: reads it off the values (:func:`hawqtool.confidence.is_binary`).
    binary: bool | None = None

    def drop(self, baseline: float, metric: float) -> float:
        """The drop of ``metric`` from ``baseline`` in this budget's mode (positive = worse)."""
        d = baseline - metric if self.higher_is_better else metric - baseline
        if self.mode == "relative":
            return d / abs(baseline) if baseline != 0 else float("inf")
        return d

    def meets(self, baseline: float, metric: float) -> bool:
        return self.drop(baseline, metric) <= self.max_drop + 1e-12

    def inside_range(self, baseline: float, metric: float) -> bool:
        """Meets the budget and, when a ``min_drop`` is set, drops at least that much."""
        d = self.drop(baseline, metric)
        return d <= self.max_drop + 1e-12 and (self.min_drop is None or d >= self.min_drop - 1e-12)


@dataclass(frozen=True)
class Trial:
    """One probe of the search: an exported allocation evaluated in onnxruntime."""

    index: int  # position on the frontier (cost order)
    cost: float
    avg_bits: float
    metric: float
    drop: float
    met: bool
    seconds: float
    allocation: Mapping[str, str]
    note: str = ""
    drop_lower: float | None = None  # one-sided bounds on the drop at ``confidence``
    drop_upper: float | None = None
    confidence: float = 0.0
    bound: str = "point"  # how the bounds were computed (hawqtool.confidence)
    source: str = "candidates"  # the list the probe came from: candidates | frontier (gap fill) | extra (named points probed after the search) | timed (a latency shortlist point, evaluated because it measured fastest) | move (a one-layer change of the latency choice, evaluated because it measured resolvably faster; index -1)
    latency_ms: float | None = None  # measured end-to-end latency, when timed


@dataclass(frozen=True)
class DataSplits:
    """What a recipe's ``data.factory`` returns: three iterables of ``(inputs, targets)`` batches.

    Any re-iterable works (a list of tensor pairs, a ``DataLoader``). The Hessian is of the mean
    loss over the whole ``calibration`` split; the search measures ``evaluation``; the final model
    is re-checked on ``test``.
    """

    calibration: Any
    evaluation: Any
    test: Any
