"""Command-line pieces shared by ``tools/generate.py`` and ``tools/run_text_generation_server.py``."""
from __future__ import annotations

import argparse

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
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine")
    return device


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
