"""Inter-layer dependency terms: score whole allocations, re-order and repair search candidates.

HAWQ-V2's ΣΩ scores each layer alone. The loss change of an allocation ``a`` with quantization
error Δ = Q_a(W) − W is, to second order, ΔL ≈ gᵀΔ + ½ΔᵀHΔ, and the cross-layer blocks H_ij carry
how layers' errors interact. Every layer's error under every candidate format is known up front, so
one Hessian-vector product per quantized (layer, format) pair k with v = Δ_k gives the row
M[k, ·] = Δ_kᵀ H Δ_· over every other pair; by symmetry only the layers at or after k's layer are
needed, which lets backward stop at k's layer. After that, any allocation's second-order prediction
(:meth:`DependencyModel.predict`) is a sum of entries of M and of gᵀΔ_k: no further HVPs.

Why the search ranks by :meth:`DependencyModel.score` rather than by ``predict`` alone: at 2 to 4
bits the errors are far outside the region where a Taylor expansion around W holds. On ResNet-20
(digits, 512 images, calibration loss 0.001) the measured loss change of random {2,4,8}-bit
allocations was 14× to 50× the second-order prediction, a single layer's 1.5× to 20× (early layers
worst), and the prediction's Spearman correlation with the top-1 drop was 0.77 (ΣΩ: 0.41). So the
score keeps the Hessian's *inter-layer* structure but takes each layer's own term from measurement:
m_k, the calibration-loss change of quantizing layer l to format f while the other layers sit at
their middle candidate format (the search's typical operating point), one forward pass each. Each
layer's error is treated as acting with the strength its measurement shows,
s_k = √(m_k / ½Δ_kᵀH_kkΔ_k), so the cross terms become s_k s_j Δ_kᵀH_kjΔ_j:

    score(a) = Σ_l m_(l,a_l) + ½ Σ_(l≠j) s_(l,a_l) s_(j,a_j) Δ_(l,a_l)ᵀ H_lj Δ_(j,a_j)

On ResNet-20 that raised the correlation with the top-1 drop to 0.88 (0.92 with the measured
calibration ΔL). It is no cure-all: on the small CNN on MNIST-5k, where the calibration loss itself
ranks the top-1 drop poorly (0.77), the score ranked it at 0.73 against 0.81 for ``predict`` and 0.87
for ΣΩ (``scripts/bench_dependency.py``). Without the measurements (``measure_singles=False``) the
score is the plain second-order prediction.

Where m_k comes from (:attr:`DependencyModel.numerics`): by default (``weights``) from the torch
model with the layers' weights fake-quantized, activations float. A format such as ``int8`` also
quantizes the layer's activations to uint8 in the exported model, and onnxruntime's integer
kernels have their own numerics (without VNNI they saturate on full-range int8 weights), so the
pipeline passes ``single_loss``: the calibration loss of the exported QDQ model of an allocation,
run in onnxruntime (:func:`exported_single_loss`, ``exported``). The Hessian terms stay those of
the weights: activation errors have no Δ in weight space. So with exported numerics the own terms
m_k are the exported ones, but the strengths s_k of the cross terms come from the weight-only
measurement (:attr:`DependencyModel.scale_measured`, one more torch pass per pair): a layer whose
exported error is dominated by something the Hessian never saw (int8 saturation: small CNN on
MNIST-5k, conv1's m_k 0.097 exported against 0.0004 weight-only) would otherwise scale up every one
of its cross terms by √240.

How the score corrects the frontier (docs/design.md §5), in :func:`candidates_for_search`: re-score every
frontier point; optionally add each point's local improvement under the score at no extra cost; keep
only the points not dominated in (cost, score), so the sequence bisection walks is monotone in the
score. The most precise frontier point is always kept: bisection's first probe decides whether the
budget is possible at all, and that verdict must not depend on a model. :func:`repair` promotes the
layers whose promotion lowers the score most per unit of added cost.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from tqdm.auto import tqdm

from hawqtool import distributed
from hawqtool.errors import UsageError
from hawqtool.formats import format_bits, is_quantized
from hawqtool.hvp import SplitHessian
from hawqtool.prepare import PreparedModel
from hawqtool.quantizer import dequantize_as, quant_error
from hawqtool.types import Frontier, FrontierPoint, OptionTable, allocation_key, average_bits

if TYPE_CHECKING:
    import onnx

    from hawqtool.export import QDQExporter
    from hawqtool.modelio import ModelIO
    from hawqtool.tasks import LossFn

log = logging.getLogger(__name__)

Allocation = Mapping[str, str]
#: The calibration loss of the model with some layers quantized (``fqn -> format``), the rest float.
SingleLoss = Callable[[Allocation], float]
#: Where :attr:`DependencyModel.measured` came from (module doc).
NUMERICS = ("weights", "exported")


@dataclass(frozen=True, eq=False)
class DependencyModel:
    """The second-order model ΔL(a) ≈ gᵀΔ_a + ½Δ_aᵀHΔ_a over every candidate (layer, format) pair.

    ``keys[k] = (fqn, format)``; ``linear[k] = gᵀΔ_k``; ``matrix[k, k'] = Δ_kᵀ H Δ_k'`` (symmetric;
    rows of ``float`` keys are zero). Entries between two formats of the same layer are never used.
    ``measured[k]`` is the measured calibration-loss change of key k in context (module doc); with
    it, :meth:`score` is the calibrated score, otherwise it equals :meth:`predict`.

    Attributes:
        layers: quantizable layers, model order.
        keys: one ``(fqn, format)`` per candidate option.
        linear: first-order terms gᵀΔ_k, shape ``(K,)``.
        matrix: second-order terms Δ_kᵀHΔ_k', shape ``(K, K)``.
        measured: measured single-layer loss changes in context, shape ``(K,)``, or ``None``.
        scale_measured: the same with weights alone fake-quantized in torch, when ``measured`` was
            taken on other numerics (``exported``); the cross terms' strengths s_k come from it.
        context: the format every other layer held while ``measured`` was taken, per layer.
        base_loss: calibration loss of the float model.
        hvps: Hessian-vector products spent building it.
        forward_passes: passes over the calibration split spent on ``measured``.
        seconds: wall time of the build.
        clip_search: whether Δ used the quantizer's clipping search (must match export).
        numerics: what ``measured`` was measured on: ``weights`` (torch, weights fake-quantized),
            ``exported`` (the exported QDQ model in onnxruntime), or another caller's label.

    Example:
        >>> # dep = build_dependency_model(SplitHessian(prep, calib, F.cross_entropy), prep, options)
        >>> # dep.predict({"conv1": "int4", "fc": "int8"})    # predicted calibration-loss change
    """

    layers: tuple[str, ...]
    keys: tuple[tuple[str, str], ...]
    linear: np.ndarray
    matrix: np.ndarray
    measured: np.ndarray | None = None
    scale_measured: np.ndarray | None = None
    context: Mapping[str, str] = field(default_factory=dict)
    base_loss: float = 0.0
    hvps: int = 0
    forward_passes: int = 0
    seconds: float = 0.0
    clip_search: bool = True
    numerics: str = "weights"
    _index: dict[tuple[str, str], int] = field(init=False, repr=False, compare=False)
    _score_linear: np.ndarray = field(init=False, repr=False, compare=False)
    _score_matrix: np.ndarray = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        lin = np.array(self.linear, dtype=np.float64).reshape(-1)
        mat = np.array(self.matrix, dtype=np.float64)
        k = len(self.keys)
        if lin.shape != (k,) or mat.shape != (k, k):
            raise ValueError(f"linear {lin.shape} / matrix {mat.shape} do not match {k} keys")
        lin.setflags(write=False)
        mat.setflags(write=False)
        object.__setattr__(self, "linear", lin)
        object.__setattr__(self, "matrix", mat)
        object.__setattr__(self, "_index", {key: i for i, key in enumerate(self.keys)})
        if self.measured is None:
            s_lin, s_mat = lin, mat
        else:
            m = np.array(self.measured, dtype=np.float64).reshape(-1)
            if m.shape != (k,):
                raise ValueError(f"measured {m.shape} does not match {k} keys")
            m.setflags(write=False)
            object.__setattr__(self, "measured", m)
            by = m
            if self.scale_measured is not None:
                by = np.array(self.scale_measured, dtype=np.float64).reshape(-1)
                if by.shape != (k,):
                    raise ValueError(f"scale_measured {by.shape} does not match {k} keys")
                by.setflags(write=False)
                object.__setattr__(self, "scale_measured", by)
            half = 0.5 * np.diag(mat)
            # A key whose curvature term is ~0 (float, or a flat direction) keeps the raw cross terms.
            tiny = 1e-12 * max(float(np.abs(half).max(initial=0.0)), 1e-300)
            scale = np.ones(k)
            ok = half > tiny
            scale[ok] = np.sqrt(np.clip(by[ok], 0.0, None) / half[ok])
            s_mat = mat * np.outer(scale, scale)
            np.fill_diagonal(s_mat, 0.0)
            s_lin = m
        s_mat = np.asarray(s_mat)
        object.__setattr__(self, "_score_linear", s_lin)
        object.__setattr__(self, "_score_matrix", s_mat)

    # -- lookups ---------------------------------------------------------------------------------

    def index(self, fqn: str, fmt: str) -> int:
        """Row of ``(fqn, fmt)`` in :attr:`matrix`.

        Raises:
            UsageError: the pair is not a candidate of this model.
        """
        try:
            return self._index[(fqn, fmt)]
        except KeyError:
            allowed = ", ".join(f for l_, f in self.keys if l_ == fqn) or "none (unknown layer)"
            raise UsageError(
                f"({fqn!r}, {fmt!r}) is not in the dependency model; formats of {fqn!r}: {allowed}"
            ) from None

    def _indices(self, allocation: Allocation) -> np.ndarray:
        missing = [f for f in self.layers if f not in allocation]
        extra = [f for f in allocation if f not in self.layers]
        if missing or extra:
            raise UsageError(
                f"allocation does not match the model's layers: missing {missing}, unknown {extra}"
            )
        return np.array([self.index(f, allocation[f]) for f in self.layers], dtype=np.int64)

    def term(self, fqn_a: str, fmt_a: str, fqn_b: str, fmt_b: str) -> float:
        """Δ_aᵀ H_ab Δ_b for one pair of (layer, format) options (appears twice in ΔᵀHΔ if a ≠ b)."""
        return float(self.matrix[self.index(fqn_a, fmt_a), self.index(fqn_b, fmt_b)])

    # -- predictions -----------------------------------------------------------------------------

    def first_order(self, allocation: Allocation) -> float:
        """gᵀΔ of an allocation."""
        return float(self.linear[self._indices(allocation)].sum())

    def quadratic(self, allocation: Allocation) -> float:
        """½ΔᵀHΔ of an allocation, cross-layer terms included."""
        idx = self._indices(allocation)
        return 0.5 * float(self.matrix[np.ix_(idx, idx)].sum())

    def diagonal(self, allocation: Allocation) -> float:
        """½ΣΔ_iᵀH_iiΔ_i: the diagonal blocks only (no cross-layer terms)."""
        idx = self._indices(allocation)
        return 0.5 * float(self.matrix[idx, idx].sum())

    def predict(self, allocation: Allocation) -> float:
        """gᵀΔ + ½ΔᵀHΔ: the predicted change of the calibration loss."""
        idx = self._indices(allocation)
        return float(self.linear[idx].sum()) + 0.5 * float(self.matrix[np.ix_(idx, idx)].sum())

    def score(self, allocation: Allocation) -> float:
        """The search's ranking score: measured own terms plus rescaled Hessian cross terms
        (module doc); equal to :meth:`predict` when the model holds no measurements."""
        idx = self._indices(allocation)
        return float(self._score_linear[idx].sum()) + 0.5 * float(self._score_matrix[np.ix_(idx, idx)].sum())

    def contributions(self, allocation: Allocation) -> dict[str, float]:
        """Each layer's share of :meth:`score`: its own term plus half of each interaction.

        The shares sum to :meth:`score`; a layer whose errors compound with others' carries half
        of every such interaction (what :func:`repair` promotes first, per unit of cost).
        """
        idx = self._indices(allocation)
        share = self._score_linear[idx] + 0.5 * self._score_matrix[np.ix_(idx, idx)].sum(axis=1)
        return {f: float(s) for f, s in zip(self.layers, share, strict=True)}

    # -- serialization ---------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return {
            "layers": list(self.layers),
            "keys": [list(k) for k in self.keys],
            "linear": self.linear.tolist(),
            "matrix": self.matrix.tolist(),
            "measured": None if self.measured is None else self.measured.tolist(),
            "scale_measured": None if self.scale_measured is None else self.scale_measured.tolist(),
            "context": dict(self.context),
            "base_loss": self.base_loss,
            "hvps": self.hvps,
            "forward_passes": self.forward_passes,
            "seconds": self.seconds,
            "clip_search": self.clip_search,
            "numerics": self.numerics,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> DependencyModel:
        return cls(
            layers=tuple(d["layers"]),
            keys=tuple((str(a), str(b)) for a, b in d["keys"]),
            linear=np.asarray(d["linear"], dtype=np.float64),
            matrix=np.asarray(d["matrix"], dtype=np.float64),
            measured=None if d.get("measured") is None else np.asarray(d["measured"], dtype=np.float64),
            scale_measured=None
            if d.get("scale_measured") is None
            else np.asarray(d["scale_measured"], dtype=np.float64),
            context=dict(d.get("context") or {}),
            base_loss=float(d.get("base_loss", 0.0)),
            hvps=int(d.get("hvps", 0)),
            forward_passes=int(d.get("forward_passes", 0)),
            seconds=float(d.get("seconds", 0.0)),
            clip_search=bool(d.get("clip_search", True)),
            numerics=str(d.get("numerics", "weights")),  # caches from before the setting: torch
        )


# --------------------------------------------------------------------------------------------
# Building it
# --------------------------------------------------------------------------------------------


def build_dependency_model(
    hessian: SplitHessian,
    prepared: PreparedModel,
    options: OptionTable,
    *,
    clip_search: bool = True,
    measure_singles: bool = True,
    single_loss: SingleLoss | None = None,
    numerics: str | None = None,
    progress: bool = True,
) -> DependencyModel:
    """Measure gᵀΔ_k and Δ_kᵀHΔ_k' for every candidate (layer, format) pair of ``options``.

    Costs one gradient and one HVP per quantized (layer, format) pair (``float`` has Δ = 0). The
    HVP for a pair on layer i differentiates only w.r.t. layers i, i+1, … (model order), so
    backward stops early; the entries with earlier layers come from their own rows (H is
    symmetric). Entries computed twice (two formats of one layer) are averaged. With
    ``measure_singles``, also one pass over the calibration split per layer and per quantized
    (layer, format) pair, for :meth:`DependencyModel.score` (cheaper than the HVPs).

    Args:
        hessian: the Hessian of the calibration loss.
        prepared: the model whose weights are quantized (the same as ``hessian``'s).
        options: candidate formats per layer.
        clip_search: passed to the quantizer; must match what export uses.
        measure_singles: measure each pair's loss change in context (module doc).
        single_loss: the calibration loss of an allocation (``fqn -> format``, other layers
            float) that the measurements take, computed by this process alone (under a process
            group each rank takes its share of the allocations, and the losses are summed over
            the ranks). Default: ``hessian.loss`` with the weights fake-quantized.
        numerics: the label recorded in :attr:`DependencyModel.numerics`; default ``weights``
            without ``single_loss``, else ``custom``.
        progress: show a tqdm bar over the HVPs and passes.

    Raises:
        UsageError: ``options`` names a layer the prepared model lacks.
    """
    t0 = time.perf_counter()
    layers = tuple(options.layers)
    unknown = [f for f in layers if f not in prepared.fqns]
    if unknown:
        raise UsageError(f"option table layers {unknown} are not in the model; layers: {prepared.fqns}")
    keys = tuple((f, o.format) for f in layers for o in options.options[f])
    index = {k: i for i, k in enumerate(keys)}
    deltas: dict[tuple[str, str], torch.Tensor] = {}
    for f, fmt in keys:
        if is_quantized(fmt):
            w = prepared.weight(f)
            deltas[(f, fmt)] = quant_error(w, fmt, clip_search=clip_search).to(hessian.device)

    grad = hessian.grad()
    linear = np.zeros(len(keys))
    for k, d in deltas.items():
        linear[index[k]] = float((grad[k[0]].double() * d.double()).sum())

    total = np.zeros((len(keys), len(keys)))
    count = np.zeros((len(keys), len(keys)))
    position = {f: i for i, f in enumerate(layers)}
    rows = sorted(deltas, key=lambda k: position[k[0]])
    context = {f: _middle_format(options, f) for f in layers}
    jobs, slots = _single_jobs(options, context, deltas, index) if measure_singles else ([], [])
    # A rank-local single_loss runs this rank's share of the jobs; hessian.loss runs on every rank.
    mine = distributed.shard(len(jobs)) if single_loss is not None else list(range(len(jobs)))
    bar = tqdm(
        total=len(rows) + len(mine),
        desc="dependency terms",
        disable=not progress or not distributed.is_main(),
        leave=False,
    )
    for key in rows:
        bar.update(1)
        later = layers[position[key[0]] :]
        hv = hessian.hvp({key[0]: deltas[key]}, wrt=later)
        i = index[key]
        for other, d in deltas.items():
            if other[0] in hv:
                j = index[other]
                total[i, j] += float((hv[other[0]].double() * d.double()).sum())
                count[i, j] += 1
    both = count + count.T
    matrix = np.divide(total + total.T, both, out=np.zeros_like(total), where=both > 0)

    measured = scale_measured = None
    if measure_singles:
        weights_loss = _weights_loss(hessian, prepared, deltas)
        measured = _measure_singles(
            jobs,
            slots,
            single_loss or weights_loss,
            len(keys),
            local=single_loss is not None,
            device=hessian.device,
            bar=bar,
        )
        if single_loss is not None:
            # The cross terms Δ_kᵀH_kjΔ_j are weight-error interactions: their strength is calibrated
            # on how the weight error alone acts (torch, activations float), not on activation or
            # kernel error the Hessian never saw (e.g. int8 saturation on a CPU without VNNI, which
            # would blow up every cross term of that layer). The own terms stay exported.
            scale_measured = _measure_singles(
                jobs, slots, weights_loss, len(keys), local=False, device=hessian.device
            )
    bar.close()
    dep = DependencyModel(
        layers=layers,
        keys=keys,
        linear=linear,
        matrix=matrix,
        measured=measured,
        scale_measured=scale_measured,
        context=context if measure_singles else {},
        base_loss=hessian.loss(),
        hvps=len(rows),
        forward_passes=len(jobs) * (2 if scale_measured is not None else 1),
        seconds=time.perf_counter() - t0,
        clip_search=clip_search,
        numerics=numerics or ("weights" if single_loss is None else "custom"),
    )
    log.info(
        "dependency model: %d (layer, format) pairs, %d HVPs, %d passes, %.1f s",
        len(keys),
        dep.hvps,
        dep.forward_passes,
        dep.seconds,
    )
    return dep


def _measure_singles(
    jobs: Sequence[dict[str, str]],
    slots: Sequence[tuple[int, int, int]],
    measure: SingleLoss,
    n_keys: int,
    *,
    local: bool,
    device: torch.device,
    bar: Any = None,
) -> np.ndarray:
    """Each quantized key's measured loss change in context (its job's loss minus its reference
    job's). A rank-local ``measure`` (onnxruntime) runs this rank's share of the jobs and the losses
    are summed over the ranks; the torch default is itself a collective step and runs them all."""
    what = "the dependency stage's loss passes"
    mine = distributed.shard(len(jobs)) if local else range(len(jobs))
    losses = torch.zeros(len(jobs), dtype=torch.float64, device=device)
    with distributed.shared_failure(what) if local else contextlib.nullcontext():
        for j in mine:
            losses[j] = measure(jobs[j])
            if bar is not None:
                bar.update(1)
    if local:
        distributed.all_reduce_sum([losses], what=what)
    values = losses.cpu().numpy()
    measured = np.zeros(n_keys)
    for row, ref, job in slots:
        measured[row] = values[job] - values[ref]
    return measured


def _weights_loss(
    hessian: SplitHessian, prepared: PreparedModel, deltas: Mapping[tuple[str, str], torch.Tensor]
) -> SingleLoss:
    """The default ``single_loss``: ``hessian.loss`` with the allocation's weights fake-quantized
    (W + Δ), activations float. A collective step under a process group (it shards the batches)."""
    weights = {f: prepared.weight(f).to(hessian.device) for f, _ in deltas}

    def loss(allocation: Allocation) -> float:
        return hessian.loss(
            weights={f: weights[f] + deltas[(f, fmt)] for f, fmt in allocation.items() if is_quantized(fmt)}
        )

    return loss


def _single_jobs(
    options: OptionTable,
    context: Mapping[str, str],
    deltas: Mapping[tuple[str, str], torch.Tensor],
    index: Mapping[tuple[str, str], int],
) -> tuple[list[dict[str, str]], list[tuple[int, int, int]]]:
    """The allocations whose losses give the measured single-layer changes, and per quantized key
    ``(row of the key, job of its reference, job of the key)``: for each layer, the other layers in
    ``context`` (the reference), then the layer in each of its quantized formats on top."""
    background = {f: fmt for f, fmt in context.items() if is_quantized(fmt)}
    jobs: list[dict[str, str]] = []
    slots: list[tuple[int, int, int]] = []
    for f in options.layers:
        others = {g: fmt for g, fmt in background.items() if g != f}
        ref = len(jobs)
        jobs.append(others)
        for fmt in (o.format for o in options.options[f]):
            if (f, fmt) in deltas:
                slots.append((index[(f, fmt)], ref, len(jobs)))
                jobs.append({**others, f: fmt})
    return jobs, slots


def onnx_loss(
    model: onnx.ModelProto,
    batches: Sequence[tuple[Any, Any]],
    loss_fn: LossFn,
    *,
    io: ModelIO | None = None,
    threads: int = 2,
    provider: str = "cpu",
) -> float:
    """Mean of ``loss_fn`` (a batch-mean loss) over ``batches``, weighted by batch size, of an ONNX
    model run in onnxruntime: one session, dropped after.

    Args:
        model: an ``onnx.ModelProto``.
        batches: ``(inputs, targets)`` pairs, e.g. the calibration split.
        loss_fn: ``fn(outputs, targets)`` on torch tensors (the first model output).
        io: the model-I/O contract for the feeds (:func:`hawqtool.evaluate.session_feeds`).
        threads: onnxruntime intra-op threads.
        provider: the execution provider (:func:`hawqtool.evaluate.make_session`).

    Raises:
        UsageError: the loss is NaN or infinite on a batch, or there are no batches.
        ExportError: onnxruntime fails to load or run the model.
    """
    from hawqtool.evaluate import make_session, run_session, session_feeds
    from hawqtool.modelio import batch_size

    session = make_session(model.SerializeToString(), threads=threads, provider=provider)
    total, n = 0.0, 0
    for i, (x, y) in enumerate(batches):
        out = torch.from_numpy(run_session(session, session_feeds(session, x, io)))
        loss = float(loss_fn(out, y))
        if not math.isfinite(loss):
            raise UsageError(f"the onnxruntime model's loss is {loss} on calibration batch {i}")
        size = batch_size(x)
        total += loss * size
        n += size
    if n == 0:
        raise UsageError("cannot measure a loss on an empty split")
    return total / n


def exported_single_loss(
    exporter: Callable[[], QDQExporter],
    batches: Sequence[tuple[Any, Any]],
    loss_fn: LossFn,
    *,
    io: ModelIO | None = None,
    threads: int = 2,
    provider: str = "cpu",
) -> SingleLoss:
    """A ``single_loss`` for :func:`build_dependency_model` with the exported numerics: each
    allocation's QDQ model (``exporter().quantized_model``; activations quantized as the ONNX model
    will quantize them) run in onnxruntime over ``batches`` (:func:`onnx_loss`).

    ``exporter`` returns a :class:`hawqtool.export.QDQExporter`; it is called on the first
    measurement, so a process with no measurements to take never builds one.
    """

    def loss(allocation: Allocation) -> float:
        model = exporter().quantized_model(allocation)
        return onnx_loss(model, batches, loss_fn, io=io, threads=threads, provider=provider)

    return loss


def _middle_format(options: OptionTable, fqn: str) -> str:
    """The median-bits candidate of a layer ({2,4,8} → int4, {4,8,float} → int8)."""
    fmts = sorted((o.format for o in options.options[fqn]), key=format_bits)
    return fmts[len(fmts) // 2]


def measured_change(
    hessian: SplitHessian,
    prepared: PreparedModel,
    allocation: Allocation,
    *,
    clip_search: bool = True,
    base_loss: float | None = None,
) -> float:
    """The real change of the calibration loss when every layer is fake-quantized per ``allocation``.

    The ground truth :meth:`DependencyModel.predict` approximates. ``base_loss`` (e.g.
    :attr:`DependencyModel.base_loss`) saves one pass over the split.
    """
    weights = {
        f: dequantize_as(prepared.weight(f), fmt, clip_search=clip_search)
        for f, fmt in allocation.items()
        if is_quantized(fmt)
    }
    base = hessian.loss() if base_loss is None else base_loss
    return hessian.loss(weights=weights) - base


# --------------------------------------------------------------------------------------------
# Using it: re-score, improve, filter, repair
# --------------------------------------------------------------------------------------------


def rescore(frontier: Frontier, dep: DependencyModel) -> Frontier:
    """The same points, in the same order, with ``score = dep.score(allocation)``."""
    return replace(frontier, points=tuple(replace(p, score=dep.score(p.allocation)) for p in frontier.points))


class _Search:
    """Vectorised move evaluation under the score's pairwise form (shared by improve and repair)."""

    def __init__(self, dep: DependencyModel, options: OptionTable) -> None:
        self.dep = dep
        self.M = dep._score_matrix
        self.lin = dep._score_linear
        self.diag = np.diag(self.M).copy()
        self.layer_of = np.array([dep.layers.index(f) for f, _ in dep.keys], dtype=np.int64)
        self.cost = np.array([options.option(f, fmt).cost for f, fmt in dep.keys])
        self.bits = np.array([format_bits(fmt) for _, fmt in dep.keys])

    def start(self, allocation: Allocation) -> tuple[np.ndarray, np.ndarray]:
        sel = self.dep._indices(allocation)
        return sel, self.M[:, sel].sum(axis=1)

    def single(self, sel: np.ndarray, r: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """δ score and δ cost of switching each layer to each key (k' replaces S[layer(k')])."""
        cur = sel[self.layer_of]
        d = (
            self.lin
            - self.lin[cur]
            + r
            - r[cur]
            + 0.5 * self.diag[cur]
            + 0.5 * self.diag
            - self.M[np.arange(len(cur)), cur]
        )
        return d, self.cost - self.cost[cur]

    def apply(self, sel: np.ndarray, r: np.ndarray, k: int) -> None:
        layer = self.layer_of[k]
        old = sel[layer]
        r += self.M[:, k] - self.M[:, old]
        sel[layer] = k

    def allocation(self, sel: np.ndarray) -> dict[str, str]:
        return {f: self.dep.keys[k][1] for f, k in zip(self.dep.layers, sel, strict=True)}


def improve(
    allocation: Allocation,
    dep: DependencyModel,
    options: OptionTable,
    *,
    max_cost: float | None = None,
    max_moves: int = 200,
) -> dict[str, str]:
    """Lower the score of ``allocation`` without raising its cost above ``max_cost``.

    Best-improvement local search over moves of one layer's format or of two layers' formats at once
    (promote one, demote another), all evaluated exactly under the score's pairwise form from cached
    row sums: no HVPs, O(K²) per move for K (layer, format) pairs.

    Args:
        allocation: the starting point (e.g. a frontier point's).
        dep: the dependency model.
        options: the option table (for costs).
        max_cost: cost ceiling; default the starting allocation's cost.
        max_moves: safety bound on the number of moves.
    """
    s = _Search(dep, options)
    sel, r = s.start(allocation)
    cost = float(s.cost[sel].sum())
    ceiling = cost if max_cost is None else max_cost
    tol = 1e-12 * (1.0 + abs(dep.score(allocation)))
    n = len(dep.keys)
    same_layer = s.layer_of[:, None] == s.layer_of[None, :]
    for _ in range(max_moves):
        d1, c1 = s.single(sel, r)
        cur = sel[s.layer_of]
        A = s.M[:, cur]  # A[i, j] = M[i, S(layer j)]
        D = d1[:, None] + d1[None, :] + s.M - A - A.T + s.M[np.ix_(cur, cur)]
        C = c1[:, None] + c1[None, :]
        feasible = (cost + C <= ceiling + 1e-9 * (1.0 + abs(ceiling))) & ~same_layer
        D = np.where(feasible, D, np.inf)
        single_ok = cost + c1 <= ceiling + 1e-9 * (1.0 + abs(ceiling))
        d1m = np.where(single_ok, d1, np.inf)
        best_pair = int(np.argmin(D))
        best_single = int(np.argmin(d1m))
        if min(D.flat[best_pair], d1m[best_single]) >= -tol:
            break
        if d1m[best_single] <= D.flat[best_pair]:
            cost += float(c1[best_single])
            s.apply(sel, r, best_single)
        else:
            i, j = divmod(best_pair, n)
            cost += float(C[i, j])
            s.apply(sel, r, i)
            s.apply(sel, r, j)
    return s.allocation(sel)


def _point(alloc: dict[str, str], options: OptionTable, dep: DependencyModel) -> FrontierPoint:
    params = options.params
    avg = average_bits(alloc, params) if all(f in params for f in alloc) else 0.0
    return FrontierPoint(
        cost=options.cost(alloc),
        omega=options.omega(alloc),
        allocation=alloc,
        avg_bits=avg,
        score=dep.score(alloc),
    )


def nondominated(points: Sequence[FrontierPoint], *, keep_last: bool = True) -> list[FrontierPoint]:
    """Points not dominated in (cost, score), by increasing cost and strictly decreasing score.

    Duplicated allocations are dropped. With ``keep_last`` the most expensive input point (the most
    precise allocation) stays even if dominated, so the search's first probe is unchanged.
    """
    if not points:
        return []
    anchor = max(points, key=lambda p: p.cost)
    seen: set[tuple[tuple[str, str], ...]] = set()
    out: list[FrontierPoint] = []
    best = math.inf
    for p in sorted(points, key=lambda p: (p.cost, p.score if p.score is not None else math.inf)):
        key = allocation_key(p.allocation)
        if key in seen or p.score is None:
            continue
        seen.add(key)
        if p.score < best:
            out.append(p)
            best = p.score
    if keep_last and allocation_key(anchor.allocation) not in {allocation_key(p.allocation) for p in out}:
        out = [p for p in out if p.cost < anchor.cost] + [anchor]
    return out


def candidates_for_search(
    frontier: Frontier,
    dep: DependencyModel,
    options: OptionTable,
    *,
    improve_points: bool = False,
    progress: bool = False,
) -> tuple[FrontierPoint, ...]:
    """The search's candidates: the frontier re-scored, improved and filtered (see module doc).

    Args:
        frontier: the ΣΩ Pareto frontier, sorted by cost.
        dep: the dependency model.
        options: the option table the frontier was built from.
        improve_points: add each point's local improvement under the score. Off by default: on
            ResNet-20 the improved points exploited the score's errors (bisection ended at 3.9
            average bits instead of 2.6 for a 1 % budget; ``scripts/bench_dependency.py``).
        progress: show a tqdm bar over the points.

    Returns:
        Points sorted by cost whose scores strictly decrease, except possibly for the
        most precise frontier point, which is always kept last.
    """
    scored = list(rescore(frontier, dep).points)
    pool = list(scored)
    if improve_points:
        for p in tqdm(scored, desc="improve candidates", disable=not progress, leave=False):
            alloc = improve(p.allocation, dep, options, max_cost=p.cost)
            if alloc != dict(p.allocation):
                pool.append(_point(alloc, options, dep))
    kept = nondominated(pool)
    log.info(
        "candidates: %d frontier points -> %d after (cost, score) filtering",
        len(frontier),
        len(kept),
    )
    return tuple(kept)


def repair(
    allocation: Allocation,
    dep: DependencyModel,
    options: OptionTable,
    *,
    target: float | None = None,
    max_cost: float | None = None,
    max_steps: int = 1000,
) -> dict[str, str] | None:
    """Promote layers of ``allocation`` until its score is at most ``target``.

    Each step takes the single-layer promotion (to a format with more bits)
    with the largest score reduction per unit of added cost, interactions included: the
    layers that compound most with the others are promoted first. Without a ``target`` it makes one
    step.

    Args:
        allocation: a failing allocation.
        dep: the dependency model.
        options: the option table (costs).
        target: score to reach.
        max_cost: the result must cost strictly less than this (e.g. the cheapest passing point).
        max_steps: safety bound.

    Returns:
        The promoted allocation, or ``None`` when no promotion helps or the target is not reachable
        under ``max_cost``.
    """
    s = _Search(dep, options)
    sel, r = s.start(allocation)
    cost = float(s.cost[sel].sum())
    value = dep.score(allocation)
    steps = 0
    while (target is None and steps == 0) or (target is not None and value > target):
        if steps >= max_steps:
            return None
        d, c = s.single(sel, r)
        ok = (s.bits > s.bits[sel[s.layer_of]]) & (d < 0)
        if max_cost is not None:
            ok &= cost + c < max_cost
        if not ok.any():
            return None
        # A promotion that costs nothing (a flat cost model) is taken first.
        gain = np.where(ok, -d / np.maximum(c, 1e-12 * (1.0 + abs(cost))), -np.inf)
        k = int(np.argmax(gain))
        cost += float(c[k])
        value += float(d[k])
        s.apply(sel, r, k)
        steps += 1
    return s.allocation(sel)


def make_repair(
    candidates: Sequence[FrontierPoint], dep: DependencyModel, options: OptionTable
) -> Callable[[FrontierPoint], FrontierPoint | None]:
    """A ``repair`` callback for :func:`hawqtool.search.bisect`.

    Given a failing candidate, it promotes layers until its score reaches that of the next
    more expensive candidate (which bisection found to pass) while staying strictly cheaper than it.
    """
    order = {allocation_key(p.allocation): i for i, p in enumerate(candidates)}

    def fix(point: FrontierPoint) -> FrontierPoint | None:
        i = order.get(allocation_key(point.allocation))
        if i is None or i + 1 >= len(candidates):
            return None
        nxt = candidates[i + 1]
        target = nxt.score if nxt.score is not None else dep.score(nxt.allocation)
        alloc = repair(point.allocation, dep, options, target=target, max_cost=nxt.cost)
        return None if alloc is None else _point(alloc, options, dep)

    return fix
