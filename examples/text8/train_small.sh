#!/usr/bin/env bash
# Transformer-LS small on text8 (paper Table 2 left / Appendix C): 12 layers, hidden 512, 8 heads,
# w = 512, l = 16, r = 1, dropout 0.2, weight decay 0.01, lr 5e-4 (the best of the paper's sweep on text8),
# 3 phases (seq 2048 / 4096 / 8192, batch 32 / 32 / 16, 430k / 50k / 50k steps).
#
# Usage: DATA_PREFIX=data/text8/text8_text_document bash examples/text8/train_small.sh
# Environment knobs (phases, launcher, batch, precision, parallelism) are listed in
# examples/common/char_lm_phases.sh.
#
# Differences from the paper: relative position encodings and the Transformer-XL memory of the paper's model are
# not implemented; this GPT-LS uses learned absolute positions.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=../common/char_lm_phases.sh
source "${HERE}/../common/char_lm_phases.sh"

RUN_NAME="${RUN_NAME:-text8_ls_small}"
DATA_PREFIX="${DATA_PREFIX:-data/text8/text8_text_document}"
SPLIT="${SPLIT:-90,5,5}"
LR="${LR:-5e-4}"
MODEL_ARGS=(
  --num-layers 12 --hidden-size 512 --num-attention-heads 8
  --window-size 512 --segment-length 16 --projection-rank 1
  --hidden-dropout 0.2 --attention-dropout 0.2 --weight-decay 0.01
  --seed "${SEED:-1234}"
)
run_char_lm_phases
