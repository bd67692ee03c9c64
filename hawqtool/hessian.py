"""Per-layer Hessian traces Tr(H_ii) (docs/design.md §2), by one of two estimators.

H is the Hessian of the MEAN loss over the whole calibration split; H_ii is its block on one
quantizable layer's weight. ``hutchinson``: for a Rademacher probe z_i on that block,
E[z_iᵀ H_ii z_i] = Tr(H_ii). ``gauss_newton``: with teacher targets and the mse or kl loss H is the
Gauss–Newton matrix, and ONE first-order backward of ⟨v, B f⟩ per probe samples every layer's trace
(:mod:`hawqtool.gauss_newton`, :class:`hawqtool.probes.GaussNewtonSampler`); for labels it estimates
the Gauss–Newton part of H. Both share the epochs, seeding, stopping rule, cache and processes below.

The probe schedule (why it is fast)
-----------------------------------
Work proceeds in *epochs*, each one pass over the calibration split in random sub-batches of at
most ``sub_batch`` images (a fresh random partition every epoch). Per sub-batch: ONE forward pass
and ONE first backward (``create_graph=True``) w.r.t. the layers still being estimated, then per
such layer one second backward ``grad(g_i, W_i, grad_outputs=z_i) = H_ii z_i`` through its own
block only, with a fresh probe. So:

- every layer's sample is free of the cross-layer terms z_iᵀH_ijz_j that make one all-layer probe
  per HVP so slow for small layers (docs/facts.md: 13× slower);
- the forward pass and the first backward are shared by all layers instead of repeated per layer,
  and the second backward of a late layer stops at that layer (almost free for the classifier);
- small sub-batches are cheap per probe, and because an epoch's sub-batches partition the split,
  the epoch's sample Σ_k (|B_k|/N) z_kᵀH_ii(B_k)z_k is exactly unbiased with no sub-batch sampling
  noise at all (unlike independent random sub-batches), and with less probe noise than one probe
  on the whole split (the cross terms between sub-batches' Hessians drop out);
- a layer leaves once it has converged, so later epochs only pay for the laggards.

``scripts/bench_hessian.py`` measures this against layer-at-a-time and all-layer Hutchinson.

Scale
-----
Randomness is positional: epoch e's partition comes from a generator seeded by (seed, e) and the
probe of part k for layer i from one seeded by (seed, e, k, i), never from one running generator.
So under a ``torch.distributed`` process group (:mod:`hawqtool.distributed`, e.g. ``torchrun``)
each rank computes the parts k ≡ rank (mod world) of every epoch, the per-part samples are
all-reduced, and 1, 2 or 4 processes produce the same table (to summation order) and take the same
stopping decisions. The split stays where the data factory put it; each sub-batch is gathered and
moved to the device on its own, so device memory does not grow with the split.
``scripts/bench_scale.py`` measures the alternatives tried for fewer HVPs (stopping rules and
floors, smaller sub-batches, several probes per part in one vmapped backward, low-rank deflation)
and the speed-up with processes (its numbers are in its output and docs/facts.md).

Stopping
--------
A layer's epoch samples are i.i.d.; its estimate is their mean. Its variance is estimated two ways:
from the epoch samples (n − 1 degrees of freedom), and, with random sub-batches, from its individual
part samples (probe plus sub-batch noise, ≥ the epoch's true variance, but with parts× more degrees
of freedom). A layer has converged when an upper confidence bound on its standard error (the
variance's one-sided :data:`STOP_CONFIDENCE` χ² bound, the smaller of the two estimates') is at most
``rel_tol · max(|trace|, floor)`` with ``floor = TINY_TRACE · Σ_j |trace_j| / n_layers``: a layer
whose trace is tiny, zero or negative (non-convex loss) cannot meet a relative tolerance, so it
converges instead on an absolute tolerance of ``rel_tol`` times a thousandth of the average layer's
trace. The reported ``stderr`` is the standard error scaled by Student's t, so that trace ± 2·stderr
is a 95 % interval however few the samples. Traces are never NaN; a layer the loss does not depend
on has trace 0 with stderr 0.

Why a bound and not the estimate: stopping the first time a layer's own noisy standard error looks
small biases it low and under-states its error (runs that have not yet drawn a large sample have
both a low mean and a low spread). hawqtool 0.2 guarded against that with a fixed floor of 16
epochs (or 16 part samples), which set the cost of every layer whose variance is small. Stopping on
the bound instead only lets a layer go early when its variance is small beyond reasonable doubt, so
the floor drops to :data:`MIN_SAMPLES` samples; ``scripts/bench_scale.py`` replays both rules on long
reference runs (bias, error, coverage of ±2 stderr, probes), and ``tests/test_hessian.py`` checks the
coverage on a matrix with a known trace.

No layer stops before ``min_probes`` (rounded up to whole epochs) nor runs past ``max_probes``
(rounded down to whole epochs; at least 2 epochs). Checks happen at checkpoints only: at the epoch
count the current bound says is needed (at least :data:`MIN_STEP` more, at most :data:`GROWTH` times
as many).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from hawqtool import distributed, modelio
from hawqtool.cache import hash_tensor, load_cached, qualified_name
from hawqtool.errors import UsageError
from hawqtool.files import write_json_atomic
from hawqtool.gauss_newton import resolve_estimator
from hawqtool.hvp import (
    SplitHessian,
    resolve_device,
    resolve_dtype,
)
from hawqtool.modelio import Batch
from hawqtool.prepare import PreparedModel
from hawqtool.probes import EpochSampler as EpochSampler
from hawqtool.probes import GaussNewtonSampler as GaussNewtonSampler
from hawqtool.probes import seed_of as seed_of
from hawqtool.tasks import LossFn
from hawqtool.types import LayerTrace, SensitivityTable

log = logging.getLogger(__name__)

#: Version of the estimator; part of the cache key, so a changed schedule never reuses old tables.
SCHEDULE = "shared-graph-epochs/v4-confidence-bound"
#: Tiny-trace floor, as a fraction of the average absolute layer trace (see the module docstring).
TINY_TRACE = 1e-3
#: A layer stops only when its standard error is below the tolerance with this one-sided confidence
#: (an upper confidence bound on its variance, χ² with the estimate's degrees of freedom) ...
STOP_CONFIDENCE = 0.9
#: ... computed from at least this many samples (epochs, or parts with random sub-batches).
MIN_SAMPLES = 4
#: Checkpoint rule: aim at the epochs the current variance says are needed, but grow a layer's epoch count by at most this factor per checkpoint ...
GROWTH = 2.0
#: ... and by at least this fraction of its current count (fewer looks at the data).
MIN_STEP = 0.1


def estimate_traces(
    prepared: PreparedModel,
    batches: Sequence[Batch],
    loss_fn: LossFn,
    *,
    seed: int = 0,
    rel_tol: float = 0.05,
    min_probes: int = 4,
    max_probes: int = 1000,
    device: str = "auto",
    dtype: str = "float32",
    sub_batch: int | None = 128,
    probes_per_part: int = 1,
    estimator: str = "hutchinson",
    targets: str = "labels",
    progress: bool = True,
    cache_dir: Path | None = None,
) -> SensitivityTable:
    """Estimate Tr(H_ii) of every quantizable layer's weight block, each to ``rel_tol``.

    H is the Hessian of the mean of ``loss_fn`` over all of ``batches`` (the calibration split). See
    the module docstring for the probe schedule and the stopping rule.

    Args:
        prepared: the BN-folded model and its quantizable layers (not modified).
        batches: the calibration split, ``(inputs, targets)`` tensor pairs.
        loss_fn: ``fn(outputs, targets)``, the MEAN loss over a batch, twice differentiable.
        seed: seeds the probes and sub-batches, per (epoch, part, layer) (see :class:`EpochSampler`);
            the same seed on the same device type gives the same table, bit for bit in one
            process, and up to summation order (≤ 1e-6 relative) with any number of processes.
        rel_tol: target relative standard error per layer.
        min_probes: no layer stops before this many probes (at least 2).
        max_probes: a layer stops here (in whole epochs) even if not converged; it is then
            flagged and logged.
        device: ``auto`` (CUDA when available), ``cpu`` or ``cuda``.
        dtype: compute dtype, ``float32``; ``bfloat16`` or ``float16`` on CUDA only.
        sub_batch: images per probe: each epoch splits the calibration data into random near-equal
            parts of at most this size. ``None`` (or at least the split's size) uses the split's
            own batches as the parts.
        probes_per_part: probes per part and layer, all from one vmapped second backward
            (``is_grads_batched``); each part's sample is their mean. See ``scripts/bench_scale.py``
            for when it pays.
        estimator: ``hutchinson`` (second backward per layer), ``gauss_newton`` (one first-order
            backward per probe serves every layer: :mod:`hawqtool.gauss_newton`; exact for teacher
            targets with ``mse`` / ``kl``) or ``auto`` (:func:`hawqtool.gauss_newton.resolve_estimator`;
            the recipe's default).
        targets: ``labels`` or ``model`` (teacher targets), for ``auto``.
        progress: show a tqdm bar (also hidden when stderr is not a terminal).
        cache_dir: when given, the table is stored there under a fingerprint of the weights, the
            data, the loss and every setting, and a later call with the same inputs loads it.
            Under a process group rank 0 alone writes it, and it is used only if every rank has it.

    Returns:
        A :class:`SensitivityTable` in model order, with per-layer trace, average trace, standard
        error, probes and converged flag; ``hvps`` counts single-layer Hessian-vector products
        (each on one sub-batch; 0 for ``gauss_newton``); ``estimator`` the estimator that ran and
        ``costs`` the passes over the split (forward and backward), seconds and peak memory.

    Raises:
        UsageError: empty calibration split, a bad setting, a non-finite loss or HVP, or a model or
            loss without a double backward.

    Example:
        >>> import torch.nn.functional as F
        >>> from hawqtool import zoo
        >>> from hawqtool.prepare import prepare_model
        >>> calib = zoo.digits(batch_size=128).calibration
        >>> prepared = prepare_model(zoo.mlp_digits(), calib[0][0])
        >>> table = estimate_traces(prepared, calib, F.cross_entropy, rel_tol=0.2, progress=False)
        >>> [row.layer for row in table]
        ['hidden.0', 'hidden.1', 'head']
    """
    batches = list(batches)
    if not batches:
        raise UsageError("the calibration split is empty: give at least one (inputs, targets) batch")
    validate_settings(rel_tol=rel_tol, min_probes=min_probes, max_probes=max_probes, sub_batch=sub_batch)
    if not isinstance(probes_per_part, int) or probes_per_part < 1:
        raise UsageError(f"probes_per_part must be a positive integer, got {probes_per_part!r}")
    dev = resolve_device(device)
    resolve_dtype(dtype, dev)
    which = resolve_estimator(estimator, loss_fn, targets=targets)
    settings: dict[str, Any] = {
        "seed": seed,
        "rel_tol": rel_tol,
        "min_probes": min_probes,
        "max_probes": max_probes,
        "sub_batch": sub_batch,
        "probes_per_part": probes_per_part,
        "device": dev.type,
        "dtype": dtype,
        "loss": qualified_name(loss_fn),
        "schedule": SCHEDULE,
    }
    if which != "hutchinson":  # the key of tables cached before the setting stays the same
        settings["estimator"] = which
    fp = fingerprint(prepared, batches, settings)
    path = Path(cache_dir) / f"traces-{fp}.json" if cache_dir is not None else None
    cached = load_cached(path, fp, SensitivityTable.from_dict, what="Hessian traces")
    # Every rank must take the same branch: one that computes alone would wait forever.
    if distributed.all_agree(cached is not None, what="the Hessian cache check") and cached is not None:
        return cached

    start = time.perf_counter()
    H = SplitHessian(prepared, batches, loss_fn, device=dev.type, dtype=dtype)
    sampler_type = GaussNewtonSampler if which == "gauss_newton" else EpochSampler
    sampler = sampler_type(H, sub_batch=sub_batch, seed=seed, probes_per_part=probes_per_part)
    parts = sampler.parts
    per_epoch = parts * probes_per_part
    random_parts = sampler.sub_batch is not None
    max_epochs = max(2, math.ceil(min_probes / per_epoch), max_probes // per_epoch)
    # The first checkpoint: the epochs that give a variance to stop on, and min_probes.
    first = math.ceil(MIN_SAMPLES / parts) if random_parts else MIN_SAMPLES
    min_epochs = min(max(1, first, math.ceil(min_probes / per_epoch)), max_epochs)
    states = [
        TraceState(
            info.fqn, info.params, target=min_epochs, random_parts=random_parts, per_part=probes_per_part
        )
        for info in prepared.layers
    ]
    _run(sampler, states, rel_tol=rel_tol, max_epochs=max_epochs, progress=progress)
    layers = tuple(s.result() for s in states)
    hvps = sum(r.probes for r in layers) if which == "hutchinson" else 0
    seconds = time.perf_counter() - start
    table = SensitivityTable(
        layers=layers,
        seed=seed,
        device=H.device.type,
        rel_tol=rel_tol,
        hvps=hvps,
        seconds=seconds,
        fingerprint=fp,
        settings=settings,
        estimator=which,
        costs=stage_costs(sampler.forward_passes, sampler.backward_passes, seconds, device=H.device),
    )
    lagging = [r for r in layers if not r.converged]
    if lagging and distributed.is_main():
        log.warning(
            "Hessian trace of %d layer(s) did not reach rel_tol=%g within max_probes=%d: %s",
            len(lagging),
            rel_tol,
            max_probes,
            ", ".join(f"{r.layer} (stderr {r.stderr:.3g} on trace {r.trace:.3g})" for r in lagging),
        )
    if path is not None and distributed.is_main():
        write_json_atomic(path, table.to_dict())
    return table


# --------------------------------------------------------------------------------------------
# Stopping
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VarianceEstimate:
    """A sample variance of one epoch's estimate, with its degrees of freedom.

    Example:
        >>> e = VarianceEstimate(1.0, dof=7)
        >>> round(e.upper, 2), round(e.interval, 2)   # 90 % upper bound; (t_7(0.977) / 2)²
        (2.47, 1.47)
    """

    value: float
    dof: int

    @property
    def upper(self) -> float:
        """One-sided :data:`STOP_CONFIDENCE` upper confidence bound on the true variance."""
        return self.value * _chi2_factor(self.dof)

    @property
    def interval(self) -> float:
        """The variance that makes ±2 standard errors a 95.45 % interval (Student's t)."""
        return self.value * _t_factor(self.dof)


@functools.cache
def _chi2_factor(dof: int) -> float:
    from scipy.stats import chi2

    return float(dof / chi2.ppf(1 - STOP_CONFIDENCE, dof))


@functools.cache
def _t_factor(dof: int) -> float:
    from scipy.stats import norm, t

    return float((t.ppf(norm.cdf(2.0), dof) / 2.0) ** 2)


class SampleMean:
    """Mean and sample variance of ``self.samples`` (i.i.d. estimates, e.g. one per epoch); shared
    by the weight and the activation trace estimators."""

    samples: list[float]

    @property
    def n(self) -> int:
        return len(self.samples)

    @property
    def mean(self) -> float:
        return math.fsum(self.samples) / self.n if self.samples else 0.0

    @property
    def variance(self) -> float:
        if self.n < 2:
            return math.inf
        m = self.mean
        return math.fsum((s - m) ** 2 for s in self.samples) / (self.n - 1)


@dataclass
class TraceState(SampleMean):
    fqn: str
    params: int
    target: int  # next checkpoint (epoch count)
    random_parts: bool  # parts are random equal sub-batches (the part-level bound applies)
    per_part: int = 1  # probes behind each part's sample
    samples: list[float] = field(default_factory=list)  # one estimate per epoch
    parts: list[float] = field(default_factory=list)  # every part's own sample
    w2: list[float] = field(default_factory=list)  # Σ_k w_k² per epoch
    done: bool = False
    converged: bool = False

    def add(self, values: Sequence[float], weights: Sequence[float]) -> None:
        self.samples.append(math.fsum(w * v for w, v in zip(weights, values, strict=True)))
        self.parts.extend(values)
        self.w2.append(math.fsum(w * w for w in weights))

    def estimates(self) -> list[VarianceEstimate]:
        """The variance estimates of one epoch's sample that have enough samples to stop on."""
        found = []
        if self.n >= MIN_SAMPLES:
            found.append(VarianceEstimate(self.variance, self.n - 1))
        if self.random_parts and len(self.parts) >= MIN_SAMPLES:
            # Each part's sample is marginally an unbiased sample of Tr(H_ii) with variance (probe +
            # sub-batch) ≥ its variance given the partition, so this over-states the epoch's
            # variance (by the sub-batch share, ~20-40 % measured) but has parts× more degrees of
            # freedom.
            m = math.fsum(self.parts) / len(self.parts)
            var = math.fsum((p - m) ** 2 for p in self.parts) / (len(self.parts) - 1)
            found.append(VarianceEstimate(var * math.fsum(self.w2) / len(self.w2), len(self.parts) - 1))
        return found

    def best(self) -> VarianceEstimate | None:
        """The estimate with the smallest upper confidence bound (what the layer stops on)."""
        return min(self.estimates(), key=lambda e: e.upper, default=None)

    @property
    def stderr(self) -> float:
        """Standard error of the mean, scaled so that mean ± 2·stderr is a 95 % interval however
        few the samples (Student's t with the estimate's degrees of freedom); ∞ before there is one."""
        best = self.best()
        return math.sqrt(best.interval / self.n) if best is not None else math.inf

    def check(self, *, floor: float, rel_tol: float, max_epochs: int) -> None:
        """At a checkpoint: converge, give up at ``max_epochs``, or set the next checkpoint."""
        tol = rel_tol * max(abs(self.mean), floor)
        best = self.best()
        if best is not None and math.sqrt(best.upper / self.n) <= tol:
            self.done = self.converged = True
            return
        if self.n >= max_epochs:
            self.done = True
            return
        variance = best.upper if best is not None else math.inf
        needed = variance / tol**2 if tol > 0 and math.isfinite(variance) else math.inf
        step = max(1, math.ceil(MIN_STEP * self.n))
        target = max(self.n + step, min(needed, GROWTH * self.n))
        self.target = min(max_epochs, math.ceil(target))

    def final_stderr(self) -> float:
        """:attr:`stderr`, or when the layer stopped (at ``max_probes``) before :data:`MIN_SAMPLES`,
        the same from the few epochs there are (∞ from one)."""
        if math.isfinite(self.stderr) or self.n < 2:
            return self.stderr
        return math.sqrt(VarianceEstimate(self.variance, self.n - 1).interval / self.n)

    def result(self) -> LayerTrace:
        trace = self.mean
        stderr = self.final_stderr()
        return LayerTrace(
            layer=self.fqn,
            trace=trace,
            avg_trace=trace / self.params,
            stderr=stderr,
            probes=len(self.parts) * self.per_part,
            converged=self.converged,
            params=self.params,
        )


def checkpoint(
    states: Sequence[TraceState], active: Sequence[TraceState], *, rel_tol: float, max_epochs: int
) -> int:
    """After an epoch: check the ``active`` layers that reached their checkpoint (the tiny-trace
    floor from every layer's current mean, ``states``); returns how many are now done."""
    floor = TINY_TRACE * sum(abs(s.mean) for s in states) / len(states)
    done = 0
    for s in active:
        if s.n >= s.target:
            s.check(floor=floor, rel_tol=rel_tol, max_epochs=max_epochs)
            done += s.done
    return done


def _run(
    sampler: EpochSampler, states: list[TraceState], *, rel_tol: float, max_epochs: int, progress: bool
) -> None:
    from tqdm.auto import tqdm

    bar = tqdm(
        total=len(states),
        desc="Hessian traces",
        unit="layer",
        disable=not progress or not sys.stderr.isatty() or not distributed.is_main(),
    )
    try:
        while True:
            active = [s for s in states if not s.done]
            if not active:
                break
            values, weights = sampler.sample([s.fqn for s in active])
            for s, v in zip(active, values, strict=True):
                s.add(v, weights)
            bar.update(checkpoint(states, active, rel_tol=rel_tol, max_epochs=max_epochs))
            bar.set_postfix(backward=sampler.backward_passes, active=sum(not s.done for s in states))
    finally:
        bar.close()


# --------------------------------------------------------------------------------------------
# Validation, fingerprint, cache
# --------------------------------------------------------------------------------------------


def peak_memory_mib(device: torch.device | None = None) -> float:
    """The process's peak resident memory in MiB (on CUDA: the device's peak allocation)."""
    if device is not None and device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource  # POSIX only; ru_maxrss is KiB on Linux, bytes on macOS

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10


def stage_costs(
    forward: float, backward: float, seconds: float, *, device: torch.device | None = None
) -> dict[str, float]:
    """A stage's costs as recorded in its artifact: passes over the calibration split (forward and
    backward counted apart), wall seconds and the peak memory so far (MiB).

    Example:
        >>> sorted(stage_costs(2, 3, 1.5))
        ['backward_passes', 'forward_passes', 'peak_memory_mib', 'seconds']
    """
    return {
        "forward_passes": float(forward),
        "backward_passes": float(backward),
        "seconds": float(seconds),
        "peak_memory_mib": round(peak_memory_mib(device), 1),
    }


def validate_settings(
    *, rel_tol: float, min_probes: int, max_probes: int, sub_batch: int | None = None
) -> None:
    """The stopping settings shared by the weight and activation trace estimators, and the
    sub-batch size.

    Raises:
        UsageError: naming the bad value and what is allowed.
    """
    if not (isinstance(rel_tol, (int, float)) and math.isfinite(rel_tol) and rel_tol > 0):
        raise UsageError(f"rel_tol must be a finite number > 0, got {rel_tol!r}")
    if not isinstance(min_probes, int) or min_probes < 2:
        raise UsageError(
            f"min_probes must be an integer >= 2 (a standard error needs two), got {min_probes!r}"
        )
    if not isinstance(max_probes, int) or max_probes < min_probes:
        raise UsageError(f"max_probes must be an integer >= min_probes ({min_probes}), got {max_probes!r}")
    if sub_batch is not None and (not isinstance(sub_batch, int) or sub_batch < 1):
        raise UsageError(f"sub_batch must be a positive integer or None (whole split), got {sub_batch!r}")


def fingerprint(prepared: PreparedModel, batches: Sequence[Batch], settings: dict[str, Any]) -> str:
    """sha256 of the prepared model's state dict, its layer list, the data bytes and the settings."""
    h = hashlib.sha256()
    for name, t in prepared.model.state_dict().items():
        hash_tensor(h, name, t)
    h.update(json.dumps(list(prepared.fqns)).encode())
    h.update(json.dumps(prepared.io.to_dict() if prepared.io is not None else None).encode())
    for i, (x, y) in enumerate(batches):
        for j, leaf in enumerate(modelio.leaves(x)):
            hash_tensor(h, f"x{i}.{j}", leaf)
        for j, leaf in enumerate(modelio.leaves(y)):
            hash_tensor(h, f"y{i}.{j}", leaf)
    h.update(json.dumps(settings, sort_keys=True).encode())
    return h.hexdigest()
