"""Megatron-LM's ``--tokenizer-type HuggingFaceTokenizer --tokenizer-model DIR``: any Hugging Face tokenizer saved
in a local directory (``tokenizer.json`` + ``tokenizer_config.json``, e.g. a Llama or Mistral tokenizer).

As in Megatron-LM, ``tokenize`` is ``tokenizer(text).input_ids`` (the tokenizer's own special tokens included, e.g.
a BOS), the end-of-document token is the tokenizer's ``eos_token``, and the vocabulary counts added tokens too.
This project never downloads at run time: ``--tokenizer-model`` must be a local directory.
"""
from __future__ import annotations

import os
from typing import Sequence

from megatron_ls.data.tokenizer_base import Tokenizer, TokenizerError

__all__ = ["HuggingFaceTokenizer"]


class HuggingFaceTokenizer(Tokenizer):
    """``transformers.AutoTokenizer`` from a local directory (the ``transformers`` package is needed)."""

    def __init__(self, model_dir: str, make_vocab_size_divisible_by: int = 128, tensor_model_parallel_size: int = 1):
        super().__init__(make_vocab_size_divisible_by, tensor_model_parallel_size)
        if not model_dir or not os.path.isdir(model_dir):
            raise TokenizerError(f"--tokenizer-model {model_dir}: HuggingFaceTokenizer needs a local directory "
                                 f"holding the tokenizer files (nothing is downloaded)")
        try:
            from transformers import AutoTokenizer
        except ImportError:
            raise TokenizerError("--tokenizer-type HuggingFaceTokenizer needs the transformers package "
                                 "(pip install 'megatron_ls[hf]')") from None
        try:
            self._tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        except (OSError, ValueError) as exc:
            raise TokenizerError(f"--tokenizer-model {model_dir}: not a Hugging Face tokenizer ({exc})") from None
        if self._tok.eos_token_id is None:
            raise TokenizerError(f"--tokenizer-model {model_dir}: the tokenizer defines no eos_token (the "
                                 f"end-of-document token)")
        self._vocab_size = len(self._tok)
        self._eod = int(self._tok.eos_token_id)
        self.model_dir = model_dir

    def tokenize(self, text: str) -> list[int]:
        return list(self._tok(text).input_ids)

    def detokenize(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids if 0 <= int(i) < self._vocab_size])

    def save_pretrained(self, directory: str) -> None:
        """Write the tokenizer's files into ``directory`` (the Hugging Face export)."""
        self._tok.save_pretrained(directory)
