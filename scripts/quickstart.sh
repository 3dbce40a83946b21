#!/usr/bin/env bash
# The README's main job on a fresh machine: install, build the bundled sample corpus, train a small GPT-LS on CPU
# (or GPU) under torchrun with 2 processes (data parallel), and print validation and test bits per byte.
# Override any training flag by appending it: bash scripts/quickstart.sh --train-iters 50
# Environment: DATA_DIR (corpus), RUN (name), CHECKPOINT_DIR, TENSORBOARD_DIR, MEGATRON_LS_SKIP_INSTALL=1 (tests).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[[ "${MEGATRON_LS_SKIP_INSTALL:-0}" == 1 ]] || bash scripts/install.sh
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/.torch_extensions}
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" || export DS_ACCELERATOR=cpu

DATA_DIR=${DATA_DIR:-data/sample}
RUN=${RUN:-quickstart}
CHECKPOINT_DIR=${CHECKPOINT_DIR:-checkpoints/$RUN}
TENSORBOARD_DIR=${TENSORBOARD_DIR:-runs/$RUN}
"$PY" tools/prepare_sample_corpus.py --output-dir "$DATA_DIR"
# 90/5/5 by documents: validation and test are held-out slices of ~70 KB each. RoPE positions (no length cap):
# the model evaluates at 16x its training context (README: tools/evaluate.py --eval-seq-length 8192).
"$PY" -m torch.distributed.run --standalone --nproc_per_node 2 pretrain_gpt_ls.py \
  --data-path "$DATA_DIR/python_docs_text_document" --tokenizer-type ByteTokenizer --split 90,5,5 \
  --num-layers 4 --hidden-size 128 --num-attention-heads 4 --seq-length 512 --position-embedding-type rope \
  --window-size 64 --segment-length 16 --projection-rank 1 \
  --micro-batch-size 4 --global-batch-size 16 --train-iters 200 \
  --lr 2e-3 --min-lr 2e-4 --lr-decay-style cosine --lr-warmup-iters 20 --weight-decay 0.01 --clip-grad 1.0 \
  --hidden-dropout 0.0 --attention-dropout 0.0 \
  --log-interval 20 --eval-interval 100 --eval-iters 5 \
  --save "$CHECKPOINT_DIR" --save-interval 100 --tensorboard-dir "$TENSORBOARD_DIR" "$@"
echo "Checkpoints: $CHECKPOINT_DIR   Tensorboard: tensorboard --logdir $TENSORBOARD_DIR"
