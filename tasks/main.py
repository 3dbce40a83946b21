#!/usr/bin/env python
"""Sequence-classification tasks (Megatron's ``tasks/main.py``): LRA ListOps and the FAR_RECALL probe.

    python tools/generate_task_data.py --task LISTOPS --output-prefix data/listops/listops
    python tasks/main.py --task LISTOPS --data-path data/listops/listops --num-layers 2 --hidden-size 64 \\
        --num-attention-heads 2 --ffn-hidden-size 128 --seq-length 2048 --window-size 16 --projection-rank 2 \\
        --cls-last-layer --micro-batch-size 32 --train-iters 5000 --lr 1e-4 ...

Model flags are the pretraining ones (attention is bidirectional here); data come from ``--data-path PREFIX``
(``PREFIX_meta.json`` + splits). Runs as plain ``python``, under ``torchrun`` or under ``deepspeed``.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_ls.arguments import Arguments, parse_args  # noqa: E402
from megatron_ls.training.initialize import select_accelerator  # noqa: E402

TASKS = ("LISTOPS", "FAR_RECALL")


def task_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("Classification task")
    group.add_argument("--task", dest="extra.task", required=True, choices=TASKS,
                       help="Task; must match the task recorded in PREFIX_meta.json.")
    group.add_argument("--pooling", dest="extra.pooling", choices=("mean", "cls"), default="mean",
                       help="Pool the final layer by the mean over unpadded tokens, or by a CLS token put in "
                            "front of the tokens (an ordinary token in every layer). Default: mean.")
    group.add_argument("--cls-last-layer", dest="extra.cls_last_layer", action="store_true",
                       help="The released LRA 'post-CLS': a learned CLS vector joins only the last layer, where "
                            "it attends to its own key and that layer's token outputs; its output is pooled.")
    group.add_argument("--cls-init-std", dest="extra.cls_init_std", type=float, default=0.0,
                       help="Initialise the --cls-last-layer CLS vector from a normal with this std (0 = zeros, as "
                            "released; zeros start the CLS query, key and value at exactly 0). Default: 0.")
    group.add_argument("--bucket-batches", dest="extra.bucket_batches", type=int, default=0,
                       help="Sort each run of this many global batches by length before cutting it into batches "
                            "(less padding, faster on long-tailed lengths); 0 = plain shuffled batches. Default: 0.")
    group.add_argument("--results-json", dest="extra.results_json", default=None,
                       help="Write accuracies, evaluation history and training losses here (rank 0).")


def main(argv=None) -> dict:
    args: Arguments = parse_args(argv, description="Sequence classification with a bidirectional Long-Short "
                                                   "Transformer (LRA ListOps, FAR_RECALL probe).",
                                 extra_args_provider=task_args, defaults={"model.causal": False})
    from tasks.classification import train_classification

    return train_classification(args)


def cli() -> None:
    select_accelerator()
    from megatron_ls.training.pretrain import run_main

    run_main(lambda: main(sys.argv[1:]))


if __name__ == "__main__":
    cli()
