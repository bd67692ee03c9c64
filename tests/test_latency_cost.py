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
    assert main(["quantize", "tiny", "--out", str(out), "-q", "--set", "allocation.cost=latency"]) == 0
    rep = json.loads((out / "report.json").read_text())
    trials, rows = rep["search"]["trials"], rep["search"]["latency"]
    assert len(rows) == len(trials) and all(r["measured_ms"] > 0 for r in rows)
    probed = {json.dumps(t["allocation"], sort_keys=True) for t in trials}
    layers = [row["layer"] for row in rep["sensitivity"]]
    for fmt in ("int8", "int4", "int2"):  # the tiny recipe's activation formats
        assert json.dumps(dict.fromkeys(sorted(layers), fmt), sort_keys=True) in probed, fmt
    met = [
        (r, t)
        for r, t in zip(rows, trials, strict=True)
        if r["met"] and r["retimed_ms"] is not None and t["source"] != "move"
    ]
    moved = [(r, t) for r, t in zip(rows, trials, strict=True) if t["source"] == "move" and t["met"]]
    if moved:  # a one-layer move, resolvably faster in its own rounds, met the budget: the last one
        met = moved[-1:]
    if met:  # the choice is the fastest of the probes within budget, timed together
        fastest = min(met, key=lambda rt: rt[0]["retimed_ms"])[1]
        assert rep["result"]["allocation"] == fastest["allocation"]
    md = (out / "report.md").read_text()
    assert "re-timed (ms)" in md
    vf = rep["search"]["latency_vs_float"]
    if met:  # the fastest within budget against float, timed in the same rounds
        assert vf["verdict"] in ("faster", "within noise", "slower") and vf["float_ms"] > 0
        assert vf["chosen_ms"] == min(r["retimed_ms"] for r, _ in met)
        assert "Timed in the same rounds as the float model" in md
    assert (out / "frontier.png").read_bytes()[:4] == b"\x89PNG"
