#!/usr/bin/env bash
# A shorter ListOps run for a CPU: the paper's model (2 layers, hidden 64, FFN 128, 2 heads, w = 16, r = 2) with
# a CLS token in front of the tokens (--pooling cls) instead of the paper's post-CLS, batch 32, 2000 steps at
# lr 5e-4 (200 warmup steps, then linear decay), length-bucketed batches (each run of 16 batches sorted by
# length: about half the padding of random batches). Validation on 512 examples every 250 steps, then the full
# validation and test sets.
#
# Why not post-CLS here: with it the model stayed at the label prior (17%) for 1300 steps at lr 5e-4 (Megatron's
# 0.02 init) and 550 steps at the released code's init scale (0.07); the CLS token sees the root operator in its
# window from the first layer on and leaves the prior within a few hundred steps (docs/classification.md).
# --init-method-std 0.07 is the scale of the released code's PyTorch-default linear init.
#
# Usage: DATA=data/listops/listops bash examples/listops/train_cpu.sh [extra flags]
# About 1 hour on one free CPU core (~1 s per step); the measured run is in docs/classification.md.
set -euo pipefail
DATA="${DATA:-data/listops/listops}"
RUN="${RUN:-listops_cpu}"
LAUNCHER="${LAUNCHER:-python}"
${LAUNCHER} tasks/main.py --task LISTOPS --data-path "${DATA}" \
  --num-layers 2 --hidden-size 64 --num-attention-heads 2 --ffn-hidden-size 128 --seq-length 2048 \
  --window-size 16 --projection-rank 2 --pooling cls \
  --hidden-dropout 0 --attention-dropout 0 --init-method-std 0.07 \
  --micro-batch-size "${MICRO_BATCH:-32}" --global-batch-size 32 --train-iters "${ITERS:-2000}" --bucket-batches 16 \
  --lr "${LR:-5e-4}" --min-lr 0 --lr-warmup-iters 200 --lr-decay-style linear --weight-decay 0 --adam-eps 1e-6 \
  --clip-grad 0 --seed "${SEED:-1234}" \
  --log-interval 50 --eval-interval 250 --eval-iters 16 \
  --save "checkpoints/${RUN}" --save-interval 500 --tensorboard-dir "runs/${RUN}" \
  --results-json "runs/${RUN}/results.json" "$@"
