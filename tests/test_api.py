"""The public API: names stay callables after their same-named submodules load, and the README's
Python examples run as written."""

from __future__ import annotations

import importlib
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import hawqtool
from hawqtool.errors import RecipeError

README = Path(__file__).resolve().parent.parent / "README.md"
API = ("quantize", "analyze", "frontier", "export", "evaluate")
CLASHING = ("frontier", "export", "evaluate")  # both API functions and stage modules


def test_api_names_stay_functions_after_their_submodules_load(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in CLASHING:
        importlib.import_module(f"hawqtool.{name}")
    pipeline = importlib.import_module("hawqtool.pipeline")
    for name in API:
        assert getattr(hawqtool, name) is getattr(pipeline, name), name
    # The stage modules are still there for `from hawqtool.frontier import ...`.
    assert hasattr(sys.modules["hawqtool.frontier"], "pareto_frontier")
    from hawqtool.export import QDQExporter  # noqa: F401

    # A call reaches the function: a recipe error, not "TypeError: 'module' object is not callable".
    monkeypatch.chdir(tmp_path)
    with pytest.raises(RecipeError, match="'no-such-recipe' not found"):
        hawqtool.frontier("no-such-recipe")  # type: ignore[operator]  # mypy sees the submodule


def test_clash_is_resolved_in_a_fresh_interpreter() -> None:
    # In this order the submodule loads *after* the package attribute was first resolved, and again
    # with the attribute never resolved before: both orders must give the function.
    code = (
        "import hawqtool, hawqtool.export; f = hawqtool.export; import hawqtool.frontier; "
        "import hawqtool.evaluate, hawqtool.pipeline as p; "
        "print(f is p.export, hawqtool.frontier is p.frontier, hawqtool.evaluate is p.evaluate, "
        "callable(hawqtool.frontier))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert proc.stdout.split() == ["True"] * 4


def readme_python_blocks(text: str) -> list[str]:
    """The bodies of the README's fenced ```python code blocks, in order."""
    return re.findall(r"^```python[ \t]*\n(.*?)^```[ \t]*$", text, flags=re.DOTALL | re.MULTILINE)


def test_readme_block_extraction() -> None:
    text = "intro\n```python\nx = 1\n```\n```bash\nls\n```\n```python\ny = x + 1\n```\n"
    assert readme_python_blocks(text) == ["x = 1\n", "y = x + 1\n"]
    assert readme_python_blocks(README.read_text()), "README.md has no ```python block to run"


# Appended to whatever the README passes: few probes and few latency runs, so that the examples
# run in seconds on 2 cores while every stage still runs for real.
FAST = ("hessian.min_probes=4", "hessian.max_probes=8", "evaluate.latency_runs=1")


def _fast(fn: Callable[..., Any]) -> Callable[..., Any]:
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        kwargs["overrides"] = [*kwargs.get("overrides", ()), *FAST]
        kwargs.setdefault("progress", False)
        return fn(*args, **kwargs)

    return wrapped


@pytest.mark.slow
def test_readme_python_examples_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from hawqtool.contract import check_output
    from hawqtool.pipeline import QuantizeResult
    from hawqtool.recipe import load_recipe
    from hawqtool.tasks import import_object
    from hawqtool.types import SensitivityTable

    # The README's `model`, `calib`, `val`, `test`: the tiny recipe's zoo model and data.
    tiny = load_recipe("tiny")
    assert tiny.model is not None and tiny.data is not None
    model = import_object(tiny.model.factory, what="model.factory")(**tiny.model.kwargs)
    splits = import_object(tiny.data.factory, what="data.factory")(**tiny.data.kwargs)
    namespace: dict[str, Any] = {
        "__name__": "readme",
        "model": model,
        "calib": splits.calibration,
        "val": splits.evaluation,
        "test": splits.test,
    }
    for name in ("quantize", "analyze", "frontier"):
        monkeypatch.setattr(hawqtool, name, _fast(getattr(hawqtool, name)))
    monkeypatch.chdir(tmp_path)  # the README writes relative paths such as out/mine

    blocks = readme_python_blocks(README.read_text())
    for i, block in enumerate(blocks):
        exec(compile(block, f"README.md python block {i + 1}", "exec"), namespace)

    # What the examples produced is real: a model file under tmp_path and typed stage results.
    printed = capsys.readouterr().out
    results = [v for v in namespace.values() if isinstance(v, QuantizeResult)]
    for result in results:
        assert result.budget_met and result.model_path is not None
        assert result.model_path.resolve().is_relative_to(tmp_path.resolve())
        assert check_output(result.out) == []
        assert str(result.model_path) in printed
    tables = [v for v in namespace.values() if isinstance(v, SensitivityTable)]
    assert results or tables, "the README's examples produced no result to check"
    for table in tables:
        assert table.layers and all(row.probes >= 1 for row in table.layers)
