"""``allocation.cost: latency`` end to end: the uniform integer models are probed too, and the choice is
the fastest within budget among everything timed (re-timed together), in onnxruntime. The refinement
itself is tested in tests/test_refine.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest


@pytest.mark.slow
def test_quantize_under_the_latency_cost_times_the_uniform_models(tmp_path: Path) -> None:
    from hawqtool.cli import main

    out = tmp_path / "out"
    # A budget every model meets (top-1 may drop by 1.0): the choice is then known from the report
    # itself, whatever the timings.
    overrides = ["--set", "allocation.cost=latency", "--set", "budget.max_drop=1.0"]
    assert main(["quantize", "tiny", "--out", str(out), "-q", *overrides]) == 0
    rep = json.loads((out / "report.json").read_text())
    trials, rows = rep["search"]["trials"], rep["search"]["latency"]
    assert len(rows) == len(trials) and all(r["measured_ms"] > 0 for r in rows)
    assert all(t["met"] for t in trials)
    probed = {json.dumps(t["allocation"], sort_keys=True) for t in trials}
    layers = [row["layer"] for row in rep["sensitivity"]]
    for fmt in ("int8", "int4", "int2"):  # the tiny recipe's activation formats
        assert json.dumps(dict.fromkeys(sorted(layers), fmt), sort_keys=True) in probed, fmt
    timed = [(r, t) for r, t in zip(rows, trials, strict=True) if r["retimed_ms"] is not None]
    moved = [(r, t) for r, t in zip(rows, trials, strict=True) if t["source"] == "move"]
    # The last one-layer move taken (resolvably faster in its own rounds), else the fastest of the
    # probes within budget, all timed together.
    chosen = (
        moved[-1]
        if moved
        else min((rt for rt in timed if rt[1]["source"] != "move"), key=lambda rt: rt[0]["retimed_ms"])
    )
    assert rep["result"]["allocation"] == chosen[1]["allocation"]
    md = (out / "report.md").read_text()
    assert "re-timed (ms)" in md
    vf = rep["search"]["latency_vs_float"]  # the choice against float, timed in the same rounds
    assert vf["verdict"] in ("faster", "within noise", "slower") and vf["float_ms"] > 0
    assert vf["chosen_ms"] == chosen[0]["retimed_ms"]
    assert "Timed in the same rounds as the float model" in md
    assert (out / "frontier.png").read_bytes()[:4] == b"\x89PNG"
