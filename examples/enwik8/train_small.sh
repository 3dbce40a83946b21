#!/usr/bin/env bash
# Transformer-LS small on enwik8 (paper Table 2 left / Appendix C): 12 layers, hidden 512, 8 heads,
# w = 512, l = 16, r = 1, dropout 0.2, weight decay 0.01, lr 2.5e-4, 3 phases (seq 2048 / 4096 / 8192).
#
# Usage: DATA_PREFIX=data/enwik8/enwik8_text_document bash examples/enwik8/train_small.sh
# The paper trained on 8 V100s for ~8 days (all phases). Phase control, launcher, batch and precision settings
# are environment variables documented in examples/common/char_lm_phases.sh, e.g.
#   PHASES=1 LAUNCHER="torchrun --standalone --nproc-per-node 4" MICRO_BATCH=2 bash examples/enwik8/train_small.sh
#
# Differences from the paper: the paper's model adds relative position encodings to the projected segments and
# a Transformer-XL memory (cache = sequence length); this GPT-LS uses learned absolute positions and no memory.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=../common/char_lm_phases.sh
source "${HERE}/../common/char_lm_phases.sh"

RUN_NAME="${RUN_NAME:-enwik8_ls_small}"
DATA_PREFIX="${DATA_PREFIX:-data/enwik8/enwik8_text_document}"
SPLIT="${SPLIT:-90,5,5}"
LR="${LR:-2.5e-4}"
MODEL_ARGS=(
  --num-layers 12 --hidden-size 512 --num-attention-heads 8
  --window-size 512 --segment-length 16 --projection-rank 1
  --hidden-dropout 0.2 --attention-dropout 0.2 --weight-decay 0.01
  --seed "${SEED:-1234}"
)
run_char_lm_phases
