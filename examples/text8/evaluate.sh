#!/usr/bin/env bash
# Test bits per character of a trained text8 model with the paper's sliding-window protocol (stride 512).
#
# Usage: bash examples/text8/evaluate.sh [CHECKPOINT_DIR=checkpoints/text8_ls_small/phase3]
# Same environment knobs as examples/enwik8/evaluate.sh (DATA_PREFIX defaults to data/text8/text8_text_document).
# The paper's 32K windows need relative positions; with learned absolute positions the window is capped at
# --max-position-embeddings (8192 in these recipes), which is the default here.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
DATA_PREFIX="${DATA_PREFIX:-data/text8/text8_text_document}" \
  exec bash "${HERE}/../enwik8/evaluate.sh" "${1:-checkpoints/text8_ls_small/phase3}"
