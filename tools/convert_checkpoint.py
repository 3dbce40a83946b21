#!/usr/bin/env python
"""Re-shard a GPT-LS training checkpoint to another TP/PP layout, or merge it into one consolidated file.

  python tools/convert_checkpoint.py --load ckpt_tp2pp2 --save ckpt_tp1 --target-tensor-parallel-size 1
  python tools/convert_checkpoint.py --load ckpt_tp2pp2 --consolidated-dir model_for_inference

Checkpoints saved with context parallelism convert like any other (CP replicates the weights; the result has
CP = 1 and DP = 1). The re-sharded checkpoint holds model weights only: continue training from it with
``--load DIR --finetune``.
The consolidated directory holds ``model.safetensors`` (full weights, GPTModel names) and ``config.json``.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--load", required=True, help="training checkpoint directory (with its 'latest' marker)")
    p.add_argument("--save", default=None, help="write a re-sharded training checkpoint here")
    p.add_argument("--target-tensor-parallel-size", type=int, default=1)
    p.add_argument("--target-pipeline-model-parallel-size", type=int, default=1)
    p.add_argument("--consolidated-dir", default=None, help="write model.safetensors + config.json here")
    args = p.parse_args(argv)
    if not args.save and not args.consolidated_dir:
        p.error("nothing to do: give --save and/or --consolidated-dir")
    from megatron_ls.inference.checkpoint_io import InferenceCheckpointError
    from megatron_ls.inference.convert import convert
    from megatron_ls.training.checkpointing import CheckpointError

    try:
        written = convert(args.load, save_dir=args.save, target_tp=args.target_tensor_parallel_size,
                          target_pp=args.target_pipeline_model_parallel_size,
                          consolidated_dir=args.consolidated_dir)
    except (CheckpointError, InferenceCheckpointError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)
    for kind, path in written.items():
        print(f" wrote {kind}: {path}")


if __name__ == "__main__":
    main()
