#!/usr/bin/env bash
# Transformer-LS large on enwik8 (paper Table 2 right / Appendix C): 30 layers, hidden 512, 8 heads,
# w = 512, l = 16, r = 1, dropout 0.4, weight decay 0.1, lr 2.5e-4, 3 phases (seq 2048 / 4096 / 8192).
#
# Usage: DATA_PREFIX=data/enwik8/enwik8_text_document bash examples/enwik8/train_large.sh
# Environment knobs (phases, launcher, batch, precision, parallelism) are listed in
# examples/common/char_lm_phases.sh. For tight GPU memory add e.g. EXTRA_ARGS="--recompute-activations" or
# PARALLEL_ARGS="--zero-stage 1".
#
# Differences from the paper: relative position encodings and the Transformer-XL memory of the paper's model are
# not implemented; this GPT-LS uses learned absolute positions.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=../common/char_lm_phases.sh
source "${HERE}/../common/char_lm_phases.sh"

RUN_NAME="${RUN_NAME:-enwik8_ls_large}"
DATA_PREFIX="${DATA_PREFIX:-data/enwik8/enwik8_text_document}"
SPLIT="${SPLIT:-90,5,5}"
LR="${LR:-2.5e-4}"
MODEL_ARGS=(
  --num-layers 30 --hidden-size 512 --num-attention-heads 8
  --window-size 512 --segment-length 16 --projection-rank 1
  --hidden-dropout 0.4 --attention-dropout 0.4 --weight-decay 0.1
  --seed "${SEED:-1234}"
)
run_char_lm_phases
