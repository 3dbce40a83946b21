#!/usr/bin/env bash
# One node, NPROC processes (one per GPU) started by torchrun; DeepSpeed runs inside pretrain_gpt_ls.py.
#
# Usage: DATA_PATH=data/enwik8/enwik8_text_document NPROC=8 bash examples/launch/single_node_torchrun.sh [flags]
#   e.g. NPROC=8 TP=2 ZERO=1 ...   (TP x PP must divide NPROC; the rest is data parallel)
# Model / data / parallel settings come from the environment (see examples/launch/common.sh); extra
# pretrain_gpt_ls.py flags given here are appended last and override them. On a CPU-only machine this runs
# with gloo and DS_ACCELERATOR=cpu (set automatically), e.g. NPROC=2 PRECISION="" for a smoke test.
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
build_gpt_args

set -x
torchrun --standalone --nnodes 1 --nproc-per-node "${NPROC:-8}" \
  "${PRETRAIN_SCRIPT}" "${GPT_ARGS[@]}" "$@"
