#!/usr/bin/env bash
# A small ViT-LS on Fashion-MNIST from Debian's dataset-fashion-mnist (offline), on CPU. Extra flags are passed on.
#   OMP_NUM_THREADS=1 NPROC=2 bash examples/vision/fashion_mnist.sh --results-json fmnist_run.json
# NPROC > 1 launches that many data-parallel ranks with torchrun (global batch stays 128); on a 2-core CPU, two
# one-thread ranks step faster than one two-thread process. 4 LS layers of width 96 on a 7x7 grid (+ CLS) behind
# a two-conv stem (64, 128 channels), shifts of up to 2 px + flips; 14500 iterations = 30.9 epochs: 92.01% test
# top-1 (92.43% with eval_image_classifier.py --hflip-tta) in 106 min, 0.39-0.47 s per step with NPROC=2 on 2 idle
# cores of a shared host (benchmarks/results/vision_fashion_mnist_cpu.json).
set -euo pipefail
cd "$(dirname "$0")/../.."
DATA=${DATA:-/usr/share/datasets/fashion-mnist}
NPROC=${NPROC:-1}
[[ -d "$DATA" ]] || { echo "no $DATA: apt-get install dataset-fashion-mnist (or set DATA=...)" >&2; exit 1; }
(( NPROC >= 1 && 128 % NPROC == 0 )) || { echo "NPROC=$NPROC must divide the global batch 128" >&2; exit 1; }
LAUNCH=(python)
(( NPROC > 1 )) && LAUNCH=(python -m torch.distributed.run --standalone --nproc_per_node "$NPROC")
"${LAUNCH[@]}" pretrain_vit_ls.py --data-path "$DATA" --img-h 28 --img-w 28 --num-channels 1 --patch-dim 4 \
    --num-classes 10 --image-mean 0.286 --image-std 0.353 --eval-crop-fraction 1.0 --crop-padding 2 \
    --hflip-prob 0.5 --label-smoothing 0.1 --conv-stem-channels 64 128 \
    --num-layers 4 --hidden-size 96 --num-attention-heads 4 --window-size 3 --projection-rank 4 \
    --global-batch-size 128 --micro-batch-size $((128 / NPROC)) \
    --lr 2e-3 --min-lr 1e-5 --lr-warmup-iters 300 --weight-decay 0.05 --clip-grad 1.0 \
    --train-iters 14500 --log-interval 100 --eval-interval 1000 --eval-iters 79 \
    --save "${SAVE:-checkpoints/fashion_mnist_vit_ls}" --save-interval 1000 --seed 1234 "$@"
