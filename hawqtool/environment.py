"""What a run's numbers depend on outside the recipe: library versions, the CPU, and the cache keys
built from them (onnxruntime's integer kernels differ per CPU, so exported numerics do too).

Example:
    >>> sorted(versions())
    ['cpu', 'hawqtool', 'onnx', 'onnxruntime', 'torch']
"""

from __future__ import annotations

import functools
import logging
import platform
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from hawqtool import __version__
from hawqtool.cache import settings_key
from hawqtool.export.plan import PLAN_VERSION
from hawqtool.formats import parse_format
from hawqtool.recipe import Recipe
from hawqtool.types import ExportSettings, OptionTable, SensitivityTable

log = logging.getLogger(__name__)

#: Bumped when the dependency terms are computed differently (old caches are then ignored).
DEPENDENCY_VERSION = "dep-v4"


def versions() -> dict[str, str]:
    """The versions of hawqtool and the libraries its numbers come from, and the CPU (report.json)."""
    # Lazy: importing the pipeline for the Hessian stages (torchrun workers) must not load onnxruntime.
    import onnx
    import onnxruntime

    return {
        "hawqtool": __version__,
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
        "cpu": cpu(),
    }


@functools.cache
def cpu() -> str:
    """The CPU name and whether it has VNNI: without it, onnxruntime's u8 x s8 integer kernels saturate
    on full-range int8 weights, so the measured accuracy of int8 formats differs between machines.

    Example:
        >>> "VNNI" in cpu() or "(" not in cpu()
        True
    """
    name = platform.machine()
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return name
    for line in info.splitlines():
        if line.startswith("model name"):
            name = line.split(":", 1)[1].strip()
            break
    return f"{name} ({'VNNI' if has_vnni(info) else 'no VNNI'})"


def has_vnni(cpuinfo: str | None = None) -> bool:
    """Whether the CPU (or the given ``/proc/cpuinfo`` text) has AVX-512 VNNI or AVX-VNNI.

    Example:
        >>> has_vnni("flags : fpu avx512_vnni"), has_vnni("flags : fpu avx2")
        (True, False)
    """
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return False
    return "vnni" in cpuinfo


def warn_without_vnni(formats: Sequence[str]) -> None:
    """Log a warning when the CPU has no VNNI and ``formats`` run 8-bit integer kernels (static or
    dynamic activations): onnxruntime's u8 x s8 kernels can then saturate on full-range int8
    weights, so those layers measure worse here than on a VNNI CPU."""
    kernels = [parse_format(f) for f in formats]
    if not has_vnni() and any((f.activations or f.dynamic) and f.bits == 8 for f in kernels):
        log.warning(
            "this CPU (%s) has no VNNI: onnxruntime's uint8 x int8 kernels can saturate on full-range int8 "
            "weights, so int8 (and int8-d) layers may measure worse here than on a VNNI CPU; int7 "
            "(int7-d: 7-bit values in int8, onnxruntime's reduce_range) avoids it",
            cpu(),
        )


def dependency_key(
    recipe: Recipe, options: OptionTable, table: SensitivityTable, *, settings: ExportSettings
) -> str:
    """The dependency cache key: the traces, the options and, for exported numerics
    (``search.dependency_numerics``), what onnxruntime's numbers depend on: the export ``settings``,
    the execution provider, the onnxruntime version and the CPU (kernels differ per CPU).

    Example:
        >>> from hawqtool.recipe import load_recipe
        >>> from hawqtool.types import LayerOption
        >>> opts = OptionTable(("fc",), {"fc": (LayerOption("float", 1.0, 0.0, 0.0),)}, "size")
        >>> table = SensitivityTable((), 0, "cpu", 0.05, 0, 0.0, fingerprint="abc")
        >>> r = load_recipe("tiny")
        >>> k = dependency_key(r, opts, table, settings=ExportSettings())
        >>> k == dependency_key(r, opts, table, settings=ExportSettings(opset=21))
        False
    """
    parts: list[Any] = [table.fingerprint, options.to_dict(), DEPENDENCY_VERSION]
    if recipe.search.dependency_numerics == "exported":
        import onnxruntime  # lazy, as in versions()

        parts.append(
            {
                "numerics": "exported",
                "plan": PLAN_VERSION,
                "export": asdict(settings),
                "provider": recipe.evaluate.provider,
                "onnxruntime": onnxruntime.__version__,
                "cpu": cpu(),
            }
        )
    return settings_key(*parts)
