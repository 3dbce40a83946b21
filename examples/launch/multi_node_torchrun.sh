#!/usr/bin/env bash
# Several nodes with torchrun: run this script once on EVERY node (same settings, its own NODE_RANK).
#
# Usage, on node i of N:
#   NNODES=N NODE_RANK=i MASTER_ADDR=<node 0 host/IP> NPROC=8 DATA_PATH=... \
#     bash examples/launch/multi_node_torchrun.sh [extra pretrain_gpt_ls.py flags]
#
# RDZV=static (default): fixed ranks, torchrun --node-rank $NODE_RANK --master-addr $MASTER_ADDR --master-port.
# RDZV=c10d: elastic rendezvous at --rdzv-endpoint $MASTER_ADDR:$MASTER_PORT (torchrun assigns node ranks; a
#   shared RDZV_ID, default $SLURM_JOB_ID or "gpt_ls", names the job); NODE_RANK is then not needed.
# MASTER_PORT defaults to 29500 and must be reachable from every node. Model / data / parallel settings come
# from the environment (examples/launch/common.sh); all nodes need the same data path and code.
# NCCL tips: export NCCL_SOCKET_IFNAME=<interface> (and NCCL_IB_HCA for InfiniBand) if the default is wrong.
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
build_gpt_args

: "${NNODES:?set NNODES (number of nodes)}"
: "${MASTER_ADDR:?set MASTER_ADDR (host name or IP of node 0)}"
MASTER_PORT="${MASTER_PORT:-29500}"
case "${RDZV:-static}" in
  static)
    : "${NODE_RANK:?set NODE_RANK (0 .. NNODES-1) on each node}"
    RDZV_ARGS=(--node-rank "${NODE_RANK}" --master-addr "${MASTER_ADDR}" --master-port "${MASTER_PORT}")
    ;;
  c10d)
    RDZV_ARGS=(--rdzv-backend c10d --rdzv-endpoint "${MASTER_ADDR}:${MASTER_PORT}"
               --rdzv-id "${RDZV_ID:-${SLURM_JOB_ID:-gpt_ls}}")
    ;;
  *) echo "RDZV must be static or c10d, got '${RDZV}'" >&2; exit 2 ;;
esac

set -x
torchrun --nnodes "${NNODES}" --nproc-per-node "${NPROC:-8}" "${RDZV_ARGS[@]}" \
  "${PRETRAIN_SCRIPT}" "${GPT_ARGS[@]}" "$@"
