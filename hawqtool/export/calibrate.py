"""Activation calibration: uint8 ranges of the tensors QDQ quantizes, by onnxruntime's own
calibrators, and the scale / zero point onnxruntime derives from a range."""

from __future__ import annotations

import contextlib
import io
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from hawqtool.errors import ExportError, UsageError
from hawqtool.export.torch_export import INPUT_NAME
from hawqtool.export.writer import needs_external_data, write_external
from hawqtool.modelio import ModelIO

if TYPE_CHECKING:
    import onnx

CALIBRATION_METHODS = ("minmax", "percentile", "entropy")


@dataclass(frozen=True)
class ActivationQuant:
    """uint8 affine quantization of one activation tensor: ``x ≈ scale · (q − zero_point)``."""

    scale: float
    zero_point: int
    rmin: float
    rmax: float


def uint8_qparams(rmin: float, rmax: float) -> tuple[np.float32, np.uint8]:
    """Scale and zero point of a uint8 tensor covering ``[rmin, rmax]``, as onnxruntime computes them.

    The range is widened to include 0 (so 0 is exact, as padding needs); the scale is
    ``(rmax − rmin) / 255`` stored in float32 and the zero point ``round(−rmin / scale)``, the
    formula of ``onnxruntime.quantization.quant_utils.compute_scale_zp`` (asymmetric, qmin = 0).
    A degenerate range (all zeros) gets scale 1, zero point 0.

    Example:
        >>> s, z = uint8_qparams(0.0, 2.55)
        >>> round(float(s), 6), int(z)
        (0.01, 0)
    """
    lo = min(float(rmin), 0.0)
    hi = max(float(rmax), 0.0)
    scale = (np.float64(hi) - np.float64(lo)) / 255.0
    if scale < np.finfo(np.float32).tiny:
        return np.float32(1.0), np.uint8(0)
    zero_point = np.uint8(np.clip(np.round(0.0 - lo / scale), 0, 255))
    return np.float32(scale), zero_point


def calibration_inputs(
    calibration: Any, limit: int | None, io: ModelIO | None
) -> list[dict[str, np.ndarray]]:
    """onnxruntime feeds of the first ``limit`` calibration batches (inputs only).

    Raises:
        UsageError: the split is empty.
    """
    inputs: list[dict[str, np.ndarray]] = []
    for batch in calibration:
        if limit is not None and len(inputs) >= limit:
            break
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        if io is not None:
            inputs.append(io.feeds(x))
        else:
            arr = x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)
            inputs.append({INPUT_NAME: arr.astype(np.float32)})
    if not inputs:
        raise UsageError("the calibration split is empty: give at least one (inputs, targets) batch")
    return inputs


def calibrate(
    model: onnx.ModelProto, tensors: Sequence[str], inputs: Sequence[dict[str, np.ndarray]], method: str
) -> dict[str, tuple[float, float]]:
    """Calibrated ``(rmin, rmax)`` of ``tensors`` on ``inputs``, by onnxruntime's own calibrator.

    Args:
        model: the float model (not modified).
        tensors: names of the tensors to calibrate.
        inputs: onnxruntime feeds (:func:`calibration_inputs`).
        method: one of :data:`CALIBRATION_METHODS`.

    Raises:
        UsageError: an unknown method.
        ExportError: onnxruntime fails, or gives no range for a tensor.
    """
    import onnx  # lazy: see hawqtool.export's docstring
    from onnxruntime.quantization.calibrate import CalibrationMethod, create_calibrator

    methods = {
        # The calibrator's graph reduces each tensor to its min and max: little memory per batch.
        "minmax": (CalibrationMethod.MinMax, {}),
        # Asymmetric: a symmetric range would waste half the uint8 grid on post-ReLU tensors.
        "percentile": (CalibrationMethod.Percentile, {"symmetric": False}),
        "entropy": (CalibrationMethod.Entropy, {}),
    }
    if method not in methods:
        raise UsageError(f"unknown calibration method {method!r}; allowed: {', '.join(CALIBRATION_METHODS)}")
    calib_method, options = methods[method]
    # The calibrator adds graph outputs for every input/output of nodes of these types; restricting
    # the types keeps that to (a small superset of) the tensors QDQ needs.
    producers = {o: n.op_type for n in model.graph.node for o in n.output}
    wanted = set(tensors)
    op_types = {n.op_type for n in model.graph.node if wanted & set(n.input)}
    op_types |= {producers[t] for t in wanted if t in producers}
    with tempfile.TemporaryDirectory(prefix="hawqtool-calib-") as tmp:
        float_path = Path(tmp) / "float.onnx"
        external = needs_external_data(model)
        if external:
            write_external(model, float_path)
        else:
            onnx.save(model, float_path)
        try:
            with contextlib.redirect_stdout(io.StringIO()):  # the histogram calibrators print
                calibrator = create_calibrator(
                    float_path,
                    sorted(op_types),
                    augmented_model_path=str(Path(tmp) / "augmented.onnx"),
                    calibrate_method=calib_method,
                    extra_options=options,
                    use_external_data_format=external,
                )
                calibrator.collect_data(_Reader(inputs))
                data = calibrator.compute_data()
        except Exception as e:  # onnxruntime's pybind errors share no base class but Exception
            raise ExportError(f"onnxruntime calibration failed: {e}") from e
    out: dict[str, tuple[float, float]] = {}
    for name in tensors:
        if name not in data:
            raise ExportError(f"calibration produced no range for tensor {name!r}")
        lo, hi = data[name].range_value
        out[name] = (float(np.min(lo)), float(np.max(hi)))
    return out


class _Reader:
    """The ``CalibrationDataReader`` protocol over in-memory input batches."""

    def __init__(self, inputs: Sequence[dict[str, np.ndarray]]) -> None:
        self._it = iter(inputs)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._it, None)
