"""Human- and machine-readable outputs: CSVs, report.json, report.md and terminal tables.

Every file is written atomically (temporary file + rename), so an interrupted run never leaves a
half-written file under its final name.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from hawqtool.types import Frontier, SensitivityTable, write_bytes_atomic, write_json_atomic


def _csv_bytes(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> bytes:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    w.writerows(rows)
    return buf.getvalue().encode()


def sensitivity_rows(table: SensitivityTable) -> list[dict[str, Any]]:
    """One dict per layer in model order, with the keys of DESIGN.md's output contract."""
    return [
        {
            "layer": r.layer,
            "trace": r.trace,
            "avg_trace": r.avg_trace,
            "stderr": r.stderr,
            "rel_stderr": r.rel_stderr if r.trace != 0 else None,
            "probes": r.probes,
            "converged": r.converged,
            "params": r.params,
        }
        for r in table.layers
    ]


def write_sensitivity(table: SensitivityTable, out: Path) -> None:
    """``sensitivity.csv`` (one row per layer, model order) and ``sensitivity.json`` (the table)."""
    rows = sensitivity_rows(table)
    header = list(rows[0]) if rows else ["layer"]
    write_bytes_atomic(out / "sensitivity.csv", _csv_bytes(header, [list(r.values()) for r in rows]))
    write_json_atomic(out / "sensitivity.json", table.to_dict())


def frontier_rows(frontier: Frontier) -> list[dict[str, Any]]:
    return [
        {
            "index": i,
            "cost": p.cost,
            "avg_bits": round(p.avg_bits, 4),
            "omega": p.omega,
            "score": p.score,
            "allocation": dict(p.allocation),
        }
        for i, p in enumerate(frontier.points)
    ]


def write_frontier_csv(frontier: Frontier, out: Path) -> None:
    """``frontier.csv``: one row per Pareto point, cheapest first; the allocation as JSON."""
    rows = frontier_rows(frontier)
    header = ["index", f"cost_{frontier.cost_model}", "avg_bits", "sum_omega", "score", "allocation"]
    body = [
        [
            r["index"],
            r["cost"],
            r["avg_bits"],
            r["omega"],
            "" if r["score"] is None else r["score"],
            json.dumps(r["allocation"], separators=(",", ":")),
        ]
        for r in rows
    ]
    write_bytes_atomic(out / "frontier.csv", _csv_bytes(header, body))


def sensitivity_text(table: SensitivityTable) -> str:
    """A terminal table, most sensitive layer (largest average trace) first."""
    lines = [
        f"{'layer':<28} {'params':>8} {'trace':>11} {'avg trace':>11} {'rel.err':>8} {'probes':>6}  ok",
    ]
    for r in table.by_sensitivity():
        rel = f"{100 * r.rel_stderr:7.1f}%" if r.trace != 0 else "    n/a"
        lines.append(
            f"{r.layer:<28} {r.params:>8} {r.trace:>11.4g} {r.avg_trace:>11.4g} {rel:>8} {r.probes:>6}  "
            f"{'yes' if r.converged else 'NO'}"
        )
    lines.append(
        f"{len(table)} layers, {table.hvps} Hessian-vector products, {table.seconds:.1f} s on {table.device}"
    )
    return "\n".join(lines)


def _fmt_size(n: float) -> str:
    return f"{n / 1024:.1f} KiB" if n < 1024**2 else f"{n / 1024**2:.2f} MiB"


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.2f} %"


