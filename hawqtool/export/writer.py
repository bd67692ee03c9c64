"""Writing a model: checked by ``onnx.checker``, atomically, with external data past protobuf's limit."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from hawqtool.errors import ExportError
from hawqtool.files import write_bytes_atomic

if TYPE_CHECKING:
    import onnx

#: The largest message protobuf serializes (2 GiB − 1): a bigger model must keep its tensors in
#: an external data file.
PROTOBUF_LIMIT = 2**31 - 1
#: Tensors smaller than this stay inside the ``.onnx`` file when the rest goes to external data.
EXTERNAL_DATA_MIN_BYTES = 1024


def external_data_path(path: str | os.PathLike[str]) -> Path:
    """The external data file that goes with a model file: ``model.onnx`` -> ``model.onnx.data``."""
    path = Path(path)
    return path.with_name(f"{path.name}.data")


def needs_external_data(model: onnx.ModelProto, *, max_inline_bytes: int = PROTOBUF_LIMIT) -> bool:
    """Whether ``model`` serializes to more than ``max_inline_bytes`` (it cannot be one protobuf)."""
    return int(model.ByteSize()) > max_inline_bytes


def write_model(
    model: onnx.ModelProto, path: str | os.PathLike[str], *, max_inline_bytes: int = PROTOBUF_LIMIT
) -> Path:
    """Check ``model`` with ``onnx.checker`` (full check) and write it to ``path`` atomically.

    A model that serializes to at most ``max_inline_bytes`` is one file. A bigger one keeps its
    tensors of :data:`EXTERNAL_DATA_MIN_BYTES` or more in :func:`external_data_path` next to it
    (``onnx.save(..., save_as_external_data=True)``), which onnxruntime and ``onnx.load`` find when
    they open the model by its path. Both files are written under temporary names in the same
    folder and renamed into place, data first: a failure leaves nothing at ``path``. In the
    external case ``model``'s tensors are moved to the data file (its raw bytes cleared): pass a
    model you do not need afterwards.

    Args:
        model: the model to write.
        path: the ``.onnx`` file.
        max_inline_bytes: the largest model written as one file (protobuf's limit; lower it to test
            the external-data path on a small model).

    Raises:
        ExportError: the model fails validation, or ``path`` cannot be written.

    Example:
        >>> write_model(model, Path("out/model.onnx"))  # doctest: +SKIP
        PosixPath('out/model.onnx')
    """
    import onnx  # lazy: see hawqtool.export's docstring

    path = Path(path)
    if not needs_external_data(model, max_inline_bytes=max_inline_bytes):
        _check(model)
        try:
            write_bytes_atomic(path, model.SerializeToString())
        except OSError as e:
            raise ExportError(f"cannot write {path}: {e}") from e
        return path
    data = external_data_path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    except OSError as e:
        raise ExportError(f"cannot write {path}: {e}") from e
    try:
        # Saved under the final names inside a temporary folder: the model records its data file by
        # a path relative to itself, so both move out together.
        onnx.save(
            model,
            tmp / path.name,
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=data.name,
            size_threshold=EXTERNAL_DATA_MIN_BYTES,
        )
        _check(str(tmp / path.name))
        (tmp / data.name).replace(data)
        (tmp / path.name).replace(path)
    except OSError as e:
        raise ExportError(f"cannot write {path}: {e}") from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def _check(model: onnx.ModelProto | str) -> None:
    import onnx  # lazy: see hawqtool.export's docstring

    try:
        onnx.checker.check_model(model, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        raise ExportError(f"the exported model is not valid ONNX: {e}") from e
