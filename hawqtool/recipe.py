"""Recipe schema: YAML in, a validated, frozen :class:`Recipe` out.

Unknown keys are rejected, and every error names the dotted path of the bad key or value and what
is allowed. ``--set dotted.key=value`` overrides are parsed as YAML scalars and validated the same
way. The user's model and data come in through import paths (``package.module:callable``), never
``eval``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from hawqtool import costs
from hawqtool.errors import RecipeError
from hawqtool.formats import AUTO, DEFAULT_OPSET, FORMAT_GRAMMAR, format_bits, is_format
from hawqtool.types import Budget, ExportSettings

#: The cost measured on the execution provider (a latency table per run) rather than computed.
MEASURED_COST = "latency"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSection(_Section):
    """``factory`` returns a trained ``torch.nn.Module``; ``checkpoint`` is an optional state dict."""

    factory: str
    kwargs: dict[str, Any] = Field(default_factory=dict)
    checkpoint: Path | None = None


class DataSection(_Section):
    """``factory`` returns splits ``calibration``, ``evaluation``, ``test`` of (inputs, targets)."""

    factory: str
    kwargs: dict[str, Any] = Field(default_factory=dict)


class TaskSection(_Section):
    """The loss the Hessian is taken of, the metric the budget is stated in, and what they compare.

    ``targets: labels`` takes targets from the data (``(inputs, targets)`` batches);
    ``targets: model`` uses the float model's own outputs (teacher fidelity: no labels needed).
    ``output`` picks the tensor loss and metric see when the model returns a tuple, dict or
    ``ModelOutput``: a key or attribute (``logits``, ``last_hidden_state``), an index, or an import
    path ``package.module:function``. Defaults: labels → ``cross_entropy`` + ``top1``; model →
    ``kl`` + ``top1_agreement`` (for embeddings give ``loss: mse`` and ``metric: cosine``).
    ``binary`` says whether the metric is 0/1 per sample (``top1``) or continuous (``cosine``); the
    built-in metrics declare it, a user's metric may (``null``: read off the float model's values).
    """

    loss: str | None = None
    metric: str | None = None
    higher_is_better: bool | None = None
    binary: bool | None = None
    targets: Literal["labels", "model"] = "labels"
    output: str | int | None = None

    @property
    def loss_name(self) -> str:
        return self.loss or ("kl" if self.targets == "model" else "cross_entropy")

    @property
    def metric_name(self) -> str:
        return self.metric or ("top1_agreement" if self.targets == "model" else "top1")

    @field_validator("metric", "loss")
    @classmethod
    def _registered(cls, v: str | None, info: Any) -> str | None:
        # Lazy: tasks imports torch, which a recipe's schema alone must not pull in.
        from hawqtool.tasks import loss_names, metric_names

        names = metric_names() if info.field_name == "metric" else loss_names()
        if v is not None and v not in names and ":" not in v:
            raise ValueError(
                f"unknown {info.field_name} {v!r}; allowed: {', '.join(names)} or 'package.module:function'"
            )
        return v

    @property
    def higher_is_better_resolved(self) -> bool:
        if self.higher_is_better is not None:
            return self.higher_is_better
        # Lazy: tasks imports torch.
        from hawqtool.tasks import get_metric, metric_names

        return get_metric(self.metric_name).higher_is_better if self.metric_name in metric_names() else True

    @property
    def binary_resolved(self) -> bool | None:
        """Whether the metric is 0/1 per sample: ``binary`` if given, else the registered metric's
        (:attr:`hawqtool.tasks.Metric.binary`, on (N, C) outputs; see ``Metric.binary_for``); ``None``
        for a user's metric that does not say (the pipeline then reads it off the float torch model's
        values on the evaluation split)."""
        if self.binary is not None:
            return self.binary
        # Lazy: tasks imports torch.
        from hawqtool.tasks import get_metric, metric_names

        return get_metric(self.metric_name).binary if self.metric_name in metric_names() else None


class HessianSection(_Section):
    """Per-layer Hutchinson trace estimation (docs/design.md §2)."""

    seed: int = 0
    rel_tol: float = Field(0.05, gt=0, lt=1)
    # A floor only: layers stop on an upper confidence bound of their standard error (hessian.py).
    min_probes: int = Field(4, ge=2)
    max_probes: int = Field(1000, ge=2)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # Images per probe, drawn afresh from the calibration split (an unbiased estimate of the split's
    # Hessian that costs less per HVP); null uses the whole split for every probe.
    sub_batch: int | None = Field(128, ge=1)
    # Compute dtype of the Hessian stages; the half precisions need CUDA (checked when the device is
    # known: hessian.device may be auto).
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    # gauss_newton: every layer's trace sample from ONE first-order backward per probe (exact for
    # teacher targets with mse / kl; fused attention allowed); hutchinson: a second backward per
    # layer; auto: gauss_newton where it is exact and for cross_entropy on labels (where it ranks
    # allocations as well for less), else hutchinson (hawqtool.gauss_newton.resolve_estimator).
    estimator: Literal["auto", "gauss_newton", "hutchinson"] = "auto"
    # Also estimate each layer's input-activation Hessian trace and add Ω_act to the formats that
    # quantize activations (HAWQ-V2 §iii). Off by default: on the digits zoo it did not improve how
    # well ΣΩ ranks allocations (scripts/bench_latency.py), and it costs a second round of probes;
    # on a BERT-class model it does (MiniLM: Spearman 0.50 → 0.92), and the minilm recipe sets it.
    activations: bool = False

    @model_validator(mode="after")
    def _probes(self) -> HessianSection:
        if self.max_probes < self.min_probes:
            raise ValueError(f"max_probes ({self.max_probes}) must be >= min_probes ({self.min_probes})")
        return self


class AllocationSection(_Section):
    """Candidate formats per layer, the cost model and pins (FQN or ``re:`` regex → format)."""

    # auto: each layer is offered the formats its kind runs well on evaluate.provider
    # (hawqtool.options.AUTO_FORMATS); a list: every layer is offered those of them it can take.
    formats: tuple[str, ...] | Literal["auto"] = AUTO
    # A registered cost model (hawqtool.costs.register: size in bytes, bops, ...) or latency (ms,
    # measured per layer and format on evaluate.provider).
    cost: str = "size"
    pins: dict[str, str] = Field(default_factory=dict)
    # Bounds on the frontier's size for models with hundreds of layers; null = automatic (exact until
    # the frontier outgrows its bucket budget, then within 0.5 % of ΣΩ). cost_grid is a
    # bucket width in cost units, omega_grid one in ln(ΣΩ); both together stay within 0.5 % of the
    # ILP optimum on 1000 synthetic layers at 1e5 buckets each (scripts/bench_frontier.py).
    cost_grid: float | None = Field(None, gt=0)
    omega_grid: float | None = Field(None, gt=0)
    clip_search: bool = True

    @field_validator("formats")
    @classmethod
    def _formats(cls, v: tuple[str, ...] | str) -> tuple[str, ...] | str:
        if v == AUTO:
            return v
        if not v:
            raise ValueError(f"give at least one format or {AUTO}; allowed: {FORMAT_GRAMMAR}")
        for f in v:
            if not is_format(f):
                raise ValueError(f"unknown format {f!r}; allowed: {FORMAT_GRAMMAR}")
        if len(set(v)) != len(v):
            raise ValueError(f"formats repeat: {list(v)}")
        return tuple(sorted(v, key=format_bits))

    @field_validator("cost")
    @classmethod
    def _cost(cls, v: str) -> str:
        allowed = (*costs.names(), *(() if MEASURED_COST in costs.names() else (MEASURED_COST,)))
        if v not in allowed:
            raise ValueError(f"unknown cost model {v!r}; allowed: {', '.join(allowed)}")
        return v

    @field_validator("pins")
    @classmethod
    def _pins(cls, v: dict[str, str]) -> dict[str, str]:
        for key, f in v.items():
            if not is_format(f):
                raise ValueError(f"pin {key!r}: unknown format {f!r}; allowed: {FORMAT_GRAMMAR}")
        return v


class BudgetSection(_Section):
    """How far the metric may drop: ``mode`` must be stated (``absolute`` or ``relative``)."""

    max_drop: float = Field(ge=0)
    mode: Literal["absolute", "relative"]
    min_drop: float | None = Field(None, ge=0)
    # A candidate meets the budget when the one-sided upper confidence bound of its drop (paired
    # against the float model on the same evaluation samples) is within max_drop; 0 = point estimate.
    confidence: float = Field(0.95, ge=0, lt=1)

    @model_validator(mode="after")
    def _range(self) -> BudgetSection:
        if self.min_drop is not None and self.min_drop > self.max_drop:
            raise ValueError(f"min_drop ({self.min_drop}) must be <= max_drop ({self.max_drop})")
        return self


class SearchSection(_Section):
    """Whether inter-layer dependency terms re-score the frontier, and repair failing candidates."""

    dependency: bool = True
    repair: bool = True
    # What the dependency stage's single-layer losses are measured on: exported (the QDQ ONNX model
    # in onnxruntime, activations quantized as exported) or weights (torch, weights fake-quantized).
    dependency_numerics: Literal["exported", "weights"] = "exported"
    # How the cross terms are computed: output (from each (layer, format)'s output change, one
    # forward pass each, no HVPs), hvp (one Hessian-vector product each, as in 0.3); auto: output for
    # the built-in losses (cross_entropy, mse, kl), hvp for a custom one.
    dependency_method: Literal["auto", "output", "hvp"] = "auto"
    # The keys with the smallest √Ω, together at most this share of Σ√Ω, get no cross terms (their
    # |cross terms| are bounded by √Ω each): each one saves a forward pass (or an HVP). 0: every key.
    dependency_tolerance: float = Field(0.1, ge=0, lt=1)
    # Bisection stops once the cheapest meeting and the dearest missing candidate differ in cost by at
    # most this fraction: on a frontier of thousands of points (an LLM's), telling sizes 0.1 % apart
    # costs evaluations of minutes each and changes nothing a user could resolve. 0: to the neighbour.
    cost_tolerance: float = Field(0.01, ge=0, lt=1)


class ExportSection(_Section):
    """QDQ ONNX export: opset, sub-8-bit storage and activation calibration."""

    # 25 is the first opset with INT2 (packed int2 weights); torch exports 21 and onnx's version
    # converter lifts it. Packed int4 needs >= 21.
    opset: int = Field(DEFAULT_OPSET, ge=18, le=25)
    # container: b-bit integers in int8 (ORT's fast int8 kernels); packed: INT2/INT4 initializers
    # (smaller file, dequantize + float compute on CPU; docs/facts.md).
    int4_storage: Literal["container", "packed"] = "packed"
    calibration: Literal["minmax", "percentile", "entropy"] = "minmax"


class EvaluateSection(_Section):
    """onnxruntime evaluation settings."""

    threads: int = Field(2, ge=1)
    latency_runs: int = Field(20, ge=1)
    # The execution provider the model is evaluated and timed on (latency costs are measured there).
    provider: Literal["cpu", "cuda", "tensorrt"] = "cpu"


class Recipe(_Section):
    """A whole hawqtool recipe. ``model`` and ``data`` may be absent only when the Python API is
    handed a model and data directly."""

    name: str = "recipe"
    model: ModelSection | None = None
    data: DataSection | None = None
    task: TaskSection = TaskSection()
    hessian: HessianSection = HessianSection()
    allocation: AllocationSection = AllocationSection()
    budget: BudgetSection = BudgetSection(max_drop=0.01, mode="absolute")
    search: SearchSection = SearchSection()
    export: ExportSection = ExportSection()
    evaluate: EvaluateSection = EvaluateSection()

    @property
    def budget_spec(self) -> Budget:
        b = self.budget
        return Budget(
            b.max_drop,
            b.mode,
            b.min_drop,
            higher_is_better=self.task.higher_is_better_resolved,
            confidence=b.confidence,
            binary=self.task.binary_resolved,
        )

    @property
    def export_settings(self) -> ExportSettings:
        """The export settings every stage that must agree on them is built with (Ω, costs, the
        dependency terms, the exporter): one frozen object from the recipe.

        Example:
            >>> load_recipe("tiny", ["export.int4_storage=container"]).export_settings.int4_storage
            'container'
        """
        e = self.export
        return ExportSettings(
            opset=e.opset,
            int4_storage=e.int4_storage,
            clip_search=self.allocation.clip_search,
            calibration=e.calibration,
        )

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


BUILTIN = (
    "default",
    "resnet20-digits",
    "small-cnn-digits",
    "small-cnn-mnist",
    "transformer-digits",
    "tiny",
    "minilm",
    "gemma3-270m",
    "efficientnet-lite0",
)


def builtin_path(name: str) -> Path:
    """Path of a built-in recipe shipped in the package (``default``, ``resnet20-digits``, ...)."""
    return Path(str(resources.files("hawqtool.recipes").joinpath(f"{name}.yaml")))


def _model_at(loc: Sequence[str | int]) -> type[BaseModel] | None:
    cls: Any = Recipe
    for part in loc:
        field = cls.model_fields.get(part) if isinstance(part, str) else None
        if field is None:
            return None
        ann = field.annotation
        args = getattr(ann, "__args__", ())
        nxt = next((a for a in (ann, *args) if isinstance(a, type) and issubclass(a, BaseModel)), None)
        if nxt is None:
            return None
        cls = nxt
    return cls  # type: ignore[no-any-return]


def _format_errors(err: ValidationError, source: str) -> str:
    lines = []
    for e in err.errors():
        loc = [p for p in e["loc"] if not (isinstance(p, str) and p.startswith("function-"))]
        path = ".".join(str(p) for p in loc) or "(top level)"
        if e["type"] == "extra_forbidden":
            parent = _model_at(loc[:-1])
            allowed = ", ".join(parent.model_fields) if parent else "?"
            lines.append(f"{path}: unknown key; allowed here: {allowed}")
        elif e["type"] == "missing":
            lines.append(f"{path}: required key is missing")
        else:
            msg = e["msg"].removeprefix("Value error, ")
            lines.append(f"{path}: {msg} (got {e.get('input')!r})")
    return f"{source}: invalid recipe:\n  " + "\n  ".join(lines)


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply ``dotted.key=value`` overrides (values parsed as YAML) to a recipe mapping, in order."""
    out: dict[str, Any] = dict(data)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise RecipeError(f"--set {item!r}: expected dotted.key=value")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as e:
            raise RecipeError(f"--set {item!r}: value is not valid YAML: {e}") from e
        node = out
        parts = key.strip().split(".")
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = {}
            elif not isinstance(child, dict):
                raise RecipeError(f"--set {item!r}: {'.'.join(parts[: i + 1])} is not a section")
            node[part] = dict(child)
            node = node[part]
        node[parts[-1]] = value
    return out


