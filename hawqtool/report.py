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
from typing import TYPE_CHECKING, Any

from hawqtool.confidence import is_binary, resolvable_drop
from hawqtool.distributed import is_main
from hawqtool.errors import ExportError
from hawqtool.files import write_bytes_atomic, write_json_atomic
from hawqtool.formats import formats_by_kind, parse_format
from hawqtool.search import Measurement, judge
from hawqtool.types import Budget, Frontier, FrontierPoint, OptionTable, SensitivityTable

if TYPE_CHECKING:
    from hawqtool.evaluate import Evaluation
    from hawqtool.prepare import PreparedModel
    from hawqtool.recipe import Recipe
    from hawqtool.refine import Refined
    from hawqtool.search import SearchResult


def _csv_bytes(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> bytes:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    w.writerows(rows)
    return buf.getvalue().encode()


def sensitivity_rows(table: SensitivityTable) -> list[dict[str, Any]]:
    """One dict per layer in model order, with the keys of the output contract in docs/design.md."""
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


def _drop(b: Budget, base: Evaluation, cand: Evaluation, seed: int) -> dict[str, Any]:
    """The drop of ``cand`` from ``base`` on the same split, with paired bounds at the budget's
    confidence (see :func:`hawqtool.search.judge`)."""
    est = judge(b, Measurement.of(base), Measurement.of(cand), seed=seed)
    return {**est.to_dict(), "met": est.upper <= b.max_drop + 1e-12}


def _versus_float(ms: float, float_ms: float) -> str:
    """The result's latency as a multiple of the float model's, and which way it went.

    Example:
        >>> _versus_float(531.0, 295.0), _versus_float(5.0, 10.0)
        ("latency 1.80× float's (slower)", "latency 0.50× float's (2.00× faster)")
    """
    ratio = ms / float_ms
    if ratio > 1:
        return f"latency {ratio:.2f}× float's (slower)"
    return f"latency {ratio:.2f}× float's ({1 / ratio:.2f}× faster)"


def build_report(
    *,
    recipe: Recipe,
    prepared: PreparedModel,
    table: SensitivityTable,
    front: Frontier,
    result: SearchResult,
    baseline: tuple[Evaluation, Evaluation],
    final: tuple[Evaluation, Evaluation] | None,
    chosen: FrontierPoint | None,
    candidates: int,
    dependency: bool,
    timings: Mapping[str, float],
    versions: Mapping[str, str],
    model_path: Path | None,
    budget: Budget | None = None,
    latency: Refined | None = None,
    options: OptionTable | None = None,
    dependency_stage: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """``report.json``: the output contract of docs/design.md, plus what each stage assumed.

    Keys of 0.1 are kept (``baseline``, ``result`` {metric, test_metric, latency_ms, size_bytes,
    allocation}, ``budget``, ``budget_met``, ``search``, ``sensitivity``, ``frontier``, ``seed``,
    ``versions``); 0.2 adds the drop intervals on evaluation and test, the smallest drop the split
    resolves, the model-I/O contract and the layers kept float (unused or unsupported). ``budget``
    is the one the search judged by (:func:`hawqtool.workspace.budget_for`; default: the recipe's).
    Under ``cost: latency``, ``latency`` (the refinement's result) adds ``search.latency`` (each
    probe's predicted vs measured latency) and ``search.latency_vs_float``. ``options`` (0.4) adds
    ``candidate_formats``: what ``allocation.formats`` asked for (a list or ``auto``) and the formats
    each layer and each layer kind was offered. ``dependency_stage`` (0.4.1,
    :meth:`hawqtool.dependency.DependencyModel.summary`) adds ``dependency``: the method, numerics,
    (layer, format) pairs, HVPs and the stage's costs.
    """
    r = recipe
    base_eval, base_test = baseline
    budget = budget or r.budget_spec
    res: dict[str, Any] = {
        "metric": None,
        "test_metric": None,
        "latency_ms": None,
        "size_bytes": None,
        "allocation": None,
    }
    if final is not None and chosen is not None and model_path is not None:
        final_eval, final_test = final
        on_eval = _drop(budget, base_eval, final_eval, r.hessian.seed)
        on_test = _drop(budget, base_test, final_test, r.hessian.seed)
        formats: dict[str, int] = {}
        for fmt in chosen.allocation.values():
            formats[fmt] = formats.get(fmt, 0) + 1
        res = {
            "metric": final_eval.metric,
            "test_metric": final_test.metric,
            "drop": on_eval["drop"],
            "test_drop": on_test["drop"],
            "drop_interval": on_eval,
            "test_drop_interval": on_test,
            # As in 0.1: the observed drop on test is within max_drop. Whether its upper bound
            # also is (a stronger statement a smaller test split rarely supports) is apart.
            "test_budget_met": on_test["drop"] <= budget.max_drop + 1e-12,
            "test_bound_met": on_test["met"],
            "latency_ms": final_eval.latency_ms,
            "size_bytes": model_path.stat().st_size,
            "cost": chosen.cost,
            "avg_bits": chosen.avg_bits,
            "sum_omega": chosen.omega,
            "score": chosen.score,
            "allocation": dict(chosen.allocation),
            "formats": formats,
            "weight_only_layers": sum(1 for f in chosen.allocation.values() if parse_format(f).weight_only),
        }
    resolvable = None
    binary = budget.binary
    if binary is None and base_eval.values is not None:
        binary = is_binary(base_eval.values)
    if base_eval.values is not None and budget.confidence > 0:
        base = base_eval.metric if budget.mode == "relative" and base_eval.metric else None
        if budget.mode == "absolute" or base is not None:
            resolvable = resolvable_drop(
                base_eval.samples,
                confidence=budget.confidence,
                binary=bool(binary),
                mode=budget.mode,
                baseline=base,
            )
    return {
        "name": r.name,
        "baseline": {
            "metric": base_eval.metric,
            "test_metric": base_test.metric,
            "latency_ms": base_eval.latency_ms,
            "size_bytes": base_eval.size_bytes,
            "samples": base_eval.samples,
            "test_samples": base_test.samples,
        },
        "result": res,
        "budget": {
            **r.budget.model_dump(),
            "higher_is_better": budget.higher_is_better,
            "metric": r.task.metric_name,
            "split": "evaluation",
            "per_sample": base_eval.values is not None,
            "binary": binary,
            "resolvable_drop": resolvable,
        },
        "budget_met": result.budget_met,
        "search": {
            **result.to_dict(),
            "evaluations": len(result.trials),
            "candidates": candidates,
            "dependency": dependency,
            **(
                {"latency": list(latency.latency), "latency_vs_float": latency.versus_float}
                if latency is not None
                else {}
            ),
        },
        **({"dependency": dict(dependency_stage)} if dependency_stage is not None else {}),
        "sensitivity": sensitivity_rows(table),
        "hessian": {
            "hvps": table.hvps,
            "seconds": table.seconds,
            "device": table.device,
            "fingerprint": table.fingerprint,
            "rel_tol": table.rel_tol,
            "estimator": table.estimator,
            "estimator_setting": r.hessian.estimator,
            "estimator_reason": estimator_reason(
                r.hessian.estimator, table.estimator, loss=r.task.loss_name, targets=r.task.targets
            ),
            "costs": dict(table.costs),
        },
        "layers": {
            "quantizable": len(prepared.layers),
            "kinds": {
                k: sum(1 for i in prepared.layers if i.kind == k)
                for k in sorted({i.kind for i in prepared.layers})
            },
            "unused": list(prepared.unused),
            "unsupported": list(prepared.unsupported),
        },
        "io": prepared.io.to_dict() if prepared.io is not None else None,
        "frontier": frontier_rows(front),
        "cost_model": front.cost_model,
        "seed": r.hessian.seed,
        "timings_s": {k: round(v, 3) for k, v in timings.items()},
        "recipe": r.to_dict(),
        "versions": dict(versions),
        **({"candidate_formats": candidate_report(r, prepared, options)} if options is not None else {}),
    }


def candidate_report(recipe: Recipe, prepared: PreparedModel, options: OptionTable) -> dict[str, Any]:
    """``candidate_formats`` of ``report.json``: the recipe's ``allocation.formats`` (a list or
    ``auto``), the provider ``auto`` chose for, and the formats offered per layer kind and per layer."""
    by_layer = {fqn: [o.format for o in options.options[fqn]] for fqn in options.layers}
    requested = recipe.allocation.formats
    return {
        "requested": requested if isinstance(requested, str) else list(requested),
        "provider": recipe.evaluate.provider,
        "by_kind": formats_by_kind(prepared.layers, by_layer),
        "by_layer": by_layer,
    }


def output_folder(out: Path) -> Path:
    """``out``, created, with any model of an earlier run removed (on rank 0 only): a stale model
    must never pass for this run's result.

    Raises:
        ExportError: the folder cannot be created (exit 4).
    """
    if is_main():
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ExportError(f"cannot create output folder {str(out)!r}: {e}") from e
        (out / "model.onnx").unlink(missing_ok=True)
    return out


def budget_not_met_message(report: Mapping[str, Any], md: Path) -> str:
    """The CLI's one-paragraph explanation of an unmet budget, with the closest candidates."""
    b = report["budget"]
    trials = report["search"]["trials"]
    if report["search"].get("reason") == "only-float":
        head = (
            "budget not met: only the all-float model meets it, and keeping every layer float is not a result"
        )
    else:
        head = "budget not met: no quantized candidate keeps the metric within the budget"

    def upper(t: Mapping[str, Any]) -> float:
        return float(t["drop"] if t.get("drop_upper") is None else t["drop_upper"])

    misses = sorted((t for t in trials if not t["met"]), key=upper)[:3]
    closest = "; ".join(
        f"{t['avg_bits']:.2f} avg bits: drop {t['drop']:.4g}, bound {upper(t):.4g}, "
        f"missed by {upper(t) - b['max_drop']:.4g}"
        for t in misses
    )
    return (
        f"{head} (max_drop {b['max_drop']:g} {b['mode']} on {b['metric']} at confidence "
        f"{b.get('confidence', 0)}). Closest: {closest or 'none probed'}. Report: {md}"
    )


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
        f"{len(table)} layers, {table.estimator} estimator, {table.hvps} Hessian-vector products, "
        f"{table.seconds:.1f} s on {table.device}"
    )
    return "\n".join(lines)


def estimator_reason(setting: str, ran: str, *, loss: str, targets: str) -> str:
    """Why the trace stage ran ``ran`` when the recipe said ``setting`` (report.json
    ``hessian.estimator_reason``; the rule is :func:`hawqtool.gauss_newton.resolve_estimator`'s).

    Example:
        >>> estimator_reason("auto", "gauss_newton", loss="kl", targets="model")[:60]
        'auto: with teacher targets and the kl loss the loss Hessian '
    """
    if setting != "auto":
        return f"hessian.estimator: {setting} in the recipe"
    if ran == "gauss_newton" and targets == "model":
        return (
            f"auto: with teacher targets and the {loss} loss the loss Hessian at the float weights is "
            "exactly the Gauss–Newton matrix, whose traces one ordinary backward per probe samples"
        )
    if ran == "gauss_newton":
        return (
            f"auto: for {loss} on labels the Gauss–Newton matrix (the Fisher of the model's own "
            "predictions) ranked allocations as well as Hutchinson's traces for a fraction of the cost "
            "(docs/benchmarks.md, scripts/bench_sensitivity.py)"
        )
    return (
        f"auto: the {loss} loss on {targets} has no Gauss–Newton form that hawqtool knows, so "
        "Hutchinson's estimator (Hessian-vector products) ran"
    )


def _stage_cost(c: Mapping[str, Any], hvps: Any) -> str:
    """One stage's cost as report.md says it: passes over the calibration split, Hessian-vector
    products, seconds and peak memory (those its ``costs`` hold).

    Example:
        >>> _stage_cost({"forward_passes": 3.0, "backward_passes": 3.0, "seconds": 2.5,
        ...     "peak_memory_mib": 458.3}, 0)
        '3 forward and 3 backward passes, 0 Hessian-vector products, 2.5 s, peak 458 MiB'
    """
    parts = [f"{hvps} Hessian-vector products"]
    if "forward_passes" in c:
        parts.insert(
            0, f"{c['forward_passes']:.0f} forward and {c.get('backward_passes', 0):.0f} backward passes"
        )
    if "seconds" in c:
        parts.append(f"{c['seconds']:.1f} s")
    if c.get("peak_memory_mib"):
        parts.append(f"peak {c['peak_memory_mib']:.0f} MiB")
    return ", ".join(parts)


def _hessian_cost(h: Mapping[str, Any]) -> str:
    """What the trace stage cost: the estimator, then :func:`_stage_cost`.

    Example:
        >>> _hessian_cost({"estimator": "gauss_newton", "hvps": 0, "costs": {"forward_passes": 3.0,
        ...     "backward_passes": 3.0, "seconds": 2.5, "peak_memory_mib": 458.3}})
        'gauss_newton: 3 forward and 3 backward passes, 0 Hessian-vector products, 2.5 s, peak 458 MiB'
    """
    return f"{h.get('estimator', 'hutchinson')}: " + _stage_cost(h.get("costs") or {}, h.get("hvps", "?"))


def _dependency_cost(d: Mapping[str, Any]) -> str:
    """What the dependency stage cost: its method, numerics and (layer, format) pairs, then
    :func:`_stage_cost`.

    Example:
        >>> _dependency_cost({"method": "output", "numerics": "exported", "pairs": 9, "interacting": 4,
        ...     "hvps": 0, "costs": {"forward_passes": 22.0, "backward_passes": 0.0, "seconds": 1.5}})
        'output-space, exported numerics: 9 (layer, format) pairs, 4 with cross terms, 22 forward and 0 backward passes, 0 Hessian-vector products, 1.5 s'
    """
    method = {"output": "output-space", "hvp": "Hessian-vector products"}.get(d.get("method", ""), "?")
    interacting = f"{d['interacting']} with cross terms, " if "interacting" in d else ""
    return (
        f"{method}, {d.get('numerics', '?')} numerics: {d.get('pairs', '?')} (layer, format) pairs, "
        + interacting
        + _stage_cost(d.get("costs") or {}, d.get("hvps", 0))
    )


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
            else "**Budget NOT met.** Only the all-float model meets the budget, and keeping every layer "
            "float is no quantization result; no model is presented as meeting it."
            if report["search"].get("reason") == "only-float"
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
        f"Average weight bits {r.get('avg_bits', float('nan')):.2f}; {_versus_float(r['latency_ms'], b['latency_ms'])}; "
        f"size ×{b['size_bytes'] / r['size_bytes']:.2f} smaller."
        if r.get("size_bytes") and r.get("latency_ms")
        else "",
        "",
        "## How it was chosen",
        "",
        f"Per-layer Hessian traces ({_hessian_cost(report.get('hessian', {}))}) "
        f"scored each layer × format by Ω = avg trace · ‖Q(W) − W‖²"
        + (f" ({why})" if (why := report.get("hessian", {}).get("estimator_reason")) else "")
        + f"; the exact Pareto frontier of (cost, ΣΩ) has {len(report['frontier'])} points"
        + (
            f"; inter-layer dependency terms ({_dependency_cost(report['dependency'])}) re-scored it"
            if report["search"].get("dependency") and report.get("dependency")
            else "; inter-layer dependency terms re-scored it"
            if report["search"].get("dependency")
            else ""
        )
        + f". Bisection over {report['search'].get('candidates', '?')} candidates took "
        f"{report['search']['evaluations']} onnxruntime evaluations:",
        "",
        "| # | candidate | avg bits | cost | metric | drop | interval | within budget | seconds | note |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for i, t in enumerate(report["search"]["trials"], 1):
        lo, hi = t.get("drop_lower"), t.get("drop_upper")
        interval = "—" if lo is None or t.get("bound", "point") == "point" else f"[{lo:.4f}, {hi:.4f}]"
        note = t.get("note", "") + (" (frontier gap)" if t.get("source") == "frontier" else "")
        lines.append(
            f"| {i} | {_candidate(t)} | {t['avg_bits']:.2f} | {t['cost']:.4g} | {_pct(t['metric'])} | "
            f"{t['drop']:.4f} | {interval} | {'yes' if t['met'] else 'no'} | {t['seconds']:.2f} | {note} |"
        )
    conf = budget.get("confidence", 0) or 0
    if conf > 0:
        resolution = "."
        if budget.get("binary") is False:
            resolution = (
                "; the metric is continuous, so the bound narrows as the candidate's per-sample values "
                "approach the float model's (no smallest resolvable drop)."
            )
        elif budget.get("binary") and budget.get("resolvable_drop") is not None:
            resolution = (
                f"; the evaluation split ({b.get('samples', '?')} samples) resolves drops down to "
                f"{budget['resolvable_drop']:.4g}."
            )
        lines += [
            "",
            f"A candidate meets the budget when the one-sided {100 * conf:g} % upper bound of its drop, "
            "paired against the float model on the same evaluation samples, is within max_drop" + resolution,
        ]
    if report["search"].get("reason") == "uniform":
        lines += [
            "",
            "The uniform models cheaper than the search's choice were probed after it, and one met the "
            "budget: it is the result (a one-line model beat the predicted frontier here).",
        ]
    for key, split in (("drop_interval", "evaluation"), ("test_drop_interval", "test")):
        iv = r.get(key)
        if iv:
            lines.append(
                f"- chosen model on {split}: drop {iv['drop']:.4f}"
                + (
                    f", {100 * iv['confidence']:g} % bounds [{iv['lower']:.4f}, {iv['upper']:.4f}] ({iv['method']})"
                    if iv.get("method") != "point"
                    else ""
                )
                + (
                    f"; {'within' if iv['met'] else 'NOT within'} the budget"
                    if iv.get("method") == "point"
                    else f"; the upper bound is {'within' if iv['met'] else 'beyond'} max_drop"
                )
            )
    lat = report["search"].get("latency")
    if lat:
        lines += [
            "",
            "Latency cost: every probe was timed, the uniform integer models too; the probes within the "
            "budget were timed again together, in interleaved rounds with the float model and a shortlist "
            "of unprobed candidates more precise than the search's choice, and the choice is the fastest "
            "of those within budget (a shortlisted one is evaluated first: `timed` rows). Predicted "
            "(float latency + Σ per-layer deltas) against measured:",
            "",
            "| candidate | within budget | predicted (ms) | measured (ms) | re-timed (ms) |",
            "|---|---|---|---|---|",
            *(
                f"| {_candidate(row)} | {'yes' if row['met'] else 'no'} | {row['predicted_ms']:.3f} | "
                + ("—" if row["measured_ms"] is None else f"{row['measured_ms']:.3f}")
                + " | "
                + (
                    "—"
                    if row.get("retimed_ms") is None
                    else f"{row['retimed_ms']:.3f} ± {row['retimed_stderr_ms']:.3f}"
                )
                + " |"
                for row in lat
            ),
        ]
        vf = report["search"].get("latency_vs_float")
        if vf:
            lines += [
                "",
                f"Timed in the same rounds as the float model: the fastest within budget "
                f"{vf['chosen_ms']:.3f} ± {vf['chosen_stderr_ms']:.3f} ms, float {vf['float_ms']:.3f} ± "
                f"{vf['float_stderr_ms']:.3f} ms, a difference of {vf['difference_ms']:+.3f} ± "
                f"{vf['difference_stderr_ms']:.3f} ms ({vf['verdict']})."
                + (
                    " **No quantized model within the budget is faster than float** on this provider at "
                    "this batch shape: the Q/DQ nodes cost more than the integer kernels save."
                    if vf["verdict"] == "slower"
                    else ""
                ),
            ]
    layers = report.get("layers") or {}
    if layers.get("unused") or layers.get("unsupported"):
        lines += [""]
        if layers.get("unused"):
            lines.append(
                f"Unused by the selected output (excluded, kept float): {', '.join(layers['unused'])}."
            )
        if layers.get("unsupported"):
            lines.append(f"Kept float (unsupported kind): {', '.join(layers['unsupported'])}.")
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


def _candidate(row: Mapping[str, Any]) -> str:
    """A probe's candidate index; the name of an extra point (``uniform int8``); ``move`` for a
    one-layer change of the latency choice (its note says which)."""
    if row.get("source") in ("extra", "uniform"):
        return str(row["note"])
    return "move" if row.get("source") == "move" else str(row["index"])


def write_report(report: Mapping[str, Any], out: Path) -> None:
    """``report.json`` and ``report.md``."""
    write_json_atomic(out / "report.json", report)
    write_bytes_atomic(out / "report.md", render_markdown(report).encode())
