"""How long the rest of a run will take, forecast from what the trace stage and one onnxruntime pass
measured.

The trace stage is the first long stage, and it records its passes over the calibration split and its
seconds (:func:`hawqtool.hessian.stage_costs`): from them, the seconds of one torch forward pass over
the calibration split (a backward counted as two forwards). One timed onnxruntime run of the float
model on a calibration batch gives onnxruntime's seconds per sample, which on a CPU are often a
fraction of torch's. The stages after the traces are counted in those units: the dependency terms'
torch and onnxruntime passes (known from the option table before they start), the search's
evaluations (at most :func:`hawqtool.search.max_evaluations` of the candidates, a frontier gap's
bisection and the uniform models below the choice; each an onnxruntime pass over the evaluation
split) and the final model's two evaluations. Exports, session starts and replayed parts of passes
are not priced, so the figure is a scale (minutes or hours), not a promise; report.json keeps it
(``forecast_s``) beside what each stage took (``timings_s``).

Example:
    >>> f = forecast({"forward_passes": 10.0, "backward_passes": 10.0, "seconds": 30.0},
    ...              calibration=100, evaluation=200, test=200, torch_passes=40, onnx_passes=20,
    ...              evaluations=9, onnx_seconds_per_sample=0.002)
    >>> f.pass_seconds, f.dependency_s, f.search_s, f.final_s
    (1.0, 44.0, 3.6, 0.8)
    >>> f.describe()
    'dependency terms ≈ 44 s (40 torch + 20 onnxruntime passes), search ≤ 4 s (≤ 9 evaluations), final check ≈ 1 s: about 48 s more'
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass

#: A backward pass costs about two forward passes.
BACKWARD_AS_FORWARDS = 2.0


@dataclass(frozen=True)
class Forecast:
    """Forecast seconds of the stages after the traces (``dependency_s`` 0 when they are off)."""

    pass_seconds: float  # one torch forward pass over the calibration split
    onnx_seconds_per_sample: float  # onnxruntime, the float model
    dependency_s: float
    torch_passes: int
    onnx_passes: int
    search_s: float  # an upper bound: every evaluation the search may take
    evaluations: int
    final_s: float

    @property
    def total_s(self) -> float:
        return self.dependency_s + self.search_s + self.final_s

    def describe(self) -> str:
        parts = []
        if self.torch_passes or self.onnx_passes:
            parts.append(
                f"dependency terms ≈ {_duration(self.dependency_s)} ({self.torch_passes} torch + "
                f"{self.onnx_passes} onnxruntime passes)"
            )
        parts.append(f"search ≤ {_duration(self.search_s)} (≤ {self.evaluations} evaluations)")
        parts.append(f"final check ≈ {_duration(self.final_s)}")
        return ", ".join(parts) + f": about {_duration(self.total_s)} more"

    def to_dict(self) -> dict[str, float]:
        return {k: float(v) for k, v in asdict(self).items()}


def forecast(
    costs: Mapping[str, float],
    *,
    calibration: int,
    evaluation: int,
    test: int,
    torch_passes: int,
    onnx_passes: int,
    evaluations: int,
    onnx_seconds_per_sample: float | None = None,
) -> Forecast | None:
    """The forecast from the trace stage's ``costs`` (passes and seconds), the splits' sample counts,
    the dependency stage's passes over the calibration split and the most evaluations the search may
    take; onnxruntime priced at ``onnx_seconds_per_sample`` (default: torch's). ``None`` when the
    costs hold no timed pass (e.g. a cache from before 0.4)."""
    passes = costs.get("forward_passes", 0.0) + BACKWARD_AS_FORWARDS * costs.get("backward_passes", 0.0)
    seconds = costs.get("seconds", 0.0)
    if not (passes > 0 and seconds > 0 and calibration > 0 and math.isfinite(seconds)):
        return None
    per_pass = seconds / passes
    onnx = onnx_seconds_per_sample if onnx_seconds_per_sample is not None else per_pass / calibration
    return Forecast(
        pass_seconds=per_pass,
        onnx_seconds_per_sample=onnx,
        dependency_s=torch_passes * per_pass + onnx_passes * calibration * onnx,
        torch_passes=torch_passes,
        onnx_passes=onnx_passes,
        search_s=evaluations * evaluation * onnx,
        evaluations=evaluations,
        final_s=(evaluation + test) * onnx,
    )


def _duration(seconds: float) -> str:
    """Seconds for people: ``< 1 s``, ``12 s``, ``4.5 min``, ``1.6 h``.

    Example:
        >>> _duration(0.3), _duration(42.0), _duration(270.0)
        ('< 1 s', '42 s', '4.5 min')
    """
    if seconds < 0.5:
        return "< 1 s"
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"
