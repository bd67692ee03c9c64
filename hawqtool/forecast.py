"""How long the rest of a run will take, forecast from what the trace stage measured.

The trace stage is the first long stage, and it records its passes over the calibration split and its
seconds (:func:`hawqtool.hessian.stage_costs`). From them: the seconds of one forward pass over the
calibration split (a backward counted as two forwards), and per sample. The stages after it are
counted in the same unit: the dependency terms' passes (known from the option table before they
start), the search's evaluations (at most :func:`hawqtool.search.max_evaluations` of the candidates,
plus the uniform models below the choice; each a forward pass over the evaluation split) and the
final model's two evaluations. onnxruntime runs a model faster than torch does on a CPU, and exports
and session starts are not counted, so the figure is a scale (minutes or hours), not a promise;
report.json keeps it (``forecast_s``) beside what each stage took (``timings_s``).

Example:
    >>> f = forecast({"forward_passes": 10.0, "backward_passes": 10.0, "seconds": 30.0},
    ...              calibration=100, evaluation=200, test=200, dependency_passes=50, evaluations=9)
    >>> f.pass_seconds, f.dependency_s, f.search_s, f.final_s
    (1.0, 50.0, 18.0, 4.0)
    >>> f.describe()
    'dependency terms ≈ 50 s (50 passes), search ≤ 18 s (≤ 9 evaluations), final check ≈ 4 s: about 72 s more'
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

    pass_seconds: float  # one forward pass over the calibration split
    dependency_s: float
    dependency_passes: int
    search_s: float  # an upper bound: every evaluation bisection may take
    evaluations: int
    final_s: float

    @property
    def total_s(self) -> float:
        return self.dependency_s + self.search_s + self.final_s

    def describe(self) -> str:
        parts = []
        if self.dependency_passes:
            parts.append(
                f"dependency terms ≈ {_duration(self.dependency_s)} ({self.dependency_passes} passes)"
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
    dependency_passes: int,
    evaluations: int,
) -> Forecast | None:
    """The forecast from the trace stage's ``costs`` (passes and seconds), the splits' sample counts,
    the dependency stage's passes over the calibration split and the most evaluations the search may
    take; ``None`` when the costs hold no timed pass (e.g. a cache from before 0.4)."""
    passes = costs.get("forward_passes", 0.0) + BACKWARD_AS_FORWARDS * costs.get("backward_passes", 0.0)
    seconds = costs.get("seconds", 0.0)
    if not (passes > 0 and seconds > 0 and calibration > 0 and math.isfinite(seconds)):
        return None
    per_pass = seconds / passes
    per_sample = per_pass / calibration
    return Forecast(
        pass_seconds=per_pass,
        dependency_s=dependency_passes * per_pass,
        dependency_passes=dependency_passes,
        search_s=evaluations * evaluation * per_sample,
        evaluations=evaluations,
        final_s=(evaluation + test) * per_sample,
    )


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"
