"""GPT pretraining samples over Megatron indexed datasets, with splits, blending and cached indices.

A ``GPTDataset`` covers a contiguous range of documents of one ``IndexedDataset`` (one split part).
Three index arrays define it, all cached on disk (see ``index_cache``):

- ``doc_idx``: document ids, one shuffled permutation per epoch, epochs concatenated (as many epochs
  as ``num_samples`` needs);
- ``sample_idx`` ``(num_samples + 1, 2)``: for sample ``j`` the (position in ``doc_idx``, token offset)
  where it starts. Sample ``j`` covers the ``seq_length + 1`` tokens from its start up to and
  including the start of sample ``j + 1`` (consecutive samples share one token: inputs/labels shift);
- ``shuffle_idx``: a permutation of the samples.

``ds[i]`` returns ``{"tokens": int64[seq_length + 1], "loss_mask": float32[seq_length]}``.
"""
from __future__ import annotations

import math
import os
from typing import Callable, Sequence

import numpy as np

from megatron_ls.data.blended_dataset import BlendedDataset
from megatron_ls.data.index_cache import IndexCache, hash_array
from megatron_ls.data.indexed_dataset import IndexedDataset

__all__ = [
    "GPTDataset",
    "GPTDatasetError",
    "build_gpt_datasets",
    "parse_data_path",
    "parse_split",
    "split_document_ranges",
]

SPLIT_NAMES = ("train", "valid", "test")
_INDEX_VERSION = 1  # bump when the index construction changes, to invalidate old caches


class GPTDatasetError(ValueError):
    """Bad ``--data-path``/``--split``/sizes, or a dataset too small for what was asked."""


def parse_data_path(data_path: Sequence[str] | str) -> tuple[list[str], list[float]]:
    """Megatron ``--data-path`` syntax: ``[prefix]``, ``[w1, p1, w2, p2, ...]`` or ``[p1, p2, ...]``.

    Returns prefixes and weights normalised to sum to 1 (equal weights when none are given).
    """
    items = data_path.split() if isinstance(data_path, str) else [str(x) for x in data_path]
    if not items:
        raise GPTDatasetError("--data-path is empty")

    def as_float(x: str) -> float | None:
        try:
            return float(x)
        except ValueError:
            return None

    if as_float(items[0]) is None:
        prefixes, weights = items, [1.0] * len(items)
    else:
        if len(items) % 2:
            raise GPTDatasetError(f"--data-path {' '.join(items)}: expected weight/prefix pairs, got an odd count")
        prefixes, weights = items[1::2], []
        for w in items[0::2]:
            v = as_float(w)
            if v is None or not math.isfinite(v) or v <= 0:
                raise GPTDatasetError(f"--data-path: weight {w!r} is not a positive number")
            weights.append(v)
    total = sum(weights)
    return prefixes, [w / total for w in weights]


def parse_split(split: str) -> list[float]:
    """``"949,50,1"`` (or ``/``-separated) -> three fractions summing to 1; missing parts are 0."""
    parts = [p.strip() for p in split.replace("/", ",").split(",")]
    try:
        values = [float(p) for p in parts]
    except ValueError:
        raise GPTDatasetError(f"--split {split!r}: expected up to three comma-separated numbers") from None
    if len(values) > 3 or any(not math.isfinite(v) or v < 0 for v in values) or sum(values) <= 0:
        raise GPTDatasetError(f"--split {split!r}: expected up to three non-negative numbers with a positive sum")
    values += [0.0] * (3 - len(values))
    total = sum(values)
    return [v / total for v in values]


def split_document_ranges(num_documents: int, fractions: Sequence[float]) -> list[tuple[int, int]]:
    """Contiguous ``[start, end)`` document ranges for each split fraction (rounded, covering all documents)."""
    cumulative = np.cumsum(fractions)
    bounds = [0] + [int(round(c * num_documents)) for c in cumulative]
    bounds[-1] = num_documents  # the cumulative sum may land a hair below 1.0
    return [(bounds[i], bounds[i + 1]) for i in range(len(fractions))]


