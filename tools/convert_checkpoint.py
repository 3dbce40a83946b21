#!/usr/bin/env python
"""Re-shard a GPT-LS training checkpoint to another TP/PP layout, merge it into one consolidated file, or export
it as a Hugging Face model (``trust_remote_code``) with its Long-Short decoding cache.

  python tools/convert_checkpoint.py --load ckpt_tp2pp2 --save ckpt_tp1 --target-tensor-parallel-size 1
  python tools/convert_checkpoint.py --load ckpt_tp2pp2 --consolidated-dir model_for_inference
  python tools/convert_checkpoint.py --load ckpt_tp2pp2 --to-hf hf_model   # or --load a consolidated dir

Checkpoints saved with context parallelism convert like any other (CP replicates the weights; the result has
CP = 1 and DP = 1). The re-sharded checkpoint carries the optimizer state (fp32 master weights, Adam moments, LR
schedule, counters) whenever the source has it: continue training with ``--load DIR`` (any DP size and ZeRO
stage); otherwise it holds weights only: continue with ``--load DIR --finetune``.
The consolidated directory holds ``model.safetensors`` (full weights, GPTModel names) and ``config.json``.
The Hugging Face directory loads with ``AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)``
(docs/inference.md, "Hugging Face export"); the tokenizer comes from the checkpoint's flags unless given here.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None) -> None:
    from megatron_ls.arguments import FriendlyArgumentParser
    from megatron_ls.data.tokenizers import TOKENIZER_TYPES

    p = FriendlyArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--load", required=True, help="training checkpoint directory (with its 'latest' marker), or a "
                   "consolidated directory (with --consolidated-dir / --to-hf only)")
    p.add_argument("--save", default=None, help="write a re-sharded training checkpoint here")
    p.add_argument("--target-tensor-parallel-size", type=int, default=1)
    p.add_argument("--target-pipeline-model-parallel-size", type=int, default=1)
    p.add_argument("--consolidated-dir", default=None, help="write model.safetensors + config.json here")
    hf = p.add_argument_group("Hugging Face export")
    hf.add_argument("--to-hf", default=None, metavar="DIR", help="write a Hugging Face model directory here "
                    "(config.json, model.safetensors, remote-code modeling files, tokenizer files)")
    hf.add_argument("--hf-dtype", default=None, choices=("float32", "bfloat16", "float16"),
                    help="cast the exported weights (default: as stored)")
    hf.add_argument("--tokenizer-type", default=None, choices=TOKENIZER_TYPES,
                    help="tokenizer to export (default: the checkpoint's)")
    hf.add_argument("--vocab-file", default=None, help="GPT-2 BPE vocab.json (default: the checkpoint's)")
    hf.add_argument("--merge-file", default=None, help="GPT-2 BPE merges.txt (default: the checkpoint's)")
    hf.add_argument("--tokenizer-model", default=None,
                    help="SentencePiece model (copied along) or Hugging Face tokenizer directory (saved along)")
    args = p.parse_args(argv)
    if not args.save and not args.consolidated_dir and not args.to_hf:
        p.error("nothing to do: give --save, --consolidated-dir and/or --to-hf")
    from megatron_ls.inference.checkpoint_io import InferenceCheckpointError
    from megatron_ls.inference.cli_common import check_at_least
    from megatron_ls.inference.convert import convert
    from megatron_ls.inference.vit_checkpoint import consolidate_vision_checkpoint, is_vision_checkpoint
    from megatron_ls.training.checkpointing import CheckpointError

    check_at_least("--target-tensor-parallel-size", args.target_tensor_parallel_size, 1)
    check_at_least("--target-pipeline-model-parallel-size", args.target_pipeline_model_parallel_size, 1)
    for flag, path in (("--vocab-file", args.vocab_file), ("--merge-file", args.merge_file),
                       ("--tokenizer-model", args.tokenizer_model)):
        if path is not None and not os.path.isfile(path):  # given explicitly: not a note, an error
            raise ValueError(f"{flag} {path}: no such file")
    for flag, path in (("--save", args.save), ("--consolidated-dir", args.consolidated_dir), ("--to-hf", args.to_hf)):
        if path is not None:  # fail before the (long) conversion, naming the flag, without creating anything
            ancestor = os.path.abspath(path)
            while not os.path.exists(ancestor):
                ancestor = os.path.dirname(ancestor)
            if not os.path.isdir(ancestor) or not os.access(ancestor, os.W_OK | os.X_OK):
                raise ValueError(f"{flag} {path}: cannot create this directory ({ancestor} is not a writable "
                                 f"directory)")
    if is_vision_checkpoint(args.load):  # ViT-LS / ViL-LS (pretrain_vit_ls.py): consolidation only
        if args.save or args.to_hf or not args.consolidated_dir:
            p.error("vision checkpoints convert with --consolidated-dir only (no --save re-sharding, no --to-hf)")
        print(f" wrote consolidated: {consolidate_vision_checkpoint(args.load, args.consolidated_dir)}")
        return
    written = convert(args.load, save_dir=args.save, target_tp=args.target_tensor_parallel_size,
                      target_pp=args.target_pipeline_model_parallel_size,
                      consolidated_dir=args.consolidated_dir, hf_dir=args.to_hf, hf_dtype=args.hf_dtype,
                      hf_tokenizer={"tokenizer_type": args.tokenizer_type, "vocab_file": args.vocab_file,
                                    "merge_file": args.merge_file, "tokenizer_model": args.tokenizer_model})
    for note in written.pop("notes", []):
        print(f" {note}")
    for kind, path in written.items():
        print(f" wrote {kind}: {path}")
    if args.save:
        try:
            carried = carry_optimizer_state(args.load, args.save, args.target_tensor_parallel_size,
                                            args.target_pipeline_model_parallel_size)
        except (CheckpointError, InferenceCheckpointError, OSError) as exc:
            carried = False
            print(f" optimizer state not carried over: {exc}")
        print(f" continue training with --load {args.save}" if carried else
              f" weights only: continue training with --load {args.save} --finetune")


def carry_optimizer_state(load_dir: str, save_dir: str, tp: int, pp: int) -> bool:
    """Re-shard the Adam state (and LR schedule, counters) of ``load_dir`` next to the weights in ``save_dir``."""
    from megatron_ls.checkpoint_files import read_latest_tag, read_metadata
    from megatron_ls.config import transformer_config_from_dict
    from megatron_ls.inference.convert import partition_dims
    from megatron_ls.model import GPTModel
    from megatron_ls.training.optimizer_reshard import reshard_optimizer_states

    config = transformer_config_from_dict(read_metadata(load_dir, read_latest_tag(load_dir))["args"]["model"])
    model = GPTModel(config)
    shapes = {name: param.shape for name, param in model.named_parameters()}
    return reshard_optimizer_states(load_dir, save_dir, shapes, partition_dims(config), model, tp, pp)


def cli() -> None:
    """Command-line entry: known failures end in one line ``error: ...`` and exit status 1."""
    from megatron_ls.training.faults import run_tool

    run_tool(main)


if __name__ == "__main__":
    cli()
