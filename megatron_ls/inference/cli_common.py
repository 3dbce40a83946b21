"""Command-line pieces shared by the inference tools (``tools/generate.py``, ``tools/run_text_generation_server.py``,
``tools/evaluate.py``, ``tools/eval_image_classifier.py``): model flags and the checks of flag values."""
from __future__ import annotations

import argparse
import os
from typing import Optional

import torch


def add_model_args(parser: argparse.ArgumentParser) -> None:
    """--load, device/precision and tokenizer flags."""
    g = parser.add_argument_group("model")
    g.add_argument("--load", required=True, help="consolidated directory (tools/convert_checkpoint.py "
                   "--consolidated-dir) or a training --save directory of any TP/PP layout (merged on load)")
    g.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    g.add_argument("--bf16", action="store_true", help="run the model in bfloat16 (default float32)")
    t = parser.add_argument_group("tokenizer (default: the one recorded in a training checkpoint, else "
                                  "ByteTokenizer)")
    t.add_argument("--tokenizer-type", default=None)
    t.add_argument("--tokenizer-model", default=None, help="SentencePiece model file")
    t.add_argument("--vocab-file", default=None, help="GPT-2 BPE vocab JSON")
    t.add_argument("--merge-file", default=None, help="GPT-2 BPE merges file")
    t.add_argument("--vocab-size", type=int, default=None, help="NullTokenizer vocabulary size")


def resolve_device(name: str | None) -> torch.device:
    """The device for ``--device`` (a clear error when CUDA is asked for but absent)."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name}: not a device name; use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine")
    return device


def check_output_file(flag: str, path: Optional[str]) -> None:
    """Refuse an output file whose directory does not exist, before any work is done."""
    if path is None:
        return
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise ValueError(f"{flag} {path}: directory {directory} does not exist")


def check_at_least(flag: str, value: Optional[int], low: int) -> None:
    """Refuse a numeric flag below ``low`` (None = not given)."""
    if value is not None and value < low:
        raise ValueError(f"{flag} must be >= {low}, got {value}")


def load_from_args(args: argparse.Namespace):
    """``(model, config, tokenizer)`` from the flags of :func:`add_model_args`."""
    from megatron_ls.inference.loading import build_inference_tokenizer, load_model_for_inference

    device = resolve_device(args.device)
    model, config, metadata = load_model_for_inference(args.load, device=device,
                                                       dtype=torch.bfloat16 if args.bf16 else torch.float32)
    tokenizer = build_inference_tokenizer(metadata, config, tokenizer_type=args.tokenizer_type,
                                          tokenizer_model=args.tokenizer_model, vocab_file=args.vocab_file,
                                          merge_file=args.merge_file, vocab_size=args.vocab_size)
    return model, config, tokenizer
