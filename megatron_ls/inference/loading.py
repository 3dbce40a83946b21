"""Loading a GPT-LS and its tokenizer for generation, from a consolidated or a training checkpoint of any layout.

A consolidated directory (``config.json`` + ``model.safetensors``) loads directly. A training checkpoint (``--save``
directory with its ``latest`` marker) saved at any TP x PP (and any DP/CP) is merged on load with the converter's
own code (``inference.convert.read_full_checkpoint``: TP shards concatenated along each parameter's partition
dimension). The tokenizer is the one the checkpoint recorded unless the caller names one.
"""
from __future__ import annotations

import os
from typing import Optional

import torch

from megatron_ls.checkpoint_files import CheckpointError
from megatron_ls.inference.checkpoint_io import CONFIG_FILE, InferenceCheckpointError, build_gpt_model


def load_model_for_inference(path: str, device: str | torch.device = "cpu", dtype: Optional[torch.dtype] = None):
    """``(model, config, metadata)``: a single-process ``GPTModel`` in eval mode, without dropout.

    Raises ``InferenceCheckpointError`` naming ``path`` when it is neither kind of checkpoint or does not match.
    """
    if not os.path.isdir(path):
        raise InferenceCheckpointError(f"--load {path}: no such directory")
    from megatron_ls.inference.convert import read_full_checkpoint

    try:
        config, state, metadata, _ = read_full_checkpoint(path)
    except CheckpointError as exc:
        raise InferenceCheckpointError(f"{path}: neither a consolidated checkpoint ({CONFIG_FILE} + "
                                       f"model.safetensors) nor a loadable training checkpoint: {exc}") from exc
    return build_gpt_model(config, state, path, device, dtype), config, metadata


def tokenizer_settings(metadata: dict) -> dict:
    """Tokenizer flags recorded with the checkpoint (training checkpoints record every flag), else {}."""
    data = (metadata.get("args") or {}).get("data") or metadata.get("tokenizer") or {}
    keys = ("tokenizer_type", "tokenizer_model", "vocab_file", "merge_file", "null_vocab_size")
    return {k: data[k] for k in keys if data.get(k) is not None}


def build_inference_tokenizer(metadata: dict, config, *, tokenizer_type: Optional[str] = None,
                              tokenizer_model: Optional[str] = None, vocab_file: Optional[str] = None,
                              merge_file: Optional[str] = None, vocab_size: Optional[int] = None):
    """The tokenizer named by the arguments, else the checkpoint's, else ``ByteTokenizer``; it must fit the
    model's vocabulary."""
    from megatron_ls.data.tokenizers import build_tokenizer

    saved = tokenizer_settings(metadata)
    kind = tokenizer_type or saved.get("tokenizer_type", "ByteTokenizer")
    tok = build_tokenizer(kind, tokenizer_model=tokenizer_model or saved.get("tokenizer_model"),
                          vocab_file=vocab_file or saved.get("vocab_file"),
                          merge_file=merge_file or saved.get("merge_file"),
                          vocab_size=vocab_size or saved.get("null_vocab_size"))
    if tok.vocab_size > config.vocab_size:
        raise InferenceCheckpointError(f"--tokenizer-type {kind} has {tok.vocab_size} ids but the model's "
                                       f"vocabulary has {config.vocab_size}: not the tokenizer it was trained with")
    return tok