def render_markdown(report: Mapping[str, Any]) -> str:
    """``report.md``: what was chosen and why, baseline vs result, trials and the per-layer table."""
    b, r, budget = report["baseline"], report["result"], report["budget"]
    met = report["budget_met"]
    unit = "points" if budget["mode"] == "absolute" else "of the baseline"
    lines = [
        f"# hawqtool report: {report.get('name', '')}",
        "",
        (
            f"**Budget met.** The cheapest candidate within the budget keeps the metric at "
            f"{_pct(r['metric'])} on the evaluation split ({_pct(r.get('test_metric'))} on test)."
            if met
            else "**Budget NOT met.** Even the most precise candidate drops the metric by more than "
            "the budget allows; no model is presented as meeting it."
        ),
        "",
        *(
            [
                f"**Caution:** on the held-out test split the drop is {r['test_drop']:.4f}, beyond the "
                "budget. The search chose on the evaluation split; a choice at the budget's edge on a "
                "small split can miss it on another. A larger evaluation split or a tighter `max_drop` "
                "leaves a margin.",
                "",
            ]
            if met and r.get("test_budget_met") is False
            else []
        ),
        f"Budget: metric drop at most {budget['max_drop']:g} ({budget['mode']}, {unit})"
        + (f", at least {budget['min_drop']:g}" if budget.get("min_drop") is not None else "")
        + ".",
        "",
        "| | metric (evaluation) | metric (test) | latency (ms) | size |",
        "|---|---|---|---|---|",
        f"| float baseline | {_pct(b['metric'])} | {_pct(b.get('test_metric'))} | "
        f"{b['latency_ms']:.3f} | {_fmt_size(b['size_bytes'])} |",
    ]
    if r.get("size_bytes"):
        lines.append(
            f"| quantized | {_pct(r['metric'])} | {_pct(r.get('test_metric'))} | "
            f"{r['latency_ms']:.3f} | {_fmt_size(r['size_bytes'])} |"
        )
    lines += [
        "",
        f"Average weight bits {r.get('avg_bits', float('nan')):.2f}; "
        f"latency ×{b['latency_ms'] / r['latency_ms']:.2f} vs float; size ×{b['size_bytes'] / r['size_bytes']:.2f} smaller."
        if r.get("size_bytes") and r.get("latency_ms")
        else "",
        "",
        "## How it was chosen",
        "",
        f"Per-layer Hessian traces ({report.get('hessian', {}).get('hvps', '?')} Hessian-vector products) "
        f"scored each layer × format by Ω = avg trace · ‖Q(W) − W‖²; the exact Pareto frontier of "
        f"(cost, ΣΩ) has {len(report['frontier'])} points"
        + (
            "; inter-layer dependency terms (gᵀΔ + ½ΔᵀHΔ) re-scored it"
            if report["search"].get("dependency")
            else ""
        )
        + f". Bisection over {report['search'].get('candidates', '?')} candidates took "
        f"{report['search']['evaluations']} onnxruntime evaluations:",
        "",
        "| # | candidate | avg bits | cost | metric | drop | within budget | seconds | note |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for i, t in enumerate(report["search"]["trials"], 1):
        lines.append(
            f"| {i} | {t['index']} | {t['avg_bits']:.2f} | {t['cost']:.4g} | {_pct(t['metric'])} | "
            f"{t['drop']:.4f} | {'yes' if t['met'] else 'no'} | {t['seconds']:.2f} | {t.get('note', '')} |"
        )
    alloc = r.get("allocation") or {}
    lines += [
        "",
        "## Per layer",
        "",
        "| layer | params | avg trace | ± stderr | probes | format |",
        "|---|---|---|---|---|---|",
    ]
    for row in sorted(report["sensitivity"], key=lambda s: s["avg_trace"], reverse=True):
        se = row["stderr"] / row["params"] if row["params"] else 0.0
        lines.append(
            f"| {row['layer']} | {row['params']} | {row['avg_trace']:.4g} | {se:.2g} | {row['probes']}"
            f"{'' if row['converged'] else ' (not converged)'} | {alloc.get(row['layer'], '—')} |"
        )
    v = report.get("versions", {})
    lines += [
        "",
        "Files: `model.onnx` (when the budget is met), `report.json`, `sensitivity.csv`, "
        "`frontier.csv`, `frontier.png`.",
        "",
        f"Seed {report.get('seed')}; " + ", ".join(f"{k} {val}" for k, val in v.items()) + ".",
        "",
    ]
    return "\n".join(lines)


def write_report(report: Mapping[str, Any], out: Path) -> None:
    """``report.json`` and ``report.md``."""
    write_json_atomic(out / "report.json", report)
    write_bytes_atomic(out / "report.md", render_markdown(report).encode())
