#!/usr/bin/env bash
# Several nodes with the DeepSpeed launcher: run ONCE, on the first node of the hostfile; it starts the
# processes on every node over passwordless ssh (pdsh by default) and sets RANK / LOCAL_RANK / WORLD_SIZE.
#
# Usage: HOSTFILE=examples/launch/hostfile.example DATA_PATH=... bash examples/launch/deepspeed_hostfile.sh [flags]
#   HOSTFILE     "<host> slots=<GPUs>" lines (see hostfile.example)      [examples/launch/hostfile.example]
#   NUM_NODES    use only the first N hosts of the hostfile              [all]
#   NUM_GPUS     processes per node                                      [the host's slots]
#   MASTER_ADDR  address of the first host as the others see it          [the first host in HOSTFILE]
#   MASTER_PORT  [29500]     DS_LAUNCHER  pdsh | openmpi | mvapich | slurm | ...   [pdsh]
#   DS_LAUNCHER_ARGS  more deepspeed-launcher flags, e.g. "--no_ssh_check" (a one-host hostfile without ssh)
# Every node needs the same code, environment (virtualenv) and data path; DeepSpeed exports the variables named
# in ~/.deepspeed_env (e.g. NCCL_SOCKET_IFNAME=eth0, PYTHONPATH=...) to all nodes.
# pretrain_gpt_ls.py accepts the --local_rank flag this launcher passes.
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
build_gpt_args

HOSTFILE="${HOSTFILE:-${LAUNCH_REPO_ROOT}/examples/launch/hostfile.example}"
if [[ ! -f "${HOSTFILE}" ]]; then echo "HOSTFILE ${HOSTFILE}: no such file" >&2; exit 2; fi
FIRST_HOST="$(awk '!/^[[:space:]]*(#|$)/ {print $1; exit}' "${HOSTFILE}")"
DS_ARGS=(--hostfile "${HOSTFILE}" --master_addr "${MASTER_ADDR:-${FIRST_HOST}}"
         --master_port "${MASTER_PORT:-29500}" --launcher "${DS_LAUNCHER:-pdsh}")
if [[ -n "${NUM_NODES:-}" ]]; then DS_ARGS+=(--num_nodes "${NUM_NODES}"); fi
if [[ -n "${NUM_GPUS:-}" ]]; then DS_ARGS+=(--num_gpus "${NUM_GPUS}"); fi
# shellcheck disable=SC2206  # word splitting intended: a list of flags
if [[ -n "${DS_LAUNCHER_ARGS:-}" ]]; then DS_ARGS+=(${DS_LAUNCHER_ARGS}); fi

set -x
deepspeed "${DS_ARGS[@]}" "${PRETRAIN_SCRIPT}" "${GPT_ARGS[@]}" "$@"
