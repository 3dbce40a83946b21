"""Megatron-LM's ``--mock-data``: synthetic pretraining sequences and no files, for throughput runs and smoke tests.

The sequences follow megatron-core's ``MockGPTLowLevelDataset``: 100,000 sequences whose lengths are drawn from
``numpy.random.default_rng(0).integers(1, 4096)``; sequence ``i`` of length ``n`` holds the tokens
``1, 2, ..., n - 1`` (modulo the vocabulary size) and then the end-of-document token. ``MockIndexedDataset``
offers the arrays a ``GPTDataset`` reads from a ``.bin/.idx`` pair, its tokens computed on demand, so the usual
sample, shuffle and split machinery (and megatron-core's ``MockGPTDataset`` with it) gives the same samples.
"""
from __future__ import annotations

import numpy as np

__all__ = ["MOCK_PREFIX", "MockIndexedDataset"]

MOCK_PREFIX = "<mock>"  # stands for the mock data wherever a dataset prefix goes
_SEED, _SEQUENCES, _MAX_LENGTH = 0, 100_000, 4096  # megatron-core's hard-coded MockGPTLowLevelDataset values


class _MockTokens:
    """Every mock sequence laid end to end; slicing computes the tokens of that range."""

    def __init__(self, starts: np.ndarray, lengths: np.ndarray, vocab_size: int, eod: int) -> None:
        self.starts, self.lengths, self.vocab_size, self.eod = starts, lengths, vocab_size, eod

    def __getitem__(self, key: slice) -> np.ndarray:
        if not isinstance(key, slice) or key.step not in (None, 1):
            raise TypeError("mock tokens are read by contiguous slices")
        positions = np.arange(key.start, key.stop, dtype=np.int64)
        sequence = np.searchsorted(self.starts, positions, side="right") - 1
        offset = positions - self.starts[sequence]
        tokens = (offset + 1) % self.vocab_size
        tokens[offset == self.lengths[sequence].astype(np.int64) - 1] = self.eod
        return tokens


class MockIndexedDataset:
    """The ``IndexedDataset`` view of the mock sequences for a tokenizer of ``vocab_size`` ids (unpadded) and
    end-of-document id ``eod``."""

    path_prefix = "mock"
    dtype = np.dtype(np.int64)

    def __init__(self, vocab_size: int, eod: int) -> None:
        if vocab_size < 1 or not 0 <= eod < vocab_size:
            raise ValueError(f"--mock-data needs a tokenizer with an end-of-document id inside its vocabulary, got "
                             f"vocab size {vocab_size} and EOD {eod}")
        rng = np.random.default_rng(seed=_SEED)
        self.sequence_lengths = rng.integers(low=1, high=_MAX_LENGTH, size=_SEQUENCES, dtype=np.int32)
        starts = np.zeros(_SEQUENCES, dtype=np.int64)
        np.cumsum(self.sequence_lengths[:-1], out=starts[1:])
        self.sequence_pointers = starts * self.dtype.itemsize
        self.tokens = _MockTokens(starts, self.sequence_lengths, vocab_size, eod)

    def __len__(self) -> int:
        return len(self.sequence_lengths)
