"""hawqtool: Hessian-aware mixed-precision post-training quantization to ONNX, verified against an
accuracy budget in onnxruntime.

The public API is imported lazily, so ``import hawqtool`` stays cheap (no onnxruntime, no CUDA):

>>> import hawqtool
>>> recipe = hawqtool.load_recipe("tiny")                       # doctest: +SKIP
>>> result = hawqtool.quantize(recipe=recipe, out="out/tiny")   # doctest: +SKIP
>>> result.model_path, result.report["result"]["metric"]        # doctest: +SKIP
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "quantize": "hawqtool.pipeline",
    "analyze": "hawqtool.pipeline",
    "frontier": "hawqtool.pipeline",
    "export": "hawqtool.pipeline",
    "evaluate": "hawqtool.pipeline",
    "Workspace": "hawqtool.pipeline",
    "QuantizeResult": "hawqtool.pipeline",
    "Recipe": "hawqtool.recipe",
    "load_recipe": "hawqtool.recipe",
    "parse_recipe": "hawqtool.recipe",
    "Budget": "hawqtool.types",
    "DataSplits": "hawqtool.types",
    "Frontier": "hawqtool.types",
    "FrontierPoint": "hawqtool.types",
    "SensitivityTable": "hawqtool.types",
    "HawqError": "hawqtool.errors",
    "UsageError": "hawqtool.errors",
    "RecipeError": "hawqtool.errors",
    "BudgetNotMetError": "hawqtool.errors",
    "ExportError": "hawqtool.errors",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'hawqtool' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
