"""Evaluate an ONNX model in onnxruntime: metric over a whole split, median latency, file size.

The float baseline and every quantized candidate go through :func:`evaluate_onnx` with the same
settings, so their numbers compare. onnxruntime is imported inside the functions:
``import hawqtool`` stays cheap.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from hawqtool.errors import ExportError, UsageError

if TYPE_CHECKING:
    import onnx
    import onnxruntime

    from hawqtool.tasks import MetricFn  # a type only: tasks imports torch


@dataclass(frozen=True)
class Evaluation:
    """What one model scored in onnxruntime.

    Attributes:
        metric: ``metric_fn`` over the outputs of the whole split (batches concatenated).
        latency_ms: median wall time of one ``session.run`` on one batch, in milliseconds.
        size_bytes: serialized model size (the file size).
        samples: number of samples the metric covers.
        seconds: wall time of the whole evaluation (session creation included).
    """

    metric: float
    latency_ms: float
    size_bytes: int
    samples: int
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def make_session(model_bytes: bytes, *, threads: int = 2) -> onnxruntime.InferenceSession:
    """A CPU ``InferenceSession`` with all graph optimizations and ``threads`` intra-op threads.

    Raises:
        ExportError: onnxruntime rejects the model.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3  # errors only; warnings about NCHWc serialization are noise here
    try:
        return ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime's pybind errors (Fail, InvalidGraph, ...) share only Exception
        raise ExportError(f"onnxruntime cannot load the model: {e}") from e


def evaluate_onnx(
    model: onnx.ModelProto | str | Path,
    batches: Iterable[tuple[Any, Any]],
    metric_fn: MetricFn,
    *,
    threads: int = 2,
    latency_runs: int = 20,
    latency_batch: int | None = None,
    warmup: int = 3,
) -> Evaluation:
    """Run ``model`` over ``batches`` in one onnxruntime session and measure it.

    Args:
        model: an ``onnx.ModelProto`` or the path of an ``.onnx`` file.
        batches: ``(inputs, targets)`` pairs (torch tensors or numpy arrays), e.g. a split.
        metric_fn: ``fn(outputs, targets) -> float`` over the whole split (numpy arrays).
        threads: onnxruntime intra-op threads.
        latency_runs: timed runs; the latency is their median.
        latency_batch: samples in the timed batch (taken from the split, repeated if it is
            smaller); default: the first batch as it is.
        warmup: untimed runs before timing.

    Example:
        >>> from hawqtool.tasks import top1
        >>> ev = evaluate_onnx(Path("model.onnx"), splits.test, top1)   # doctest: +SKIP
        >>> ev.metric, ev.latency_ms, ev.size_bytes                     # doctest: +SKIP

    Raises:
        UsageError: an empty split, a bad setting, or a model path that does not exist.
        ExportError: onnxruntime fails to load or run the model.
    """
    start = time.perf_counter()
    if threads < 1 or latency_runs < 1 or warmup < 0 or (latency_batch is not None and latency_batch < 1):
        raise UsageError(
            f"need threads >= 1, latency_runs >= 1, warmup >= 0, latency_batch >= 1 or None; got "
            f"threads={threads}, latency_runs={latency_runs}, warmup={warmup}, latency_batch={latency_batch}"
        )
    if isinstance(model, (str, Path)):
        try:
            data = Path(model).read_bytes()
        except OSError as e:
            raise UsageError(f"cannot read model {model}: {e}") from e
    else:
        data = model.SerializeToString()
    session = make_session(data, threads=threads)
    input_name = session.get_inputs()[0].name

    def run(x: np.ndarray) -> np.ndarray:
        try:
            return np.asarray(session.run(None, {input_name: x})[0])
        except Exception as e:  # see make_session
            raise ExportError(f"onnxruntime failed to run the model: {e}") from e

    inputs, outputs, targets = [], [], []
    for x, y in batches:
        xs = _numpy(x).astype(np.float32, copy=False)
        inputs.append(xs)
        outputs.append(run(xs))
        targets.append(_numpy(y))
    if not inputs:
        raise UsageError("cannot evaluate on an empty split: give at least one (inputs, targets) batch")
    metric = float(metric_fn(np.concatenate(outputs), np.concatenate(targets)))

    timed = inputs[0]
    if latency_batch is not None:
        pool = np.concatenate(inputs)
        reps = -(-latency_batch // len(pool))
        timed = np.concatenate([pool] * reps)[:latency_batch] if reps > 1 else pool[:latency_batch]
    timed = np.ascontiguousarray(timed)
    for _ in range(warmup):
        run(timed)
    times = []
    for _ in range(latency_runs):
        t = time.perf_counter()
        run(timed)
        times.append(time.perf_counter() - t)
    return Evaluation(
        metric=metric,
        latency_ms=1e3 * statistics.median(times),
        size_bytes=len(data),
        samples=sum(len(t) for t in targets),
        seconds=time.perf_counter() - start,
    )


def _numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):
        return x.detach().cpu().numpy()  # type: ignore[no-any-return]
    return np.asarray(x)
