"""Typed artifacts passed between pipeline stages.

Every artifact is a frozen dataclass that round-trips through JSON (``to_dict`` / ``from_dict``), so
each stage can be cached, resumed and tested on its own. Nothing here imports torch or onnx.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from hawqtool.errors import UsageError

# --------------------------------------------------------------------------------------------
# Formats
# --------------------------------------------------------------------------------------------

FLOAT = "float"
#: Integer weight formats: symmetric, per output channel, full signed range [-2^(b-1), 2^(b-1)-1].
INT_FORMATS = tuple(f"int{b}" for b in range(2, 9))
KNOWN_FORMATS = (*INT_FORMATS, FLOAT)

#: How sub-8-bit integers are stored: ``packed`` (ONNX INT2/INT4) or ``container`` (INT8).
STORAGES = ("packed", "container")
#: First opsets with INT4 / INT2 ``DequantizeLinear`` inputs (packed sub-byte storage).
INT4_MIN_OPSET = 21
INT2_MIN_OPSET = 25
#: The exporter's default opset: the lowest that stores int2 packed (onnxruntime 1.32 runs it).
DEFAULT_OPSET = 25


def format_bits(fmt: str) -> int:
    """Storage bits per weight of a format: ``int4`` -> 4, ``float`` -> 32.

    Raises:
        UsageError: ``fmt`` is not one of :data:`KNOWN_FORMATS`.
    """
    if fmt == FLOAT:
        return 32
    m = re.fullmatch(r"int([2-8])", fmt)
    if m is None:
        raise UsageError(f"unknown format {fmt!r}; allowed: {', '.join(KNOWN_FORMATS)}")
    return int(m.group(1))


def is_quantized(fmt: str) -> bool:
    """Whether a format quantizes the layer (anything but ``float``)."""
    return format_bits(fmt) < 32


# --------------------------------------------------------------------------------------------
# Layers and sensitivity
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LayerInfo:
    """A quantizable layer found by :mod:`hawqtool.prepare`.

    Attributes:
        fqn: fully-qualified module name (``layer1.0.conv1``).
        kind: ``conv1d``, ``conv2d`` or ``linear``.
        weight_shape: shape of the (BN-folded) weight, output channels first.
        params: number of weight elements.
        macs: multiply-accumulates of one forward pass on one sample (0 when unknown).
        pinned: format the recipe pins this layer to, or ``None``.
    """

    fqn: str
    kind: str
    weight_shape: tuple[int, ...]
    params: int
    macs: int = 0
    pinned: str | None = None

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
    ``cost_model`` is ``size`` (bytes) or ``bops``.
    """

    layers: tuple[str, ...]
    options: Mapping[str, tuple[LayerOption, ...]]
    cost_model: str
    params: Mapping[str, int] = field(default_factory=dict)

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
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> OptionTable:
        return cls(
            layers=tuple(d["layers"]),
            options={k: tuple(LayerOption(**o) for o in v) for k, v in d["options"].items()},
            cost_model=d["cost_model"],
            params=dict(d.get("params", {})),
        )


def average_bits(allocation: Mapping[str, str], params: Mapping[str, int]) -> float:
    """Parameter-weighted average weight bits of an allocation (``float`` counts as 32)."""
    total = sum(params[f] for f in allocation)
    return sum(format_bits(fmt) * params[f] for f, fmt in allocation.items()) / max(total, 1)


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


def write_json_atomic(path: str | os.PathLike[str], payload: Any) -> None:
    """Write JSON next to ``path`` then rename over it, so readers never see half a file."""
    write_bytes_atomic(path, (json.dumps(payload, indent=2, sort_keys=False) + "\n").encode())


def write_bytes_atomic(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to a temporary file in the same folder, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        Path(tmp).replace(path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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
