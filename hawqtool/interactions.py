"""Inter-layer dependency terms from output changes: no Hessian-vector products.

For a (layer, format) key k, δ_k = f(x; W with only layer k quantized) − f(x; W), measured with one
forward pass per key. To second order the loss change of an allocation a is ½E‖Σ_k c·Bδ_k‖² (plus the
first-order term E⟨∂ℓ/∂f, Σ_k δ_k⟩, zero for teacher targets), with B and c the loss's output curvature
(:mod:`hawqtool.gauss_newton`). So the pairwise term Δ_iᵀH_ijΔ_j of the weight-space model is
E[c⟨Bδ_i, Bδ_j⟩]: exact for a model linear in each layer's weights with teacher mse, the Gauss–Newton
term otherwise, and measured at the real (not infinitesimal) error of each layer.

Each batch's c·Bδ_k (flattened) is projected by a seeded CountSketch to ``sketch_dim`` coordinates (one
random bucket and sign per output element, fresh per batch: inner products are kept in expectation, with
an error ~ ‖a‖‖b‖/√sketch_dim per batch), and the Gram matrix of the keys' sketches is summed over the
batches. A batch with at most ``sketch_dim`` output elements is kept whole (exact). Memory: the keys ×
``sketch_dim`` sketches of one batch, and the keys × keys matrix.

Each key's pass replays the part of the model that cannot depend on its layer (:mod:`hawqtool.replay`):
the float pass of a batch is recorded, and every module whose call ended before the layer's weight was
first read returns its recorded output instead of running. The results are those of full passes; a
model whose replayed pass departs from the recorded one falls back to full passes (with a warning).
"""

from __future__ import annotations

import functools
import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm

from hawqtool import distributed, modelio
from hawqtool.errors import UsageError
from hawqtool.gauss_newton import OutputCurvature, loss_kind
from hawqtool.hvp import SplitHessian
from hawqtool.probes import seed_of
from hawqtool.replay import ReplayError, record

log = logging.getLogger(__name__)

Key = tuple[str, str]
#: Default sketch size: ~1 % relative error per batch on an inner product of aligned vectors.
SKETCH_DIM = 8192


class CountSketch:
    """A seeded CountSketch of vectors of ``size`` elements to ``dim`` coordinates (float64): one
    random bucket and sign per element, drawn once and applied to every vector.

    Vectors sketched by the same sketch keep their inner products in expectation:
    E⟨S a, S b⟩ = ⟨a, b⟩, with variance ≤ 2‖a‖²‖b‖²/dim.

    Example:
        >>> a = torch.randn(100000, generator=torch.Generator().manual_seed(0))
        >>> s = CountSketch(a.numel(), 4096, seed=1)(a)
        >>> abs(float(s @ s) / float(a @ a) - 1) < 0.1
        True
    """

    def __init__(self, size: int, dim: int, *, seed: int, device: torch.device | str = "cpu") -> None:
        gen = torch.Generator(device=device).manual_seed(seed)
        self.dim = dim
        self.bucket = torch.randint(0, dim, (size,), generator=gen, device=device)
        sign = torch.randint(0, 2, (size,), generator=gen, device=device, dtype=torch.float64)
        self.sign = sign.mul_(2).sub_(1)

    def __call__(self, v: torch.Tensor) -> torch.Tensor:
        flat = v.reshape(-1).double()
        out = torch.zeros(self.dim, dtype=flat.dtype, device=flat.device)
        return out.index_add_(0, self.bucket, flat * self.sign)


@dataclass(frozen=True)
class OutputTerms:
    """First- and second-order terms of the keys' output changes over the calibration split.

    ``linear[k] = E⟨∂ℓ/∂f, δ_k⟩``; ``gram[k, k'] = E[c⟨Bδ_k, Bδ_k'⟩]`` (sketched); ``own_loss[k]`` the
    measured change of the mean loss with only key k's weight error (out of context, activations
    float), from the same passes; ``forward_passes`` passes over the split (the float one and one per
    key); ``replayed_fraction`` the mean share of the recorded module calls (the children of the
    quantized layers' ancestors, :mod:`hawqtool.replay`) that the keys' passes replayed instead of
    running (0: every pass ran in full)."""

    keys: tuple[Key, ...]
    linear: np.ndarray
    gram: np.ndarray
    forward_passes: int
    sketched: bool
    seconds: float
    own_loss: np.ndarray = field(default_factory=lambda: np.zeros(0))
    replayed_fraction: float = 0.0


