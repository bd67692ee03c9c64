"""The Pareto plot ``frontier.png``: cost against ΣΩ, with reference allocations and search trials.

matplotlib is imported inside the function, so ``import hawqtool`` stays cheap.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Mapping, Sequence
from types import MappingProxyType

from hawqtool.costs import unit
from hawqtool.errors import UsageError
from hawqtool.files import write_bytes_atomic
from hawqtool.frontier import uniform_points
from hawqtool.search import SearchResult
from hawqtool.types import Frontier, OptionTable

_NO_UNIFORM: Mapping[str, tuple[float, float]] = MappingProxyType({})
# Cost units: (divisor, axis label) per cost model.
_UNITS = {"size": (1e6, "weight size (MB)"), "bops": (1e9, "bit operations per sample (GBOPs)")}


def _unit(cost_model: str) -> str:
    try:
        return unit(cost_model)
    except UsageError:
        return cost_model


_UNIFORM_STYLE = {"int2": "#7b3294", "int4": "#c2a5cf", "int8": "#5aae61", "float": "#1b7837"}
# More points than this and markers would only blur the line.
_MAX_MARKERS = 400


def plot_frontier(
    frontier: Frontier,
    path: str | os.PathLike[str],
    *,
    uniform: Mapping[str, tuple[float, float]] = _NO_UNIFORM,
    trials: Sequence[tuple[float, float, bool]] = (),
    chosen: tuple[float, float] | None = None,
    title: str = "",
    latency: Sequence[tuple[float, float, bool]] = (),
    chosen_latency: tuple[float, float] | None = None,
) -> None:
    """Draw the frontier to a PNG at ``path`` (written atomically): :func:`frontier_figure`, saved.

    x is the cost (MB for ``size``, GBOPs for ``bops``; with ``size`` a top axis reads it as
    average weight bits), y is ΣΩ (log scale when it spans more than two decades, with a linear
    band around 0 so the all-float point still shows). The frontier is drawn as a staircase.
    With ``latency`` (the probes timed under ``cost: latency``) a last panel plots each probe's
    predicted against its measured end-to-end latency, with the line y = x.

    Args:
        frontier: from :func:`hawqtool.frontier.pareto_frontier`.
        path: the PNG to write.
        uniform: reference allocations by label, ``{"int4": (cost, omega), ...}``
            (:func:`hawqtool.frontier.uniform_points` computes them).
        trials: search probes as ``(cost, omega, met_budget)``, in the order they were run.
        chosen: ``(cost, omega)`` of the final allocation, highlighted.
        title: figure title.
        latency: timed probes as ``(predicted ms, measured ms, met_budget)``; no panel when empty.
        chosen_latency: ``(predicted ms, measured ms)`` of the final allocation, highlighted.

    Example:
        >>> import tempfile, pathlib
        >>> from hawqtool.types import FrontierPoint
        >>> rows = [(2e6, 5.0, 4), (4e6, 1.0, 8), (16e6, 0.0, 32)]
        >>> pts = tuple(FrontierPoint(c, o, {}, b) for c, o, b in rows)
        >>> out = pathlib.Path(tempfile.mkdtemp()) / "frontier.png"
        >>> plot_frontier(Frontier(pts, "size", float_cost=16e6), out, chosen=(4e6, 1.0))
        >>> out.read_bytes()[:4] == b"\\x89PNG"
        True
    """
    fig = frontier_figure(
        frontier,
        uniform=uniform,
        trials=trials,
        chosen=chosen,
        title=title,
        latency=latency,
        chosen_latency=chosen_latency,
    )
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    write_bytes_atomic(path, buf.getvalue())


#: ``Axes.get_label()`` of the predicted-vs-measured latency panel.
LATENCY_PANEL = "latency: predicted vs measured"


def plot_search(
    frontier: Frontier,
    path: str | os.PathLike[str],
    *,
    options: OptionTable,
    result: SearchResult,
    latency: Sequence[Mapping[str, object]] = (),
    formats: tuple[str, ...] = ("int4", "int8", "float"),
    title: str = "",
) -> None:
    """:func:`plot_frontier` of a search: the uniform models of ``formats``, every trial of ``result``
    and its choice; with ``latency`` (one row per trial, as in report.json's ``search.latency``),
    each timed probe's predicted against its measured latency."""
    chosen = result.chosen
    rows = zip(latency, result.trials, strict=True) if latency else ()
    timed = [(row, t) for row, t in rows if row["measured_ms"]]
    chosen_latency = next(
        (
            (float(row["predicted_ms"]), float(row["measured_ms"]))  # type: ignore[arg-type]
            for row, t in timed
            if chosen is not None and dict(t.allocation) == dict(chosen.allocation)
        ),
        None,
    )
    plot_frontier(
        frontier,
        path,
        uniform=uniform_points(options, formats),
        trials=[(t.cost, options.omega(t.allocation), t.met) for t in result.trials],
        chosen=(chosen.cost, chosen.omega) if chosen is not None else None,
        title=title,
        latency=[
            (float(row["predicted_ms"]), float(row["measured_ms"]), bool(row["met"]))  # type: ignore[arg-type]
            for row, _ in timed
        ],
        chosen_latency=chosen_latency,
    )


def frontier_figure(  # type: ignore[no-untyped-def]
    frontier: Frontier,
    *,
    uniform: Mapping[str, tuple[float, float]] = _NO_UNIFORM,
    trials: Sequence[tuple[float, float, bool]] = (),
    chosen: tuple[float, float] | None = None,
    title: str = "",
    latency: Sequence[tuple[float, float, bool]] = (),
    chosen_latency: tuple[float, float] | None = None,
):
    """The matplotlib ``Figure`` that :func:`plot_frontier` saves (same arguments, no path): the
    frontier panel, a zoom on the search region when there were trials, and the latency panel
    (its axes labelled :data:`LATENCY_PANEL`) when ``latency`` is given."""
    import matplotlib

    matplotlib.use("Agg", force=False)  # no-op if a non-interactive backend is already set
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    div, xlabel = _UNITS.get(frontier.cost_model, (1.0, f"cost ({_unit(frontier.cost_model)})"))
    xs = [p.cost / div for p in frontier.points]
    ys = [p.omega for p in frontier.points]
    marks = [(c / div, o) for c, o, _ in trials] + ([(chosen[0] / div, chosen[1])] if chosen else [])
    zoom = bool(marks) and len(xs) > 1

    ratios = [1.35] + [1.0] * zoom + [1.0] * bool(latency)
    fig = Figure(figsize=(8.0 + 5.0 * (len(ratios) - 1), 5.4), dpi=150, layout="constrained")
    FigureCanvasAgg(fig)
    panels = list(fig.subplots(1, len(ratios), width_ratios=ratios, squeeze=False)[0])
    if latency:
        _draw_latency(panels.pop(), latency, chosen_latency)
    axes = panels
    ax = axes[0]
    label = (
        f"Pareto frontier ({len(xs):,} points{', exact' if frontier.cost_grid is None else ', cost grid'})"
    )
    _draw(ax, xs, ys, uniform, trials, chosen, div, label=label, numbered=not zoom)
    positive = [y for y in ys + [o for _, o in uniform.values()] + [o for _, o in marks] if y > 0]
    if positive and max(positive) / min(positive) > 100:
        _symlog_y(ax, min(positive), max(positive))
    ax.set_xlim(left=0)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("ΣΩ  (HAWQ-V2 sensitivity, lower is better)")
    _add_bits_axis(ax, frontier, div)

    handles, labels = ax.get_legend_handles_labels()
    if uniform:
        handles.append(Line2D([], [], ls="none", marker="D", color="#999999", mec="black", ms=7))
        labels.append("uniform allocations")
    _legend(ax, handles, labels, trials, chosen is not None, prefix="search trial: ", loc="upper right")

    if zoom:
        # The search region, where the trials are, is usually a sliver of the whole cost range.
        zx = axes[1]
        # The search always probes the most precise candidate first; leaving that far-right
        # trial out of the window is what lets the panel zoom in on where bisection converged.
        window = sorted(c for c, _ in marks)
        window = window[:-1] if len(window) > 2 else window
        lo, hi = window[0], window[-1]
        pad = max(0.25 * (hi - lo), 0.01 * (xs[-1] - xs[0]))
        lo, hi = max(lo - pad, 0.0), hi + pad
        _draw(zx, xs, ys, uniform, trials, chosen, div, label=None, numbered=True)
        inside = [y for x, y in zip(xs, ys, strict=True) if lo <= x <= hi] + [o for c, o in marks]
        # The staircase value at lo, from the last point at or before it, bounds the window too.
        before = [y for x, y in zip(xs, ys, strict=True) if x <= lo]
        inside += before[-1:]
        zpos = [y for y in inside if y > 0]
        if zpos and max(zpos) / min(zpos) > 30:
            zx.set_yscale("log")
            zx.set_ylim(min(zpos) / 1.5, max(zpos) * 1.5)
        elif inside:
            span = max(inside) - min(inside) or max(abs(max(inside)), 1e-12)
            zx.set_ylim(min(inside) - 0.08 * span, max(inside) + 0.08 * span)
        zx.set_xlim(lo, hi)
        zx.set_xlabel(xlabel)
        zx.set_ylabel("ΣΩ")
        zx.set_title("search region (zoom): trials in the order run", fontsize=10)
        for side in ("top", "right", "bottom", "left"):
            zx.spines[side].set_color("#888888")
        ax.axvspan(lo, hi, color="#fdb863", alpha=0.15, zorder=0)

    for a in axes:
        a.grid(True, which="major", alpha=0.35)
        a.grid(True, which="minor", alpha=0.12)
    if title:
        fig.suptitle(title, fontsize=12)
    return fig


def _draw_latency(  # type: ignore[no-untyped-def]
    ax,
    latency: Sequence[tuple[float, float, bool]],
    chosen: tuple[float, float] | None,
) -> None:
    """Predicted (x) against measured (y) latency of the timed probes, coloured as the trials are,
    on equal axes with the line y = x; the chosen allocation as a star."""
    from matplotlib.lines import Line2D

    ax.set_label(LATENCY_PANEL)
    xs = [p for p, _, _ in latency]
    ys = [m for _, m, _ in latency]
    colours = [_trial_colour(met) for _, _, met in latency]
    ax.scatter(xs, ys, s=90, facecolor="none", edgecolors=colours, lw=1.8, zorder=4)
    for i, (x, y) in enumerate(zip(xs, ys, strict=True), start=1):
        if len(latency) <= 30:
            ax.annotate(
                str(i),
                (x, y),
                xytext=(-10, -13),
                textcoords="offset points",
                fontsize=8,
                color=colours[i - 1],
            )
    if chosen is not None:
        ax.scatter(*chosen, marker="*", s=320, color="#fdb863", edgecolor="black", lw=1.0, zorder=5)
    both = xs + ys + (list(chosen) if chosen is not None else [])
    lo, hi = min(both), max(both)
    pad = 0.08 * (hi - lo) if hi > lo else 0.05 * max(abs(hi), 1e-3)
    lo, hi = lo - pad, hi + pad
    ax.plot([lo, hi], [lo, hi], color="#555555", lw=1.0, ls="--", zorder=2)
    ax.set_xlim(lo, hi)
    ax.set_ylim(lo, hi)
    ax.set_aspect("equal", adjustable="box")
    ax.set_xlabel("predicted latency (ms): float + Σ per-layer deltas")
    ax.set_ylabel("measured latency (ms)")
    ax.set_title("timed probes: predicted vs measured", fontsize=10)
    ax.grid(True, alpha=0.35)
    handles = [Line2D([], [], color="#555555", lw=1.0, ls="--")]
    _legend(ax, handles, ["measured = predicted"], latency, chosen is not None, prefix="", loc="upper left")


def _legend(  # type: ignore[no-untyped-def]
    ax,
    handles: list,  # type: ignore[type-arg]
    labels: list[str],
    trials: Sequence[tuple[float, float, bool]],
    chosen: bool,
    *,
    prefix: str,
    loc: str,
) -> None:
    """The legend: the given entries, then met / missed trials (those present) and the chosen star."""
    from matplotlib.lines import Line2D

    for met, text in ((True, "budget met"), (False, "budget missed")):
        if any(t[2] == met for t in trials):
            handles.append(
                Line2D([], [], ls="none", marker="o", mfc="none", mec=_trial_colour(met), mew=1.8, ms=9)
            )
            labels.append(prefix + text)
    if chosen:
        handles.append(Line2D([], [], ls="none", marker="*", color="#fdb863", mec="black", ms=14))
        labels.append("chosen allocation")
    ax.legend(handles, labels, loc=loc, fontsize=9, framealpha=0.92)


def _trial_colour(met: bool) -> str:
    return "#1a9641" if met else "#d7191c"


def _draw(  # type: ignore[no-untyped-def]
    ax,
    xs: list[float],
    ys: list[float],
    uniform: Mapping[str, tuple[float, float]],
    trials: Sequence[tuple[float, float, bool]],
    chosen: tuple[float, float] | None,
    div: float,
    *,
    label: str | None,
    numbered: bool,
) -> None:
    # The main panel lets markers on its edges (ΣΩ = 0 at the bottom) overhang; the zoom clips.
    clip = numbered and label is None
    """The frontier staircase, reference allocations, trials and the chosen point on one axes."""
    n = len(xs)
    ax.step(
        xs,
        ys,
        where="post",
        color="#2166ac",
        lw=1.6,
        marker="o" if n <= _MAX_MARKERS else None,
        ms=3.5,
        zorder=3,
        label=label,
    )
    if n > _MAX_MARKERS:
        ax.plot(xs, ys, ls="none", marker=".", ms=1.0, color="#2166ac", alpha=0.4, rasterized=True)
    for name, (cost, omega) in uniform.items():
        colour = _UNIFORM_STYLE.get(name, "#555555")
        ax.scatter(
            cost / div,
            omega,
            marker="D",
            s=70,
            color=colour,
            edgecolor="black",
            lw=0.8,
            zorder=5,
            clip_on=clip,
        )
        ax.annotate(
            f"all {name}",
            (cost / div, omega),
            xytext=(8, 8),
            textcoords="offset points",
            fontsize=9,
            color="#333333",
            bbox={"boxstyle": "round,pad=0.2", "fc": "white", "ec": colour, "lw": 0.8, "alpha": 0.9},
            zorder=6,
            annotation_clip=True,
        )
    for i, (cost, omega, met) in enumerate(trials, start=1):
        colour = _trial_colour(met)
        ax.scatter(
            cost / div, omega, s=90, facecolor="none", edgecolor=colour, lw=1.8, zorder=6, clip_on=clip
        )
        if numbered and len(trials) <= 30:
            ax.annotate(
                str(i),
                (cost / div, omega),
                xytext=(-10, -13),
                textcoords="offset points",
                fontsize=8,
                fontweight="bold",
                color=colour,
                annotation_clip=True,
            )
    if chosen is not None:
        ax.scatter(
            chosen[0] / div,
            chosen[1],
            marker="*",
            s=320,
            color="#fdb863",
            edgecolor="black",
            lw=1.0,
            zorder=7,
            clip_on=clip,
        )
        ax.annotate(
            "chosen",
            (chosen[0] / div, chosen[1]),
            xytext=(11, -4),
            textcoords="offset points",
            fontsize=10,
            fontweight="bold",
            annotation_clip=True,
        )


def _symlog_y(ax, lo: float, hi: float) -> None:  # type: ignore[no-untyped-def]
    """Logarithmic y from the decade below ``lo`` up, linear below it, so that ΣΩ = 0 (all float)
    still shows; ticks at 0 and at whole decades only."""
    first = math.floor(math.log10(lo))
    last = math.ceil(math.log10(hi))
    ax.set_yscale("symlog", linthresh=10.0**first, linscale=0.6)
    step = max(1, math.ceil((last - first + 1) / 12))
    ax.set_yticks([0.0] + [10.0**k for k in range(first, last + 1, step)])
    ax.set_ylim(bottom=0.0, top=10.0 ** (math.log10(hi) + 0.25))


def _add_bits_axis(ax, frontier: Frontier, div: float) -> None:  # type: ignore[no-untyped-def]
    """A top axis in average weight bits, where cost maps to bits monotonically (``size``)."""
    import numpy as np

    pts = [(p.cost / div, p.avg_bits) for p in frontier.points if p.avg_bits > 0]
    if frontier.cost_model != "size" or len(pts) < 2:
        return
    x = np.array([c for c, _ in pts])
    b = np.maximum.accumulate(np.array([a for _, a in pts]))
    if not (np.all(np.diff(x) > 0) and b[-1] > b[0]):
        return
    # Size is bits × params plus scales: extend the line through the ends linearly.
    slope = (b[-1] - b[0]) / (x[-1] - x[0])

    def to_bits(v):  # type: ignore[no-untyped-def]
        v = np.asarray(v, dtype=float)
        return np.where(
            v < x[0],
            b[0] + (v - x[0]) * slope,
            np.where(v > x[-1], b[-1] + (v - x[-1]) * slope, np.interp(v, x, b)),
        )

    def to_cost(v):  # type: ignore[no-untyped-def]
        v = np.asarray(v, dtype=float)
        bu, idx = np.unique(b, return_index=True)
        xu = x[idx]
        return np.where(
            v < bu[0],
            xu[0] + (v - bu[0]) / slope,
            np.where(v > bu[-1], xu[-1] + (v - bu[-1]) / slope, np.interp(v, bu, xu)),
        )

    top = ax.secondary_xaxis("top", functions=(to_bits, to_cost))
    top.set_xlabel("average weight bits (parameter-weighted)")
    # Whole bit counts, dropping any that would crowd the previous one (< 4 % of the axis apart).
    lo, hi = ax.get_xlim()
    ticks: list[float] = []
    for t in (2, 3, 4, 5, 6, 8, 12, 16, 20, 24, 28, 32):
        pos = float(to_cost(t))
        if lo <= pos <= hi and (not ticks or pos - float(to_cost(ticks[-1])) > 0.04 * (hi - lo)):
            ticks.append(t)
    if len(ticks) >= 2:
        top.set_xticks(ticks)
