#!/usr/bin/env bash
# The GPU check of the Hessian and dependency stages (scripts/device_check.py), as one short run.
#
# Uses $PYTHON, else .venv/bin/python, else python3 (it needs a CUDA build of torch to check the
# GPU; with a CPU-only torch it runs the CPU half and exits 0). The repository is put on
# PYTHONPATH, so hawqtool need not be installed. The whole run is capped at $DEVICE_CHECK_TIMEOUT
# seconds (default 540).
#
#   bash scripts/device_check.sh [--models default transformer-digits]
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
py="${PYTHON:-}"
if [[ -z "$py" ]]; then
    if [[ -x .venv/bin/python ]]; then py=.venv/bin/python; else py=python3; fi
fi
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
export OMP_WAIT_POLICY=PASSIVE
"$py" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available())"
exec timeout "${DEVICE_CHECK_TIMEOUT:-540}" "$py" scripts/device_check.py "$@"
