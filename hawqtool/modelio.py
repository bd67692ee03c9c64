"""The model-I/O contract: what goes into the user's model, what comes out, and how both cross into
ONNX and onnxruntime.

Every stage that runs the model (prepare, Hessian, dependency terms, export, calibration,
evaluation) goes through this module, so a model that takes one float tensor, a tuple, or a dict of
int64 token ids and masks is handled the same way everywhere:

- **inputs** are a pytree (a tensor, a tuple/list or a dict of tensors, nested, any dtype);
  ``torch.utils._pytree`` flattens them. The batch size is the leading dimension of every leaf.
- **the call**: a tensor is passed as ``model(x)``, a tuple/list as ``model(*x)``, a dict as
  ``model(**x)``.
- **the output** the loss and metric see is picked by ``task.output``
  (:func:`select_output`): a name (``logits``, ``last_hidden_state``: a dict key or an attribute of
  a Hugging Face ``ModelOutput``), an integer index, or an import path ``package.module:function``.
  The exported ONNX model has exactly that one output, named ``output``.
- **ONNX inputs** are the flattened leaves, named by their path (``input`` for a lone tensor,
  ``input_ids`` / ``attention_mask`` for a dict, ``input_0`` ... for a tuple), with the batch axis
  dynamic and every other axis dynamic where it varies across the data or where it is a token
  axis (any non-batch axis of an integer tensor: sequence lengths differ between users' batches).
- **onnxruntime feeds** keep integer dtypes (int64 ids stay int64) and turn floating ones into
  float32.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils import _pytree as pytree

from hawqtool.errors import UsageError
from hawqtool.tasks import import_object

#: One batch: ``(inputs, targets)``; ``targets`` is ``None`` until teacher targets fill it.
Batch = tuple[Any, Any]

OUTPUT_NAME = "output"
#: Names tried, in order, when ``task.output`` is not given and the model returns a mapping.
DEFAULT_OUTPUT_KEYS = ("logits", "last_hidden_state", "output")


# --------------------------------------------------------------------------------------------
# Pytrees of tensors
# --------------------------------------------------------------------------------------------


def leaves(tree: Any) -> list[Any]:
    """The leaves of a pytree, in a stable order (a dict's own key order)."""
    return list(pytree.tree_leaves(tree))


def as_tensors(tree: Any, *, what: str) -> Any:
    """The same pytree with numpy arrays turned into tensors.

    Raises:
        UsageError: a leaf is neither a tensor nor a numpy array (naming ``what``).
    """

    def conv(x: Any) -> torch.Tensor:
        if isinstance(x, torch.Tensor):
            return x
        if isinstance(x, np.ndarray):
            return torch.from_numpy(x)
        raise UsageError(
            f"{what} holds a {type(x).__name__}; inputs must be tensors or numpy arrays, alone or in "
            "a tuple, list or dict"
        )

    return pytree.tree_map(conv, tree)


def batch_size(tree: Any, *, what: str = "inputs") -> int:
    """The leading dimension shared by every leaf of ``tree``.

    Raises:
        UsageError: no tensor leaves, a 0-d leaf, or leaves that disagree on the batch size.

    Example:
        >>> batch_size({"input_ids": torch.zeros(4, 7, dtype=torch.long), "mask": torch.ones(4, 7)})
        4
    """
    sizes = {tuple(x.shape[:1]) for x in leaves(tree) if isinstance(x, torch.Tensor)}
    if not sizes:
        raise UsageError(f"{what} holds no tensors")
    if () in sizes:
        raise UsageError(f"{what} holds a 0-d tensor; every input needs a leading batch dimension")
    if len(sizes) > 1:
        raise UsageError(
            f"{what}: the tensors disagree on the batch size (leading dimensions {sorted(s[0] for s in sizes)})"
        )
    return int(next(iter(sizes))[0])


def to_device(tree: Any, device: torch.device | str) -> Any:
    """Move every tensor leaf to ``device`` (other leaves unchanged)."""
    return pytree.tree_map(lambda x: x.to(device) if isinstance(x, torch.Tensor) else x, tree)


def take(tree: Any, index: torch.Tensor) -> Any:
    """Rows ``index`` of every tensor leaf (a sub-batch)."""
    return pytree.tree_map(lambda x: x[index.to(x.device)] if isinstance(x, torch.Tensor) else x, tree)


def concat(trees: Sequence[Any]) -> Any:
    """Concatenate pytrees of the same structure along the batch axis.

    Raises:
        UsageError: the structures or the non-batch shapes differ (e.g. token sequences of
            different lengths, which cannot be stacked without padding).
    """
    flat = [pytree.tree_flatten(t) for t in trees]
    spec = flat[0][1]
    for _, s in flat[1:]:
        if s != spec:
            raise UsageError("batches have different input structures (keys or nesting)")
    try:
        cols = [torch.cat([f[0][i] for f in flat]) for i in range(len(flat[0][0]))]
    except RuntimeError as e:
        raise UsageError(f"batches do not concatenate along the batch axis: {e}") from e
    return pytree.tree_unflatten(cols, spec)


def call(model: nn.Module, inputs: Any) -> Any:
    """Run ``model`` on one batch of inputs: ``model(x)``, ``model(*x)`` or ``model(**x)``."""
    if isinstance(inputs, Mapping):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


# --------------------------------------------------------------------------------------------
# Outputs
# --------------------------------------------------------------------------------------------


def output_selector(spec: str | int | None) -> Callable[[Any], torch.Tensor]:
    """A function that picks the loss and metric's tensor out of whatever the model returns.

    Args:
        spec: ``None`` (a tensor as it is; the first element of a tuple; ``logits``, then
            ``last_hidden_state``, then ``output`` of a mapping or ``ModelOutput``), a key or
            attribute name, an integer index into a tuple, or ``package.module:function``
            (called on the raw outputs).

    Raises:
        UsageError: an import path that does not resolve (on construction); a missing key or
            index, or a non-tensor result (when applied).

    Example:
        >>> pick = output_selector("logits")
        >>> pick({"logits": torch.ones(2, 3), "hidden": torch.zeros(2, 4)}).shape
        torch.Size([2, 3])
    """
    if isinstance(spec, str) and ":" in spec:
        fn = import_object(spec, what="task.output")

        def custom(out: Any) -> torch.Tensor:
            return _check_tensor(fn(out), spec)

        return custom

    def select(out: Any) -> torch.Tensor:
        return _check_tensor(_select(out, spec), spec)

    return select


def _select(out: Any, spec: str | int | None) -> Any:
    if spec is None:
        if isinstance(out, torch.Tensor):
            return out
        if isinstance(out, (tuple, list)) and out:
            return out[0]
        for key in DEFAULT_OUTPUT_KEYS:
            got = _lookup(out, key)
            if got is not None:
                return got
        raise UsageError(
            f"the model returns a {type(out).__name__}; set task.output to the key, attribute or "
            f"index of the tensor to quantize against ({_describe(out)})"
        )
    if isinstance(spec, int):
        if isinstance(out, Mapping):
            out = list(out.values())
        if not isinstance(out, (tuple, list)) or not -len(out) <= spec < len(out):
            raise UsageError(f"task.output {spec} is not an index of the model's outputs ({_describe(out)})")
        return out[spec]
    got = _lookup(out, spec)
    if got is None:
        raise UsageError(f"task.output {spec!r} is not among the model's outputs ({_describe(out)})")
    return got


def _lookup(out: Any, key: str) -> Any:
    if isinstance(out, Mapping):
        return out.get(key)
    if isinstance(out, torch.Tensor):
        return None
    return getattr(out, key, None)


def _describe(out: Any) -> str:
    if isinstance(out, Mapping):
        return "keys: " + ", ".join(map(str, out.keys()))
    if isinstance(out, (tuple, list)):
        return f"a {type(out).__name__} of {len(out)}"
    if hasattr(out, "keys"):
        return "keys: " + ", ".join(map(str, out.keys()))
    return f"a {type(out).__name__}"


def _check_tensor(x: Any, spec: Any) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise UsageError(f"task.output {spec!r} selects a {type(x).__name__}, not a tensor")
    return x


class SelectedOutput(nn.Module):
    """``model`` with its inputs as flat positional tensors and one output tensor: what is exported.

    ONNX has no pytrees: the exported graph takes the leaves of the input pytree in order, and
    returns the tensor ``task.output`` selects.
    """

    def __init__(self, model: nn.Module, spec: Any, select: Callable[[Any], torch.Tensor]) -> None:
        super().__init__()
        self.model = model
        self._spec = spec
        self._select = select

    def forward(self, *flat: torch.Tensor) -> torch.Tensor:
        return self._select(call(self.model, pytree.tree_unflatten(list(flat), self._spec)))


# --------------------------------------------------------------------------------------------
# The contract object
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelIO:
    """How one model's inputs and output cross into ONNX and onnxruntime.

    Attributes:
        input_names: ONNX input names, one per pytree leaf, in leaf order.
        dynamic_axes: per input, the axes that are dynamic (0, the batch, always).
        dtypes: per input, the numpy dtype onnxruntime is fed (integers kept, floats as float32).
        output: ``task.output`` as given (``None``: the default rule of :func:`output_selector`).

    Example:
        >>> batches = [({"input_ids": torch.ones(4, 9, dtype=torch.long)}, None)]
        >>> io = ModelIO.from_batches(batches)
        >>> io.input_names, io.dynamic_axes
        (('input_ids',), {'input_ids': (0, 1)})
    """

    input_names: tuple[str, ...]
    dynamic_axes: Mapping[str, tuple[int, ...]]
    dtypes: Mapping[str, str]
    output: str | int | None = None
    spec: Any = None  # the inputs' TreeSpec

    @classmethod
    def from_batches(cls, batches: Iterable[Batch], *, output: str | int | None = None) -> ModelIO:
        """Infer names, dtypes and dynamic axes from the data the model will see.

        Raises:
            UsageError: no batches, or batches whose input structures or ranks differ.
        """
        specs, shapes, dtypes = [], [], None
        for inputs, _ in batches:
            flat, spec = pytree.tree_flatten(inputs)
            specs.append(spec)
            shapes.append([tuple(x.shape) for x in flat])
            dtypes = dtypes or [x.dtype for x in flat]
        if not specs:
            raise UsageError("no batches to infer the model's inputs from")
        if any(s != specs[0] for s in specs[1:]):
            raise UsageError("batches have different input structures (keys, order or nesting)")
        names = _leaf_names(specs[0])
        dynamic: dict[str, tuple[int, ...]] = {}
        np_dtypes: dict[str, str] = {}
        for i, name in enumerate(names):
            ranks = {len(s[i]) for s in shapes}
            if len(ranks) > 1:
                raise UsageError(f"input {name!r} changes rank between batches: {sorted(ranks)}")
            rank = ranks.pop()
            dt = dtypes[i]  # type: ignore[index]
            integer = not (dt.is_floating_point or dt.is_complex or dt == torch.bool)
            axes = [0]
            for a in range(1, rank):
                varies = len({s[i][a] for s in shapes}) > 1
                if varies or integer:
                    axes.append(a)
            dynamic[name] = tuple(axes)
            np_dtypes[name] = "bool" if dt == torch.bool else str(torch.empty((), dtype=dt).numpy().dtype)
            if dt.is_floating_point:
                np_dtypes[name] = "float32"
        return cls(tuple(names), dynamic, np_dtypes, output, specs[0])

    # -- torch side ---------------------------------------------------------------------------

    def selector(self) -> Callable[[Any], torch.Tensor]:
        """The output selector of ``task.output``."""
        return output_selector(self.output)

    def forward(self, model: nn.Module, inputs: Any) -> torch.Tensor:
        """The selected output of ``model`` on one batch of inputs."""
        return self.selector()(call(model, inputs))

    def flat_module(self, model: nn.Module) -> SelectedOutput:
        """``model`` as the exporter sees it: flat positional inputs, one selected output."""
        return SelectedOutput(model, self.spec, self.selector()).eval()

    def flatten(self, inputs: Any) -> list[torch.Tensor]:
        """The input leaves, in ONNX input order.

        Raises:
            UsageError: ``inputs`` has another structure than the data the contract was built on.
        """
        flat, spec = pytree.tree_flatten(inputs)
        if spec != self.spec:
            raise UsageError(f"inputs do not have the structure the model was prepared with: {self.spec}")
        return list(flat)

    # -- onnxruntime side --------------------------------------------------------------------

    def feeds(self, inputs: Any) -> dict[str, np.ndarray]:
        """onnxruntime feeds for one batch of inputs: integers keep their dtype, floats become float32."""
        out = {}
        for name, x in zip(self.input_names, self.flatten(inputs), strict=True):
            arr = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
            out[name] = np.ascontiguousarray(arr.astype(self.dtypes[name], copy=False))
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "inputs": [
                {"name": n, "dtype": self.dtypes[n], "dynamic_axes": list(self.dynamic_axes[n])}
                for n in self.input_names
            ],
            "output": self.output,
        }


def _leaf_names(spec: Any) -> list[str]:
    """ONNX-safe names of a TreeSpec's leaves: ``input`` for a lone tensor, the dict keys of a dict,
    ``input_0``... for a sequence, joined paths (``a_b``) for nested containers."""
    dummy = pytree.tree_unflatten(list(range(spec.num_leaves)), spec)
    paths, _ = pytree.tree_flatten_with_path(dummy)
    if len(paths) == 1 and not paths[0][0]:
        return ["input"]
    names = []
    for path, _ in paths:
        parts = []
        for k in path:
            key = getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))
            parts.append(str(key))
        name = "_".join(parts)
        if not name or name[0].isdigit():
            name = f"input_{name}"
        names.append("".join(c if c.isalnum() or c == "_" else "_" for c in name))
    if len(set(names)) != len(names):
        names = [f"input_{i}" for i in range(len(names))]
    return names
