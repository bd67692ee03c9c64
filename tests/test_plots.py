"""frontier.png: the figure's panels and points, written atomically as a PNG."""

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


def _panels(fig) -> list[str]:  # type: ignore[no-untyped-def]
    return [a.get_label() for a in fig.axes]


def test_the_latency_panel_shows_exactly_the_given_pairs_and_only_when_given() -> None:
    import numpy as np

    from hawqtool.plots import LATENCY_PANEL, frontier_figure

    front = Frontier(POINTS, "latency", float_cost=160.0)
    trials = [(160.0, 0.0, True), (20.0, 0.1, True), (10.0, 1.0, False)]
    without = frontier_figure(front, trials=trials, chosen=(20.0, 0.1))
    assert LATENCY_PANEL not in _panels(without)
    assert len(without.axes) == 2  # the frontier and the zoom on the search region

    pairs = [(2.0, 2.2, True), (1.5, 1.4, True), (1.2, 1.3, False)]
    fig = frontier_figure(front, trials=trials, chosen=(20.0, 0.1), latency=pairs, chosen_latency=(1.5, 1.4))
    assert len(fig.axes) == 3 and _panels(fig).count(LATENCY_PANEL) == 1
    ax = fig.axes[_panels(fig).index(LATENCY_PANEL)]
    probes, star = ax.collections  # the probes, then the chosen allocation
    np.testing.assert_array_equal(probes.get_offsets(), [[p, m] for p, m, _ in pairs])
    np.testing.assert_array_equal(star.get_offsets(), [[1.5, 1.4]])
    met, missed = (0x1A / 255, 0x96 / 255, 0x41 / 255, 1.0), (0xD7 / 255, 0x19 / 255, 0x1C / 255, 1.0)
    np.testing.assert_allclose(probes.get_edgecolors(), [met, met, missed])
    (diagonal,) = ax.get_lines()
    x, y = diagonal.get_data()
    np.testing.assert_array_equal(x, y)  # the line y = x, spanning every point
    assert min(x) <= 1.2 and max(x) >= 2.2
    # Without a frontier zoom (no trials) the panel still comes, next to the frontier.
    alone = frontier_figure(front, latency=pairs)
    assert _panels(alone)[1:] == [LATENCY_PANEL] and len(alone.axes) == 2


def test_plot_frontier_writes_the_three_panel_figure_with_the_chosen_star(tmp_path: Path) -> None:
    import numpy as np
    from matplotlib.colors import to_rgb
    from matplotlib.image import imread

    from hawqtool.plots import LATENCY_PANEL, frontier_figure

    args = {
        "trials": [(160.0, 0.0, True), (20.0, 0.1, True)],
        "chosen": (20.0, 0.1),
        "latency": [(2.0, 2.1, True), (1.0, 1.0, True)],
        "chosen_latency": (1.5, 1.6),
    }
    out = tmp_path / "frontier.png"
    plot_frontier(Frontier(POINTS, "latency", float_cost=160.0), out, **args)  # type: ignore[arg-type]
    assert [p.name for p in tmp_path.iterdir()] == ["frontier.png"]
    image = imread(out)
    # Frontier, zoom and latency panels: (8 + 5 + 5) x 5.4 inches at 150 dpi, RGBA.
    assert image.shape == (810, 2700, 4)
    # The same figure drawn in memory places the chosen allocation's star; the file has its fill
    # colour at that pixel (display coordinates count from the bottom, image rows from the top).
    fig = frontier_figure(Frontier(POINTS, "latency", float_cost=160.0), **args)  # type: ignore[arg-type]
    fig.canvas.draw()
    ax = fig.axes[[a.get_label() for a in fig.axes].index(LATENCY_PANEL)]
    x, y = ax.transData.transform((1.5, 1.6))
    row, col = round(float(image.shape[0] - y)), round(float(x))
    pixel = image[row, col, :3]
    np.testing.assert_allclose(pixel, to_rgb("#fdb863"), atol=2 / 255)
    assert np.abs(image[row, col + 60, :3] - pixel).max() > 0.1  # the star, not a region of its colour
