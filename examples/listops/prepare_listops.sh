#!/usr/bin/env bash
# Generate LRA ListOps (96K/2K/2K, 500 < length < 2000, depth <= 10, <= 10 arguments) in the tasks/ format.
# Usage: bash examples/listops/prepare_listops.sh [PREFIX] [extra flags of tools/generate_task_data.py]
#   e.g. bash examples/listops/prepare_listops.sh data/listops/listops --train-samples 20000
# About 3 minutes for the full set on one CPU core. Deterministic for a given --seed (default 1234).
set -euo pipefail
PREFIX="${1:-data/listops/listops}"
shift || true
mkdir -p "$(dirname "${PREFIX}")"
python tools/generate_task_data.py --task LISTOPS --output-prefix "${PREFIX}" "$@"
