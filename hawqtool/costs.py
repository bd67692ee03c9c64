"""Cost models: what one layer in one format costs, behind one small protocol and a registry.

The frontier, the plots and the report only ever ask a :class:`CostModel` (its ``name``, ``unit``,
``layer_cost`` and ``fingerprint``); a new cost model is one class and one :func:`register` call.
Built in: ``size`` (bytes of the weights as stored) and ``bops`` (MACs × weight bits × activation
bits), both :func:`hawqtool.formats.layer_cost`; and ``latency`` (milliseconds), which is measured
per model by :mod:`hawqtool.latency` and has no costs by name alone. Costs may be negative (an
integer kernel faster than the float one): the frontier only adds and compares them.

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

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from hawqtool import formats
from hawqtool.errors import UsageError
from hawqtool.formats import DEFAULT_OPSET, STORAGES
from hawqtool.registry import Registry
from hawqtool.types import LayerInfo

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
_REGISTRY = Registry[CostFactory]("cost model")


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
    _REGISTRY.add(name, factory, replace=replace)


def unregister(name: str) -> None:
    """Remove a registered cost model (tests and plug-ins).

    Raises:
        UsageError: no cost model of that name is registered.
    """
    _REGISTRY.remove(name)


def names() -> tuple[str, ...]:
    """The registered cost models' names."""
    return _REGISTRY.names()


def get(name: str, settings: CostSettings | None = None) -> CostModel:
    """The registered cost model ``name``, built for ``settings`` (defaults when ``None``).

    ``latency`` by name has a name and a unit but no costs; the measured model comes from
    :meth:`hawqtool.latency.LatencyTable.cost_model`.

    Raises:
        UsageError: an unknown name, naming the registered ones.
    """
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
        s = self.settings
        return formats.layer_cost(layer, fmt, cost="size", storage=s.storage, opset=s.opset)

    def fingerprint(self) -> str:
        return f"size/v1/storage={self.settings.storage}/opset={self.settings.opset}"


@dataclass(frozen=True)
class BopsCost:
    """Bit operations per sample (:func:`hawqtool.formats.layer_cost` with ``bops``)."""

    settings: CostSettings = CostSettings()
    name: str = field(default="bops", init=False)
    unit: str = field(default="BOPs", init=False)

    def layer_cost(self, layer: LayerInfo, fmt: str) -> float:
        return formats.layer_cost(layer, fmt, cost="bops", activation_bits=self.settings.activation_bits)

    def fingerprint(self) -> str:
        return f"bops/v1/activation_bits={self.settings.activation_bits}"


@dataclass(frozen=True)
class UnmeasuredLatency:
    """The ``latency`` cost model by name: a unit but no costs until measured on a model
    (:meth:`hawqtool.latency.LatencyTable.cost_model` gives the measured one)."""

    name: str = field(default="latency", init=False)
    unit: str = field(default="ms", init=False)

    def layer_cost(self, layer: LayerInfo, fmt: str) -> float:
        raise self._unmeasured()

    def fingerprint(self) -> str:
        raise self._unmeasured()

    @staticmethod
    def _unmeasured() -> UsageError:
        return UsageError(
            "latency costs are measured per model: build the cost model with "
            "hawqtool.latency.measure_latency(exporter, feeds, formats=...).cost_model()"
        )


register("size", SizeCost)
register("bops", BopsCost)
register("latency", lambda settings: UnmeasuredLatency())
