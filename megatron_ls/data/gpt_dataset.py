"""GPT pretraining samples over one range of sequences of a Megatron indexed dataset, with cached indices.

A ``GPTDataset`` is Megatron-LM's ``GPTDataset`` for one split part of one ``.bin/.idx`` prefix: the
index arrays (``gpt_indices``) are megatron-core's, so ``ds[i]`` holds the tokens megatron-core's
``GPTDataset[i]`` holds. Its length is every sample of the epochs it built (at least ``num_samples``).
``ds[i]`` returns ``{"tokens": int64[seq_length + 1], "loss_mask": float32[seq_length]}``; with
``eod_mask_loss`` the loss mask is 0 where the *input* token is the EOD token (Megatron's rule).
"""
from __future__ import annotations

import os

import numpy as np

from megatron_ls.data.gpt_indices import build_gpt_indices, plan_epochs
from megatron_ls.data.index_cache import IndexCache, hash_array
from megatron_ls.data.indexed_dataset import IndexedDataset

__all__ = ["GPTDataset", "GPTDatasetError"]

_INDEX_VERSION = 2  # bump when the index construction changes, to invalidate old caches
_NAMES = ("document_index", "sample_index", "shuffle_index")


class GPTDatasetError(ValueError):
    """Bad ``--data-path``/``--split``/sizes, or a dataset too small for what was asked."""


class GPTDataset:
    """Samples of ``seq_length + 1`` tokens from sequences ``[start, end)`` of ``indexed``.

    ``num_samples=None`` builds exactly one epoch (Megatron's choice for blends given without weights).
    """

    def __init__(self, indexed: IndexedDataset, split_name: str, index_range: tuple[int, int], seq_length: int,
                 num_samples: int | None, seed: int, cache_dir: str, *, eod_token: int | None = None,
                 eod_mask_loss: bool = False) -> None:
        self.indexed = indexed
        self.split_name = split_name
        self.start, self.end = (int(x) for x in index_range)
        self.seq_length = int(seq_length)
        self.num_samples = None if num_samples is None else int(num_samples)
        self.seed = int(seed)
        self.eod_token = eod_token
        self.eod_mask_loss = eod_mask_loss
        if eod_mask_loss and eod_token is None:
            raise GPTDatasetError("eod_mask_loss=True needs eod_token")
        if self.seq_length < 1 or (self.num_samples is not None and self.num_samples < 0):
            raise GPTDatasetError(f"seq_length ({seq_length}) must be >= 1 and num_samples ({num_samples}) >= 0")
        lengths = indexed.sequence_lengths[self.start:self.end]
        tokens = int(np.sum(lengths, dtype=np.int64))
        if tokens == 0:
            raise GPTDatasetError(
                f"{indexed.path_prefix}: the {split_name} part (sequences {self.start}..{self.end}) contains no "
                "tokens (Megatron-LM would loop forever here); use more data or a larger share for this part")
        self.plan = plan_epochs(lengths, self.seq_length, self.num_samples)
        all_lengths = indexed.sequence_lengths
        description = {
            "class": "GPTDataset",
            "version": _INDEX_VERSION,
            "prefix": os.path.basename(indexed.path_prefix),
            "split": split_name,
            "index_range": [self.start, self.end],
            "lengths_hash": hash_array(np.asarray(lengths)),
            "num_sequences": len(all_lengths),
            "max_sequence_length": int(all_lengths.max()),
            "seq_length": self.seq_length,
            "num_samples": self.num_samples,
            "seed": self.seed,
        }
        label = f"{os.path.basename(indexed.path_prefix)}-{split_name}"
        self.cache = IndexCache(cache_dir, label, description, _NAMES)
        self._loaded = False
        self._ones = np.ones(self.seq_length, dtype=np.float32)

    # -- index construction -----------------------------------------------------------------
    def _compute(self) -> dict[str, np.ndarray]:
        return build_gpt_indices(self.indexed.sequence_lengths, self.start, self.end, self.seq_length,
                                 self.num_samples, self.seed)

    def _validate(self, arrays: dict) -> str | None:
        total = self.plan.total_samples
        doc, sample, shuffle = (arrays[n] for n in _NAMES)
        if sample.shape != (total + 1, 2) or shuffle.shape != (total,):
            return f"shapes {sample.shape}/{shuffle.shape} do not match the {total} samples expected"
        if doc.shape != (self.plan.num_epochs * (self.end - self.start),) or int(sample[-1, 0]) >= len(doc):
            return "the sample index points past the document index"
        return None

    def ensure_index(self) -> bool:
        """Build (or reuse) the cached indices; call on the building rank. True when it built them."""
        return self.cache.ensure(self._compute, self._validate)

    def load_index(self) -> None:
        """Memory-map the cached indices (after the building rank has finished)."""
        arrays = self.cache.load()
        problem = self._validate(arrays)
        if problem is not None:
            raise GPTDatasetError(f"index cache {self.cache.stem}: {problem}")
        self.document_index, self.sample_index, self.shuffle_index = (arrays[n] for n in _NAMES)
        self._tokens = self.indexed.tokens
        self._pointers = self.indexed.sequence_pointers
        self._lengths = self.indexed.sequence_lengths
        self._itemsize = self.indexed.dtype.itemsize
        self._loaded = True

    # Pickling sends the description only; the receiver memory-maps the cached indices again.
    _MAPPED = ("document_index", "sample_index", "shuffle_index", "_tokens", "_pointers", "_lengths")

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k not in self._MAPPED}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        if self._loaded:
            self.load_index()

    # -- access -----------------------------------------------------------------------------
    def __len__(self) -> int:
        return self.plan.total_samples

    def get_tokens(self, idx: int) -> np.ndarray:
        """The ``seq_length + 1`` tokens of sample ``idx`` (after shuffling), as int64."""
        if not self._loaded:
            raise GPTDatasetError("GPTDataset used before load_index()")
        n = self.plan.total_samples
        i = int(idx)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"sample {idx} out of range ({n} samples in {self.split_name})")
        j = int(self.shuffle_index[i])
        (p0, o0), (p1, o1) = self.sample_index[j : j + 2].tolist()
        tokens, size = self._tokens, self._itemsize  # hot path: plain slices of one mapped array
        if p0 == p1:
            start = int(self._pointers[self.document_index[p0]]) // size + o0
            return tokens[start : start + o1 - o0 + 1].astype(np.int64)
        seqs = self.document_index[p0 : p1 + 1]
        first = self._pointers[seqs] // size
        starts = first.tolist()
        ends = (first + self._lengths[seqs]).tolist()
        starts[0] += o0
        ends[-1] = starts[-1] + o1 + 1
        out = np.empty(self.seq_length + 1, dtype=np.int64)
        k = 0
        for a, b in zip(starts, ends):
            out[k : k + b - a] = tokens[a:b]
            k += b - a
        return out

    def __getitem__(self, idx: int) -> dict[str, np.ndarray]:
        tokens = self.get_tokens(idx)
        loss_mask = self._ones.copy()  # copying a template is cheaper than np.ones (a Python function)
        if self.eod_mask_loss:
            loss_mask[tokens[:-1] == self.eod_token] = 0.0
        return {"tokens": tokens, "loss_mask": loss_mask}

    def __repr__(self) -> str:
        return (f"GPTDataset({self.indexed.path_prefix!r}, split={self.split_name}, "
                f"sequences={self.start}..{self.end}, seq_length={self.seq_length}, samples={len(self)})")
