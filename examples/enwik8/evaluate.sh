#!/usr/bin/env bash
# Test bits per character of a trained enwik8 model with the paper's sliding-window protocol (stride 512: every
# window scores its last 512 characters given the characters before them).
#
# Usage: bash examples/enwik8/evaluate.sh [CHECKPOINT_DIR=checkpoints/enwik8_ls_small/phase3]
#   CHECKPOINT_DIR: a --save directory trained with TP=1, PP=1 and ZeRO < 3, or a consolidated directory
#                   written by tools/convert_checkpoint.py (needed for TP/PP/ZeRO-3 checkpoints).
# Environment: DATA_PREFIX (default data/enwik8/enwik8_text_document), SPLIT (90,5,5), SPLIT_PART (test | valid),
#   EVAL_SEQ_LENGTH (8192), STRIDE (512), PRECISION (--bf16; "" for fp32), MAX_TOKENS (evaluate a prefix only),
#   OUTPUT_JSON (default CHECKPOINT_DIR/eval_<part>_<len>.json).
#
# The paper evaluates with 32K-character windows. That relies on its relative positions and Transformer-XL
# memory; a GPT-LS with learned absolute positions can only use windows up to --max-position-embeddings (8192
# in these recipes), so the default window here is 8192 (each scored character sees 7680+ characters of context).
set -euo pipefail
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
CHECKPOINT_DIR="${1:-checkpoints/enwik8_ls_small/phase3}"
DATA_PREFIX="${DATA_PREFIX:-data/enwik8/enwik8_text_document}"
SPLIT_PART="${SPLIT_PART:-test}"
EVAL_SEQ_LENGTH="${EVAL_SEQ_LENGTH:-8192}"
OUTPUT_JSON="${OUTPUT_JSON:-${CHECKPOINT_DIR}/eval_${SPLIT_PART}_${EVAL_SEQ_LENGTH}.json}"
EXTRA=()
if [[ -n "${MAX_TOKENS:-}" ]]; then EXTRA+=(--max-tokens "${MAX_TOKENS}"); fi

# shellcheck disable=SC2086  # PRECISION is zero or one flag
"${PYTHON:-python}" "${REPO_ROOT}/tools/evaluate.py" \
  --load "${CHECKPOINT_DIR}" \
  --data-path "${DATA_PREFIX}" --split "${SPLIT:-90,5,5}" --split-part "${SPLIT_PART}" \
  --eval-seq-length "${EVAL_SEQ_LENGTH}" --stride "${STRIDE:-512}" \
  ${PRECISION---bf16} \
  --json "${OUTPUT_JSON}" "${EXTRA[@]}"
