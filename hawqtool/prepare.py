"""Prepare a model for analysis and export: fold BatchNorm, find quantizable layers, apply pins.

Everything here works on a copy; the caller's model is never changed.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from hawqtool import modelio
from hawqtool.errors import UsageError
from hawqtool.formats import LayerKind, format_bits, layer_kind, register_kind, unregister_kind
from hawqtool.modelio import ModelIO
from hawqtool.types import LayerInfo

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------
# Layer handlers: which weights are quantizable, how to see them, what they cost in MACs
# --------------------------------------------------------------------------------------------

#: Multiply-accumulates of one call of a module for ONE sample: ``(module, inputs, output, batch
#: size) -> {submodule path relative to the module ("" for itself): MACs}``.
MacCounter = Callable[[Any, tuple[Any, ...], Any, int], Mapping[str, int]]


def filter_macs(module: Any, inputs: tuple[Any, ...], output: Any, batch: int) -> dict[str, int]:
    """Every output element is one dot product with one output channel's filter (Linear, Conv)."""
    return {"": output.numel() // batch * int(module.weight[0].numel())}


def _no_macs(module: Any, inputs: tuple[Any, ...], output: Any, batch: int) -> dict[str, int]:
    return {"": 0}  # a lookup: present (the module runs) but free


def _mha_macs(module: Any, inputs: tuple[Any, ...], output: Any, batch: int) -> dict[str, int]:
    # q, k and v projections: each query/key/value element passes 3E x E weights once.
    # MultiheadAttention applies its out_proj functionally: that module's hook never fires, so
    # its MACs are counted here.
    q = inputs[0] if inputs else None
    per = (
        q.numel() // (q.shape[1] if not module.batch_first and q.ndim == 3 else batch) if q is not None else 0
    )
    return {
        "": per * int(module.in_proj_weight.shape[0]),
        "out_proj": per * int(module.out_proj.out_features),
    }


def _hf_conv1d_macs(module: Any, inputs: tuple[Any, ...], output: Any, batch: int) -> dict[str, int]:
    return {"": output.numel() // batch * int(module.weight.shape[0])}  # weight stored (in, out)


@dataclass(frozen=True)
class LayerHandler:
    """How hawqtool treats one kind of weighted module; a new kind is one :func:`register_handler`.

    Attributes:
        kind: what layers of this kind can take (:class:`hawqtool.formats.LayerKind`), registered
            in the kind table with the handler; :attr:`LayerInfo.kind` records its name.
        matches: ``isinstance``-style test on a module.
        macs: the module's multiply-accumulates per sample (:data:`MacCounter`).
        params: the module's quantizable parameters: ``(layer suffix, parameter name)`` pairs; the
            layer is named ``module_fqn + suffix`` (``""`` for the module itself).
        transposed: the parameter is stored ``(in, out)`` (Hugging Face ``Conv1D``); the weight view
            every stage quantizes is its transpose, output channels first.
        onnx_ops: ONNX ops that consume the weight as their weight input.
    """

    kind: LayerKind
    matches: Callable[[nn.Module], bool]
    macs: MacCounter = filter_macs
    params: tuple[tuple[str, str], ...] = (("", "weight"),)
    transposed: bool = False
    onnx_ops: tuple[str, ...] = ("Conv", "Gemm", "MatMul")


def _is_hf_conv1d(module: nn.Module) -> bool:
    # Hugging Face's GPT-2 ``Conv1D`` is a Linear with a transposed (in, out) weight; matched by
    # name so that transformers stays an optional import.
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "weight")


_BUILTIN: tuple[LayerHandler, ...] = (
    LayerHandler(layer_kind("linear"), lambda m: isinstance(m, nn.Linear), onnx_ops=("Gemm", "MatMul")),
    LayerHandler(layer_kind("conv1d"), lambda m: isinstance(m, nn.Conv1d), onnx_ops=("Conv",)),
    LayerHandler(layer_kind("conv2d"), lambda m: isinstance(m, nn.Conv2d), onnx_ops=("Conv",)),
    LayerHandler(
        layer_kind("mha_in_proj"),
        lambda m: isinstance(m, nn.MultiheadAttention) and m.in_proj_weight is not None,
        macs=_mha_macs,
        params=((".in_proj", "in_proj_weight"),),
        onnx_ops=("Gemm", "MatMul"),
    ),
    LayerHandler(
        layer_kind("embedding"), lambda m: isinstance(m, nn.Embedding), macs=_no_macs, onnx_ops=("Gather",)
    ),
    LayerHandler(
        layer_kind("hf_conv1d"),
        _is_hf_conv1d,
        macs=_hf_conv1d_macs,
        transposed=True,
        onnx_ops=("Gemm", "MatMul"),
    ),
)
_REGISTERED: list[LayerHandler] = []


def register_handler(handler: LayerHandler) -> None:
    """Add a layer handler, checked before the built-in ones (so it may claim a subclass of
    ``nn.Linear``), and its kind to :mod:`hawqtool.formats`' kind table.

    Raises:
        UsageError: a handler for that kind is already registered, or its kind conflicts with a
            registered kind of the same name.

    Example:
        >>> class Gate(nn.Module):
        ...     def __init__(self): super().__init__(); self.weight = nn.Parameter(torch.ones(4, 4))
        ...     def forward(self, x): return x @ self.weight
        >>> gate = LayerKind("gate", activations=False, matmul_only=False, matrix=True)
        >>> register_handler(LayerHandler(gate, lambda m: isinstance(m, Gate)))
        >>> prepare_model(nn.Sequential(Gate()), torch.ones(2, 4)).layers[0].kind
        'gate'
        >>> unregister_handler("gate")
    """
    if any(h.kind.name == handler.kind.name for h in handlers()):
        raise UsageError(f"a layer handler for kind {handler.kind.name!r} is already registered")
    register_kind(handler.kind)
    _REGISTERED.append(handler)


def unregister_handler(kind: str) -> None:
    """Remove a registered handler and its kind (tests); the built-in handlers stay."""
    if any(h.kind.name == kind for h in _REGISTERED):
        _REGISTERED[:] = [h for h in _REGISTERED if h.kind.name != kind]
        unregister_kind(kind)


def handlers() -> tuple[LayerHandler, ...]:
    """The layer handlers in the order they are tried: registered ones, then the built-in ones."""
    return (*_REGISTERED, *_BUILTIN)


def _match(module: nn.Module) -> LayerHandler | None:
    return next((h for h in handlers() if h.matches(module)), None)


@dataclass(frozen=True)
class PreparedModel:
    """A BN-folded copy of the user's model in eval mode and its quantizable layers (model order).

    Attributes:
        model: the BN-folded copy (parameters frozen).
        layers: one :class:`LayerInfo` per quantizable weight tensor (a tensor shared by several
            modules is one layer).
        example_input: the first calibration batch's inputs (a pytree).
        io: the model-I/O contract (:class:`hawqtool.modelio.ModelIO`).
        unused: weighted layers the selected output does not depend on (e.g. a pooler): excluded.
        unsupported: weight tensors of modules no handler knows: kept float.
    """

    model: nn.Module
    layers: tuple[LayerInfo, ...]
    example_input: Any
    io: ModelIO | None = None
    unused: tuple[str, ...] = ()
    unsupported: tuple[str, ...] = ()

    @property
    def fqns(self) -> tuple[str, ...]:
        return tuple(layer.fqn for layer in self.layers)

    def info(self, fqn: str) -> LayerInfo:
        for layer in self.layers:
            if layer.fqn == fqn:
                return layer
        raise UsageError(f"unknown layer {fqn!r}; layers are: {', '.join(self.fqns)}")

    def module(self, fqn: str) -> nn.Module:
        """The module that owns a layer's weight."""
        return self.model.get_submodule(self.info(fqn).param.rpartition(".")[0])

    def param(self, fqn: str) -> nn.Parameter:
        """The parameter tensor of one layer, in its stored layout."""
        return self.model.get_parameter(self.info(fqn).param)

    def weight(self, fqn: str) -> torch.Tensor:
        """The (BN-folded) weight of one layer, output channels first (what the quantizer sees)."""
        w = self.param(fqn).detach()
        return w.T if self.info(fqn).transposed else w

    def weights(self) -> list[torch.Tensor]:
        """The weight views of the quantizable layers, in :attr:`layers` order."""
        return [self.weight(f) for f in self.fqns]

    def forward(self, inputs: Any) -> torch.Tensor:
        """The selected output of the prepared model on one batch of inputs."""
        assert self.io is not None
        return self.io.forward(self.model, inputs)


def to_param_layout(info: LayerInfo, view: torch.Tensor) -> torch.Tensor:
    """A tensor in a layer's weight-view layout (output channels first) back in its stored layout."""
    return view.T if info.transposed else view


def fold_batchnorm(model: nn.Module, example_input: Any = None, *, io: ModelIO | None = None) -> nn.Module:
    """Return an eval-mode copy of ``model`` with every BatchNorm fed by a Conv1d/Conv2d folded into it.

    Uses torch's own ``fuse_conv_bn_eval``. With ``example_input`` (what :func:`prepare_model`
    passes), pairs come from the data flow of one forward pass: a BN whose input tensor is a conv's
    output tensor. Each pair is folded only if the outputs stay the same (a conv output that also
    feeds something else, e.g. a skip connection, must not absorb the BN), so a BN that runs
    before its conv, or is shared, is left alone. Without an example input, pairs are a conv and
    the BN registered right after it (``Sequential(conv, bn)``, ``conv1``/``bn1``), unchecked.
    """
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    model = copy.deepcopy(model).eval()
    if example_input is None:
        for conv, bn in _registration_pairs(model):
            _fuse(model, conv, bn, fuse_conv_bn_eval)
        return model
    pairs = _dataflow_pairs(model, example_input, io)
    if not pairs:
        return model

    def run(m: nn.Module) -> Any:
        return _forward(m, example_input, io)

    ref = run(model)

    def same(m: nn.Module) -> bool:
        out = run(m)
        if isinstance(ref, torch.Tensor) and isinstance(out, torch.Tensor):
            tol = 1e-4 * float(ref.abs().max()) + 1e-5
            return bool(torch.allclose(ref, out, rtol=1e-3, atol=tol))
        return False

    trial = copy.deepcopy(model)
    for conv, bn in pairs:
        _fuse(trial, conv, bn, fuse_conv_bn_eval)
    if same(trial):
        return trial
    for conv, bn in pairs:  # some pair is not exact: keep only those that are, one at a time
        trial = copy.deepcopy(model)
        _fuse(trial, conv, bn, fuse_conv_bn_eval)
        if same(trial):
            model = trial
        else:
            log.info("BatchNorm %r is not folded into %r: its conv output is used elsewhere", bn, conv)
    return model


@torch.no_grad()
def _forward(model: nn.Module, example_input: Any, io: ModelIO | None) -> Any:
    """One forward pass: the selected output through the I/O contract, or the raw call without one."""
    return io.forward(model, example_input) if io is not None else modelio.call(model, example_input)


#: Samples of the first calibration batch that :func:`prepare_model`'s structural passes run on.
STRUCTURE_SAMPLES = 2

_CONVS = (nn.Conv1d, nn.Conv2d)
_BNS = (nn.BatchNorm1d, nn.BatchNorm2d)


def _registration_pairs(model: nn.Module) -> list[tuple[str, str]]:
    pairs = []
    prev: tuple[str, nn.Module] | None = None
    for name, mod in ((n, m) for n, m in model.named_modules() if n):
        if isinstance(mod, _BNS) and prev is not None:
            pname, pmod = prev
            if isinstance(pmod, _CONVS) and pmod.out_channels == mod.num_features:
                pairs.append((pname, name))
        if isinstance(mod, (*_CONVS, *_BNS, nn.Linear)):
            prev = (name, mod)
    return pairs


def _dataflow_pairs(model: nn.Module, example_input: Any, io: ModelIO | None) -> list[tuple[str, str]]:
    """(conv, bn) pairs where the BN's input is the very tensor the conv returned (each used once)."""
    produced: dict[int, str] = {}
    pairs: dict[str, str] = {}
    calls: dict[str, int] = {}
    hooks = []

    def conv_hook(name: str):  # type: ignore[no-untyped-def]
        def fn(mod: nn.Module, inp: tuple[Any, ...], out: Any) -> None:
            calls[name] = calls.get(name, 0) + 1
            produced[id(out)] = name

        return fn

    def bn_hook(name: str):  # type: ignore[no-untyped-def]
        def fn(mod: nn.Module, inp: tuple[Any, ...]) -> None:
            calls[name] = calls.get(name, 0) + 1
            src = produced.get(id(inp[0])) if inp else None
            if src is not None:
                pairs[name] = src

        return fn

    for name, mod in model.named_modules():
        if isinstance(mod, _CONVS):
            hooks.append(mod.register_forward_hook(conv_hook(name)))
        elif isinstance(mod, _BNS):
            hooks.append(mod.register_forward_pre_hook(bn_hook(name)))
    try:
        _forward(model, example_input, io)
    finally:
        for h in hooks:
            h.remove()
    out = []
    for bn, conv in pairs.items():
        c, b = model.get_submodule(conv), model.get_submodule(bn)
        if calls.get(conv) == 1 and calls.get(bn) == 1 and c.out_channels == b.num_features:  # type: ignore[union-attr]
            out.append((conv, bn))
    return out


def _fuse(model: nn.Module, conv: str, bn: str, fuse) -> None:  # type: ignore[no-untyped-def]
    fused = fuse(model.get_submodule(conv), model.get_submodule(bn))
    _set_submodule(model, conv, fused)
    _set_submodule(model, bn, nn.Identity())


def _set_submodule(model: nn.Module, fqn: str, new: nn.Module) -> None:
    parent, _, child = fqn.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def _discover(model: nn.Module) -> tuple[list[tuple[str, LayerHandler, str, str, nn.Module]], list[str]]:
    """Quantizable tensors ``(layer fqn, handler, parameter fqn, module fqn, module)`` in model
    order, one per tensor (tied weights go to the first module that uses them), and the weight
    tensors (≥ 2-D parameters) that no handler claims."""
    found: list[tuple[str, LayerHandler, str, str, nn.Module]] = []
    owner: dict[int, int] = {}  # id(tensor) -> index in found
    claimed: set[int] = set()
    for name, mod in model.named_modules():
        handler = _match(mod)
        if handler is None:
            continue
        for suffix, pname in handler.params:
            p = getattr(mod, pname, None)
            if not isinstance(p, torch.Tensor) or p.ndim < 2:
                continue
            claimed.add(id(p))
            if id(p) in owner:
                continue
            owner[id(p)] = len(found)
            fqn = f"{name}{suffix}" if name else (suffix.lstrip(".") or pname)
            found.append((fqn, handler, f"{name}.{pname}" if name else pname, name, mod))
    unsupported = [
        n for n, p in model.named_parameters(remove_duplicate=True) if p.ndim >= 2 and id(p) not in claimed
    ]
    return found, unsupported


def _tensor_users(model: nn.Module) -> dict[int, list[str]]:
    users: dict[int, list[str]] = {}
    for name, mod in model.named_modules():
        handler = _match(mod)
        if handler is None:
            continue
        for _, pname in handler.params:
            p = getattr(mod, pname, None)
            if isinstance(p, torch.Tensor):
                users.setdefault(id(p), []).append(name)
    return users


def count_macs(model: nn.Module, example_input: Any, io: ModelIO | None = None) -> dict[str, int]:
    """Multiply-accumulates per quantizable module for ONE sample, counted from a real forward pass
    by each module's handler (:attr:`LayerHandler.macs`).

    Keys are module FQNs; a module that never runs is absent (that is how unused layers are found).
    A module called twice (shared weights) counts twice.
    """
    macs: dict[str, int] = {}
    hooks = []
    n = modelio.batch_size(example_input)

    def hook(name: str, counter: MacCounter):  # type: ignore[no-untyped-def]
        def fn(mod: nn.Module, inp: tuple[Any, ...], out: Any) -> None:
            for rel, count in counter(mod, inp, out, n).items():
                key = ".".join(p for p in (name, rel) if p)
                macs[key] = macs.get(key, 0) + int(count)

        return fn

    for name, mod in model.named_modules():
        handler = _match(mod)
        if handler is not None:
            hooks.append(mod.register_forward_hook(hook(name, handler.macs)))
    try:
        _forward(model, example_input, io)
    finally:
        for h in hooks:
            h.remove()
    return macs


def _used_params(model: nn.Module, io: ModelIO, example_input: Any, params: Sequence[str]) -> set[str]:
    """The parameters the selected output depends on (one backward pass; no data leaves the model)."""
    tensors = [model.get_parameter(p) for p in params]
    saved = [t.requires_grad for t in tensors]
    try:
        for t in tensors:
            t.requires_grad_(True)
        with torch.enable_grad(), double_backward_attention():
            out = io.forward(model, example_input)
            if not out.requires_grad:
                return set()
            grads = torch.autograd.grad(out.float().sum(), tensors, allow_unused=True)
    finally:
        for t, s in zip(tensors, saved, strict=True):
            t.requires_grad_(s)
    return {p for p, g in zip(params, grads, strict=True) if g is not None}


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


def prepare_model(
    model: nn.Module,
    example_input: Any,
    *,
    pins: Mapping[str, str] | None = None,
    io: ModelIO | None = None,
) -> PreparedModel:
    """Fold BatchNorm, find the quantizable layers and apply pins.

    Args:
        model: the user's trained model (not modified).
        example_input: one batch of inputs (a tensor or a tuple / dict of tensors).
        pins: FQN or ``re:`` regex -> format.
        io: the model-I/O contract; by default inferred from ``example_input`` alone.

    Raises:
        UsageError: not an ``nn.Module``, no quantizable layers, non-finite weights or outputs, or
            folding changed the outputs (an unsupported conv/BN arrangement).
    """
    if not isinstance(model, nn.Module):
        raise UsageError(f"the model factory returned {type(model).__name__}, not a torch.nn.Module")
    for name, param in model.named_parameters():
        if param.is_floating_point() and not torch.isfinite(param).all():
            raise UsageError(f"parameter {name!r} has NaN or Inf weights")
    io = io or ModelIO.from_batches([(example_input, None)])
    # The structural passes below (data flow, the folding check, MACs, used parameters) need a
    # sample or two, not the whole batch: six passes of a 32-image batch cost half a minute on 2 cores.
    few = modelio.take(example_input, torch.arange(min(STRUCTURE_SAMPLES, modelio.batch_size(example_input))))
    folded = fold_batchnorm(model, few, io=io)
    with torch.no_grad():
        ref = io.forward(copy.deepcopy(model).eval(), few)
        got = io.forward(folded, few)
    if not torch.isfinite(ref).all():
        raise UsageError(
            "the model's outputs on the first calibration samples contain NaN or Inf: check the data"
        )
    if not torch.allclose(ref, got, rtol=1e-3, atol=1e-4 * float(ref.abs().max()) + 1e-5):
        raise UsageError("BatchNorm folding changed the model's outputs; unsupported conv/BN layout")
    found, unsupported = _discover(folded)
    if not found:
        raise UsageError(
            f"{type(model).__name__} has no quantizable layers; known kinds: "
            f"{', '.join(h.kind.name for h in handlers())}"
        )
    macs = count_macs(folded, few, io)
    users = _tensor_users(folded)
    used = _used_params(folded, io, few, [p for _, _, p, _, _ in found])
    unused = tuple(fqn for fqn, _, p, _, _ in found if p not in used)
    found = [row for row in found if row[2] in used]
    if not found:
        raise UsageError(f"the selected output of {type(model).__name__} depends on none of its layers")
    if unused:
        log.info("layers the selected output does not use (excluded, kept float): %s", ", ".join(unused))
    if unsupported:
        log.warning("weights no layer handler knows (kept float): %s", ", ".join(unsupported))
    fqns = [row[0] for row in found]
    pinned = resolve_pins(pins or {}, fqns)
    infos = []
    for fqn, handler, pname, mname, _mod in found:
        p = folded.get_parameter(pname)
        shape = tuple(p.shape[::-1]) if handler.transposed else tuple(p.shape)
        sharers = [u for u in users.get(id(p), []) if u != mname]
        infos.append(
            LayerInfo(
                fqn=fqn,
                kind=handler.kind.name,
                weight_shape=shape,
                params=p.numel(),
                macs=macs.get(mname, 0) + sum(macs.get(u, 0) for u in sharers),
                pinned=pinned.get(fqn),
                param=pname,
                transposed=handler.transposed,
                shared=tuple(sharers),
            )
        )
    for p in folded.parameters():
        p.requires_grad_(False)
    return PreparedModel(
        model=folded,
        layers=tuple(infos),
        example_input=example_input,
        io=io,
        unused=unused,
        unsupported=tuple(unsupported),
    )


@contextlib.contextmanager
def double_backward_attention() -> Iterator[None]:
    """Route ``scaled_dot_product_attention`` to the math backend, which has a double backward.

    The fused CPU kernel raises "derivative for aten::_scaled_dot_product_flash_attention_for_cpu
    _backward is not implemented" under ``create_graph=True`` (docs/facts.md).
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH):
        yield


@contextlib.contextmanager
def swapped_weights(prepared: PreparedModel, weights: Mapping[str, torch.Tensor]) -> Iterator[nn.Module]:
    """Temporarily replace some layers' weights (views, output channels first, e.g. fake-quantized);
    restored on exit."""
    saved = {}
    try:
        for fqn, w in weights.items():
            p = prepared.param(fqn)
            saved[fqn] = p.data
            p.data = to_param_layout(prepared.info(fqn), w).to(saved[fqn].dtype)
        yield prepared.model
    finally:
        for fqn, w in saved.items():
            prepared.param(fqn).data = w
