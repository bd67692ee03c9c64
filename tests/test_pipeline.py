"""End to end: `hawqtool quantize` on a tiny recipe, its output contract, exit codes and caching."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest

from hawqtool.cli import main
from hawqtool.contract import check_output

FILES = ["model.onnx", "report.json", "report.md", "sensitivity.csv", "frontier.csv", "frontier.png"]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory, hawqtool_cache: Path) -> Path:
    out = tmp_path_factory.mktemp("tiny") / "out"
    assert main(["quantize", "tiny", "--out", str(out), "-q"]) == 0
    return out


def test_quantize_writes_the_contract(tiny_run: Path) -> None:
    for f in FILES:
        assert (tiny_run / f).is_file(), f
    rep = json.loads((tiny_run / "report.json").read_text())
    assert rep["budget_met"] is True
    assert rep["result"]["drop"] <= rep["budget"]["max_drop"] + 1e-12
    assert rep["search"]["evaluations"] == len(rep["search"]["trials"]) >= 1
    assert set(rep["result"]["allocation"]) == {row["layer"] for row in rep["sensitivity"]}
    assert "Budget met" in (tiny_run / "report.md").read_text()
    # tiny: cross_entropy on labels, estimator left at auto -> Gauss–Newton (the Fisher), said why.
    h = rep["hessian"]
    assert (h["estimator"], h["estimator_setting"]) == ("gauss_newton", "auto")
    assert h["estimator_reason"].startswith("auto: for cross_entropy on labels")
    assert h["estimator_reason"] in (tiny_run / "report.md").read_text()
    # The dependency stage's method and cost (tiny's defaults: output-space terms, exported numerics).
    d = rep["dependency"]
    assert (d["method"], d["numerics"], d["hvps"]) == ("output", "exported", 0)
    assert d["pairs"] == sum(1 for _ in rep["result"]["allocation"]) * 4  # int2, int4, int8, float
    # Every quantized pair quantizes activations: its own term is an onnxruntime pass (and one reference).
    quantized = d["pairs"] * 3 // 4
    assert d["own_terms"] == {"onnxruntime": quantized, "float": d["pairs"] - quantized}
    assert d["costs"]["onnx_passes"] == quantized + 1 and 1 <= d["interacting"] <= quantized
    assert d["costs"]["term_forward_passes"] == d["interacting"] + 1  # the float pass and one per key
    assert d["costs"]["forward_passes"] == d["costs"]["term_forward_passes"] + quantized + 1 + 1  # + base
    assert d["costs"]["seconds"] > 0
    assert f"{d['pairs']} (layer, format) pairs" in (tiny_run / "report.md").read_text()
    # The forecast made after the traces bounds the search's evaluations (cost: size).
    assert rep["search"]["evaluations"] <= rep["forecast_s"]["evaluations"]
    assert rep["forecast_s"]["pass_seconds"] > 0
    # The search is never costlier than a uniform model that met the budget.
    for t in rep["search"]["trials"]:
        if t["source"] == "uniform" and t["met"]:
            assert rep["result"]["cost"] <= t["cost"] + 1e-9


def test_output_passes_the_contract_checker(tiny_run: Path) -> None:
    assert check_output(tiny_run) == []
    proc = subprocess.run(
        [sys.executable, "-m", "hawqtool.contract", str(tiny_run)], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "output matches the contract" in proc.stdout


def test_report_agrees_with_hawqtool_eval(tiny_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rep = json.loads((tiny_run / "report.json").read_text())
    for split, key in (("evaluation", "metric"), ("test", "test_metric")):
        assert main(["eval", str(tiny_run / "model.onnx"), "--recipe", "tiny", "--split", split, "-q"]) == 0
        got = json.loads(capsys.readouterr().out)
        assert got["metric"] == pytest.approx(rep["result"][key], abs=1e-9)
    assert got["size_bytes"] == rep["result"]["size_bytes"]


def test_second_run_reuses_cached_stages(
    tiny_run: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    first = json.loads((tiny_run / "report.json").read_text())
    with caplog.at_level(logging.INFO):
        assert main(["quantize", "tiny", "--out", str(tmp_path / "again")]) == 0
    second = json.loads((tmp_path / "again" / "report.json").read_text())
    assert second["sensitivity"] == first["sensitivity"]
    assert second["hessian"]["fingerprint"] == first["hessian"]["fingerprint"]
    assert "Hessian traces loaded from cache" in caplog.text
    assert "dependency terms: cached" in caplog.text
    assert second["result"]["allocation"] == first["result"]["allocation"]


def test_impossible_budget_exits_3_without_a_model(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    out = tmp_path / "out"
    with caplog.at_level(logging.ERROR, logger="hawqtool"):
        code = main(
            [
                "quantize",
                "tiny",
                "--out",
                str(out),
                "-q",
                "--set",
                "allocation.formats=[int2]",
                "--set",
                "budget.max_drop=0.0",
                "--set",
                "budget.confidence=0",
            ]
        )
    assert code == 3
    assert "budget not met" in caplog.text
    assert not (out / "model.onnx").exists()
    rep = json.loads((out / "report.json").read_text())
    assert rep["budget_met"] is False
    assert rep["search"]["evaluations"] >= 1
    assert "NOT met" in (out / "report.md").read_text()
    assert "Even the most precise candidate" in (out / "report.md").read_text()


def test_only_the_float_model_meeting_is_said_so(tmp_path: Path) -> None:
    # int2 everywhere drops accuracy; with a zero budget only the all-float point meets it.
    out = tmp_path / "out"
    args = ["--set", "allocation.formats=[int2, float]", "--set", "budget.max_drop=0.0"]
    assert main(["quantize", "tiny", "--out", str(out), "-q", *args, "--set", "budget.confidence=0"]) == 3
    rep = json.loads((out / "report.json").read_text())
    assert rep["search"]["reason"] == "only-float" and rep["budget_met"] is False
    md = (out / "report.md").read_text()
    assert "Only the all-float model meets the budget" in md and "Even the most precise" not in md


def test_a_budget_the_split_cannot_resolve_exits_2_before_any_hessian_work(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # tiny evaluates on 300 digits: at 95 % one lost image already bounds the drop at 0.0174.
    out = tmp_path / "out"
    with caplog.at_level(logging.ERROR, logger="hawqtool"):
        code = main(["quantize", "tiny", "--out", str(out), "-q", "--set", "budget.max_drop=0.005"])
    assert code == 2
    assert "cannot be resolved with 300 evaluation samples at confidence 0.95" in caplog.text
    assert "it needs at least 1053 samples" in caplog.text
    assert not out.exists()
    with caplog.at_level(logging.ERROR, logger="hawqtool"):
        assert main(["quantize", "tiny", "--out", str(out), "-q", "--set", "budget.max_drop=0"]) == 2
    assert "max_drop 0" in caplog.text


def test_broken_recipe_exits_2(tmp_path: Path) -> None:
    assert main(["quantize", "tiny", "--out", str(tmp_path / "o"), "--set", "budget.mode=percent"]) == 2
    assert not (tmp_path / "o").exists()


def test_report_md_warns_when_the_test_split_misses_the_budget(tiny_run: Path) -> None:
    from hawqtool.report import render_markdown

    rep = json.loads((tiny_run / "report.json").read_text())
    assert "Caution" not in render_markdown({**rep, "result": {**rep["result"], "test_budget_met": True}})
    missed = render_markdown(
        {**rep, "result": {**rep["result"], "test_budget_met": False, "test_drop": 0.05}}
    )
    assert "on the held-out test split the drop is 0.0500, beyond the budget" in missed


def test_report_md_says_what_the_split_resolves_by_the_metric_kind(tiny_run: Path) -> None:
    from hawqtool.report import render_markdown

    rep = json.loads((tiny_run / "report.json").read_text())
    assert rep["budget"]["binary"] is True and rep["budget"]["resolvable_drop"] > 0
    assert "resolves drops down to" in render_markdown(rep)
    continuous = render_markdown({**rep, "budget": {**rep["budget"], "binary": False}})
    assert "the metric is continuous" in continuous and "resolves drops down to" not in continuous


def test_a_probe_of_the_float_model_reuses_the_baseline(
    tmp_path: Path, hawqtool_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from hawqtool import pipeline
    from hawqtool.formats import quantizes_nothing

    runs: list[str] = []
    real = pipeline._run
    monkeypatch.setattr(
        pipeline, "_run", lambda ws, model, split, **kw: (runs.append(split), real(ws, model, split, **kw))[1]
    )
    out = tmp_path / "out"
    assert main(["quantize", "tiny", "--out", str(out), "-q"]) == 0
    trials = json.loads((out / "report.json").read_text())["search"]["trials"]
    floats = [t for t in trials if quantizes_nothing(t["allocation"])]
    assert floats, "tiny's most precise candidate keeps every layer float"
    # Baseline (evaluation, test), each quantized probe, the final model (evaluation, test).
    assert len(runs) == 2 + len(trials) - len(floats) + 2
    assert all(t["drop"] == 0.0 for t in floats)