def output_terms(
    hessian: SplitHessian,
    deltas: Mapping[Key, torch.Tensor],
    *,
    sketch_dim: int = SKETCH_DIM,
    seed: int = 0,
    progress: bool = True,
    replay: bool = True,
) -> OutputTerms:
    """The output-space dependency terms of every key of ``deltas`` (module doc).

    Args:
        hessian: the split, the loss and the model (its own copy; weights are swapped and restored).
        deltas: per (layer, format) key the weight error Δ_k, in the layer's weight-view layout.
        sketch_dim: coordinates per batch sketch (a batch with fewer output elements stays exact).
        seed: seeds the sketches, per batch.
        progress: show a tqdm bar over the batches.
        replay: replay the part of the model before each key's layer (module doc); off: every
            key's pass runs the whole model (same results, for checking).

    Raises:
        UsageError: a loss with no known output curvature (:func:`hawqtool.gauss_newton.loss_kind`),
            a bad ``sketch_dim``, or a non-finite output.
    """
    kind = loss_kind(hessian.loss_fn)
    if kind is None:
        raise UsageError(
            "output-space dependency terms need the mse, kl or cross_entropy loss; "
            "set search.dependency_method: hvp for a custom loss"
        )
    if not isinstance(sketch_dim, int) or sketch_dim < 1:
        raise UsageError(f"sketch_dim must be a positive integer, got {sketch_dim!r}")
    t0 = time.perf_counter()
    keys = tuple(deltas)
    params = {f: hessian.params[f] for f, _ in keys}
    moved = {k: hessian._to_param(k[0], d) for k, d in deltas.items()}
    gram = torch.zeros(len(keys), len(keys), dtype=torch.float64, device=hessian.device)
    linear = torch.zeros(len(keys), dtype=torch.float64, device=hessian.device)
    own = torch.zeros(len(keys), dtype=torch.float64, device=hessian.device)
    watched = list({id(p): p for p in params.values()}.values())
    replayed = torch.zeros(1, dtype=torch.float64, device=hessian.device)  # summed replayed shares
    sketched = False
    mine = distributed.shard(len(hessian.batches))
    bar = tqdm(
        total=len(mine) * len(keys),
        desc="dependency terms (output space)",
        disable=not progress or not distributed.is_main(),
        leave=False,
    )
    with distributed.shared_failure("the output-space dependency terms"), torch.no_grad():
        for b in mine:
            x, y = hessian.batches[b]
            weight = hessian.sizes[b] / hessian.n
            yd = modelio.to_device(y, hessian.device)
            recording = None
            if replay:
                recording = record(hessian.model, functools.partial(hessian.outputs, x), params=watched)
                base = _finite(recording.result)
            else:
                base = _finite(hessian.outputs(x))
            base_loss = hessian.loss_fn(base, yd).double()
            curv = OutputCurvature.of(kind, base, y)
            grad_out = _output_grad(hessian, base, y) * weight
            root = math.sqrt(curv.scale * weight)
            exact = base.numel() <= sketch_dim
            sketched |= not exact
            seeded = seed_of(seed, "sketch", b)
            sketch = (
                None if exact else CountSketch(base.numel(), sketch_dim, seed=seeded, device=hessian.device)
            )
            rows = []
            for i, (f, _) in enumerate(keys):
                p = params[f]
                saved = p.data
                try:
                    p.data = saved + moved[keys[i]]
                    out = None
                    if recording is not None:
                        try:
                            with recording.replaying(p) as plan:
                                out = hessian.outputs(x)
                            replayed += plan.skipped
                        except ReplayError as e:
                            log.warning("prefix replay fell back to full forward passes: %s", e)
                            replay, recording, out = False, None, None
                    if out is None:
                        out = hessian.outputs(x)
                    delta = _finite(out) - base
                finally:
                    p.data = saved
                linear[i] += (grad_out.double() * delta.double()).sum()
                own[i] += (hessian.loss_fn(out, yd).double() - base_loss) * weight
                v = curv.apply(delta).reshape(-1).double() * root
                rows.append(v if sketch is None else sketch(v))
                bar.update(1)
            stacked = torch.stack(rows)
            gram += stacked @ stacked.T
            del recording  # one batch's recorded outputs at a time
    bar.close()
    distributed.all_reduce_sum([gram, linear, own, replayed], what="the output-space dependency terms")
    g = gram.cpu().numpy()
    return OutputTerms(
        keys=keys,
        linear=linear.cpu().numpy(),
        gram=0.5 * (g + g.T),
        forward_passes=1 + len(keys),
        sketched=sketched,
        seconds=time.perf_counter() - t0,
        own_loss=own.cpu().numpy(),
        replayed_fraction=float(replayed) / (len(hessian.batches) * len(keys)) if keys else 0.0,
    )


def _finite(out: torch.Tensor) -> torch.Tensor:
    if not torch.isfinite(out).all():
        raise UsageError("the model's output is not finite with a quantized layer on a calibration batch")
    return out


def _output_grad(hessian: SplitHessian, base: torch.Tensor, y: object) -> torch.Tensor:
    """∂(batch loss)/∂f at the float outputs (zero for teacher targets with mse or kl)."""
    with torch.enable_grad():
        f = base.detach().clone().requires_grad_(True)
        loss = hessian.loss_fn(f, modelio.to_device(y, hessian.device))
        (g,) = torch.autograd.grad(loss, f)
    return g


def stack_keys(keys: Sequence[Key], terms: OutputTerms) -> tuple[np.ndarray, np.ndarray]:
    """``terms`` laid out over ``keys`` (a superset: keys missing from ``terms``, e.g. float, are 0)."""
    index = {k: i for i, k in enumerate(terms.keys)}
    pos = np.array([index.get(k, -1) for k in keys])
    have = pos >= 0
    linear = np.zeros(len(keys))
    matrix = np.zeros((len(keys), len(keys)))
    linear[have] = terms.linear[pos[have]]
    matrix[np.ix_(have, have)] = terms.gram[np.ix_(pos[have], pos[have])]
    return linear, matrix
