"""Tokenizers (Megatron ``--tokenizer-type`` names) and ``build_tokenizer``.

Every tokenizer exposes ``vocab_size`` (real ids), ``padded_vocab_size`` (rounded up to a multiple of
``make_vocab_size_divisible_by * tensor_model_parallel_size`` so the embedding splits evenly across
tensor-parallel ranks), ``eod``, ``tokenize``, ``detokenize`` and ``is_byte_level``.
"""
from __future__ import annotations

import os
from typing import Sequence

from megatron_ls.data.gpt2_bpe import GPT2BPETokenizer
from megatron_ls.data.tokenizer_base import Tokenizer, TokenizerError, pad_vocab_size

__all__ = [
    "ByteTokenizer",
    "GPT2BPETokenizer",
    "NullTokenizer",
    "SentencePieceTokenizer",
    "Tokenizer",
    "TokenizerError",
    "TOKENIZER_TYPES",
    "build_tokenizer",
    "pad_vocab_size",
]


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes as tokens 0..255 plus an end-of-document token 256 (enwik8/text8-style character LMs)."""

    def __init__(self, make_vocab_size_divisible_by: int = 128, tensor_model_parallel_size: int = 1) -> None:
        super().__init__(make_vocab_size_divisible_by, tensor_model_parallel_size)
        self._vocab_size = 257
        self._eod = 256

    @property
    def is_byte_level(self) -> bool:
        return True

    def tokenize(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def tokenize_bytes(self, text: str) -> bytes:
        """The token ids of ``text`` as raw bytes (fast path: ids are the bytes themselves)."""
        return text.encode("utf-8")

    def detokenize(self, ids: Sequence[int]) -> str:
        # Special ids (EOD, padding) carry no text; invalid UTF-8 from sampling shows as U+FFFD.
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")


class NullTokenizer(Tokenizer):
    """Text is already space-separated ids (Megatron's NullTokenizer); EOD is ``vocab_size``."""

    def __init__(self, vocab_size: int, make_vocab_size_divisible_by: int = 128, tensor_model_parallel_size: int = 1):
        super().__init__(make_vocab_size_divisible_by, tensor_model_parallel_size)
        if vocab_size is None or int(vocab_size) < 1:
            raise TokenizerError(f"NullTokenizer needs --vocab-size >= 1, got {vocab_size}")
        self._base = int(vocab_size)
        self._vocab_size = self._base + 1
        self._eod = self._base

    def tokenize(self, text: str) -> list[int]:
        try:
            ids = [int(x) for x in text.split()]
        except ValueError as exc:
            raise TokenizerError(f"NullTokenizer input must be space-separated integers: {exc}") from None
        for i in ids:
            if not 0 <= i < self._base:
                raise TokenizerError(f"NullTokenizer: id {i} outside --vocab-size {self._base}")
        return ids

    def detokenize(self, ids: Sequence[int]) -> str:
        return " ".join(str(int(i)) for i in ids)


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece model (``--tokenizer-model``); EOD is the model's ``</s>`` (eos) piece."""

    def __init__(self, model_file: str, make_vocab_size_divisible_by: int = 128, tensor_model_parallel_size: int = 1):
        super().__init__(make_vocab_size_divisible_by, tensor_model_parallel_size)
        import sentencepiece as spm  # imported lazily: only this tokenizer needs it

        if not model_file:
            raise TokenizerError("SentencePieceTokenizer needs --tokenizer-model")
        if not os.path.isfile(model_file):
            raise TokenizerError(f"--tokenizer-model {model_file}: no such file")
        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.Load(model_file)
        except (OSError, RuntimeError) as exc:
            raise TokenizerError(f"--tokenizer-model {model_file}: not a SentencePiece model ({exc})") from None
        self._vocab_size = int(self._sp.GetPieceSize())
        eos = int(self._sp.eos_id())
        if eos < 0:
            # Models trained with --eos_id=-1 may still carry an explicit end-of-document piece.
            for piece in ("<EOD>", "<|endoftext|>", "</s>"):
                pid = int(self._sp.PieceToId(piece))
                if pid != self._sp.unk_id() and self._sp.IdToPiece(pid) == piece:
                    eos = pid
                    break
        if eos < 0:
            raise TokenizerError(f"--tokenizer-model {model_file}: the model defines no eos/EOD piece")
        self._eod = eos

    def tokenize(self, text: str) -> list[int]:
        return self._sp.EncodeAsIds(text)

    def detokenize(self, ids: Sequence[int]) -> str:
        return self._sp.DecodeIds([int(i) for i in ids if 0 <= int(i) < self._vocab_size])


TOKENIZER_TYPES = (
    "ByteTokenizer",
    "GPT2BPETokenizer",
    "SentencePieceTokenizer",
    "GPTSentencePieceTokenizer",
    "HuggingFaceTokenizer",
    "NullTokenizer",
)


def build_tokenizer(
    tokenizer_type: str,
    *,
    tokenizer_model: str | None = None,
    vocab_file: str | None = None,
    merge_file: str | None = None,
    vocab_size: int | None = None,
    make_vocab_size_divisible_by: int = 128,
    tensor_model_parallel_size: int = 1,
) -> Tokenizer:
    """Build the tokenizer named by ``--tokenizer-type`` from the matching flags."""
    common = (make_vocab_size_divisible_by, tensor_model_parallel_size)
    if tokenizer_type == "ByteTokenizer":
        return ByteTokenizer(*common)
    if tokenizer_type in ("SentencePieceTokenizer", "GPTSentencePieceTokenizer"):
        if tokenizer_model is None:
            raise TokenizerError(f"--tokenizer-type {tokenizer_type} needs --tokenizer-model")
        return SentencePieceTokenizer(tokenizer_model, *common)
    if tokenizer_type == "GPT2BPETokenizer":
        if vocab_file is None or merge_file is None:
            raise TokenizerError("--tokenizer-type GPT2BPETokenizer needs --vocab-file and --merge-file")
        return GPT2BPETokenizer(vocab_file, merge_file, *common)
    if tokenizer_type == "HuggingFaceTokenizer":
        from megatron_ls.data.hf_tokenizer import HuggingFaceTokenizer

        if tokenizer_model is None:
            raise TokenizerError("--tokenizer-type HuggingFaceTokenizer needs --tokenizer-model DIR")
        return HuggingFaceTokenizer(tokenizer_model, *common)
    if tokenizer_type == "NullTokenizer":
        if vocab_size is None:
            raise TokenizerError("--tokenizer-type NullTokenizer needs --vocab-size")
        return NullTokenizer(vocab_size, *common)
    raise TokenizerError(f"unknown --tokenizer-type {tokenizer_type!r}; choose one of {', '.join(TOKENIZER_TYPES)}")
