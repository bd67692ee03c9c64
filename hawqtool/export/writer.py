"""Writing a model: checked by ``onnx.checker``, atomically, with external data past protobuf's limit."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
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
    initializers of :data:`EXTERNAL_DATA_MIN_BYTES` or more in :func:`external_data_path` next to it,
    which onnxruntime and ``onnx.load`` find when they open the model by its path. Both files are
    written under temporary names in the same folder and renamed into place, data first: a failure
    leaves nothing at ``path``. ``model`` is left as it was.

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
        # Written under the final names inside a temporary folder: the model records its data file
        # by a path relative to itself, so both move out together.
        write_external(model, tmp / path.name)
        _check(str(tmp / path.name))
        (tmp / data.name).replace(data)
        (tmp / path.name).replace(path)
    except OSError as e:
        raise ExportError(f"cannot write {path}: {e}") from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


@contextlib.contextmanager
def session_source(
    model: onnx.ModelProto, *, max_inline_bytes: int = PROTOBUF_LIMIT
) -> Iterator[bytes | str]:
    """What onnxruntime opens for ``model``: its bytes, or, past ``max_inline_bytes``, the path of a
    copy written with external data (:func:`external_data_path`) in a temporary folder that is
    removed on exit (a session made inside keeps what it loaded). ``model`` is left as it was.

    Raises:
        ExportError: the temporary copy cannot be written.

    Example:
        >>> with session_source(model) as source:  # doctest: +SKIP
        ...     session = onnxruntime.InferenceSession(source)
    """
    if not needs_external_data(model, max_inline_bytes=max_inline_bytes):
        yield model.SerializeToString()
        return
    with tempfile.TemporaryDirectory(prefix="hawqtool-model-") as folder:
        path = Path(folder) / "model.onnx"
        try:
            write_external(model, path)
        except OSError as e:
            raise ExportError(f"cannot write a temporary copy of the model to {folder}: {e}") from e
        yield str(path)


def write_external(model: onnx.ModelProto, path: Path, *, limit: int = PROTOBUF_LIMIT) -> None:
    """Write ``model`` to ``path`` (unchecked, not atomically: a scratch copy) with the bytes of its initializers of
    :data:`EXTERNAL_DATA_MIN_BYTES` or more in :func:`external_data_path`, without copying the model:
    each such tensor is an external reference while the (then small) message is serialized, and
    gets its bytes back afterwards.

    Raises:
        ExportError: the rest of the model still serializes to more than ``limit`` bytes
            (protobuf's limit).
    """
    from onnx import TensorProto  # lazy: see hawqtool.export's docstring

    data = external_data_path(path)
    moved: list[tuple[onnx.TensorProto, bytes, bool]] = []
    try:
        with data.open("wb") as f:
            for t in model.graph.initializer:
                if t.data_location != TensorProto.DEFAULT or len(t.raw_data) < EXTERNAL_DATA_MIN_BYTES:
                    continue
                raw = t.raw_data
                offset = f.tell()
                f.write(raw)
                moved.append((t, raw, t.HasField("data_location")))
                t.ClearField("raw_data")
                t.data_location = TensorProto.EXTERNAL
                for key, value in (("location", data.name), ("offset", offset), ("length", len(raw))):
                    t.external_data.add(key=key, value=str(value))
        size = model.ByteSize()
        if size > limit:
            raise ExportError(
                f"the model is {size} bytes without its initializers' data, past the limit of {limit}: "
                "large constants outside the initializers cannot go to external data"
            )
        write_bytes_atomic(path, model.SerializeToString())
    finally:
        for t, raw, had_location in moved:  # as it was, field for field
            del t.external_data[:]
            t.ClearField("data_location")
            if had_location:
                t.data_location = TensorProto.DEFAULT
            t.raw_data = raw


def _check(model: onnx.ModelProto | str) -> None:
    import onnx  # lazy: see hawqtool.export's docstring

    try:
        onnx.checker.check_model(model, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        raise ExportError(f"the exported model is not valid ONNX: {e}") from e
