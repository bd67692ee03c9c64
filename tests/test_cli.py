"""The CLI: every --help works, import stays cheap, bad input exits 2 with a named error."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from hawqtool.cli import main

COMMANDS = ["quantize", "analyze", "frontier", "export", "eval"]
TESTS = Path(__file__).parent


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(TESTS) + os.pathsep + os.environ.get("PYTHONPATH", "")}


@pytest.mark.parametrize("cmd", [[], *([c] for c in COMMANDS)])
def test_every_help_works(cmd: list[str]) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "hawqtool.cli", *cmd, "--help"], capture_output=True, text=True, env=_env()
    )
    assert proc.returncode == 0, proc.stderr
    assert "usage: hawqtool" in proc.stdout


def test_import_is_cheap() -> None:
    code = (
        "import sys, hawqtool, hawqtool.cli; "
        "bad = [m for m in ('onnxruntime', 'onnx', 'torch', 'matplotlib') if m in sys.modules]; "
        "print(','.join(bad))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert proc.stdout.strip() == ""


def test_analysis_does_not_touch_cuda_or_onnxruntime_on_import() -> None:
    code = (
        "import sys, torch, hawqtool.pipeline; "
        "print('onnxruntime' in sys.modules, torch.cuda.is_initialized())"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert proc.stdout.split() == ["False", "False"]


def _recipe(tmp_path: Path, model: str, data: str = "hawqtool.zoo:digits", **extra: object) -> Path:
    p = tmp_path / "recipe.yaml"
    body = {
        "model": {"factory": model},
        "data": {"factory": data},
        "hessian": {"min_probes": 4, "max_probes": 8, "rel_tol": 0.5},
        **extra,
    }
    p.write_text(yaml.safe_dump(body))
    return p


@pytest.mark.parametrize(
    ("model", "data", "needle"),
    [
        ("no_such_module_xyz:f", "hawqtool.zoo:digits", "cannot import module 'no_such_module_xyz'"),
        ("hawqtool.zoo:nope", "hawqtool.zoo:digits", "has no attribute 'nope'"),
        ("hawqtool.zoo.resnet20_digits", "hawqtool.zoo:digits", "is not an import path"),
        ("factories:not_a_module", "hawqtool.zoo:digits", "returned str, not a torch.nn.Module"),
        ("factories:no_layers", "hawqtool.zoo:digits", "has no quantizable layers"),
        ("factories:nan_weights", "hawqtool.zoo:digits", "NaN or Inf weights"),
        ("hawqtool.zoo:mlp_digits", "factories:empty_calibration", "calibration split is empty"),
        ("hawqtool.zoo:mlp_digits", "factories:nan_data", "contain NaN or Inf"),
        ("factories:once_differentiable_mlp", "hawqtool.zoo:digits", "no double backward"),
    ],
)
def test_bad_input_exits_2_with_a_named_error(
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
    model: str,
    data: str,
    needle: str,
) -> None:
    monkeypatch.syspath_prepend(str(TESTS))
    out = tmp_path / "out"
    with caplog.at_level(logging.ERROR, logger="hawqtool"):
        code = main(["analyze", str(_recipe(tmp_path, model, data)), "--out", str(out), "-q"])
    assert code == 2
    assert needle in caplog.text
    assert not (out / "sensitivity.csv").exists()


def test_bad_recipe_key_exits_2(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    p = _recipe(tmp_path, "hawqtool.zoo:mlp_digits", budget={"max_drop": 0.01, "mode": "absolute", "typo": 1})
    with caplog.at_level(logging.ERROR, logger="hawqtool"):
        assert main(["quantize", str(p), "--out", str(tmp_path / "o")]) == 2
    assert "budget.typo: unknown key" in caplog.text


def test_usage_errors_exit_2() -> None:
    with pytest.raises(SystemExit) as e:
        main(["quantize"])
    assert e.value.code == 2
    assert main([]) == 2
