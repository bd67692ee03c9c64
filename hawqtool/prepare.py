"""Prepare a model for analysis and export: fold BatchNorm, find quantizable layers, apply pins.

Everything here works on a copy; the caller's model is never changed.
"""

from __future__ import annotations

import contextlib
import copy
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from hawqtool.errors import UsageError
from hawqtool.types import LayerInfo, format_bits

QUANTIZABLE = (nn.Conv1d, nn.Conv2d, nn.Linear)
Batch = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class PreparedModel:
    """A BN-folded copy of the user's model in eval mode and its quantizable layers (model order)."""

    model: nn.Module
    layers: tuple[LayerInfo, ...]
    example_input: torch.Tensor

    @property
    def fqns(self) -> tuple[str, ...]:
        return tuple(layer.fqn for layer in self.layers)

    def module(self, fqn: str) -> nn.Module:
        return self.model.get_submodule(fqn)

    def weight(self, fqn: str) -> torch.Tensor:
        """The (BN-folded) weight of one quantizable layer."""
        return self.module(fqn).weight.detach()  # type: ignore[operator]

    def weights(self) -> list[torch.Tensor]:
        """The weight tensors of the quantizable layers, in :attr:`layers` order."""
        return [self.weight(f) for f in self.fqns]


def _kind(module: nn.Module) -> str:
    return {nn.Conv1d: "conv1d", nn.Conv2d: "conv2d", nn.Linear: "linear"}[type(module)]


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """Return an eval-mode copy of ``model`` with every BatchNorm that directly follows a
    Conv1d/Conv2d (in module registration order, as in ``conv -> bn`` pairs) folded into it.

    Uses torch's own ``fuse_conv_bn_eval``. Folding is only done where it is exact: the BN's input
    must be the conv's output. Pairs are found by tracing which module feeds which during one
    forward pass, so a BN that is not fed by a conv is left alone.
    """
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    model = copy.deepcopy(model).eval()
    return _fold_pairs(model, fuse_conv_bn_eval)


def _fold_pairs(model: nn.Module, fuse) -> nn.Module:  # type: ignore[no-untyped-def]
    # Register-order pairing: a BN whose previous sibling-or-cousin module is a conv with matching
    # channels. This covers Sequential(conv, bn) and attribute pairs (conv1/bn1) in the zoo and in
    # most CNNs; it is validated by comparing outputs in ``prepare_model``.
    names = [(n, m) for n, m in model.named_modules() if n]
    prev: tuple[str, nn.Module] | None = None
    for name, mod in names:
        if isinstance(mod, (nn.BatchNorm1d, nn.BatchNorm2d)) and prev is not None:
            pname, pmod = prev
            if isinstance(pmod, (nn.Conv1d, nn.Conv2d)) and pmod.out_channels == mod.num_features:
                fused = fuse(pmod, mod)
                _set_submodule(model, pname, fused)
                _set_submodule(model, name, nn.Identity())
        if isinstance(mod, (nn.Conv1d, nn.Conv2d, nn.BatchNorm1d, nn.BatchNorm2d, nn.Linear)):
            prev = (name, mod)
    return model


