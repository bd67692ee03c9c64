"""Seeded probe sampling for the trace estimators of :mod:`hawqtool.hessian`: one *epoch* is the
calibration split in random sub-batches (parts), and per part either one Hutchinson sample per layer
(a shared first backward, then a second backward per layer: :class:`EpochSampler`) or one Gauss–Newton
sample of every layer from a single first-order backward (:class:`GaussNewtonSampler`).

Randomness is positional (:func:`seed_of`), so 1, 2 or 4 processes compute the same samples.
"""

from __future__ import annotations

import hashlib
import itertools
import math
from collections.abc import Sequence
from typing import Any

import torch
from torch.utils import _pytree as pytree

from hawqtool import distributed, modelio
from hawqtool.errors import UsageError
from hawqtool.gauss_newton import OutputCurvature, loss_kind
from hawqtool.hvp import NO_DOUBLE_BACKWARD, SplitHessian, severed_double_backward
from hawqtool.modelio import Batch

# --------------------------------------------------------------------------------------------
# Sampling: one epoch = the split in sub-batches; per sub-batch one shared first backward and one
# single-block second backward per active layer
# --------------------------------------------------------------------------------------------


class EpochSampler:
    """Draws one Hutchinson sample of Tr(H_ii) for each of a set of layers per call (an *epoch*).

    An epoch covers the whole split once, in parts: random near-equal sub-batches of at most
    ``sub_batch`` images (a fresh random partition each epoch), or the split's own batches when
    ``sub_batch`` is ``None``. Each part k gets its own Rademacher probe z_k per layer, and the
    epoch's sample is Σ_k (|B_k|/N) z_kᵀ H_ii(B_k) z_k. Since Σ_k (|B_k|/N) H(B_k) = H exactly, the
    sample is unbiased and carries no sub-batch sampling noise, only probe noise; epochs are i.i.d.

    Randomness is a function of position, not of history: epoch e's partition is drawn from a
    generator seeded by (seed, e), and the probe of part k for layer i from one seeded by
    (seed, e, k, i), with i the layer's index in the model. So the samples do not depend on which
    process computes which part, nor on which other layers are still active: 1, 2 or 4 processes
    (each taking the parts k % world == rank, :mod:`hawqtool.distributed`) compute the same
    numbers, and all-reduce them so every process holds them all.

    Memory: the split stays where the data factory put it (usually host memory); each sub-batch is
    gathered from the batches it draws rows from and moved to the device on its own, so device
    memory grows with ``sub_batch``, not with the split.
    """

    def __init__(
        self, hessian: SplitHessian, *, sub_batch: int | None, seed: int, probes_per_part: int = 1
    ) -> None:
        self.H = hessian
        self.seed = seed
        self.probes_per_part = probes_per_part
        self.epoch = 0
        # Passes over the split (an epoch's parts cover it once), forward and backward counted apart;
        # a single-layer second backward counts as one (it stops at its layer).
        self.forward_passes = 0
        self.backward_passes = 0
        self.layer_index = {f: i for i, f in enumerate(hessian.fqns)}
        self.gen = torch.Generator(device=hessian.device)  # re-seeded for every probe
        self.sub_batch = sub_batch if sub_batch is not None and sub_batch < hessian.n else None
        if self.sub_batch is None:
            self.parts = len(hessian.batches)
        else:
            self.parts = math.ceil(hessian.n / self.sub_batch)
            _check_stackable(hessian.batches)
            self.offsets = torch.tensor([0, *itertools.accumulate(hessian.sizes)], dtype=torch.long)

    def partition(self, epoch: int) -> list[torch.Tensor]:
        """Epoch ``epoch``'s sub-batches as sorted row indices into the whole split (CPU tensors)."""
        gen = torch.Generator().manual_seed(seed_of(self.seed, "partition", epoch))
        perm = torch.randperm(self.H.n, generator=gen)
        return [idx.sort().values for idx in torch.tensor_split(perm, self.parts)]

    def gather(self, idx: torch.Tensor) -> Batch:
        """Rows ``idx`` (sorted, into the whole split) as one batch, on the data's own device."""
        which = torch.searchsorted(self.offsets, idx, right=True) - 1
        pieces = []
        for b in torch.unique(which).tolist():
            rows = idx[which == b] - self.offsets[b]
            x, y = self.H.batches[b]
            pieces.append((modelio.take(x, rows), modelio.take(y, rows)))
        if len(pieces) == 1:
            return pieces[0]
        return modelio.concat([x for x, _ in pieces]), modelio.concat([y for _, y in pieces])

    def _next_epoch(self) -> tuple[int, list[torch.Tensor] | None, list[float]]:
        """The next epoch's number, its parts (``None``: the split's own batches) and their weights."""
        epoch = self.epoch
        self.epoch += 1
        self.forward_passes += 1
        if self.sub_batch is None:
            return epoch, None, [size / self.H.n for size in self.H.sizes]
        parts = self.partition(epoch)
        return epoch, parts, [len(idx) / self.H.n for idx in parts]

    def _finish(self, acc: torch.Tensor, fqns: Sequence[str]) -> list[list[float]]:
        """All-reduce an epoch's (part, layer) samples and check them."""
        distributed.all_reduce_sum([acc], what="the Hessian stage")
        values = acc.T.tolist()
        for f, v in zip(fqns, values, strict=True):
            if not all(math.isfinite(x) for x in v):
                raise UsageError(
                    f"a Hessian trace sample of layer {f!r} is not finite: check the model and loss"
                )
        return values

    def probe(self, p: torch.Tensor, *, epoch: int, part: int, fqn: str, index: int = 0) -> torch.Tensor:
        """The Rademacher probe of (epoch, part, layer[, index]), on ``p``'s device and in its dtype."""
        key = (self.seed, "probe", epoch, part, self.layer_index[fqn], *((index,) if index else ()))
        self.gen.manual_seed(seed_of(*key))
        z = torch.randint(0, 2, p.shape, generator=self.gen, device=p.device, dtype=p.dtype)
        return z.mul_(2).sub_(1)

    def _hz(self, g: torch.Tensor, p: torch.Tensor, z: torch.Tensor) -> torch.Tensor | None:
        """H_ii z for one probe, or for a stack of probes in one vmapped second backward."""
        batched = z.dim() > p.dim()
        try:
            (hz,) = torch.autograd.grad(
                g, p, grad_outputs=z, retain_graph=True, allow_unused=True, is_grads_batched=batched
            )
        except RuntimeError as e:
            raise UsageError(
                f"the loss has no double backward ({e}). Use a twice-differentiable loss "
                "and model (for attention, scaled_dot_product_attention or eager attention)"
            ) from e
        return hz

    def sample(self, fqns: Sequence[str]) -> tuple[list[list[float]], list[float]]:
        """One epoch: per layer in ``fqns``, one sample z_kᵀH_ii(B_k)z_k per part k; and the parts'
        weights |B_k|/N. The epoch's estimate of Tr(H_ii) is the weighted sum.

        Raises:
            UsageError: the loss or a sample is not finite, or there is no double backward.
            DistributedError: another rank failed (under a process group).
        """
        epoch, parts, weights = self._next_epoch()
        self.backward_passes += 1 + len(fqns)
        params = [self.H.params[f] for f in fqns]
        acc = torch.zeros(len(weights), len(fqns), dtype=torch.float64, device=self.H.device)
        with distributed.shared_failure("the Hessian stage"):
            for k in distributed.shard(len(weights)):
                x, y = self.H.batches[k] if parts is None else self.gather(parts[k])
                # One forward and one first backward, shared by every layer; then per layer a
                # second backward through its own block only: grad(g_i, W_i, z_i) = H_ii z_i.
                loss = self.H.batch_loss(x, y)
                grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
                for j, (f, p, g) in enumerate(zip(fqns, params, grads, strict=True)):
                    if g is None or not g.requires_grad:
                        continue  # the loss does not depend on W_i, or only linearly: zero curvature
                    if self.probes_per_part == 1:
                        z = self.probe(p, epoch=epoch, part=k, fqn=f)
                    else:
                        z = torch.stack(
                            [
                                self.probe(p, epoch=epoch, part=k, fqn=f, index=i)
                                for i in range(self.probes_per_part)
                            ]
                        )
                    hz = self._hz(g, p, z)
                    if hz is not None:
                        # Several probes: the part's sample is their mean (z_1ᵀHz_1 + ...) / P.
                        acc[k, j] = (hz * z).sum(dtype=torch.float64) / self.probes_per_part
                    elif severed_double_backward(g):
                        raise UsageError(NO_DOUBLE_BACKWARD.format(fqn=f))
                del loss, grads
        return self._finish(acc, fqns), weights