def parse_recipe(data: Mapping[str, Any], *, source: str = "recipe") -> Recipe:
    """Validate a recipe mapping.

    Raises:
        RecipeError: naming each bad key's dotted path and what is allowed.
    """
    if not isinstance(data, Mapping):
        raise RecipeError(f"{source}: a recipe is a mapping of sections, got {type(data).__name__}")
    try:
        return Recipe.model_validate(dict(data))
    except ValidationError as e:
        raise RecipeError(_format_errors(e, source)) from None


def load_recipe(path: str | Path, overrides: Sequence[str] = ()) -> Recipe:
    """Read a recipe YAML file (or a built-in name such as ``default``) and apply overrides.

    Example:
        >>> r = load_recipe("default", ["budget.max_drop=0.02"])
        >>> r.budget.max_drop
        0.02
    """
    p = Path(path)
    if not p.is_file() and str(path) in BUILTIN:  # a folder named like one (e.g. an --out) does not hide it
        p = builtin_path(str(path))
    if not p.is_file():
        what = "is a folder" if p.is_dir() else "not found"
        raise RecipeError(f"recipe {str(path)!r} {what}; give a YAML file or one of: {', '.join(BUILTIN)}")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise RecipeError(f"{p}: not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise RecipeError(f"{p}: a recipe is a mapping of sections, got {type(data).__name__}")
    return parse_recipe(apply_overrides(data, overrides), source=str(p))