def _build_indices(doc_lengths: np.ndarray, doc_start: int, seq_length: int, num_samples: int, seed: int):
    """Compute (doc_idx, sample_idx, shuffle_idx) for documents ``doc_start + arange(len(doc_lengths))``."""
    tokens_per_epoch = int(doc_lengths.sum())
    num_epochs = -(-(num_samples * seq_length + 1) // tokens_per_epoch)
    rng = np.random.RandomState(seed % 2**32)
    ids = np.arange(doc_start, doc_start + len(doc_lengths), dtype=np.int64)
    doc_dtype = np.int32 if ids[-1] < 2**31 else np.int64
    doc_idx = np.concatenate([rng.permutation(ids) for _ in range(num_epochs)]).astype(doc_dtype)
    lens = doc_lengths[doc_idx - doc_start]
    ends = np.cumsum(lens, dtype=np.int64)
    starts = np.arange(num_samples + 1, dtype=np.int64) * seq_length
    pos = np.searchsorted(ends, starts, side="right")
    offsets = starts - (ends[pos] - lens[pos])
    sample_idx = np.stack([pos, offsets], axis=1).astype(np.int64)
    shuffle_dtype = np.int32 if num_samples < 2**31 else np.int64
    shuffle_idx = rng.permutation(num_samples).astype(shuffle_dtype)
    return {"doc_idx": doc_idx, "sample_idx": sample_idx, "shuffle_idx": shuffle_idx}


class GPTDataset:
    """``num_samples`` samples of ``seq_length + 1`` tokens drawn from documents ``[doc_start, doc_end)``."""

    def __init__(
        self,
        indexed: IndexedDataset,
        split_name: str,
        doc_range: tuple[int, int],
        seq_length: int,
        num_samples: int,
        seed: int,
        cache_dir: str,
        *,
        eod_token: int | None = None,
        eod_mask_loss: bool = False,
    ) -> None:
        self.indexed = indexed
        self.split_name = split_name
        self.doc_start, self.doc_end = doc_range
        self.seq_length = int(seq_length)
        self.num_samples = int(num_samples)
        self.eod_token = eod_token
        self.eod_mask_loss = eod_mask_loss
        if eod_mask_loss and eod_token is None:
            raise GPTDatasetError("eod_mask_loss=True needs eod_token")
        if self.seq_length < 1 or self.num_samples < 1:
            raise GPTDatasetError(f"seq_length ({seq_length}) and num_samples ({num_samples}) must be >= 1")
        self._doc_lengths = indexed.document_lengths[self.doc_start : self.doc_end]
        if self.doc_end <= self.doc_start or int(self._doc_lengths.sum()) == 0:
            raise GPTDatasetError(
                f"{indexed.path_prefix}: the {split_name} split (documents {self.doc_start}..{self.doc_end}) "
                "contains no tokens"
            )
        description = {
            "class": "GPTDataset",
            "version": _INDEX_VERSION,
            "prefix": os.path.basename(indexed.path_prefix),
            "split": split_name,
            "doc_range": [self.doc_start, self.doc_end],
            "doc_lengths_hash": hash_array(np.asarray(self._doc_lengths)),
            "seq_length": self.seq_length,
            "num_samples": self.num_samples,
            "seed": int(seed),
        }
        label = f"{os.path.basename(indexed.path_prefix)}-{split_name}"
        self.cache = IndexCache(cache_dir, label, description, ("doc_idx", "sample_idx", "shuffle_idx"))
        self._seed = int(seed)
        self._arrays: dict | None = None
        self._ones = np.ones(self.seq_length, dtype=np.float32)

    # -- index construction -----------------------------------------------------------------
    def _compute(self) -> dict[str, np.ndarray]:
        return _build_indices(
            np.asarray(self._doc_lengths), self.doc_start, self.seq_length, self.num_samples, self._seed
        )

    def _validate(self, arrays: dict) -> str | None:
        doc_idx, sample_idx, shuffle_idx = arrays["doc_idx"], arrays["sample_idx"], arrays["shuffle_idx"]
        if sample_idx.shape != (self.num_samples + 1, 2) or shuffle_idx.shape != (self.num_samples,):
            return f"shapes {sample_idx.shape}/{shuffle_idx.shape} do not match num_samples={self.num_samples}"
        if doc_idx.ndim != 1 or int(sample_idx[-1, 0]) >= len(doc_idx):
            return "sample index points past the document index"
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
        self._arrays = arrays
        self._doc_idx = arrays["doc_idx"]
        self._tokens = self.indexed.tokens
        self._doc_offsets = self.indexed.document_offsets
        self._all_doc_lengths = self.indexed.document_lengths
        self._sample_idx = arrays["sample_idx"]
        self._shuffle_idx = arrays["shuffle_idx"]

    # Pickling sends the description only; the receiver memory-maps the cached indices again.
    _MAPPED = ("_arrays", "_doc_idx", "_sample_idx", "_shuffle_idx", "_tokens", "_doc_offsets", "_all_doc_lengths")

    def __getstate__(self) -> dict:
        state = {k: v for k, v in self.__dict__.items() if k not in self._MAPPED and k != "_doc_lengths"}
        state["_loaded"] = self._arrays is not None
        return state

    def __setstate__(self, state: dict) -> None:
        loaded = state.pop("_loaded")
        self.__dict__.update(state)
        self._arrays = None
        self._doc_lengths = self.indexed.document_lengths[self.doc_start : self.doc_end]
        if loaded:
            self.load_index()

    # -- access -----------------------------------------------------------------------------
    def __len__(self) -> int:
        return self.num_samples

    def get_tokens(self, idx: int) -> np.ndarray:
        """The ``seq_length + 1`` tokens of sample ``idx`` (after shuffling), as int64."""
        if self._arrays is None:
            raise GPTDatasetError("GPTDataset used before load_index()")
        i = int(idx)
        if i < 0:
            i += self.num_samples
        if not 0 <= i < self.num_samples:
            raise IndexError(f"sample {idx} out of range ({self.num_samples} samples in {self.split_name})")
        j = int(self._shuffle_idx[i])
        (p0, o0), (p1, o1) = self._sample_idx[j : j + 2].tolist()
        tokens, offsets = self._tokens, self._doc_offsets  # hot path: plain slices of one mapped array
        if p0 == p1:
            start = int(offsets[self._doc_idx[p0]]) + o0
            return tokens[start : start + o1 - o0 + 1].astype(np.int64)
        docs = self._doc_idx[p0 : p1 + 1]
        first = offsets[docs]
        starts = first.tolist()
        ends = (first + self._all_doc_lengths[docs]).tolist()
        starts[0] += o0
        ends[-1] = starts[-1] + o1 + 1
        out = np.empty(self.seq_length + 1, dtype=np.int64)
        n = 0
        for a, b in zip(starts, ends):
            out[n : n + b - a] = tokens[a:b]
            n += b - a
        return out

    def __getitem__(self, idx: int) -> dict[str, np.ndarray]:
        tokens = self.get_tokens(idx)
        loss_mask = self._ones.copy()  # copying a template is cheaper than np.ones (a Python function)
        if self.eod_mask_loss:
            # Megatron's rule: no loss where the *input* token is EOD (predicting across documents).
            loss_mask[tokens[:-1] == self.eod_token] = 0.0
        return {"tokens": tokens, "loss_mask": loss_mask}

    def __repr__(self) -> str:
        return (
            f"GPTDataset({self.indexed.path_prefix!r}, split={self.split_name}, docs={self.doc_start}..{self.doc_end}, "
            f"seq_length={self.seq_length}, num_samples={self.num_samples})"
        )


def _make_split(indexed, ranges, weights, s, size, seq_length, seed, cache_dir, build, eod_kw):
    """The dataset for split ``s``; ``build`` ensures the caches, otherwise they are loaded."""
    name = SPLIT_NAMES[s]
    if len(indexed) == 1:
        ds = GPTDataset(indexed[0], name, ranges[0][s], seq_length, size, seed, cache_dir, **eod_kw)
        if build:
            ds.ensure_index()
        else:
            ds.load_index()
        return ds
    blend = BlendedDataset(weights, size, cache_dir, name, [d.path_prefix for d in indexed])
    if build:
        blend.ensure_index()
    counts = blend.load_counts()
    parts = []
    for d, ids in enumerate(indexed):
        if counts[d] == 0:  # a tiny weight can leave a dataset unused in a short split
            parts.append(None)
            continue
        part = GPTDataset(ids, name, ranges[d][s], seq_length, int(counts[d]), seed, cache_dir, **eod_kw)
        if build:
            part.ensure_index()
        else:
            part.load_index()
        parts.append(part)
    if not build:
        blend.load_index(parts)
    return blend


def build_gpt_datasets(
    data_path: Sequence[str] | str,
    split: str,
    seq_length: int,
    num_samples: tuple[int, int, int],
    seed: int,
    cache_dir: str | None = None,
    is_builder: bool = True,
    barrier: Callable[[], None] | None = None,
    *,
    eod_token: int | None = None,
    eod_mask_loss: bool = False,
) -> tuple:
    """(train, valid, test) datasets; an entry is None when its split part or its sample count is 0.

    With several weighted prefixes each split is a ``BlendedDataset``. Indices are cached under
    ``cache_dir`` (default: ``index-cache/`` next to the first prefix). In a multi-process job pass
    ``is_builder=(rank == 0)`` and ``barrier=torch.distributed.barrier``: the builder writes the caches,
    everyone meets at the barrier, then every process memory-maps them.
    """
    prefixes, weights = parse_data_path(data_path)
    fractions = parse_split(split)
    if len(num_samples) != 3 or any(int(n) < 0 for n in num_samples):
        raise GPTDatasetError(f"num_samples must be three non-negative counts, got {num_samples}")
    if seq_length < 1:
        raise GPTDatasetError(f"--seq-length must be >= 1, got {seq_length}")
    if eod_mask_loss and eod_token is None:
        raise GPTDatasetError("eod_mask_loss=True needs eod_token")
    if cache_dir is None:
        cache_dir = os.path.join(os.path.dirname(os.path.abspath(prefixes[0])), "index-cache")
    indexed = [IndexedDataset(p) for p in prefixes]
    ranges = []
    for ds in indexed:
        if ds.num_documents == 0:
            raise GPTDatasetError(f"{ds.path_prefix}: dataset has no documents")
        r = split_document_ranges(ds.num_documents, fractions)
        for name, frac, n, (a, b) in zip(SPLIT_NAMES, fractions, num_samples, r):
            if frac > 0 and int(n) > 0 and b <= a:
                raise GPTDatasetError(
                    f"--split {split}: the {name} part gets 0 of the {ds.num_documents} documents of "
                    f"{ds.path_prefix}; use more documents or a larger {name} share"
                )
        ranges.append(r)

    wanted = [s for s in range(3) if fractions[s] > 0 and int(num_samples[s]) > 0]
    eod_kw = {"eod_token": eod_token, "eod_mask_loss": eod_mask_loss}
    args = (indexed, ranges, weights)
    if is_builder:
        for s in wanted:
            _make_split(*args, s, int(num_samples[s]), seq_length, seed, cache_dir, True, eod_kw)
    if barrier is not None:
        barrier()
    result: list = [None, None, None]
    for s in wanted:
        result[s] = _make_split(*args, s, int(num_samples[s]), seq_length, seed, cache_dir, False, eod_kw)
    return tuple(result)