class GaussNewtonSampler(EpochSampler):
    """The same epochs, parts and stopping as :class:`EpochSampler`, but each part's sample of every
    layer's trace comes from ONE first-order backward: with a Rademacher v over the part's outputs,
    g = ∂⟨v, B f⟩/∂W and c‖g_i‖² samples Tr(G_ii) of the Gauss–Newton matrix G = E[Jᵀ c BᵀB J]
    (:mod:`hawqtool.gauss_newton`), which equals the Hessian for teacher targets with mse or kl.

    Each sample is ≥ 0; no ``create_graph``, so fused attention kernels need not be swapped out.
    The probe of part k in epoch e is seeded by (seed, e, k), shared by all layers.
    """

    def __init__(
        self, hessian: SplitHessian, *, sub_batch: int | None, seed: int, probes_per_part: int = 1
    ) -> None:
        super().__init__(hessian, sub_batch=sub_batch, seed=seed, probes_per_part=probes_per_part)
        kind = loss_kind(hessian.loss_fn)
        if kind is None:
            raise UsageError("the gauss_newton estimator needs the mse, kl or cross_entropy loss")
        self.kind = kind

    def output_probe(self, out: torch.Tensor, *, epoch: int, part: int, index: int) -> torch.Tensor:
        """The Rademacher probe over every output element of (epoch, part, index)."""
        self.gen.manual_seed(seed_of(self.seed, "output-probe", epoch, part, index))
        v = torch.randint(0, 2, out.shape, generator=self.gen, device=out.device, dtype=out.dtype)
        return v.mul_(2).sub_(1)

    def sample(self, fqns: Sequence[str]) -> tuple[list[list[float]], list[float]]:
        """One epoch: per layer in ``fqns`` one sample c‖g_i‖² per part; and the parts' weights."""
        epoch, parts, weights = self._next_epoch()
        self.backward_passes += self.probes_per_part
        params = [self.H.params[f] for f in fqns]
        acc = torch.zeros(len(weights), len(fqns), dtype=torch.float64, device=self.H.device)
        with distributed.shared_failure("the Hessian stage"):
            for k in distributed.shard(len(weights)):
                x, y = self.H.batches[k] if parts is None else self.gather(parts[k])
                out = self.H.outputs(x)
                if not torch.isfinite(out).all():
                    raise UsageError("the model's output is not finite on a calibration batch")
                curv = OutputCurvature.of(self.kind, out, y)
                bf = curv.apply(out)
                for i in range(self.probes_per_part):
                    v = self.output_probe(out, epoch=epoch, part=k, index=i)
                    last = i == self.probes_per_part - 1
                    grads = torch.autograd.grad(
                        (bf * v).sum(), params, retain_graph=not last, allow_unused=True
                    )
                    for j, g in enumerate(grads):
                        if g is not None:
                            acc[k, j] += g.double().square().sum() * (curv.scale / self.probes_per_part)
                del out, bf
        return self._finish(acc, fqns), weights


def seed_of(*key: int | str) -> int:
    """A 63-bit seed from a key such as ``(seed, "probe", epoch, part, layer)`` (blake2b of its repr).

    Example:
        >>> seed_of(0, "probe", 1, 2, 3) == seed_of(0, "probe", 1, 2, 3) != seed_of(0, "probe", 1, 2, 4)
        True
    """
    digest = hashlib.blake2b(repr(key).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def _check_stackable(batches: Sequence[Batch]) -> None:
    """Sub-batches mix rows of different batches: every batch needs the same structure, dtypes and
    non-batch shapes (checked up front, without copying the data)."""

    def layout(tree: Any) -> tuple[Any, list[Any]]:
        flat, spec = pytree.tree_flatten(tree)
        return spec, [(x.dtype, tuple(x.shape[1:])) if isinstance(x, torch.Tensor) else type(x) for x in flat]

    first = [layout(t) for t in batches[0]]
    for i, b in enumerate(batches[1:], start=1):
        if [layout(t) for t in b] != first:
            raise UsageError(
                f"cannot draw sub-batches: calibration batch {i} differs from batch 0 in structure, "
                "dtype or a non-batch dimension (e.g. token sequences of different lengths); set "
                "hessian.sub_batch to null to use whole batches"
            )
