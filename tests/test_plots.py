"""frontier.png: a real PNG, written atomically, with and without search trials."""

from __future__ import annotations

from pathlib import Path

import pytest

from hawqtool.plots import plot_frontier
from hawqtool.types import Frontier, FrontierPoint

POINTS = tuple(
    FrontierPoint(cost=c, omega=o, allocation={"a": f}, avg_bits=b)
    for c, o, f, b in [
        (10.0, 1.0, "int2", 2),
        (20.0, 0.1, "int4", 4),
        (40.0, 0.01, "int8", 8),
        (160.0, 0.0, "float", 32),
    ]
)


@pytest.mark.parametrize("with_trials", [False, True])
def test_plot_is_a_png_and_leaves_no_temporary_files(tmp_path: Path, with_trials: bool) -> None:
    out = tmp_path / "frontier.png"
    trials = [(160.0, 0.0, True), (20.0, 0.1, True), (10.0, 1.0, False)] if with_trials else []
    plot_frontier(
        Frontier(POINTS, "size", float_cost=160.0),
        out,
        uniform={"int4": (20.0, 0.1), "float": (160.0, 0.0)},
        trials=trials,
        chosen=(20.0, 0.1) if with_trials else None,
        title="test",
    )
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["frontier.png"]
