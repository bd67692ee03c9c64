"""Inter-layer dependency terms: score whole allocations, re-order and repair search candidates.

HAWQ-V2's ΣΩ scores each layer alone. To second order the loss change of an allocation with weight
error Δ is gᵀΔ + ½ΔᵀHΔ, and the cross-layer blocks H_ij carry how layers' errors interact. Every
candidate (layer, format) key k has a known error Δ_k, so the matrix M[k, k'] = Δ_kᵀHΔ_k' is built once
(:func:`build_dependency_model`) and then any allocation is scored from its entries. Two ways:

- ``output`` (default): M[k, k'] = E[c⟨Bδ_k, Bδ_k'⟩] from each key's measured output change δ_k, one
  forward pass per key and no Hessian-vector products (:mod:`hawqtool.interactions`);
- ``hvp``: one Hessian-vector product per key, v = Δ_k (the 0.3 method).

Why the search ranks by :meth:`DependencyModel.score` rather than ``predict``: at 2 to 4 bits the
errors are far outside the region where the expansion holds, and the exported model adds activation
quantization and kernels that the weights never see. So each key's own term is measured out of context
(m_k: the calibration-loss change with only its layer quantized, every other layer float): in
onnxruntime for formats that quantize activations under ``exported`` numerics, from the key's own
term pass in torch otherwise (:func:`hawqtool.singles.torch_models`). Only the cross terms come from
the model:

    score(a) = Σ_l m_(l,a_l) + ½ Σ_(l≠j) M[(l,a_l), (j,a_j)]

The cross terms are computed for the *interacting* keys only: by Cauchy–Schwarz (H is positive
semi-definite in the Gauss–Newton view) |M[k, k']| ≤ √(M_kk M_k'k'), and Ω_k estimates M_kk, so the
keys with the smallest √Ω_k, together at most ``tolerance`` of Σ√Ω, are left out (their cross terms
0, their own term ½Ω_k when no measurement gives it). Most int8 keys fall there: their error is ~16×
smaller than int4's.

:func:`candidates_for_search` re-scores the frontier and keeps the points not dominated in (cost,
score), always with the most precise point (bisection's first probe decides whether the budget is
possible at all, and that must not depend on a model); :func:`repair` promotes the layers whose
promotion lowers the score most per unit of added cost. ``scripts/bench_sensitivity.py`` and
``scripts/bench_dependency.py`` measure how well the scores rank allocations (the measurements
behind these choices are in docs/benchmarks.md).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from hawqtool import distributed
from hawqtool.errors import UsageError
from hawqtool.formats import allocation_key, average_bits, format_bits, is_quantized
from hawqtool.hessian import stage_costs
from hawqtool.hvp import SplitHessian
from hawqtool.interactions import SKETCH_DIM, output_terms, stack_keys
from hawqtool.prepare import PreparedModel
from hawqtool.quantizer import quant_error
from hawqtool.singles import (
    Allocation,
    SingleLoss,
    measured_own_terms,
    torch_models,
    weights_single_loss,
)
from hawqtool.singles import exported_single_loss as exported_single_loss  # re-exported: the stage's API
from hawqtool.singles import measured_change as measured_change
from hawqtool.singles import onnx_loss as onnx_loss
from hawqtool.types import Frontier, FrontierPoint, OptionTable

log = logging.getLogger(__name__)

#: Where :attr:`DependencyModel.measured` came from (module doc).
NUMERICS = ("weights", "exported")
#: How the second-order terms are computed (module doc).
METHODS = ("output", "hvp")
#: Where a key's own term comes from (:attr:`DependencyModel.own_source`).
OWN_SOURCES = ("onnxruntime", "torch", "estimate", "float")
#: Default share of Σ√Ω_k whose keys are left out of the interactions (module doc).
INTERACTION_TOLERANCE = 0.1


@dataclass(frozen=True, eq=False)
class DependencyModel:
    """The second-order model ΔL(a) ≈ gᵀΔ_a + ½Δ_aᵀHΔ_a over every candidate (layer, format) pair.

    ``keys[k] = (fqn, format)``; ``linear[k] = gᵀΔ_k``; ``matrix[k, k'] = Δ_kᵀ H Δ_k'`` (symmetric;
    rows of ``float`` keys are zero; a key left out of the interactions has only its diagonal, Ω_k).
    Entries between two formats of the same layer are never used. ``measured[k]`` is key k's own term
    measured out of context (module doc); with it, :meth:`score` is the calibrated score, otherwise
    it equals :meth:`predict`.

    Attributes:
        layers: quantizable layers, model order.
        keys: one ``(fqn, format)`` per candidate option.
        linear: first-order terms gᵀΔ_k, shape ``(K,)``.
        matrix: second-order terms Δ_kᵀHΔ_k', shape ``(K, K)``.
        measured: each key's own term, the loss change with only its layer quantized, shape ``(K,)``,
            or ``None``.
        own_source: where each key's own term came from: ``onnxruntime`` (or the caller's
            ``single_loss``), ``torch`` (weights fake-quantized), ``estimate`` (½Ω_k: a key left out
            of the interactions whose format torch models), ``float``; empty without ``measured``.
        own_loss: ``output`` method: each interacting key's calibration-loss change with only its
            weight error (torch, other layers float), from the term passes.
        interacting: how many keys have cross terms (module doc).
        base_loss: calibration loss of the float model.
        hvps: Hessian-vector products spent building it.
        forward_passes: passes over the calibration split spent on ``measured`` beyond the term
            passes (onnxruntime, or torch under ``hvp``).
        seconds: wall time of the build.
        clip_search: whether Δ used the quantizer's clipping search (must match export).
        numerics: what ``measured`` was measured on: ``weights`` (torch, weights fake-quantized),
            ``exported`` (the exported QDQ model in onnxruntime, for the formats torch does not
            model), or another caller's label.
        method: how ``linear`` and ``matrix`` were computed: ``output`` or ``hvp`` (module doc).
        costs: passes over the split (forward and backward apart), seconds, peak memory (MiB).

    Example:
        >>> # dep = build_dependency_model(SplitHessian(prep, calib, F.cross_entropy), prep, options)
        >>> # dep.predict({"conv1": "int4", "fc": "int8"})    # predicted calibration-loss change
    """

    layers: tuple[str, ...]
    keys: tuple[tuple[str, str], ...]
    linear: np.ndarray
    matrix: np.ndarray
    measured: np.ndarray | None = None
    own_source: tuple[str, ...] = ()
    own_loss: np.ndarray | None = None
    interacting: int = 0
    base_loss: float = 0.0
    hvps: int = 0
    forward_passes: int = 0
    seconds: float = 0.0
    clip_search: bool = True
    numerics: str = "weights"
    method: str = "hvp"
    costs: Mapping[str, float] = field(default_factory=dict)
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
            # The own terms are measured; the matrix gives only the cross terms.
            s_lin, s_mat = m, mat.copy()
            np.fill_diagonal(s_mat, 0.0)
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
        """The search's ranking score: measured own terms plus the cross terms (module doc); equal
        to :meth:`predict` when the model holds no measurements."""
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

    def summary(self) -> dict[str, Any]:
        """What report.json says about the stage: how the terms were computed and what they cost.

        Example:
            >>> DependencyModel(("a",), (("a", "int4"),), [0.0], [[1.0]], method="output").summary()["pairs"]
            1
        """
        return {
            "method": self.method,
            "numerics": self.numerics,
            "pairs": len(self.keys),
            "interacting": self.interacting,
            "own_terms": {src: self.own_source.count(src) for src in OWN_SOURCES if src in self.own_source},
            "hvps": self.hvps,
            "costs": dict(self.costs),
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "layers": list(self.layers),
            "keys": [list(k) for k in self.keys],
            "linear": self.linear.tolist(),
            "matrix": self.matrix.tolist(),
            "measured": None if self.measured is None else self.measured.tolist(),
            "own_source": list(self.own_source),
            "own_loss": None if self.own_loss is None else np.asarray(self.own_loss).tolist(),
            "interacting": self.interacting,
            "base_loss": self.base_loss,
            "hvps": self.hvps,
            "forward_passes": self.forward_passes,
            "seconds": self.seconds,
            "clip_search": self.clip_search,
            "numerics": self.numerics,
            "method": self.method,
            "costs": dict(self.costs),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> DependencyModel:
        return cls(
            layers=tuple(d["layers"]),
            keys=tuple((str(a), str(b)) for a, b in d["keys"]),
            linear=np.asarray(d["linear"], dtype=np.float64),
            matrix=np.asarray(d["matrix"], dtype=np.float64),
            measured=None if d.get("measured") is None else np.asarray(d["measured"], dtype=np.float64),
            own_source=tuple(str(x) for x in d.get("own_source") or ()),
            own_loss=None if d.get("own_loss") is None else np.asarray(d["own_loss"], dtype=np.float64),
            interacting=int(d.get("interacting", 0)),
            base_loss=float(d.get("base_loss", 0.0)),
            hvps=int(d.get("hvps", 0)),
            forward_passes=int(d.get("forward_passes", 0)),
            seconds=float(d.get("seconds", 0.0)),
            clip_search=bool(d.get("clip_search", True)),
            numerics=str(d.get("numerics", "weights")),  # caches from before the setting: torch
            method=str(d.get("method", "hvp")),  # caches from before 0.4: HVPs
            costs={str(k): float(v) for k, v in (d.get("costs") or {}).items()},
        )


# --------------------------------------------------------------------------------------------
# Building it
# --------------------------------------------------------------------------------------------


def interacting_keys(options: OptionTable, tolerance: float = INTERACTION_TOLERANCE) -> set[tuple[str, str]]:
    """The quantized keys that get cross terms: all but those with the smallest √Ω_k, which together
    carry at most ``tolerance`` of Σ√Ω_k (module doc). With no Ω to go by (all zero) every key.

    Example:
        >>> from hawqtool.types import LayerOption
        >>> opt = lambda fmt, omega: LayerOption(fmt, 1.0, 1.0, omega)
        >>> table = OptionTable(("a", "b"), {"a": (opt("int4", 64.0), opt("int8", 0.25)),
        ...                                  "b": (opt("int4", 16.0), opt("float", 0.0))}, "size")
        >>> sorted(interacting_keys(table, 0.1))  # √Ω: 8, 0.5, 4; 0.5 is 4 % of 12.5
        [('a', 'int4'), ('b', 'int4')]
    """
    if not 0.0 <= tolerance < 1.0:
        raise UsageError(f"the interaction tolerance must be in [0, 1), got {tolerance!r}")
    keys = [(f, o.format) for f in options.layers for o in options.options[f] if is_quantized(o.format)]
    root = np.sqrt(np.clip([options.option(f, fmt).omega for f, fmt in keys], 0.0, None))
    total = float(root.sum())
    if total <= 0.0 or not math.isfinite(total):
        return set(keys)
    order = np.argsort(root, kind="stable")
    left_out = order[np.cumsum(root[order]) <= tolerance * total]
    return set(keys) - {keys[i] for i in left_out}


def build_dependency_model(
    hessian: SplitHessian,
    prepared: PreparedModel,
    options: OptionTable,
    *,
    clip_search: bool = True,
    measure_singles: bool = True,
    single_loss: SingleLoss | None = None,
    numerics: str | None = None,
    method: str = "output",
    tolerance: float = INTERACTION_TOLERANCE,
    sketch_dim: int = SKETCH_DIM,
    seed: int = 0,
    progress: bool = True,
) -> DependencyModel:
    """Measure gᵀΔ_k and Δ_kᵀHΔ_k' for the interacting (layer, format) pairs of ``options``, and
    each pair's own term (module doc).

    ``output``: one forward pass per interacting pair (``float`` has Δ = 0), the terms from the
    output changes (:func:`hawqtool.interactions.output_terms`). ``hvp``: one gradient and one HVP per
    interacting pair; the HVP for a pair on layer i differentiates only w.r.t. layers i, i+1, …
    (model order), so backward stops early, and the entries with earlier layers come from their own
    rows (H is symmetric; entries computed twice are averaged). A pair left out has only its
    diagonal, Ω_k. With ``measure_singles``, each pair's own term out of context: by ``single_loss``
    for the formats torch does not model (one pass each and one reference), from the pair's term pass
    otherwise (``output``; ½Ω_k for a pair left out) or a torch pass of its own (``hvp``).

    Args:
        hessian: the Hessian of the calibration loss.
        prepared: the model whose weights are quantized (the same as ``hessian``'s).
        options: candidate formats per layer, with their Ω.
        clip_search: passed to the quantizer; must match what export uses.
        measure_singles: measure each pair's own term (module doc).
        single_loss: the calibration loss of an allocation (``fqn -> format``, other layers
            float), computed by this process alone (under a process group each rank takes its share
            of the allocations, and the losses are summed over the ranks), for the formats that
            quantize activations (:func:`hawqtool.singles.torch_models`). Default: torch for all.
        numerics: the label recorded in :attr:`DependencyModel.numerics`; default ``weights``
            without ``single_loss``, else ``custom``.
        method: ``output`` or ``hvp`` (module doc).
        tolerance: the share of Σ√Ω left out of the interactions (:func:`interacting_keys`; 0: none).
        sketch_dim: ``output``: sketch size per batch (:mod:`hawqtool.interactions`).
        seed: ``output``: seeds the sketches.
        progress: show a tqdm bar over the HVPs and passes.

    Raises:
        UsageError: ``options`` names a layer the prepared model lacks, an unknown ``method``, a
            ``tolerance`` outside [0, 1), or ``output`` with a loss of no known output curvature.
    """
    if method not in METHODS:
        raise UsageError(f"unknown dependency method {method!r}; allowed: {', '.join(METHODS)}")
    t0 = time.perf_counter()
    layers = tuple(options.layers)
    unknown = [f for f in layers if f not in prepared.fqns]
    if unknown:
        raise UsageError(f"option table layers {unknown} are not in the model; layers: {prepared.fqns}")
    keys = tuple((f, o.format) for f in layers for o in options.options[f])
    index = {k: i for i, k in enumerate(keys)}
    interacting = interacting_keys(options, tolerance)
    deltas: dict[tuple[str, str], torch.Tensor] = {}
    for f, fmt in keys:
        if (f, fmt) in interacting or (measure_singles and method == "hvp" and is_quantized(fmt)):
            w = prepared.weight(f)
            deltas[(f, fmt)] = quant_error(w, fmt, clip_search=clip_search).to(hessian.device)
    terms_of = {k: deltas[k] for k in keys if k in interacting}

    hvps = term_passes = 0
    own = replayed = None
    if method == "output":
        terms = output_terms(hessian, terms_of, sketch_dim=sketch_dim, seed=seed, progress=progress)
        linear, matrix = stack_keys(keys, terms)
        term_passes = terms.forward_passes
        own = np.zeros(len(keys))
        for k, loss_change in zip(terms.keys, terms.own_loss, strict=True):
            own[index[k]] = loss_change
        replayed = terms.replayed_fraction
    else:
        bar = tqdm(
            total=len(terms_of),
            desc="dependency terms",
            disable=not progress or not distributed.is_main(),
            leave=False,
        )
        linear, matrix = _hvp_terms(hessian, layers, keys, terms_of, bar)
        bar.close()
        hvps = len(terms_of)
    term_seconds = time.perf_counter() - t0
    matrix = matrix.copy()
    for k in keys:
        if is_quantized(k[1]) and k not in interacting:
            matrix[index[k], index[k]] = options.option(*k).omega
    base_loss = hessian.loss()

    t_own = time.perf_counter()
    measured = None
    sources: list[str] = []
    onnx_passes = torch_passes = 0
    if measure_singles:
        sources = [_own_source(k, single_loss is not None, k in interacting, method) for k in keys]
        measured = np.zeros(len(keys))
        for i, src in enumerate(sources):
            if src == "torch" and own is not None:
                measured[i] = own[i]
            elif src == "estimate":
                measured[i] = 0.5 * matrix[i, i]
        by_onnx = [k for k, src in zip(keys, sources, strict=True) if src == "onnxruntime"]
        by_torch = [k for k, src in zip(keys, sources, strict=True) if src == "torch" and own is None]
        bar = tqdm(
            total=len(by_onnx) + 1 if by_onnx else 0,
            desc="own terms (onnxruntime)",
            disable=not progress or not distributed.is_main() or not by_onnx,
            leave=False,
        )
        if by_onnx:
            assert single_loss is not None
            got = measured_own_terms(by_onnx, single_loss, local=True, device=hessian.device, bar=bar)
            measured[[index[k] for k in by_onnx]] = got
            onnx_passes = len(by_onnx) + 1
        bar.close()
        if by_torch:
            torch_loss = weights_single_loss(hessian, prepared, deltas)
            got = measured_own_terms(by_torch, torch_loss, local=False, device=hessian.device, base=base_loss)
            measured[[index[k] for k in by_torch]] = got
            torch_passes = len(by_torch)
    seconds = time.perf_counter() - t0
    term_forward = hvps + 1 if hvps else term_passes
    dep = DependencyModel(
        layers=layers,
        keys=keys,
        linear=linear,
        matrix=matrix,
        measured=measured,
        own_source=tuple(sources),
        own_loss=own,
        interacting=len(terms_of),
        base_loss=base_loss,
        hvps=hvps,
        forward_passes=onnx_passes + torch_passes,
        seconds=seconds,
        clip_search=clip_search,
        numerics=numerics or ("weights" if single_loss is None else "custom"),
        method=method,
        costs={
            # The terms' passes (a gradient, and per HVP one first and one second backward that stop
            # early; or the output changes), the own terms' passes, and the base loss.
            **stage_costs(
                term_forward + torch_passes + onnx_passes + 1,
                1 + 2 * hvps if hvps else 0,
                seconds,
                device=hessian.device,
            ),
            "term_forward_passes": float(term_forward),
            "term_seconds": term_seconds,
            "onnx_passes": float(onnx_passes),
            "own_term_seconds": seconds - (t_own - t0),
            # Output terms: the share of each key's pass replayed from the float pass (hawqtool.replay).
            **({"term_replayed_fraction": float(replayed)} if replayed is not None else {}),
        },
    )
    log.info(
        "dependency model (%s): %d (layer, format) pairs, %d interacting, %d HVPs, %d term passes, "
        "%d own-term passes (%d onnxruntime), %.1f s",
        method,
        len(keys),
        dep.interacting,
        dep.hvps,
        term_forward,
        dep.forward_passes,
        onnx_passes,
        dep.seconds,
    )
    return dep


def _own_source(key: tuple[str, str], by_single_loss: bool, interacting: bool, method: str) -> str:
    """Where ``key``'s own term comes from (:attr:`DependencyModel.own_source`)."""
    if not is_quantized(key[1]):
        return "float"
    if by_single_loss and not torch_models(key[1]):
        return "onnxruntime"
    return "torch" if interacting or method == "hvp" else "estimate"


def planned_passes(
    options: OptionTable,
    *,
    method: str,
    exported: bool,
    measure_singles: bool = True,
    tolerance: float = INTERACTION_TOLERANCE,
) -> tuple[int, int]:
    """The passes over the calibration split :func:`build_dependency_model` will take, in torch and
    in onnxruntime, a backward counted as two forwards (for :mod:`hawqtool.forecast`). Torch: the
    terms of the interacting keys (``output``: one forward per key and the base, some of it replayed;
    ``hvp``: a gradient and per key one HVP), the base loss, and under ``hvp`` one pass per own term
    torch measures. Onnxruntime, when ``exported``: one pass per key whose format torch does not
    model, and one reference.

    Example:
        >>> from hawqtool.types import LayerOption
        >>> row = (LayerOption("int4", 1.0, 2.0, 2.0), LayerOption("float", 4.0, 0.0, 0.0))
        >>> planned_passes(OptionTable(("a", "b"), {"a": row, "b": row}, "size"), method="output",
        ...                exported=True)
        (4, 3)
    """
    interacting = interacting_keys(options, tolerance)
    n = len(interacting)
    terms = 1 + n if method == "output" else n + 1 + 2 * (1 + 2 * n)
    if not measure_singles:
        return terms + 1, 0
    # The build's own rule per key; "torch" costs a pass of its own only under hvp.
    keys = [(f, o.format) for f in options.layers for o in options.options[f]]
    sources = [_own_source(k, exported, k in interacting, method) for k in keys]
    onnx = sources.count("onnxruntime")
    torch_singles = sources.count("torch") if method == "hvp" else 0
    return terms + torch_singles + 1, onnx + 1 if onnx else 0


def _hvp_terms(
    hessian: SplitHessian,
    layers: Sequence[str],
    keys: Sequence[tuple[str, str]],
    deltas: Mapping[tuple[str, str], torch.Tensor],
    bar: Any,
) -> tuple[np.ndarray, np.ndarray]:
    """gᵀΔ_k and Δ_kᵀHΔ_k' by one gradient and one HVP per key (:func:`build_dependency_model`)."""
    index = {k: i for i, k in enumerate(keys)}
    grad = hessian.grad()
    linear = np.zeros(len(keys))
    for k, d in deltas.items():
        linear[index[k]] = float((grad[k[0]].double() * d.double()).sum())
    total = np.zeros((len(keys), len(keys)))
    count = np.zeros((len(keys), len(keys)))
    position = {f: i for i, f in enumerate(layers)}
    for key in sorted(deltas, key=lambda k: position[k[0]]):
        bar.update(1)
        hv = hessian.hvp({key[0]: deltas[key]}, wrt=layers[position[key[0]] :])
        i = index[key]
        for other, d in deltas.items():
            if other[0] in hv:
                j = index[other]
                total[i, j] += float((hv[other[0]].double() * d.double()).sum())
                count[i, j] += 1
    both = count + count.T
    return linear, np.divide(total + total.T, both, out=np.zeros_like(total), where=both > 0)


# --------------------------------------------------------------------------------------------
# Using it: re-score, improve, filter, repair
# --------------------------------------------------------------------------------------------


def rescore(frontier: Frontier, dep: DependencyModel) -> Frontier:
    """The same points, in the same order, with ``score = dep.score(allocation)``."""
    return replace(frontier, points=tuple(replace(p, score=dep.score(p.allocation)) for p in frontier.points))


class _Search:
    """Vectorised move evaluation under the score's pairwise form (for :func:`repair`)."""

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
) -> tuple[FrontierPoint, ...]:
    """The search's candidates: the frontier re-scored and filtered (see module doc).

    Args:
        frontier: the ΣΩ Pareto frontier, sorted by cost.
        dep: the dependency model.
        options: the option table the frontier was built from (kept for callers; unused).

    Returns:
        Points sorted by cost whose scores strictly decrease, except possibly for the
        most precise frontier point, which is always kept last.
    """
    kept = nondominated(list(rescore(frontier, dep).points))
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
