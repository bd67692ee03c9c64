"""``hawqtool`` command line: a thin layer over :mod:`hawqtool.pipeline`.

Heavy libraries are imported inside the commands so that ``--help`` is instant. Exit codes:
0 ok; 2 bad recipe or usage; 3 budget not met; 4 export or runtime failure.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from hawqtool.errors import HawqError

log = logging.getLogger("hawqtool")

RECIPE_HELP = "recipe YAML file, or a built-in name (default, resnet20-digits, small-cnn-digits, ...)"


def _common(p: argparse.ArgumentParser, *, recipe: bool = True) -> None:
    if recipe:
        p.add_argument("recipe", help=RECIPE_HELP)
        p.add_argument(
            "--set",
            dest="overrides",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help="override a recipe value, e.g. --set budget.max_drop=0.02 (repeatable)",
        )
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars, warnings only")
    p.add_argument(
        "-v",
        "--verbose",
        "--debug",
        dest="verbose",
        action="store_true",
        help="debug logging, and the traceback behind an error",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hawqtool",
        description="Hessian-aware mixed-precision post-training quantization to ONNX, verified "
        "against an accuracy budget in onnxruntime.",
    )
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    for name, help_ in (
        ("quantize", "the main job: analyze, allocate, search, export, verify"),
        ("analyze", "per-layer Hessian traces: sensitivity.csv / .json"),
        ("frontier", "exact Pareto frontier of (cost, ΣΩ): frontier.csv / .png"),
    ):
        p = sub.add_parser(name, help=help_)
        _common(p)
        p.add_argument(
            "--out", type=Path, default=Path("hawqtool-out"), help="output folder (default: %(default)s)"
        )

    p = sub.add_parser("export", help="export one allocation (or a uniform format) as QDQ ONNX")
    _common(p)
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--allocation", type=Path, help="JSON file: {layer fqn: format} (or a report.json)")
    group.add_argument(
        "--uniform", metavar="FORMAT", help="one format for every layer (int8, int4, float, ...)"
    )
    p.add_argument(
        "--out", type=Path, default=Path("model.onnx"), help="ONNX file to write (default: %(default)s)"
    )

    p = sub.add_parser("eval", help="evaluate an ONNX model in onnxruntime on a recipe's split")
    p.add_argument("model", type=Path, help="ONNX model file")
    p.add_argument("--recipe", required=True, help=RECIPE_HELP)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--split", choices=("evaluation", "test", "calibration"), default="test")
    _common(p, recipe=False)
    return parser


def _configure_logging(args: argparse.Namespace) -> None:
    # hawqtool's own progress at INFO; other libraries only when they warn.
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    logging.basicConfig(
        level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    logging.getLogger("hawqtool").setLevel(level)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.version:
        from hawqtool import __version__

        print(__version__)  # noqa: T201 - the CLI's output
        return 0
    if args.command is None:
        parser.print_help()
        return 2
    _configure_logging(args)
    import os

    # Under torchrun (WORLD_SIZE > 1) every rank joins one process group for the Hessian stages.
    torchrun = os.environ.get("WORLD_SIZE", "1") not in ("", "1")
    try:
        if torchrun:
            from hawqtool import distributed

            distributed.init_from_env()
        from hawqtool import commands

        return int(getattr(commands, f"cmd_{args.command}")(args))
    except HawqError as e:
        # The message names the bad value; the traceback (with the user's code that raised, for a
        # failing factory) only under -v / --debug.
        log.error("%s", e, exc_info=args.verbose)
        return e.exit_code
    except KeyboardInterrupt:
        log.error("interrupted")
        return 130
    finally:
        if torchrun:
            from hawqtool import distributed

            distributed.shutdown()


if __name__ == "__main__":
    sys.exit(main())
