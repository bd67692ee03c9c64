"""The public API: every name is its pipeline stage, and the README's Python examples run as written."""

from __future__ import annotations

import importlib
import pkgutil
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import hawqtool

README = Path(__file__).resolve().parent.parent / "README.md"
API = ("quantize", "analyze", "frontier", "dependencies", "search", "export", "evaluate")


def test_every_api_name_is_the_pipeline_stage_with_every_module_loaded() -> None:
    for module in pkgutil.iter_modules(hawqtool.__path__):
        importlib.import_module(f"hawqtool.{module.name}")
    pipeline = sys.modules["hawqtool.pipeline"]
    assert all(getattr(hawqtool, name) is getattr(pipeline, name) for name in API)
    assert hawqtool.Workspace is sys.modules["hawqtool.workspace"].Workspace


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
