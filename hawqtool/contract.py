"""Check a ``hawqtool quantize`` output folder against the output contract (docs/design.md).

:func:`check_output` returns one line per problem (an empty list means the folder conforms). It is
what the end-to-end tests run on a real output, and a command for users and CI:

    python -m hawqtool.contract OUT_DIR      # exit 0 when it conforms, 1 otherwise

A folder from a run whose budget was not met conforms without ``model.onnx`` as long as
``report.json`` says ``budget_met: false``; with ``budget_met: true`` the model must be there.

Example:
    >>> from hawqtool.contract import check_output
    >>> check_output("out/tiny")                                   # doctest: +SKIP
    []
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

#: Files every output folder holds, besides ``model.onnx`` (present only when the budget is met).
REPORT_FILES = ("report.json", "report.md", "sensitivity.csv", "frontier.csv", "frontier.png")
MODEL_FILE = "model.onnx"
#: Keys of ``report.json`` and of its sections that the contract promises.
REPORT_KEYS = (
    "baseline",
    "result",
    "budget",
    "budget_met",
    "search",
    "sensitivity",
    "frontier",
    "seed",
    "versions",
)
BASELINE_KEYS = ("metric", "latency_ms", "size_bytes")
RESULT_KEYS = ("metric", "test_metric", "latency_ms", "size_bytes", "allocation")
SEARCH_KEYS = ("evaluations", "trials")
SENSITIVITY_KEYS = ("layer", "trace", "avg_trace", "stderr", "probes", "converged", "params")
VERSION_KEYS = ("hawqtool", "torch", "onnx", "onnxruntime")

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# result.size_bytes is the file's size; allow a little slack for a size measured before the
# metadata stamp was added, never more.
_SIZE_SLACK = (0.02, 4096)


def _missing(section: Any, keys: Sequence[str], where: str) -> list[str]:
    if not isinstance(section, Mapping):
        return [f"report.json {where} is a {type(section).__name__}, not an object"]
    return [f"report.json {where} lacks {k!r}" for k in keys if k not in section]


def _check_report(rep: Any) -> list[str]:
    if not isinstance(rep, Mapping):
        return [f"report.json is a {type(rep).__name__}, not an object"]
    problems = [f"report.json lacks {k!r}" for k in REPORT_KEYS if k not in rep]
    for key, keys in (
        ("baseline", BASELINE_KEYS),
        ("result", RESULT_KEYS),
        ("search", SEARCH_KEYS),
        ("versions", VERSION_KEYS),
    ):
        if key in rep:
            problems += _missing(rep[key], keys, key)
    if "budget_met" in rep and not isinstance(rep["budget_met"], bool):
        problems.append(f"report.json budget_met is {rep['budget_met']!r}, not true or false")
    search = rep.get("search")
    if isinstance(search, Mapping) and all(k in search for k in SEARCH_KEYS):
        trials = search["trials"]
        if not isinstance(trials, list):
            problems.append(f"report.json search.trials is a {type(trials).__name__}, not a list")
        elif search["evaluations"] != len(trials):
            problems.append(
                f"search.evaluations is {search['evaluations']!r} but there are {len(trials)} trials"
            )
    rows = rep.get("sensitivity")
    if "sensitivity" in rep:
        if not isinstance(rows, list) or not rows:
            problems.append("report.json sensitivity must be a non-empty list of per-layer rows")
        else:
            for i, row in enumerate(rows):
                lacking = _missing(row, SENSITIVITY_KEYS, f"sensitivity[{i}]")
                problems += lacking
                if lacking:
                    break  # one malformed row says enough
    result = rep.get("result")
    if rep.get("budget_met") is True and isinstance(result, Mapping) and isinstance(rows, list):
        allocation = result.get("allocation")
        layers = {str(row.get("layer")) for row in rows if isinstance(row, Mapping)}
        if not isinstance(allocation, Mapping):
            problems.append("report.json result.allocation must be an object {layer: format}")
        elif set(allocation) != layers:
            problems.append(
                f"result.allocation covers {sorted(allocation)} but sensitivity lists {sorted(layers)}"
            )
    return problems


def _check_model(path: Path, result: Any) -> list[str]:
    import onnx
    import onnxruntime as ort

    problems = []
    try:
        onnx.checker.check_model(str(path), full_check=True)
        ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    # Any failure to validate or load is what the check reports, whatever its type.
    except Exception as e:  # noqa: BLE001
        return [f"{MODEL_FILE} does not validate or load: {type(e).__name__}: {e}"]
    size = path.stat().st_size
    claimed = result.get("size_bytes") if isinstance(result, Mapping) else None
    rel, absolute = _SIZE_SLACK
    if not isinstance(claimed, int) or abs(claimed - size) > rel * size + absolute:
        problems.append(f"result.size_bytes is {claimed!r} but {MODEL_FILE} has {size} bytes")
    meta = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    if not any("alloc" in k for k in meta):
        problems.append(
            f"{MODEL_FILE} metadata does not stamp the allocation (keys: {', '.join(sorted(meta)) or 'none'})"
        )
    return problems


def check_output(out: str | Path) -> list[str]:
    """Problems of a ``hawqtool quantize`` output folder against the output contract.

    Args:
        out: the folder given to ``hawqtool quantize --out``.

    Returns:
        One human-readable line per problem; empty when the folder conforms.
    """
    out = Path(out)
    if not out.is_dir():
        return [f"{str(out)!r} is not a folder"]
    problems = [f"missing {name}" for name in REPORT_FILES if not (out / name).is_file()]
    png = out / "frontier.png"
    if png.is_file() and png.read_bytes()[: len(_PNG_SIGNATURE)] != _PNG_SIGNATURE:
        problems.append("frontier.png is not a PNG file")
    report_path = out / "report.json"
    rep: Any = None
    if report_path.is_file():
        try:
            rep = json.loads(report_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            problems.append(f"report.json is not valid JSON: {e}")
        else:
            problems += _check_report(rep)
    met = rep.get("budget_met") if isinstance(rep, Mapping) else None
    model = out / MODEL_FILE
    if model.is_file():
        if met is False:
            problems.append(f"{MODEL_FILE} is present although report.json says budget_met is false")
        problems += _check_model(model, rep.get("result") if isinstance(rep, Mapping) else None)
    elif met is not False:
        problems.append(f"missing {MODEL_FILE}")
    return problems


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m hawqtool.contract DIR``: print the problems; exit 1 if any, 2 on bad usage."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1 or args[0] in ("-h", "--help"):
        sys.stderr.write("usage: python -m hawqtool.contract OUT_DIR\n")
        return 0 if args in (["-h"], ["--help"]) else 2
    problems = check_output(args[0])
    for line in problems:
        sys.stdout.write(line + "\n")
    sys.stdout.write(f"{len(problems)} problem(s)\n" if problems else "output matches the contract\n")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
