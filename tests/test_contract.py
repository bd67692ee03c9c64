"""The output-contract checker on hand-made folders: a conforming one, then one break at a time."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import onnx
import pytest
from onnx import parser

from hawqtool.contract import check_output, main

IDENTITY = """
<ir_version: 10, opset_import: ["" : 21]>
identity (float[N, 3] input) => (float[N, 3] output) {
    output = Identity(input)
}
"""


def _report(size: int) -> dict[str, Any]:
    return {
        "baseline": {"metric": 0.9, "latency_ms": 1.0, "size_bytes": 1000},
        "result": {
            "metric": 0.89,
            "test_metric": 0.88,
            "latency_ms": 0.5,
            "size_bytes": size,
            "allocation": {"fc": "int4"},
        },
        "budget": {"max_drop": 0.02, "mode": "absolute"},
        "budget_met": True,
        "search": {"evaluations": 2, "trials": [{}, {}]},
        "sensitivity": [
            {
                "layer": "fc",
                "trace": 1.0,
                "avg_trace": 0.5,
                "stderr": 0.01,
                "probes": 16,
                "converged": True,
                "params": 2,
            }
        ],
        "frontier": [],
        "seed": 0,
        "versions": {"hawqtool": "0", "torch": "0", "onnx": "0", "onnxruntime": "0"},
    }


def _folder(tmp_path: Path, **report_patch: Any) -> Path:
    out = tmp_path / "out"
    out.mkdir()
    model = parser.parse_model(IDENTITY)
    onnx.helper.set_model_props(model, {"hawqtool.allocation": json.dumps({"fc": "int4"})})
    onnx.save(model, out / "model.onnx")
    rep = {**_report((out / "model.onnx").stat().st_size), **report_patch}
    (out / "report.json").write_text(json.dumps(rep))
    for name in ("report.md", "sensitivity.csv", "frontier.csv"):
        (out / name).write_text("x\n")
    (out / "frontier.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 16)
    return out


def test_a_conforming_folder_has_no_problems(tmp_path: Path) -> None:
    out = _folder(tmp_path)
    assert check_output(out) == []
    assert main([str(out)]) == 0


@pytest.mark.parametrize(
    ("patch", "problem"),
    [
        ({"seed": None}, None),  # present, even if null
        ({"budget_met": "yes"}, "report.json budget_met is 'yes', not true or false"),
        (
            {"search": {"evaluations": 3, "trials": [{}, {}]}},
            "search.evaluations is 3 but there are 2 trials",
        ),
        ({"versions": {"torch": "0"}}, "report.json versions lacks 'hawqtool'"),
        ({"result": {"metric": 1}}, "report.json result lacks 'test_metric'"),
    ],
)
def test_each_report_break_is_named(tmp_path: Path, patch: dict[str, Any], problem: str | None) -> None:
    problems = check_output(_folder(tmp_path, **patch))
    if problem is None:
        assert problems == []
    else:
        assert problem in problems


def test_file_breaks_are_named(tmp_path: Path) -> None:
    out = _folder(tmp_path)
    (out / "frontier.csv").unlink()
    (out / "frontier.png").write_bytes(b"GIF89a")
    (out / "model.onnx").write_bytes(b"half a mod")
    problems = check_output(out)
    assert problems[:2] == ["missing frontier.csv", "frontier.png is not a PNG file"]
    assert len(problems) == 3 and problems[2].startswith("model.onnx does not validate or load")
    (out / "report.json").write_text('{"baseline": ')
    assert any(p.startswith("report.json is not valid JSON") for p in check_output(out))


def test_model_must_match_the_report(tmp_path: Path) -> None:
    out = _folder(tmp_path)
    size = (out / "model.onnx").stat().st_size
    rep = json.loads((out / "report.json").read_text())
    rep["result"]["size_bytes"] = size + 10_000
    (out / "report.json").write_text(json.dumps(rep))
    assert check_output(out) == [f"result.size_bytes is {size + 10_000} but model.onnx has {size} bytes"]
    onnx.save(parser.parse_model(IDENTITY), out / "model.onnx")  # no allocation stamp
    rep["result"]["size_bytes"] = (out / "model.onnx").stat().st_size
    (out / "report.json").write_text(json.dumps(rep))
    assert check_output(out) == ["model.onnx metadata does not stamp the allocation (keys: none)"]


def test_budget_not_met_needs_no_model_but_forbids_one(tmp_path: Path) -> None:
    out = _folder(tmp_path, budget_met=False)
    assert check_output(out) == ["model.onnx is present although report.json says budget_met is false"]
    (out / "model.onnx").unlink()
    assert check_output(out) == []
    rep = json.loads((out / "report.json").read_text())
    (out / "report.json").write_text(json.dumps({**rep, "budget_met": True}))
    assert check_output(out) == ["missing model.onnx"]


def test_command_line_exit_codes(tmp_path: Path) -> None:
    def run(*args: str) -> subprocess.CompletedProcess[str]:
        cmd = [sys.executable, "-m", "hawqtool.contract", *args]
        return subprocess.run(cmd, capture_output=True, text=True, check=False)

    proc = run(str(tmp_path / "nowhere"))
    assert proc.returncode == 1
    assert f"{str(tmp_path / 'nowhere')!r} is not a folder" in proc.stdout
    assert run().returncode == 2


@pytest.mark.skipif(not hasattr(os, "fchmod"), reason="POSIX permissions")
def test_atomic_writes_get_ordinary_permissions_and_leave_no_temporary_file(tmp_path) -> None:  # type: ignore[no-untyped-def]
    # Outputs are written to a private temporary file and renamed into place; the result must be
    # readable like any file the user's umask allows (0644 under umask 022), not mode 0600.
    from hawqtool.files import write_bytes_atomic, write_json_atomic

    old = os.umask(0o022)
    try:
        write_bytes_atomic(tmp_path / "model.onnx", b"bytes")
        write_json_atomic(tmp_path / "report.json", {"a": 1})
    finally:
        os.umask(old)
    for name in ("model.onnx", "report.json"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o644
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "report.json"]
    assert (tmp_path / "model.onnx").read_bytes() == b"bytes"
