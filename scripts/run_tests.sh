#!/usr/bin/env bash
# The README's test command: installs what the suite needs, then runs unit, distributed and e2e tests.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
bash scripts/install.sh
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/.torch_extensions}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
# --durations: every CI log names the slowest tests, so the suite can be kept inside its time budget.
"$PY" -m pytest tests --durations=25 "$@"
