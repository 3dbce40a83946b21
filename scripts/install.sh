#!/usr/bin/env bash
# Install megatron_ls and its dependencies into the current Python without ever replacing an existing torch.
# Usage: bash scripts/install.sh [extra pip args]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
pin_file=$(mktemp)
trap 'rm -f "$pin_file"' EXIT
if "$PY" -c "import torch" 2>/dev/null; then
  # Keep whatever torch is there (CPU or CUDA build): constrain pip to exactly that version.
  echo "torch==$("$PY" -c 'import torch; print(torch.__version__.split("+")[0])')" > "$pin_file"
else
  # No torch yet: the pinned CPU build (an unpinned torch pulls several GB of CUDA wheels).
  cp constraints.txt "$pin_file"
  "$PY" -m pip install -q -c "$pin_file" torch
fi
# DeepSpeed builds no CUDA ops at install time; CPU ops are JIT-compiled on first use.
DS_BUILD_OPS=0 "$PY" -m pip install -q -c "$pin_file" -e ".[dev]" "$@"
"$PY" -c "import torch, deepspeed, megatron_ls; print('installed: torch', torch.__version__, '| deepspeed', deepspeed.__version__)"
