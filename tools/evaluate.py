#!/usr/bin/env python
"""Test-set bits per character/byte of a GPT-LS checkpoint with the paper's sliding long-context protocol.

The test split is read as one token stream; windows of ``--eval-seq-length`` tokens advance by ``--stride`` and
only the last ``stride`` predictions of each window are scored (every token is predicted once, each with up to
``eval_seq_length - stride`` tokens of context). The paper uses 32K windows with stride 512 on enwik8/text8.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    from megatron_ls.arguments import FriendlyArgumentParser

    p = FriendlyArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--load", required=True,
                   help="consolidated dir (convert_checkpoint.py) or a TP1/PP1 --save dir (any DP/CP)")
    p.add_argument("--data-path", required=True, help="dataset prefix (.bin/.idx)")
    p.add_argument("--split", default=None, help="train/valid/test document split (default: the one the checkpoint "
                                                 "was trained with, else 969,30,1); --split-part is evaluated")
    p.add_argument("--split-part", choices=("train", "valid", "test"), default="test")
    p.add_argument("--eval-seq-length", type=int, default=None, help="window length (default: model seq length)")
    p.add_argument("--stride", type=int, default=512, help="tokens scored per window")
    p.add_argument("--max-tokens", type=int, default=None, help="evaluate only this many tokens of the split")
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--json", default=None, help="write the result here")
    return p.parse_args(argv)


def split_token_stream(data_path: str, split: str, part: str) -> np.ndarray:
    """Concatenated tokens of the sequences in one split part (the sequence split training uses, Megatron's)."""
    from megatron_ls.data.blend_config import parse_split, split_ranges
    from megatron_ls.data.indexed_dataset import IndexedDataset

    ds = IndexedDataset(data_path)
    bounds = split_ranges(len(ds), parse_split(split))[("train", "valid", "test").index(part)]
    if bounds is None or bounds[1] <= bounds[0]:
        raise ValueError(f"--split {split}: the {part} part of {data_path} has no documents")
    return np.concatenate([np.asarray(ds[i], dtype=np.int64) for i in range(*bounds)])


def model_vocabulary(metadata: dict, config, load: str) -> tuple[int, str]:
    """(ids the model was trained on, where that number comes from): the checkpoint's tokenizer when it recorded
    one (as training checks), else the rows of the embedding table."""
    from megatron_ls.inference.loading import build_inference_tokenizer, tokenizer_settings

    kind = tokenizer_settings(metadata).get("tokenizer_type")
    if kind:
        try:
            return build_inference_tokenizer(metadata, config).vocab_size, f"--tokenizer-type {kind} of {load}"
        except ValueError:
            pass  # its tokenizer files are gone: the embedding table still bounds the ids
    return config.vocab_size, f"the embedding table of {load}"


@torch.no_grad()
def sliding_nll(model, tokens: np.ndarray, window: int, stride: int, device) -> tuple[float, int]:
    """Sum of next-token NLL (nats) over every position after the first, and the count scored."""
    if not 0 < stride <= window - 1:
        raise ValueError(f"--stride {stride} must be in [1, eval-seq-length - 1 = {window - 1}]")
    n = len(tokens)
    # Window k covers inputs [begin, begin + window); it scores the targets not scored by window k-1.
    starts, scored_from = [], []
    pos = 1  # first target index still unscored
    while pos < n:
        end = min(pos + stride, n)
        begin = max(0, end - window)
        starts.append((begin, end))
        scored_from.append(pos)
        pos = end
    total, count = 0.0, 0
    for (begin, end), first_target in zip(starts, scored_from):
        x = torch.from_numpy(tokens[begin:end - 1]).unsqueeze(0).to(device)
        y = torch.from_numpy(tokens[begin + 1:end]).unsqueeze(0).to(device)
        losses = model(x, y)[0].float()  # losses[j] predicts token begin + 1 + j
        keep = losses[first_target - 1 - begin:]
        total += float(keep.sum())
        count += keep.numel()
    return total, count


def main(argv=None) -> dict:
    args = parse_args(argv)
    from megatron_ls.data.token_check import check_token_ids
    from megatron_ls.inference.checkpoint_io import load_gpt_model
    from megatron_ls.inference.cli_common import check_at_least, check_output_file

    check_at_least("--eval-seq-length", args.eval_seq_length, 2)
    check_at_least("--stride", args.stride, 1)
    check_at_least("--max-tokens", args.max_tokens, 2)  # one prediction needs two tokens
    check_output_file("--json", args.json)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, config, metadata = load_gpt_model(args.load, device=device, dtype=torch.bfloat16 if args.bf16 else None)
    split = args.split or metadata.get("args", {}).get("data", {}).get("split") or "969,30,1"
    window = args.eval_seq_length if args.eval_seq_length is not None else config.seq_length
    if config.position_embedding_type == "learned" and window > config.max_position_embeddings:
        raise ValueError(f"--eval-seq-length {window} exceeds the {config.max_position_embeddings} learned positions "
                         f"of {args.load}; evaluate at most {config.max_position_embeddings} tokens per window, or "
                         f"train with --position-embedding-type rope (or none) to evaluate longer windows")
    # The check training does: an id outside the vocabulary crashes the embedding or, if the table is padded,
    # scores a token the model never saw.
    check_token_ids([args.data_path], *model_vocabulary(metadata, config, args.load))
    tokens = split_token_stream(args.data_path, split, args.split_part)
    if args.max_tokens is not None:
        tokens = tokens[:args.max_tokens]
    if len(tokens) < 2:
        raise ValueError(f"the {args.split_part} part of {args.data_path} holds {len(tokens)} token(s): nothing to "
                         f"predict")
    start = time.perf_counter()
    nll, count = sliding_nll(model, tokens, window, min(args.stride, window - 1), device)
    loss = nll / count
    result = {"load": args.load, "data_path": args.data_path, "split": split, "split_part": args.split_part,
              "tokens": count,
              "eval_seq_length": window, "stride": min(args.stride, window - 1), "loss_nats": loss,
              "bits_per_token": loss / math.log(2), "seconds": time.perf_counter() - start}
    print(f" {args.split_part} tokens: {count} (--split {split}) | window {window} stride {result['stride']} | "
          f"lm loss: {loss:.6E} | bits per token (byte-level: bits per character): {loss / math.log(2):.4f}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=2)
    return result


def cli() -> None:
    """Command-line entry: known failures end in one line ``error: ...`` and exit status 1."""
    from megatron_ls.training.faults import run_tool

    run_tool(main)


if __name__ == "__main__":
    cli()
