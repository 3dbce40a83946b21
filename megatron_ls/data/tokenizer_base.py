"""Tokenizer interface shared by every tokenizer, and Megatron's vocabulary padding rule."""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Sequence

__all__ = ["Tokenizer", "TokenizerError", "pad_vocab_size"]


class TokenizerError(ValueError):
    """A tokenizer cannot be built from the given flags/files, or an id is out of range."""


def pad_vocab_size(vocab_size: int, make_vocab_size_divisible_by: int = 128,
                   tensor_model_parallel_size: int = 1) -> int:
    """Round ``vocab_size`` up to a multiple of ``divisible_by * tp`` (Megatron's padding rule)."""
    if make_vocab_size_divisible_by < 1:
        raise TokenizerError(f"--make-vocab-size-divisible-by must be >= 1, got {make_vocab_size_divisible_by}")
    if tensor_model_parallel_size < 1:
        raise TokenizerError(f"--tensor-model-parallel-size must be >= 1, got {tensor_model_parallel_size}")
    multiple = make_vocab_size_divisible_by * tensor_model_parallel_size
    return -(-vocab_size // multiple) * multiple


class Tokenizer(ABC):
    """Common interface; subclasses set ``_vocab_size`` and ``_eod``."""

    _vocab_size: int
    _eod: int

    def __init__(self, make_vocab_size_divisible_by: int = 128, tensor_model_parallel_size: int = 1) -> None:
        self._divisible_by = make_vocab_size_divisible_by
        self._tp = tensor_model_parallel_size

    @property
    def vocab_size(self) -> int:
        """Number of real token ids (``0 .. vocab_size-1``), special tokens included."""
        return self._vocab_size

    @property
    def padded_vocab_size(self) -> int:
        """``vocab_size`` rounded up for an evenly tensor-parallel-split embedding."""
        return pad_vocab_size(self._vocab_size, self._divisible_by, self._tp)

    @property
    def eod(self) -> int:
        """End-of-document token id."""
        return self._eod

    @property
    def is_byte_level(self) -> bool:
        """True when every non-special token is exactly one byte of UTF-8 text (bits-per-byte evaluation)."""
        return False

    @abstractmethod
    def tokenize(self, text: str) -> list[int]:
        """Token ids of ``text`` (no end-of-document token is added)."""

    @abstractmethod
    def detokenize(self, ids: Sequence[int]) -> str:
        """Text for ``ids``."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(vocab_size={self.vocab_size}, padded={self.padded_vocab_size}, eod={self.eod})"
