"""Evaluate an ONNX model in onnxruntime: metric over a whole split, median latency, file size.

The float baseline and every quantized candidate go through :func:`evaluate_onnx` with the same
settings, so their numbers compare. onnxruntime is imported inside the functions, so that the
stages that import this module without running a session do not load it.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from hawqtool.errors import ExportError, UsageError
from hawqtool.export.writer import session_source
from hawqtool.modelio import ModelIO
from hawqtool.tasks import MetricFn, get_metric, metric_by_chunks, metric_names, per_sample

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    import onnx
    import onnxruntime


@dataclass(frozen=True)
class Evaluation:
    """What one model scored in onnxruntime.

    Attributes:
        metric: ``metric_fn`` over the outputs of the whole split (batches concatenated).
        latency_ms: median wall time of one ``session.run`` on one batch, in milliseconds.
        size_bytes: serialized model size (the file size).
        samples: number of samples the metric covers.
        seconds: wall time of the whole evaluation (session creation included).
        values: the metric per sample (``None`` when the metric gives one number per split).
        outputs: the model's outputs over the split (only with ``keep_outputs``).
        chunks: for a metric that is one number per split, its values and sizes on fixed chunks
            of the split (what a paired bootstrap over chunks bounds a drop with).
    """

    metric: float
    latency_ms: float
    size_bytes: int
    samples: int
    seconds: float
    values: np.ndarray | None = field(default=None, repr=False, compare=False)
    outputs: np.ndarray | None = field(default=None, repr=False, compare=False)
    chunks: tuple[np.ndarray, np.ndarray] | None = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("values")
        d.pop("outputs")
        d.pop("chunks")
        d["per_sample"] = self.values is not None
        return d


#: Execution providers a recipe can target (``evaluate.provider``), by short name.
PROVIDERS = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}


def make_session(
    model_bytes: bytes | str | onnx.ModelProto, *, threads: int = 2, provider: str = "cpu"
) -> onnxruntime.InferenceSession:
    """An ``InferenceSession`` with all graph optimizations and ``threads`` intra-op threads.

    Args:
        model_bytes: the serialized model, the path of an ``.onnx`` file (needed when its
            weights are in external data), or an ``onnx.ModelProto`` of any size (past protobuf's
            2 GiB limit it is opened from a temporary copy with external data,
            :func:`hawqtool.export.writer.session_source`).
        threads: intra-op threads.
        provider: the target execution provider, a short name of :data:`PROVIDERS`; nodes it cannot
            run fall back to the CPU provider.

    Raises:
        UsageError: an unknown provider, or one this onnxruntime build does not have (the message
            names the available ones).
        ExportError: onnxruntime rejects the model.
    """
    import onnxruntime as ort  # lazy: see the module docstring

    if provider not in PROVIDERS:
        raise UsageError(f"unknown execution provider {provider!r}; allowed: {', '.join(PROVIDERS)}")
    available = ort.get_available_providers()
    if PROVIDERS[provider] not in available:
        names = {v: k for k, v in PROVIDERS.items()}
        raise UsageError(
            f"execution provider {provider!r} ({PROVIDERS[provider]}) is not available in this "
            f"onnxruntime build; available: {', '.join(names.get(a, a) for a in available)}"
        )
    providers = list(dict.fromkeys([PROVIDERS[provider], "CPUExecutionProvider"]))
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3  # errors only; warnings about NCHWc serialization are noise here
    try:
        if isinstance(model_bytes, (bytes, str)):
            return ort.InferenceSession(model_bytes, options, providers=providers)
        with session_source(model_bytes) as source:
            return ort.InferenceSession(source, options, providers=providers)
    except ExportError:
        raise
    except Exception as e:  # onnxruntime's pybind errors (Fail, InvalidGraph, ...) share only Exception
        raise ExportError(f"onnxruntime cannot load the model: {e}") from e


def evaluate_onnx(
    model: onnx.ModelProto | str | Path,
    batches: Iterable[tuple[Any, Any]],
    metric_fn: MetricFn,
    *,
    io: ModelIO | None = None,
    threads: int = 2,
    provider: str = "cpu",
    latency_runs: int = 20,
    latency_batch: int | None = None,
    warmup: int = 3,
    keep_outputs: bool = False,
    per_batch: bool = False,
) -> Evaluation:
    """Run ``model`` over ``batches`` in one onnxruntime session and measure it.

    Args:
        model: an ``onnx.ModelProto`` or the path of an ``.onnx`` file.
        batches: ``(inputs, targets)`` pairs (torch tensors or numpy arrays, inputs possibly a
            tuple or dict), e.g. a split.
        metric_fn: ``fn(outputs, targets)`` over the whole split (numpy arrays): per-sample values
            (shape ``(N,)``; the metric is their mean) or one number.
        io: the model-I/O contract that names and types the inputs; default: the model has one
            input, fed as float32.
        threads: onnxruntime intra-op threads.
        provider: the execution provider (:func:`make_session`).
        latency_runs: timed runs; the latency is their median.
        latency_batch: samples in the timed batch (taken from the split, repeated if it is
            smaller); default: the first batch as it is.
        warmup: untimed runs before timing.
        keep_outputs: keep the concatenated outputs in :attr:`Evaluation.outputs`.
        per_batch: the metric's per-sample values do not depend on the rest of the split
            (:func:`batchwise`): take them batch by batch and let the outputs go, so memory is one
            batch's outputs; otherwise (and for a metric that is one number per split) the split's
            outputs are kept and scored at once.

    Example:
        >>> from hawqtool.tasks import top1
        >>> ev = evaluate_onnx(Path("model.onnx"), splits.test, top1)   # doctest: +SKIP
        >>> ev.metric, ev.latency_ms, ev.size_bytes                     # doctest: +SKIP

    Raises:
        UsageError: an empty split, a bad setting, a model path that does not exist, or a metric
            that is NaN or of the wrong shape.
        ExportError: onnxruntime fails to load or run the model.
    """
    start = time.perf_counter()
    if threads < 1 or latency_runs < 1 or warmup < 0 or (latency_batch is not None and latency_batch < 1):
        raise UsageError(
            f"need threads >= 1, latency_runs >= 1, warmup >= 0, latency_batch >= 1 or None; got "
            f"threads={threads}, latency_runs={latency_runs}, warmup={warmup}, latency_batch={latency_batch}"
        )
    if isinstance(model, (str, Path)):
        path = Path(model)
        if not path.is_file():
            raise UsageError(f"cannot read model {model}: no such file")
        # A path, not bytes: a model over 2 GB keeps its weights in external data beside it.
        size = path.stat().st_size + sum(p.stat().st_size for p in path.parent.glob(f"{path.name}.data"))
        session = make_session(str(path), threads=threads, provider=provider)
    else:
        size = model.ByteSize()  # what the model serializes to, with no copy of it made
        session = make_session(model, threads=threads, provider=provider)

    # With per_batch, a metric with per-sample values is taken batch by batch and the outputs let
    # go (an LM's logits are vocabulary × tokens per sample); one number per split, keep_outputs or
    # a metric centred on the split (perplexity's pseudo-values) need them all.
    fed: list[dict[str, np.ndarray]] = []
    outputs: list[np.ndarray] = []
    targets: list[np.ndarray] = []
    parts: list[np.ndarray] = []
    streamed: bool | None = None
    pooled = 0  # samples in ``fed``: the timed batch needs latency_batch of them, or the first batch
    for x, y in batches:
        feed = session_feeds(session, x, io)
        if not fed or (latency_batch is not None and pooled < latency_batch):
            fed.append(feed)
            pooled += len(next(iter(feed.values())))
        o, target = run_session(session, feed), _numpy(y)
        if streamed is None:
            first = None if keep_outputs or not per_batch else per_sample(metric_fn(o, target), len(o))
            streamed = first is not None
            if first is not None:
                parts.append(first)
                continue
        if streamed:
            got = per_sample(metric_fn(o, target), len(o))
            if got is None:
                raise UsageError("the metric gave per-sample values on one batch and one number on another")
            parts.append(got)
        else:
            outputs.append(o)
            targets.append(target)
    if not fed:
        raise UsageError("cannot evaluate on an empty split: give at least one (inputs, targets) batch")
    out = tgt = None
    if streamed:
        values: np.ndarray | None = np.concatenate(parts)
    else:
        out, tgt = _concat(outputs), _concat(targets)
        values = _ragged_per_sample(metric_fn, outputs, targets)
        if values is None:
            raw = metric_fn(out, tgt)
            values = per_sample(raw, len(out))
    n = len(values) if values is not None else len(out)  # type: ignore[arg-type]
    metric = float(np.mean(values)) if values is not None else float(raw)  # type: ignore[arg-type]
    if not np.isfinite(metric):
        raise UsageError(f"the metric is {metric} on this split: check the targets and the metric")
    chunks = metric_by_chunks(metric_fn, out, tgt) if values is None and n >= 5 else None  # type: ignore[arg-type]

    timed = fed[0]
    if latency_batch is not None:
        timed = {k: _repeat_to([f[k] for f in fed], latency_batch) for k in fed[0]}
    for _ in range(warmup):
        run_session(session, timed)
    times = []
    for _ in range(latency_runs):
        t = time.perf_counter()
        run_session(session, timed)
        times.append(time.perf_counter() - t)
    return Evaluation(
        metric=metric,
        latency_ms=1e3 * statistics.median(times),
        size_bytes=size,
        samples=n,
        seconds=time.perf_counter() - start,
        values=values,
        outputs=out if keep_outputs else None,
        chunks=chunks,
    )


def batchwise(metric_name: str) -> bool:
    """Whether a recipe's metric may be scored batch by batch (:func:`evaluate_onnx`'s
    ``per_batch``): a registered metric whose per-sample values do not depend on the whole split
    (not ``Metric.whole_split``); a metric given by import path is not known to be one.

    Example:
        >>> batchwise("top1"), batchwise("perplexity"), batchwise("my.module:metric")
        (True, False, False)
    """
    return metric_name in metric_names() and not get_metric(metric_name).whole_split


def session_feeds(session: onnxruntime.InferenceSession, x: Any, io: ModelIO | None) -> dict[str, np.ndarray]:
    """The feeds of one batch's inputs: by the model-I/O contract, else (no ``io``) the session's
    single input as float32."""
    if io is not None:
        return io.feeds(x)
    return {session.get_inputs()[0].name: np.ascontiguousarray(_numpy(x).astype(np.float32, copy=False))}


def run_session(session: onnxruntime.InferenceSession, feed: dict[str, np.ndarray]) -> np.ndarray:
    """The first output of one ``session.run``.

    Raises:
        ExportError: onnxruntime fails to run the model.
    """
    try:
        return np.asarray(session.run(None, feed)[0])
    except Exception as e:  # see make_session
        raise ExportError(f"onnxruntime failed to run the model: {e}") from e


def _ragged_per_sample(
    metric_fn: MetricFn, outputs: list[np.ndarray], targets: list[np.ndarray]
) -> np.ndarray | None:
    """Per-sample metric values batch by batch when the batches' outputs differ in a trailing axis
    (token sequences padded per batch): on the zero-padded concatenation the padded positions
    would count (as agreement for per-token ``top1_agreement``, as zero error for ``mse``). None when
    the outputs are not ragged or the metric is one number per split (then the padded
    concatenation is all there is to give it)."""
    if len({o.shape[1:] for o in outputs}) <= 1:
        return None
    parts = []
    for o, t in zip(outputs, targets, strict=True):
        values = per_sample(metric_fn(o, t), len(o))
        if values is None:
            log.warning(
                "the metric gives one number per split and the batches' outputs differ in shape "
                "(%s): it sees them zero-padded to the longest",
                sorted({o.shape[1:] for o in outputs}),
            )
            return None
        parts.append(values)
    return np.concatenate(parts)


def _concat(arrays: list[np.ndarray]) -> np.ndarray:
    """Concatenate along the batch axis; ragged trailing axes (token sequences of different
    lengths per batch) are right-padded with zeros to the longest."""
    if len({a.shape[1:] for a in arrays}) <= 1:
        return np.concatenate(arrays)
    rank = {a.ndim for a in arrays}
    if len(rank) > 1:
        raise UsageError(f"batches give outputs of different ranks: {sorted(rank)}")
    shape = np.max([a.shape[1:] for a in arrays], axis=0)
    padded = []
    for a in arrays:
        p = np.zeros((len(a), *shape), a.dtype)
        p[(slice(None), *(slice(0, s) for s in a.shape[1:]))] = a
        padded.append(p)
    return np.concatenate(padded)


def _repeat_to(pool: list[np.ndarray], n: int) -> np.ndarray:
    if len({a.shape[1:] for a in pool}) > 1:
        pool = pool[:1]
    joined = np.concatenate(pool)
    reps = -(-n // len(joined))
    return np.ascontiguousarray(np.concatenate([joined] * reps)[:n] if reps > 1 else joined[:n])


def _numpy(x: Any) -> np.ndarray:
    if x is None:
        raise UsageError("a batch has no targets: give (inputs, targets) pairs or set task.targets: model")
    if hasattr(x, "detach"):
        return x.detach().cpu().numpy()  # type: ignore[no-any-return]
    return np.asarray(x)
