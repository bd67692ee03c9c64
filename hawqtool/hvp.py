"""Hessian-vector products of the mean loss over a data split, w.r.t. the quantizable weights.

Shared by the trace estimator (:mod:`hawqtool.hessian`) and the inter-layer dependency terms
(:mod:`hawqtool.dependency`). Hv comes from double backward (``autograd.grad(create_graph=True)``),
which was the fastest way on our CPUs (docs/facts.md).

Under a ``torch.distributed`` process group (:mod:`hawqtool.distributed`) every product, gradient
and loss over the split is data-parallel: each rank runs its share of the batches and the weighted
sums are all-reduced, so every rank returns the same result.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch.utils import _pytree as pytree

from hawqtool import distributed, modelio
from hawqtool.errors import UsageError
from hawqtool.modelio import Batch
from hawqtool.prepare import PreparedModel, double_backward_attention, to_param_layout
from hawqtool.tasks import LossFn


def resolve_device(device: str) -> torch.device:
    """``auto`` → CUDA when available, else CPU; ``cpu`` / ``cuda`` as asked.

    Raises:
        UsageError: ``cuda`` asked for but not available, or an unknown name.
    """
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise UsageError("hessian.device is 'cuda' but no CUDA device is available; use 'auto' or 'cpu'")
    if device not in ("cpu", "cuda"):
        raise UsageError(f"unknown device {device!r}; allowed: auto, cpu, cuda")
    return torch.device(device)


#: ``hessian.dtype`` names → torch dtypes. Half precisions only on CUDA: CPU kernels for them are
#: slow or missing under double backward, and the point of them is GPU memory and tensor cores.
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
CPU_DTYPES = ("float32",)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """The compute dtype of the Hessian stages for a ``hessian.dtype`` name on ``device``.

    Raises:
        UsageError: an unknown name, or a half precision on a device other than CUDA; the message
            names the allowed set.

    Example:
        >>> resolve_dtype("float32", torch.device("cpu"))
        torch.float32
    """
    if dtype not in DTYPES:
        raise UsageError(f"unknown hessian.dtype {dtype!r}; allowed: {', '.join(DTYPES)}")
    if device.type != "cuda" and dtype not in CPU_DTYPES:
        raise UsageError(
            f"hessian.dtype {dtype!r} needs a CUDA device (the Hessian runs on {device.type}); "
            f"allowed on {device.type}: {', '.join(CPU_DTYPES)}; on CUDA: {', '.join(DTYPES)}"
        )
    return DTYPES[dtype]


def _cast_floats(tree: Any, dtype: torch.dtype) -> Any:
    """Floating leaves of a pytree in ``dtype`` (integer token ids, masks of bools unchanged)."""
    return pytree.tree_map(
        lambda x: x.to(dtype) if isinstance(x, torch.Tensor) and x.is_floating_point() else x, tree
    )


NO_DOUBLE_BACKWARD = (
    "the loss has no double backward on the path to layer {fqn!r}: an operation's backward cannot "
    "itself be differentiated (an autograd.Function marked @once_differentiable, or a custom op "
    "without a double backward). Replace that op with a twice-differentiable one (for attention: "
    "scaled_dot_product_attention or eager attention)"
)


def severed_double_backward(grad: torch.Tensor) -> bool:
    """Whether the graph of a ``create_graph=True`` gradient holds a node that refuses to be
    differentiated again (torch inserts an ``Error`` node for ``@once_differentiable`` backwards).

    Without this check such a layer's Hessian-vector product silently comes out as zero.
    """
    stack, seen = [grad.grad_fn], set()
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        if type(fn).__name__ == "Error":
            return True
        stack.extend(nxt for nxt, _ in fn.next_functions)
    return False


class SplitHessian:
    """The Hessian H of L(W) = mean loss over ``batches``, restricted to the quantizable weights.

    Works on its own copy of the prepared model, moved to ``device`` and cast to ``dtype``
    (``float32``; ``bfloat16`` / ``float16`` on CUDA only: the model and its floating inputs run in
    it, the loss is taken in float32 and results are accumulated in float32 or better). The batches
    stay where the data factory put them and move to the device one at a time, so device memory
    grows with the batch, not with the split. Batches are weighted by their size, so uneven last
    batches are counted exactly. Vectors in and out (``v``, ``Hv``, gradients) are in each layer's
    weight-view layout (output channels first), the layout the quantizer works in. Under a process
    group each rank takes the batches ``k % world == rank`` and the sums are all-reduced.

    Example:
        >>> # H = SplitHessian(prepared, calib, F.cross_entropy)
        >>> # Hv = H.hvp({"fc": v})          # dict fqn -> (Hv) block, for every layer
    """

    def __init__(
        self,
        prepared: PreparedModel,
        batches: Sequence[Batch],
        loss_fn: LossFn,
        *,
        device: str = "auto",
        dtype: str = "float32",
    ) -> None:
        if len(batches) == 0:
            raise UsageError("the calibration split is empty: give at least one (inputs, targets) batch")
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.model = copy.deepcopy(prepared.model).to(device=self.device, dtype=self.dtype).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.fqns = prepared.fqns
        self.infos = {info.fqn: info for info in prepared.layers}
        assert prepared.io is not None
        self.io = prepared.io
        self.params: dict[str, torch.Tensor] = {}
        for info in prepared.layers:
            w = self.model.get_parameter(info.param)
            w.requires_grad_(True)
            self.params[info.fqn] = w
        self.batches = list(batches)
        self.loss_fn = loss_fn
        self.sizes = [modelio.batch_size(x) for x, _ in self.batches]
        self.n = sum(self.sizes)

    # -- layouts -----------------------------------------------------------------------------------

    def _to_param(self, fqn: str, view: torch.Tensor) -> torch.Tensor:
        return to_param_layout(self.infos[fqn], view.to(device=self.device, dtype=self.params[fqn].dtype))

    def _acc_like(self, fqn: str) -> torch.Tensor:
        """A zero accumulator for one layer, in float32 or better (half-precision sums drift)."""
        p = self.params[fqn]
        return torch.zeros(p.shape, dtype=torch.promote_types(p.dtype, torch.float32), device=p.device)

    def _to_view(self, fqn: str, t: torch.Tensor) -> torch.Tensor:
        return to_param_layout(self.infos[fqn], t)  # a transpose is its own inverse

    # -- the primitives --------------------------------------------------------------------------

    def _loss(self, x: Any, y: Any) -> torch.Tensor:
        x, y = modelio.to_device(x, self.device), modelio.to_device(y, self.device)
        half = self.dtype != torch.float32
        if half:
            x = _cast_floats(x, self.dtype)
        with double_backward_attention():
            out = self.io.forward(self.model, x)
            loss = self.loss_fn(out.float() if half else out, y)
        if not torch.isfinite(loss):
            raise UsageError(f"the loss is {loss.item()} on a calibration batch: check the model and data")
        return loss

    def outputs(self, x: Any) -> torch.Tensor:
        """The selected output (float32) of one batch of inputs (moved to :attr:`device` here),
        differentiable once: fused attention kernels are fine (no double backward is taken)."""
        x = modelio.to_device(x, self.device)
        if self.dtype != torch.float32:
            x = _cast_floats(x, self.dtype)
        return self.io.forward(self.model, x).float()

    def batch_loss(self, x: Any, y: Any) -> torch.Tensor:
        """Mean loss of one batch (moved to :attr:`device` here), differentiable twice.

        Raises:
            UsageError: the loss is NaN or infinite.
        """
        return self._loss(x, y)

    def hvp(
        self,
        v: Mapping[str, torch.Tensor],
        *,
        wrt: Sequence[str] | None = None,
        batches: Sequence[Batch] | None = None,
    ) -> dict[str, torch.Tensor]:
        """(H v) restricted to the layers ``wrt`` (default: all), for v given on some layers.

        Layers missing from ``v`` are zero there. Differentiating only w.r.t. the layers involved
        keeps a single-layer HVP cheap: backward stops at that layer. ``batches`` replaces the
        split (e.g. a random sub-batch, an unbiased estimate of the split's H). Under a process group
        each rank takes its share of the batches and the result is summed over the ranks.
        """
        out_fqns = list(wrt) if wrt is not None else list(self.fqns)
        involved = list(dict.fromkeys([*v.keys(), *out_fqns]))
        params = [self.params[f] for f in involved]
        data = self.batches if batches is None else list(batches)
        sizes = self.sizes if batches is None else [modelio.batch_size(x) for x, _ in data]
        n = sum(sizes)
        vp = {f: self._to_param(f, t) for f, t in v.items()}
        acc = {f: self._acc_like(f) for f in out_fqns}
        with distributed.shared_failure("a Hessian-vector product"):
            for k in distributed.shard(len(data)):
                (x, y), size = data[k], sizes[k]
                loss = self._loss(x, y)
                grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
                gmap = dict(zip(involved, grads, strict=True))
                terms = [(gmap[f] * vp[f]).sum() for f in vp if gmap[f] is not None and gmap[f].requires_grad]
                if not terms:
                    continue  # the loss is at most linear in these weights on this batch: H v = 0
                dot = torch.stack(terms).sum()
                try:
                    hv = torch.autograd.grad(dot, [self.params[f] for f in out_fqns], allow_unused=True)
                except RuntimeError as e:
                    raise UsageError(
                        f"the loss has no double backward ({e}). Use a twice-differentiable loss and "
                        "model (for attention, scaled_dot_product_attention or eager attention)"
                    ) from e
                for f, h in zip(out_fqns, hv, strict=True):
                    if h is not None:
                        acc[f] += h.detach() * (size / n)
                    elif f in v and gmap[f] is not None and severed_double_backward(gmap[f]):
                        raise UsageError(NO_DOUBLE_BACKWARD.format(fqn=f))
        distributed.all_reduce_sum(list(acc.values()), what="a Hessian-vector product")
        return {f: self._to_view(f, a) for f, a in acc.items()}

    def grad(self) -> dict[str, torch.Tensor]:
        """Gradient g of the split's mean loss w.r.t. every quantizable weight (view layout)."""
        params = [self.params[f] for f in self.fqns]
        acc = [self._acc_like(f) for f in self.fqns]
        with distributed.shared_failure("the gradient"):
            for k in distributed.shard(len(self.batches)):
                (x, y), size = self.batches[k], self.sizes[k]
                gs = torch.autograd.grad(self._loss(x, y), params, allow_unused=True)
                for a, g in zip(acc, gs, strict=True):
                    if g is not None:
                        a += g * (size / self.n)
        distributed.all_reduce_sum(acc, what="the gradient")
        return {f: self._to_view(f, a) for f, a in zip(self.fqns, acc, strict=True)}

    @torch.no_grad()
    def loss(self, weights: Mapping[str, torch.Tensor] | None = None) -> float:
        """Mean loss over the split, optionally with some layers' weights (views) replaced."""
        saved = {}
        try:
            for f, w in (weights or {}).items():
                saved[f] = self.params[f].data
                self.params[f].data = self._to_param(f, w).to(saved[f].dtype)
            total = torch.zeros((), dtype=torch.float64, device=self.device)
            with distributed.shared_failure("a loss pass"):
                for k in distributed.shard(len(self.batches)):
                    (x, y), size = self.batches[k], self.sizes[k]
                    total += self._loss(x, y).double() * size
            distributed.all_reduce_sum([total], what="a loss pass")
            return float(total) / self.n
        finally:
            for f, w in saved.items():
                self.params[f].data = w
