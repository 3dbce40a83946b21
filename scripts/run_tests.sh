#!/usr/bin/env bash
# The README's test command: installs what the suite needs, then runs unit, distributed and e2e tests.
#   bash scripts/run_tests.sh [pytest args, e.g. -k vit or -x]
# Two passes: the tests that run in one process (or one child process) spread over every core with
# pytest-xdist (PYTEST_JOBS, default: the number of cores); then the multi-process ones (marked `distributed` or
# `mpi`: torchrun/mpirun with 2-4 ranks, which already fill the cores) one at a time, so their ranks never
# compete with other tests for the CPU. Both passes end with their 25 slowest tests (--durations).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
bash scripts/install.sh
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/.torch_extensions}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
JOBS=${PYTEST_JOBS:-$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)}  # nproc alone obeys OMP_NUM_THREADS

status=0
run_pass() {  # pytest exit 5 = this pass selected no test (e.g. a -k that matches only the other pass)
  local rc=0
  "$PY" -m pytest tests --durations=25 "$@" || rc=$?
  if (( rc != 0 && rc != 5 )); then status=$rc; fi
}
echo "== pass 1: single-process tests on $JOBS workers"
run_pass -m "not distributed and not mpi" -n "$JOBS" "$@"
echo "== pass 2: multi-process tests (torchrun / mpirun), one at a time"
run_pass -m "distributed or mpi" "$@"
exit $status
