"""The CLI's commands. Imported only when a command runs (so ``hawqtool --help`` stays instant)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from hawqtool import pipeline
from hawqtool.costs import unit as cost_unit
from hawqtool.distributed import is_main
from hawqtool.errors import ExportError, UsageError
from hawqtool.formats import FLOAT, FORMAT_GRAMMAR, is_format
from hawqtool.frontier import uniform_points
from hawqtool.options import offered_formats
from hawqtool.plots import plot_frontier
from hawqtool.report import sensitivity_text, write_frontier_csv, write_sensitivity

log = logging.getLogger("hawqtool")


def _progress(args: argparse.Namespace) -> bool:
    return not args.quiet and sys.stderr.isatty()


def _check_out_dir(path: Path) -> Path:
    """Fail fast, before any work, when ``--out`` cannot become a folder because a file is in the way.

    Raises:
        UsageError: ``path`` or one of its parents exists and is not a folder (exit 2).
    """
    for p in (path, *path.parents):
        if p.exists():
            if not p.is_dir():
                what = "--out" if p == path else f"--out {str(path)!r}: its parent"
                raise UsageError(f"{what} {str(p)!r} is an existing file, not a folder; give a folder path")
            break
    return path


def _out_dir(path: Path) -> Path:
    _check_out_dir(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ExportError(f"cannot create output folder {str(path)!r}: {e}") from e
    return path


def _say(text: str) -> None:
    sys.stdout.write(text + "\n")


def cmd_analyze(args: argparse.Namespace) -> int:
    _check_out_dir(args.out)
    ws = pipeline.load(args.recipe, overrides=args.overrides)
    table = pipeline.analyze(ws, progress=_progress(args))
    if not is_main():  # under torchrun: rank 0 alone writes
        return 0
    out = _out_dir(args.out)
    write_sensitivity(table, out)
    _say(sensitivity_text(table))
    _say(f"wrote {out / 'sensitivity.csv'} and {out / 'sensitivity.json'}")
    return 0


def cmd_frontier(args: argparse.Namespace) -> int:
    _check_out_dir(args.out)
    ws = pipeline.load(args.recipe, overrides=args.overrides)
    table = pipeline.analyze(ws, progress=_progress(args))
    options, front = pipeline.frontier(ws, table=table, progress=_progress(args))
    if not is_main():  # under torchrun: rank 0 alone writes
        return 0
    out = _out_dir(args.out)
    write_sensitivity(table, out)
    write_frontier_csv(front, out)
    a, provider = ws.recipe.allocation, ws.recipe.evaluate.provider
    uniform = uniform_points(options, offered_formats(ws.prepared.layers, a.formats, provider=provider))
    plot_frontier(
        front,
        out / "frontier.png",
        uniform=uniform,
        title=f"{ws.recipe.name}: Pareto frontier ({front.cost_model} vs ΣΩ)",
    )
    unit = cost_unit(front.cost_model)
    _say(
        f"{len(front)} Pareto points, cost {front.points[0].cost:.4g}–{front.points[-1].cost:.4g} {unit}, "
        f"average bits {front.points[0].avg_bits:.2f}–{front.points[-1].avg_bits:.2f}"
    )
    _say(f"wrote {out / 'frontier.csv'} and {out / 'frontier.png'}")
    return 0


def _read_allocation(path: Path) -> dict[str, str]:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UsageError(f"--allocation {str(path)!r}: cannot read JSON: {e}") from e
    if isinstance(data, dict) and isinstance(data.get("result"), dict):
        data = data["result"].get("allocation")  # a report.json
    if not isinstance(data, dict) or not all(isinstance(v, str) for v in data.values()):
        raise UsageError(f"--allocation {str(path)!r}: expected a JSON object {{layer fqn: format}}")
    return data


def cmd_export(args: argparse.Namespace) -> int:
    if not is_main():  # under torchrun: nothing to share, rank 0 alone exports
        return 0
    ws = pipeline.load(args.recipe, overrides=args.overrides)
    if args.uniform is not None:
        if not is_format(args.uniform):
            raise UsageError(f"--uniform {args.uniform!r}: unknown format; allowed: {FORMAT_GRAMMAR}")
        allocation = pipeline.uniform_allocation(ws, args.uniform)
    else:
        allocation = _read_allocation(args.allocation)
    path = pipeline.export(ws, allocation, args.out)
    n_q = sum(1 for f in allocation.values() if f != FLOAT)
    _say(f"wrote {path} ({path.stat().st_size / 1024:.1f} KiB; {n_q}/{len(allocation)} layers quantized)")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    if not is_main():  # under torchrun: nothing to share, rank 0 alone evaluates
        return 0
    ws = pipeline.load(args.recipe, overrides=args.overrides)
    ev = pipeline.evaluate(args.model, ws, split=args.split)
    _say(
        json.dumps(
            {
                "model": str(args.model),
                "split": args.split,
                "metric": ev.metric,
                "latency_ms": ev.latency_ms,
                "size_bytes": ev.size_bytes,
                "samples": ev.samples,
            },
            indent=2,
        )
    )
    return 0


def cmd_quantize(args: argparse.Namespace) -> int:
    _check_out_dir(args.out)  # pipeline.quantize would report a file in the way as an export error
    result = pipeline.quantize(
        recipe=args.recipe, out=args.out, overrides=args.overrides, progress=_progress(args)
    )
    if not is_main():  # under torchrun: the other ranks only share the Hessian stages
        return 0
    rep = result.report
    b, r = rep["baseline"], rep["result"]
    _say(
        f"budget met: {rep['budget']['metric']} {r['metric']:.4f} (evaluation), {r['test_metric']:.4f} (test) "
        f"vs float {b['metric']:.4f} / {b['test_metric']:.4f}; {r['avg_bits']:.2f} average bits, "
        f"{r['size_bytes'] / 1024:.1f} KiB (float {b['size_bytes'] / 1024:.1f} KiB), "
        f"latency {r['latency_ms']:.3f} ms (float {b['latency_ms']:.3f} ms); "
        f"{rep['search']['evaluations']} evaluations"
    )
    if r.get("test_budget_met") is False:
        log.warning(
            "the chosen model misses the budget on the test split (drop %.4f): see report.md", r["test_drop"]
        )
    _say(f"model: {result.model_path}\nreport: {result.out / 'report.md'}")
    return 0
