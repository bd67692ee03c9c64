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
import sys
from types import ModuleType  # not `import types`: the submodule hawqtool.types would shadow it
from typing import Any

__version__ = "0.4.2"

_LAZY = {
    "quantize": "hawqtool.pipeline",
    "analyze": "hawqtool.pipeline",
    "frontier": "hawqtool.pipeline",
    "dependencies": "hawqtool.pipeline",
    "search": "hawqtool.pipeline",
    "export": "hawqtool.pipeline",
    "evaluate": "hawqtool.pipeline",
    "load": "hawqtool.workspace",
    "Workspace": "hawqtool.workspace",
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
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value  # resolved once; later lookups skip this function
        return value
    raise AttributeError(f"module 'hawqtool' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)


class _Package(ModuleType):
    """The ``hawqtool`` package object: API names win over same-named submodules.

    ``frontier``, ``search``, ``export`` and ``evaluate`` are both API functions and stage modules. Importing a
    submodule makes the import system ``setattr`` it on the package, which would turn
    ``hawqtool.frontier(...)`` into a call of a module (TypeError) from then on. That one
    assignment is dropped here: the submodule stays in ``sys.modules`` and ``from hawqtool.frontier
    import pareto_frontier`` works as before, while the attribute stays the API function. (So
    ``import hawqtool.frontier as m`` binds the function too; ``importlib.import_module`` or
    ``sys.modules`` give the module itself.)
    """

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _LAZY and isinstance(value, ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
