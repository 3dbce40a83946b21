"""Megatron-LM's GPT sample index construction: document, sample and shuffle indices.

Written from the description of megatron-core's ``GPTDataset`` (0.16); the arrays equal megatron-core's,
element for element and in dtype (tested against it). Here a "document" is one *sequence* of the
``.bin/.idx`` pair, as in Megatron's GPT dataset (``.idx`` documents are not used).

- Epochs: as many passes over the part's sequences as ``num_samples * seq_length + 1`` tokens need
  (one when ``num_samples`` is None).
- ``document_index`` (int32): all epochs' sequence ids shuffled together in one pass with
  ``numpy.random.RandomState(seed)``; when the last epoch contributes fewer than 80% of an epoch's
  samples, the first ``epochs - 1`` are shuffled together and the last one separately.
- ``sample_index`` ``(S + 1, 2)``: where sample ``j`` starts, as (position in ``document_index``,
  token offset); sample ``j`` is the ``seq_length + 1`` tokens from stream position ``j * seq_length``.
  ``S = (epochs * tokens_per_epoch - 1) // seq_length``: every sample of the built epochs.
- ``shuffle_index`` (uint32): a permutation of all ``S`` samples, the separated last epoch's samples
  shuffled among themselves after the others.
"""
from __future__ import annotations

import numpy as np

__all__ = ["EpochPlan", "plan_epochs", "build_document_index", "build_sample_index", "build_shuffle_index",
           "build_gpt_indices"]

_SEPARATE_FINAL_EPOCH_THRESHOLD = 0.80


class EpochPlan:
    """How many epochs to build and whether the last one is shuffled separately."""

    def __init__(self, tokens_per_epoch: int, seq_length: int, num_samples: int | None) -> None:
        if tokens_per_epoch <= 0:
            raise ValueError("a GPT dataset part needs at least one token")
        self.tokens_per_epoch = int(tokens_per_epoch)
        self.seq_length = int(seq_length)
        if num_samples is None:
            self.num_epochs = 1
        else:
            needed = int(num_samples) * self.seq_length + 1
            self.num_epochs = max(1, -(-needed // self.tokens_per_epoch))
        self.samples_before_final_epoch = ((self.num_epochs - 1) * self.tokens_per_epoch - 1) // self.seq_length
        self.separate_final_epoch = False
        if self.num_epochs > 1:
            from_final = int(num_samples) - self.samples_before_final_epoch
            per_epoch = (self.tokens_per_epoch - 1) // self.seq_length
            self.separate_final_epoch = from_final < int(_SEPARATE_FINAL_EPOCH_THRESHOLD * per_epoch)

    @property
    def total_samples(self) -> int:
        """Samples in the built epochs (the dataset's length)."""
        return (self.num_epochs * self.tokens_per_epoch - 1) // self.seq_length


def plan_epochs(sequence_lengths: np.ndarray, seq_length: int, num_samples: int | None) -> EpochPlan:
    """The epoch plan for a part whose sequences have ``sequence_lengths``."""
    return EpochPlan(int(np.sum(sequence_lengths, dtype=np.int64)), seq_length, num_samples)


def _shuffled_epochs(ids: np.ndarray, epochs: int, rng: np.random.RandomState) -> np.ndarray:
    out = np.tile(ids.astype(np.int32, copy=False), epochs)
    rng.shuffle(out)
    return out


def build_document_index(ids: np.ndarray, plan: EpochPlan, rng: np.random.RandomState) -> np.ndarray:
    """int32 sequence ids of every epoch, shuffled (see the module doc)."""
    if not plan.separate_final_epoch:
        return _shuffled_epochs(ids, plan.num_epochs, rng)
    first = _shuffled_epochs(ids, plan.num_epochs - 1, rng)
    return np.concatenate([first, _shuffled_epochs(ids, 1, rng)])


def build_sample_index(all_lengths: np.ndarray, document_index: np.ndarray, plan: EpochPlan) -> np.ndarray:
    """``(S + 1, 2)`` start (document position, offset) of every sample, plus the end marker.

    ``all_lengths`` are the lengths of every sequence of the dataset (indexed by ``document_index``).
    """
    lengths = all_lengths[document_index].astype(np.int64)
    ends = np.cumsum(lengths)
    count = plan.total_samples
    starts = np.arange(count + 1, dtype=np.int64) * plan.seq_length
    # The sequence holding each start token (empty sequences are skipped: they hold no token).
    pos = np.searchsorted(ends, starts, side="right")
    offsets = starts - (ends[pos] - lengths[pos])
    widest = max(len(document_index), int(all_lengths.max()) if len(all_lengths) else 0)
    dtype = np.int32 if widest <= np.iinfo(np.int32).max else np.int64
    sample_index = np.empty((count + 1, 2), dtype=dtype)
    sample_index[:, 0] = pos
    sample_index[:, 1] = offsets
    sample_index[0] = 0  # Megatron starts at the first position even when that sequence is empty
    return sample_index


def build_shuffle_index(plan: EpochPlan, rng: np.random.RandomState) -> np.ndarray:
    """Permutation of the samples (uint32; int64 for indices near 2**32)."""
    total = plan.total_samples
    dtype = np.uint32 if total < np.iinfo(np.uint32).max - 1 else np.int64
    first_size = plan.samples_before_final_epoch if plan.separate_final_epoch else total
    first = np.arange(first_size, dtype=dtype)
    rng.shuffle(first)
    if first_size == total:
        return first
    last = np.arange(first_size, total, dtype=dtype)
    rng.shuffle(last)
    return np.concatenate([first, last])


def build_gpt_indices(all_lengths: np.ndarray, start: int, end: int, seq_length: int, num_samples: int | None,
                      seed: int) -> dict[str, np.ndarray]:
    """``document_index``, ``sample_index``, ``shuffle_index`` for sequences ``[start, end)``."""
    ids = np.arange(start, end, dtype=np.int32)
    plan = plan_epochs(all_lengths[start:end], seq_length, num_samples)
    rng = np.random.RandomState(seed)
    document_index = build_document_index(ids, plan, rng)
    sample_index = build_sample_index(all_lengths, document_index, plan)
    shuffle_index = build_shuffle_index(plan, rng)
    return {"document_index": document_index, "sample_index": sample_index, "shuffle_index": shuffle_index}
