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


def test_a_model_without_double_backward_needs_the_first_order_estimator(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Hutchinson differentiates twice and must refuse such a model by name (exit 2); Gauss-Newton
    # (the automatic choice for cross_entropy on labels) needs one ordinary backward and runs.
    monkeypatch.syspath_prepend(str(TESTS))
    hutchinson = {"min_probes": 4, "max_probes": 8, "rel_tol": 0.5, "estimator": "hutchinson"}
    recipe = _recipe(tmp_path, "factories:once_differentiable_mlp", hessian=hutchinson)
    with caplog.at_level(logging.ERROR, logger="hawqtool"):
        assert main(["analyze", str(recipe), "--out", str(tmp_path / "h"), "-q"]) == 2
    assert "no double backward" in caplog.text
    assert not (tmp_path / "h" / "sensitivity.csv").exists()
    recipe = _recipe(tmp_path, "factories:once_differentiable_mlp")
    assert main(["analyze", str(recipe), "--out", str(tmp_path / "gn"), "-q"]) == 0
    assert (tmp_path / "gn" / "sensitivity.csv").exists()


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


@pytest.mark.parametrize(
    ("model", "data", "data_kwargs", "needle"),
    [
        (
            "factories:raising_model",
            "hawqtool.zoo:digits",
            {},
            "model.factory 'factories:raising_model' raised ValueError: no checkpoint for this model",
        ),
        (
            "hawqtool.zoo:mlp_digits",
            "factories:raising_data",
            {},
            "data.factory 'factories:raising_data' raised RuntimeError: the data server is unreachable",
        ),
        (
            "factories:type_error_inside",
            "hawqtool.zoo:digits",
            {},
            "model.factory 'factories:type_error_inside' raised TypeError:",
        ),
        (
            "hawqtool.zoo:mlp_digits",
            "factories:raising_data",
            {"batch_sise": 8},
            "data.factory 'factories:raising_data' rejected data.kwargs:",
        ),
    ],
)
@pytest.mark.parametrize("flag", [None, "--debug", "-v"])
def test_a_factory_that_raises_exits_2_traceback_only_when_asked(
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
    model: str,
    data: str,
    data_kwargs: dict[str, object],
    needle: str,
    flag: str | None,
) -> None:
    monkeypatch.syspath_prepend(str(TESTS))
    recipe = _recipe(tmp_path, model, data)
    body = yaml.safe_load(recipe.read_text())
    recipe.write_text(yaml.safe_dump({**body, "data": {"factory": data, "kwargs": data_kwargs}}))
    argv = ["quantize", str(recipe), "--out", str(tmp_path / "o"), "-q"]
    with caplog.at_level(logging.ERROR, logger="hawqtool"):
        code = main([*argv, flag] if flag else argv)
    assert code == 2
    (record,) = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert needle in record.getMessage()
    if flag is None:
        assert not record.exc_info and "Traceback" not in caplog.text
    else:
        assert record.exc_info and "Traceback" in caplog.text
        factory = (model if "model.factory" in needle else data).split(":")[1]
        if "raised" in needle:  # the user's own frame is in the traceback
            assert f"in {factory}" in caplog.text
    assert not (tmp_path / "o" / "report.json").exists()


@pytest.mark.parametrize("command", ["quantize", "analyze", "frontier"])
def test_out_naming_an_existing_file_exits_2(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, command: str
) -> None:
    taken = tmp_path / "taken.txt"
    taken.write_text("keep me\n")
    for out, needle in (
        (taken, f"--out {str(taken)!r} is an existing file, not a folder"),
        (taken / "sub", f"its parent {str(taken)!r} is an existing file, not a folder"),
    ):
        caplog.clear()
        with caplog.at_level(logging.ERROR, logger="hawqtool"):
            assert main([command, "tiny", "--out", str(out), "-q"]) == 2
        assert needle in caplog.text
    assert taken.read_text() == "keep me\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken.txt"]
