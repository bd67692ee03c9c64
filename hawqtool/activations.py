"""Activation sensitivity (HAWQ-V2 §iii): Hessian traces w.r.t. each layer's INPUT activation.

For a layer whose input an integer format quantizes to uint8, the activation term is

    Ω_act = (Tr(H_X) / numel(X)) · ‖Q_u8(X) − X‖²

where X is the layer's input over the WHOLE calibration split (all N samples stacked, ``numel(X)
= N · d``), H_X the Hessian of the MEAN calibration loss L = (1/N) Σ_n ℓ_n w.r.t. X, and Q_u8 the
uint8 quantizer with the range the exporter calibrates (min/max of X over the split, the formula of
:func:`hawqtool.export.uint8_qparams`). This is the weight term's twin (Ω = avg trace · ‖ΔW‖²): both
estimate ΔᵀHΔ, so they add.

Dynamic formats (``intB-d``) quantize the same input at run time (``DynamicQuantizeLinear``: uint8,
the range of the tensor the node sees, widened to include 0). Their term uses the same trace and
``‖Q_dyn(X) − X‖²`` with one range per calibration batch, as the model quantizes when it runs on
batches of that size (a smaller batch spans a narrower range, so this errs on the safe side).

Normalisation. Sample n's loss depends only on its own activation x_n (eval mode, no batch
statistics), so H_X is block diagonal with blocks (1/N) ∇²ℓ_n(x_n) and
``Tr(H_X) = (1/N) Σ_n Tr(∇²_{x_n} ℓ_n)``: the per-sample traces are SUMMED over the split, each with
the 1/N of the mean loss — the mean per-sample trace. A batch k of n_k samples with mean loss L_k
covers the block (n_k/N) ∇²L_k, so an epoch (one pass over the split's batches, a fresh Rademacher
probe z_k per batch and layer) gives the exactly unbiased sample Σ_k (n_k/N) z_kᵀ ∇²L_k z_k, with
∇²L_k z_k from a double backward w.r.t. a zero "perturbation" e added to the layer's input by a
forward pre-hook (x + e, differentiated at e = 0).

Stopping is the weight traces' rule (:mod:`hawqtool.hessian`): epochs are i.i.d.; a layer stops at
a checkpoint once an upper confidence bound on its standard error is at most
``rel_tol · max(|trace|, floor)`` (floor: a thousandth of the mean |trace|), never before 4 epochs
(:data:`~hawqtool.hessian.MIN_SAMPLES`) nor ``min_probes`` probes, and at the latest after
``max_probes``.

Example:
    >>> import torch.nn.functional as F
    >>> from hawqtool import zoo
    >>> from hawqtool.prepare import prepare_model
    >>> calib = zoo.digits(batch_size=128).calibration
    >>> prepared = prepare_model(zoo.mlp_digits(), calib[0][0])
    >>> table = estimate_activation_traces(prepared, calib, F.cross_entropy, rel_tol=0.2, progress=False)
    >>> sorted(table.omegas()) == sorted(prepared.fqns)
    True
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hawqtool import modelio
from hawqtool.cache import load_cached, qualified_name
from hawqtool.errors import UsageError
from hawqtool.files import write_json_atomic
from hawqtool.formats import ACTIVATION_KINDS
from hawqtool.hessian import MIN_SAMPLES, TraceState, checkpoint, fingerprint, validate_settings
from hawqtool.hvp import resolve_device
from hawqtool.modelio import Batch
from hawqtool.prepare import PreparedModel, double_backward_attention
from hawqtool.tasks import LossFn

log = logging.getLogger(__name__)

#: Version of the estimator; part of the cache key.
SCHEDULE = "activation-epochs/v2-confidence-bound/dynamic-error"


@dataclass(frozen=True)
class ActivationTrace:
    """One layer's input-activation trace and its HAWQ-V2 activation term.

    Attributes:
        layer: the layer's FQN.
        trace: Tr(H_X), H_X the Hessian of the mean calibration loss w.r.t. the layer's input over
            the whole split (the mean per-sample trace; module docstring).
        stderr: standard error of ``trace``.
        probes: Hutchinson samples (one per batch per epoch).
        converged: ``stderr`` reached the tolerance.
        numel: elements of the input over the split (N · d).
        rmin, rmax: the input's range over the split (what the exporter's min/max calibrates).
        scale, zero_point: the uint8 quantization of that range.
        sq_error: ‖Q_u8(X) − X‖² summed over the split.
        omega: ``max(trace, 0) / numel · sq_error``.
        sq_error_dynamic: ‖Q_dyn(X) − X‖² summed over the split, each batch quantized with its own
            range (as ``DynamicQuantizeLinear`` does for the dynamic formats ``intB-d``).
        omega_dynamic: ``max(trace, 0) / numel · sq_error_dynamic``.
    """

    layer: str
    trace: float
    stderr: float
    probes: int
    converged: bool
    numel: int
    rmin: float
    rmax: float
    scale: float
    zero_point: int
    sq_error: float
    omega: float
    sq_error_dynamic: float = 0.0
    omega_dynamic: float = 0.0


@dataclass(frozen=True)
class ActivationTable:
    """Activation traces and Ω_act of every layer whose input can be quantized, in model order."""

    layers: tuple[ActivationTrace, ...]
    seed: int
    rel_tol: float
    hvps: int
    seconds: float
    fingerprint: str = ""
    settings: Mapping[str, Any] = field(default_factory=dict)

    def __getitem__(self, fqn: str) -> ActivationTrace:
        for row in self.layers:
            if row.layer == fqn:
                return row
        raise KeyError(fqn)

    def omegas(self) -> dict[str, float]:
        """``fqn -> Ω_act``: ``build_options(..., activation_omega=table.omegas())``."""
        return {row.layer: row.omega for row in self.layers}

    def dynamic_omegas(self) -> dict[str, float]:
        """``fqn -> Ω_act`` of run-time (dynamic) quantization:
        ``build_options(..., dynamic_activation_omega=table.dynamic_omegas())``."""
        return {row.layer: row.omega_dynamic for row in self.layers}

    def to_dict(self) -> dict[str, Any]:
        return {
            "layers": [asdict(r) for r in self.layers],
            "seed": self.seed,
            "rel_tol": self.rel_tol,
            "hvps": self.hvps,
            "seconds": self.seconds,
            "fingerprint": self.fingerprint,
            "settings": dict(self.settings),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ActivationTable:
        d = dict(d)
        d["layers"] = tuple(ActivationTrace(**r) for r in d["layers"])
        return cls(**d)


def uint8_fake_quant(x: torch.Tensor, scale: float, zero_point: int) -> torch.Tensor:
    """``DequantizeLinear(QuantizeLinear(x))`` for uint8 as onnxruntime computes it (round half to even).

    Example:
        >>> uint8_fake_quant(torch.tensor([-1.0, 0.004, 0.006, 9.0]), 0.01, 0).tolist()
        [0.0, 0.0, 0.009999999776482582, 2.549999952316284]
    """
    s = torch.tensor(scale, dtype=torch.float32, device=x.device)
    q = torch.clamp(torch.round(x.float() / s) + zero_point, 0, 255)
    return ((q - zero_point) * s).to(x.dtype)


# --------------------------------------------------------------------------------------------
# Hooks: read or perturb each layer's input
# --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _input_hooks(modules: Mapping[str, nn.Module], fn: Any) -> Iterator[None]:
    """Forward pre-hooks calling ``fn(fqn, x) -> x'`` on each module's first positional input (and
    on every other argument that is the same tensor, as in self-attention's ``(x, x, x)``)."""
    handles = []

    def make(fqn: str) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
            if not args or not isinstance(args[0], torch.Tensor):
                raise UsageError(
                    f"layer {fqn!r}: its input is not a positional tensor argument, so its activation "
                    "cannot be hooked"
                )
            x = args[0]
            new = fn(fqn, x)
            return tuple(new if a is x else a for a in args)

        return hook

    try:
        for fqn, mod in modules.items():
            handles.append(mod.register_forward_pre_hook(make(fqn)))
        yield
    finally:
        for h in handles:
            h.remove()


class _Model:
    """A frozen copy of the prepared model on ``device`` and the modules of the activation layers."""

    def __init__(self, prepared: PreparedModel, device: torch.device) -> None:
        self.model = copy.deepcopy(prepared.model).to(device).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.device = device
        assert prepared.io is not None
        self.io = prepared.io
        self.layers = [info for info in prepared.layers if info.kind in ACTIVATION_KINDS]
        self.modules = {
            info.fqn: self.model.get_submodule(info.param.rpartition(".")[0]) for info in self.layers
        }

    def forward(self, x: Any) -> torch.Tensor:
        return self.io.forward(self.model, modelio.to_device(x, self.device))


@torch.no_grad()
def _ranges_and_errors(
    m: _Model, batches: Sequence[Batch]
) -> dict[str, tuple[float, float, int, float, int, float, float]]:
    """Per layer: (rmin, rmax, numel, scale, zero point, ‖Q_u8(X) − X‖², ‖Q_dyn(X) − X‖²) over the
    split; ``Q_dyn`` quantizes each input tensor with its own range (``DynamicQuantizeLinear``)."""
    from hawqtool.export import uint8_qparams

    lo: dict[str, float] = {}
    hi: dict[str, float] = {}
    numel: dict[str, int] = {}

    def observe(fqn: str, x: torch.Tensor) -> torch.Tensor:
        lo[fqn] = min(lo.get(fqn, math.inf), float(x.min()))
        hi[fqn] = max(hi.get(fqn, -math.inf), float(x.max()))
        numel[fqn] = numel.get(fqn, 0) + x.numel()
        return x

    with _input_hooks(m.modules, observe):
        for x, _ in batches:
            m.forward(x)
    qp = {f: uint8_qparams(lo[f], hi[f]) for f in lo}
    sq: dict[str, float] = {}
    sq_dyn: dict[str, float] = {}

    def error(fqn: str, x: torch.Tensor) -> torch.Tensor:
        scale, zp = qp[fqn]
        d = uint8_fake_quant(x, float(scale), int(zp)) - x
        sq[fqn] = sq.get(fqn, 0.0) + float(d.double().pow(2).sum())
        scale, zp = uint8_qparams(float(x.min()), float(x.max()))
        d = uint8_fake_quant(x, float(scale), int(zp)) - x
        sq_dyn[fqn] = sq_dyn.get(fqn, 0.0) + float(d.double().pow(2).sum())
        return x

    with _input_hooks(m.modules, error):
        for x, _ in batches:
            m.forward(x)
    missing = [info.fqn for info in m.layers if info.fqn not in lo]
    if missing:
        raise UsageError(f"layer(s) {', '.join(missing)} never ran on the calibration split")
    return {
        f: (lo[f], hi[f], numel[f], float(qp[f][0]), int(qp[f][1]), sq[f], sq_dyn[f])
        for f in (i.fqn for i in m.layers)
    }


# --------------------------------------------------------------------------------------------
# Hutchinson epochs and stopping
# --------------------------------------------------------------------------------------------


def _epoch(
    m: _Model,
    batches: Sequence[Batch],
    sizes: Sequence[int],
    loss_fn: LossFn,
    fqns: Sequence[str],
    gen: torch.Generator,
) -> list[float]:
    """One epoch: per layer in ``fqns``, Σ_k (n_k/N) z_kᵀ ∇²_{X_k} L_k z_k over the split's batches."""
    n = sum(sizes)
    active = {f: m.modules[f] for f in fqns}
    acc = [0.0] * len(fqns)
    for (x, y), size in zip(batches, sizes, strict=True):
        perturb: dict[str, list[torch.Tensor]] = {f: [] for f in fqns}

        def add(fqn: str, a: torch.Tensor, perturb: dict[str, list[torch.Tensor]] = perturb) -> torch.Tensor:
            e = torch.zeros_like(a, requires_grad=True)
            perturb[fqn].append(e)
            return a + e

        with _input_hooks(active, add), double_backward_attention():
            loss = loss_fn(m.forward(x), modelio.to_device(y, m.device))
        if not torch.isfinite(loss):
            raise UsageError(f"the loss is {loss.item()} on a calibration batch: check the model and data")
        es = [e for f in fqns for e in perturb[f]]
        grads = torch.autograd.grad(loss, es, create_graph=True, allow_unused=True)
        g_of = dict(zip(map(id, es), grads, strict=True))
        for j, f in enumerate(fqns):
            total = 0.0
            for e in perturb[f]:
                z = (
                    torch.randint(0, 2, e.shape, generator=gen, device=e.device, dtype=e.dtype)
                    .mul_(2)
                    .sub_(1)
                )
                g = g_of[id(e)]
                if g is None or not g.requires_grad:
                    continue  # the loss is at most linear in this input: zero curvature
                try:
                    (hz,) = torch.autograd.grad(g, e, grad_outputs=z, retain_graph=True, allow_unused=True)
                except RuntimeError as err:
                    raise UsageError(
                        f"the loss has no double backward w.r.t. the input of layer {f!r} ({err}); use a "
                        "twice-differentiable model and loss"
                    ) from err
                if hz is not None:
                    total += float((hz * z).sum(dtype=torch.float64))
            acc[j] += total * size / n
    for f, v in zip(fqns, acc, strict=True):
        if not math.isfinite(v):
            raise UsageError(f"an activation Hessian-vector product of layer {f!r} is not finite")
    return acc


def estimate_activation_traces(
    prepared: PreparedModel,
    batches: Sequence[Batch],
    loss_fn: LossFn,
    *,
    seed: int = 0,
    rel_tol: float = 0.05,
    min_probes: int = 4,
    max_probes: int = 1000,
    device: str = "auto",
    progress: bool = True,
    cache_dir: Path | None = None,
) -> ActivationTable:
    """Tr(H_X) of every activation-quantizable layer's input, and its Ω_act (module docstring).

    Args:
        prepared: the BN-folded model (not modified).
        batches: the calibration split, ``(inputs, targets)`` tensor pairs (the same split the
            exporter calibrates its uint8 ranges on).
        loss_fn: ``fn(outputs, targets)``, the MEAN loss over a batch, twice differentiable.
        seed: seeds the probes' ``torch.Generator``; the same seed on the same device gives the same
            table.
        rel_tol: target relative standard error per layer.
        min_probes: no layer stops before this many probes (rounded up to whole epochs).
        max_probes: a layer stops here (in whole epochs, at least 2) even if not converged.
        device: ``auto``, ``cpu`` or ``cuda``.
        progress: a tqdm bar over layers (hidden when stderr is not a terminal).
        cache_dir: when given, the table is cached there under a fingerprint of the weights, the
            data, the loss and every setting.

    Returns:
        An :class:`ActivationTable` in model order (layers whose kind has no activations, e.g.
        embeddings, are left out).

    Raises:
        UsageError: an empty split, a bad setting, a non-finite loss or sample, a layer that never
            runs, or a model or loss without a double backward.
    """
    import sys

    from tqdm.auto import tqdm

    batches = list(batches)
    if not batches:
        raise UsageError("the calibration split is empty: give at least one (inputs, targets) batch")
    validate_settings(rel_tol=rel_tol, min_probes=min_probes, max_probes=max_probes)
    dev = resolve_device(device)
    settings: dict[str, Any] = {
        "seed": seed,
        "rel_tol": rel_tol,
        "min_probes": min_probes,
        "max_probes": max_probes,
        "device": dev.type,
        "loss": qualified_name(loss_fn),
        "schedule": SCHEDULE,
    }
    fp = fingerprint(prepared, batches, settings)
    path = Path(cache_dir) / f"activations-{fp}.json" if cache_dir is not None else None
    cached = load_cached(path, fp, ActivationTable.from_dict, what="activation traces")
    if cached is not None:
        return cached

    start = time.perf_counter()
    m = _Model(prepared, dev)
    stats = _ranges_and_errors(m, batches)
    sizes = [modelio.batch_size(x) for x, _ in batches]
    parts = len(batches)
    max_epochs = max(2, math.ceil(min_probes / parts), max_probes // parts)
    min_epochs = min(max(MIN_SAMPLES, math.ceil(min_probes / parts)), max_epochs)
    states = [TraceState(info.fqn, 1, target=min_epochs, random_parts=False) for info in m.layers]
    gen = torch.Generator(device=dev).manual_seed(seed)
    hvps = 0
    bar = tqdm(
        total=len(states),
        desc="activation traces",
        unit="layer",
        disable=not progress or not sys.stderr.isatty(),
    )
    try:
        while active := [s for s in states if not s.done]:
            values = _epoch(m, batches, sizes, loss_fn, [s.fqn for s in active], gen)
            hvps += len(active) * parts
            for s, v in zip(active, values, strict=True):
                s.add([v], [1.0])
            bar.update(checkpoint(states, active, rel_tol=rel_tol, max_epochs=max_epochs))
    finally:
        bar.close()

    rows = []
    for s in states:
        rmin, rmax, numel, scale, zp, sq, sq_dyn = stats[s.fqn]
        trace = s.mean
        stderr = s.final_stderr()
        rows.append(
            ActivationTrace(
                layer=s.fqn,
                trace=trace,
                stderr=stderr,
                probes=s.n * parts,
                converged=s.converged,
                numel=numel,
                rmin=rmin,
                rmax=rmax,
                scale=scale,
                zero_point=zp,
                sq_error=sq,
                omega=max(trace, 0.0) / numel * sq if numel else 0.0,
                sq_error_dynamic=sq_dyn,
                omega_dynamic=max(trace, 0.0) / numel * sq_dyn if numel else 0.0,
            )
        )
    lagging = [r for r in rows if not r.converged]
    if lagging:
        log.warning(
            "activation trace of %d layer(s) did not reach rel_tol=%g within max_probes=%d: %s",
            len(lagging),
            rel_tol,
            max_probes,
            ", ".join(f"{r.layer} (stderr {r.stderr:.3g} on trace {r.trace:.3g})" for r in lagging),
        )
    table = ActivationTable(
        layers=tuple(rows),
        seed=seed,
        rel_tol=rel_tol,
        hvps=hvps,
        seconds=time.perf_counter() - start,
        fingerprint=fp,
        settings=settings,
    )
    if path is not None:
        write_json_atomic(path, table.to_dict())
    return table