def _set_submodule(model: nn.Module, fqn: str, new: nn.Module) -> None:
    parent, _, child = fqn.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def count_macs(model: nn.Module, example_input: torch.Tensor) -> dict[str, int]:
    """Multiply-accumulates per quantizable layer for ONE sample, counted from a real forward pass."""
    macs: dict[str, int] = {}
    hooks = []

    def hook(name: str):  # type: ignore[no-untyped-def]
        def fn(mod: nn.Module, inp: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
            # Every output element is one dot product with one output channel's filter (a module
            # called twice, e.g. shared weights, counts twice).
            macs[name] = macs.get(name, 0) + out[:1].numel() * mod.weight[0].numel()  # type: ignore[index]

        return fn

    for name, mod in model.named_modules():
        if isinstance(mod, QUANTIZABLE):
            hooks.append(mod.register_forward_hook(hook(name)))
    try:
        with torch.no_grad():
            model(example_input[:1])
    finally:
        for h in hooks:
            h.remove()
    return macs


def resolve_pins(pins: Mapping[str, str], fqns: Sequence[str]) -> dict[str, str]:
    """Map pin keys (an FQN, or ``re:PATTERN`` matched in full) to the layers they fix.

    Raises:
        UsageError: a key matches no quantizable layer, a regex does not compile, or a format is
            unknown. The message lists the layers that exist.
    """
    out: dict[str, str] = {}
    for key, fmt in pins.items():
        format_bits(fmt)
        if key.startswith("re:"):
            try:
                pattern = re.compile(key[3:])
            except re.error as e:
                raise UsageError(f"pin {key!r}: bad regular expression: {e}") from e
            hits = [f for f in fqns if pattern.fullmatch(f)]
        else:
            hits = [key] if key in fqns else []
        if not hits:
            raise UsageError(f"pin {key!r} matches no quantizable layer; layers are: {', '.join(fqns)}")
        for f in hits:
            out[f] = fmt
    return out


def first_batch(batches: object, split: str = "calibration") -> Batch:
    for batch in batches:  # type: ignore[attr-defined]
        return batch  # type: ignore[no-any-return]
    raise UsageError(f"the {split} split is empty: give at least one (inputs, targets) batch")


def prepare_model(
    model: nn.Module, example_input: torch.Tensor, *, pins: Mapping[str, str] | None = None
) -> PreparedModel:
    """Fold BatchNorm, find the quantizable layers and apply pins.

    Raises:
        UsageError: not an ``nn.Module``, no quantizable layers, non-finite weights, or folding
            changed the outputs (an unsupported conv/BN arrangement).
    """
    if not isinstance(model, nn.Module):
        raise UsageError(f"the model factory returned {type(model).__name__}, not a torch.nn.Module")
    for name, param in model.named_parameters():
        if not torch.isfinite(param).all():
            raise UsageError(f"parameter {name!r} has NaN or Inf weights")
    folded = fold_batchnorm(model)
    with torch.no_grad():
        ref = copy.deepcopy(model).eval()(example_input)
        got = folded(example_input)
    if not torch.isfinite(ref).all():
        raise UsageError(
            "the model's outputs on the first calibration batch contain NaN or Inf: check the data"
        )
    if not torch.allclose(ref, got, rtol=1e-3, atol=1e-4 * float(ref.abs().max()) + 1e-5):
        raise UsageError("BatchNorm folding changed the model's outputs; unsupported conv/BN layout")
    layers = []
    for name, mod in folded.named_modules():
        if isinstance(mod, QUANTIZABLE):
            layers.append((name, mod))
    if not layers:
        raise UsageError(f"{type(model).__name__} has no quantizable layers (Conv1d, Conv2d or Linear)")
    fqns = [n for n, _ in layers]
    pinned = resolve_pins(pins or {}, fqns)
    macs = count_macs(folded, example_input)
    infos = tuple(
        LayerInfo(
            fqn=n,
            kind=_kind(m),
            weight_shape=tuple(m.weight.shape),
            params=m.weight.numel(),
            macs=macs.get(n, 0),
            pinned=pinned.get(n),
        )
        for n, m in layers
    )
    for p in folded.parameters():
        p.requires_grad_(False)
    return PreparedModel(model=folded, layers=infos, example_input=example_input)


@contextlib.contextmanager
def double_backward_attention() -> Iterator[None]:
    """Route ``scaled_dot_product_attention`` to the math backend, which has a double backward.

    The fused CPU kernel raises "derivative for aten::_scaled_dot_product_flash_attention_for_cpu
    _backward is not implemented" under ``create_graph=True`` (FACTS.md).
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH):
        yield


@contextlib.contextmanager
def swapped_weights(prepared: PreparedModel, weights: Mapping[str, torch.Tensor]) -> Iterator[nn.Module]:
    """Temporarily replace some layers' weights (e.g. with fake-quantized ones); restored on exit."""
    saved = {}
    try:
        for fqn, w in weights.items():
            mod = prepared.module(fqn)
            saved[fqn] = mod.weight.data
            mod.weight.data = w.to(saved[fqn].dtype)
        yield prepared.model
    finally:
        for fqn, w in saved.items():
            prepared.module(fqn).weight.data = w
