"""Crash safety of ``hawqtool quantize``: kill -9 at random moments, then look for half-written files.

Each trial starts ``hawqtool quantize RECIPE --out DIR`` in a subprocess and sends SIGKILL to its
process group after a random delay (uniform over the length of a completed run, so every stage is
hit: training the zoo model, Hessian traces, dependency terms, search, export, reports). Every trial
uses the same DIR and the same cache folder, so later runs start from whatever the killed ones left;
every ``--cold-every``-th trial starts from an empty cache, so the cold stages (training, Hessian
cache writes) are hit too.

After each kill, every file under DIR and under the cache whose name is a final name (not a hidden
``.NAME.*.tmp`` temporary file) must be whole: ``.json`` parses, ``.onnx`` loads with ``onnx.load``
and passes ``onnx.checker.check_model(full_check=True)``, ``.png`` ends with its IEND chunk,
``.csv`` rows all have the header's width, ``.md`` / ``.csv`` end with a newline, ``.pt`` loads
with ``torch.load(weights_only=True)``. Temporary files a kill leaves behind are counted, not
failed.

Two runs to completion before the trials (one from a cold cache, one warm) and one after them must
exit 0, pass ``hawqtool.contract.check_output`` and write byte-identical ``model.onnx`` files.

Usage:
    python scripts/reliability.py                 # 20 trials of the tiny recipe
    python scripts/reliability.py --trials 40 --seed 1 --keep
Exit status: 0 when every check held, 1 otherwise.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

PNG_END = b"IEND\xaeB`\x82"


@dataclass
class Run:
    """One ``hawqtool quantize`` subprocess."""

    seconds: float
    returncode: int | None  # None: killed
    stderr: str


@dataclass
class Trial:
    index: int
    cold: bool
    delay: float
    run: Run
    checked: int = 0
    problems: list[str] = field(default_factory=list)
    leftovers: int = 0

    @property
    def outcome(self) -> str:
        if self.run.returncode is None:
            return "killed"
        return f"finished rc={self.run.returncode}"

    @property
    def held(self) -> bool:
        return not self.problems and self.run.returncode in (None, 0)


def quantize(recipe: str, out: Path, cache: Path, *, kill_after: float | None) -> Run:
    """Run the CLI; with ``kill_after``, SIGKILL its process group after that many seconds."""
    env = {**os.environ, "HAWQTOOL_CACHE": str(cache), "OMP_WAIT_POLICY": "PASSIVE"}
    cmd = [sys.executable, "-m", "hawqtool.cli", "quantize", recipe, "--out", str(out), "-q"]
    with tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
        try:
            proc.wait(timeout=kill_after)
            code: int | None = proc.returncode
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            code = None
        seconds = time.perf_counter() - t0
        err.seek(0)
        return Run(seconds, code, err.read().decode(errors="replace"))


def is_temporary(path: Path) -> bool:
    return path.name.startswith(".") and path.name.endswith(".tmp")


def check_file(path: Path) -> str | None:
    """Why ``path`` is not a whole file of its kind, or None."""
    suffix = path.suffix
    try:
        data = path.read_bytes()
        if suffix == ".json":
            json.loads(data)
        elif suffix == ".onnx":
            import onnx

            onnx.checker.check_model(onnx.load(str(path)), full_check=True)
        elif suffix == ".png":
            if not data.endswith(PNG_END):
                return "PNG without its IEND chunk"
        elif suffix in (".csv", ".md"):
            text = data.decode()
            if not text.endswith("\n"):
                return "text does not end with a newline"
            if suffix == ".csv":
                rows = list(csv.reader(io.StringIO(text)))
                widths = {len(r) for r in rows}
                if len(widths) != 1:
                    return f"CSV rows of widths {sorted(widths)}"
        elif suffix == ".pt":
            import torch

            torch.load(io.BytesIO(data), weights_only=True)
        else:
            return None
    # Whatever a reader raises on a damaged file is the finding.
    except Exception as e:  # noqa: BLE001
        return f"{type(e).__name__}: {str(e)[:120]}"
    return None


def check_tree(*roots: Path) -> tuple[int, list[str], int]:
    """(files checked, problems, temporary files left) under ``roots``."""
    checked, problems, leftovers = 0, [], 0
    for root in roots:
        if not root.exists():
            continue
        for path in sorted(p for p in root.rglob("*") if p.is_file()):
            if is_temporary(path):
                leftovers += 1
                continue
            checked += 1
            why = check_file(path)
            if why is not None:
                problems.append(f"{path.relative_to(root.parent)}: {why}")
    return checked, problems, leftovers


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def completed(recipe: str, out: Path, cache: Path, label: str) -> tuple[Run, str | None, list[str]]:
    """A run to completion: (run, model sha256, contract problems)."""
    from hawqtool.contract import check_output

    run = quantize(recipe, out, cache, kill_after=None)
    problems = [] if run.returncode == 0 else [f"{label}: exit {run.returncode}: {run.stderr[-400:]}"]
    problems += [f"{label}: {p}" for p in check_output(out)]
    model = out / "model.onnx"
    return run, sha256(model) if model.is_file() else None, problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--recipe", default="tiny", help="recipe name or YAML (default: %(default)s)")
    parser.add_argument("--trials", type=int, default=20, help="kill trials (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill delays (default: %(default)s)")
    parser.add_argument(
        "--cold-every",
        type=int,
        default=4,
        help="empty the cache before every Nth trial (default: %(default)s)",
    )
    parser.add_argument("--workdir", type=Path, default=None, help="default: a new temporary folder")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    args = parser.parse_args()
    if args.trials < 1 or args.cold_every < 1:
        parser.error(f"--trials and --cold-every must be >= 1, got {args.trials} and {args.cold_every}")

    work = args.workdir or Path(tempfile.mkdtemp(prefix="hawqtool-reliability-"))
    work.mkdir(parents=True, exist_ok=True)
    cache, out = work / "cache", work / "out"
    rng = random.Random(args.seed)
    problems: list[str] = []

    print(f"work folder {work}; recipe {args.recipe}; {args.trials} trials, seed {args.seed}")
    cold_ref, sha_cold, p = completed(args.recipe, work / "ref-cold", cache, "reference run (cold cache)")
    problems += p
    warm_ref, sha_warm, p = completed(args.recipe, work / "ref-warm", cache, "reference run (warm cache)")
    problems += p
    print(f"reference runs: cold {cold_ref.seconds:.1f} s, warm {warm_ref.seconds:.1f} s")

    trials = []
    for i in range(1, args.trials + 1):
        cold = i % args.cold_every == 1 or args.cold_every == 1
        if cold:
            shutil.rmtree(cache, ignore_errors=True)
        span = cold_ref.seconds if cold else warm_ref.seconds
        delay = rng.uniform(0.0, span)
        trial = Trial(i, cold, delay, quantize(args.recipe, out, cache, kill_after=delay))
        trial.checked, trial.problems, trial.leftovers = check_tree(out, cache)
        if trial.run.returncode not in (None, 0):
            trial.problems.append(f"exit {trial.run.returncode}: {trial.run.stderr[-300:]}")
        trials.append(trial)
        verdict = f"{trial.checked} files whole" if not trial.problems else f"PROBLEMS {trial.problems}"
        cache_state = "cold" if cold else "warm"
        print(
            f"  trial {i:2d}: {cache_state} cache, kill at {delay:5.1f} s: {trial.outcome}, {verdict}",
            flush=True,
        )

    final, sha_final, p = completed(args.recipe, out, cache, "re-run after the trials")
    problems += p
    shas = {sha_cold, sha_warm, sha_final}
    identical = len(shas) == 1 and None not in shas
    if not identical:
        problems.append(f"model.onnx differs between completed runs: {sorted(map(str, shas))}")

    print()
    print(
        "| trial | cache | kill at (s) | outcome | final-name files checked | half-written | temp files left | held |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for t in trials:
        print(
            f"| {t.index} | {'cold' if t.cold else 'warm'} | {t.delay:.1f} | {t.outcome} | {t.checked} "
            f"| {len(t.problems)} | {t.leftovers} | {'yes' if t.held else 'NO'} |"
        )
    held = sum(t.held for t in trials)
    killed = sum(t.run.returncode is None for t in trials)
    print()
    print(
        f"trials: {len(trials)} ({killed} killed, {len(trials) - killed} finished before the kill); held: {held}"
    )
    print(
        f"completed runs: cold reference rc={cold_ref.returncode} ({cold_ref.seconds:.1f} s), warm reference "
        f"rc={warm_ref.returncode} ({warm_ref.seconds:.1f} s), re-run after the trials rc={final.returncode} "
        f"({final.seconds:.1f} s)"
    )
    print(f"model.onnx identical across the 3 completed runs: {'yes' if identical else 'NO'} ({sha_final})")
    for line in problems + [f"trial {t.index}: {q}" for t in trials for q in t.problems]:
        print(f"PROBLEM {line}")
    if not args.keep and args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)
    ok = not problems and held == len(trials)
    print("all checks held" if ok else "SOME CHECKS FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
