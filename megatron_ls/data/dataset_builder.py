"""``build_gpt_datasets``: train/valid/test datasets as megatron-core's ``BlendedMegatronDatasetBuilder`` makes them.

Cases (Megatron's, for each split with a non-empty part and a positive sample count):

- one prefix without a weight: a ``GPTDataset`` of the split's sequence range with ``num_samples``;
- weighted prefixes (even a single one): each prefix's part is built with
  ``ceil(ceil(n * w) * (1 + surplus))`` samples and blended to ``sum(ceil(n * w))`` samples;
- several prefixes without weights: each part is built for exactly one epoch and blended with weights
  equal to the parts' sample counts, to ``min(n, total)`` samples;
- per-split paths (``--train-data-path`` ...): the same per split over all of each prefix's sequences
  (a single per-split prefix ignores its weight, as in Megatron);
- ``--mock-data`` (``mock_vocab_size``): one unweighted prefix of synthetic sequences split ``1,1,1`` (megatron-core
  ignores ``--split`` for mock data too).
"""
from __future__ import annotations

import os
import tempfile
from typing import Callable, Optional, Sequence

from megatron_ls.data.blend_config import SPLIT_NAMES, parse_data_path, parse_split, samples_per_dataset, split_ranges
from megatron_ls.data.blended_dataset import BlendedDataset, normalize_weights
from megatron_ls.data.gpt_dataset import GPTDataset, GPTDatasetError
from megatron_ls.data.indexed_dataset import IndexedDataset
from megatron_ls.data.mock_dataset import MOCK_PREFIX, MockIndexedDataset

__all__ = ["build_gpt_datasets", "MID_LEVEL_DATASET_SURPLUS"]

MID_LEVEL_DATASET_SURPLUS = 0.005  # Megatron's default --mid-level-dataset-surplus


class _Context:
    """What every dataset of one build shares."""

    def __init__(self, seq_length: int, seed: int, cache_dir: str, surplus: float, eod_kw: dict,
                 mock_vocab_size: Optional[int] = None) -> None:
        self.seq_length, self.seed, self.cache_dir, self.surplus, self.eod_kw = (
            seq_length, seed, cache_dir, surplus, eod_kw)
        self.mock_vocab_size = mock_vocab_size
        self._indexed: dict[str, IndexedDataset] = {}

    def indexed(self, prefix: str) -> IndexedDataset:
        if prefix not in self._indexed:
            if prefix == MOCK_PREFIX:
                self._indexed[prefix] = MockIndexedDataset(self.mock_vocab_size, self.eod_kw["eod_token"])
            else:
                self._indexed[prefix] = IndexedDataset(prefix)
        return self._indexed[prefix]

    def part(self, prefix: str, s: int, index_range: tuple[int, int], num_samples: Optional[int]) -> GPTDataset:
        return GPTDataset(self.indexed(prefix), SPLIT_NAMES[s], index_range, self.seq_length, num_samples,
                          self.seed, self.cache_dir, **self.eod_kw)


def _range(ctx: _Context, prefix: str, s: int, fractions: Optional[Sequence[float]], split: str) -> tuple[int, int]:
    """Sequence range of split ``s`` of ``prefix`` (all of it for per-split paths)."""
    n = len(ctx.indexed(prefix))
    if fractions is None:
        return 0, n
    r = split_ranges(n, fractions)[s]
    if r is None or r[1] <= r[0]:
        raise GPTDatasetError(
            f"--split {split}: the {SPLIT_NAMES[s]} part gets 0 of the {n} sequences of {prefix}; use more "
            f"data or a larger {SPLIT_NAMES[s]} share")
    return r


def _split_dataset(ctx: _Context, prefixes: list[str], weights: Optional[list[float]], s: int, size: int,
                   fractions: Optional[Sequence[float]], split: str):
    """The dataset of split ``s`` (a ``GPTDataset`` or a ``BlendedDataset``), not yet indexed."""
    ranges = [_range(ctx, p, s, fractions, split) for p in prefixes]
    if len(prefixes) == 1 and (weights is None or fractions is None):  # per-split: a lone weight is ignored
        return ctx.part(prefixes[0], s, ranges[0], size)
    if weights is not None:
        w = normalize_weights(weights)
        targets = samples_per_dataset(w, size)
        buffers = samples_per_dataset(w, size, ctx.surplus)
        parts = [ctx.part(p, s, r, n) for p, r, n in zip(prefixes, ranges, buffers)]
        return BlendedDataset(parts, w, sum(targets), ctx.cache_dir, SPLIT_NAMES[s])
    parts = [ctx.part(p, s, r, None) for p, r in zip(prefixes, ranges)]
    lengths = [len(p) for p in parts]
    for p, n in zip(parts, lengths):
        if n == 0:
            raise GPTDatasetError(f"{p!r} holds no sample of {ctx.seq_length + 1} tokens; it cannot be blended "
                                  "by its length (give weights, or more data)")
    blend_size = min(size, sum(lengths))
    if blend_size < size:
        raise GPTDatasetError(
            f"the {SPLIT_NAMES[s]} blend of {len(prefixes)} prefixes given without weights has {blend_size} samples "
            f"(one epoch of each, as in Megatron-LM) but {size} are needed; give weights to draw more epochs")
    return BlendedDataset(parts, lengths, blend_size, ctx.cache_dir, SPLIT_NAMES[s])


def _datasets_of(ds) -> list:
    return list(ds.parts) + [ds] if isinstance(ds, BlendedDataset) else [ds]


def build_gpt_datasets(
    data_path: Sequence[str] | str | None,
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
    per_split_data_paths: Sequence[Sequence[str] | None] | None = None,
    mid_level_dataset_surplus: float = MID_LEVEL_DATASET_SURPLUS,
    mock_vocab_size: Optional[int] = None,
) -> tuple:
    """(train, valid, test) as megatron-core builds them; an entry is None for an empty part or 0 samples.

    ``data_path`` with ``split``, or ``per_split_data_paths`` = (train, valid, test) blends (``split`` is then
    unused). Indices are cached under ``cache_dir`` (default: ``index-cache/`` next to the first prefix). In a
    multi-process job pass ``is_builder=(rank == 0)`` and ``barrier=torch.distributed.barrier``: the builder
    writes the caches, everyone meets at the barrier, then every process memory-maps them.

    ``mock_vocab_size`` (the tokenizer's unpadded size; needs ``eod_token``): synthetic data instead of files
    (``--mock-data``); the caches then default to a directory under the system's temporary one.
    """
    if mock_vocab_size is not None:
        if data_path or (per_split_data_paths is not None and any(per_split_data_paths)):
            raise GPTDatasetError("--mock-data replaces --data-path / --train/valid/test-data-path: give one or the "
                                  "other")
        if eod_token is None:
            raise GPTDatasetError("--mock-data needs the tokenizer's end-of-document id")
        data_path, split, per_split_data_paths = [MOCK_PREFIX], "1,1,1", None
        if cache_dir is None:
            cache_dir = os.path.join(tempfile.gettempdir(), f"megatron_ls-mock-index-cache-{os.getuid()}")
    per_split = list(per_split_data_paths) if per_split_data_paths is not None else None
    if per_split is not None and not any(per_split):
        per_split = None
    if per_split is not None and data_path:
        raise GPTDatasetError("--data-path and --train/valid/test-data-path cannot be used together")
    if per_split is None and not data_path:
        raise GPTDatasetError("--data-path is empty")
    if len(num_samples) != 3 or any(int(n) < 0 for n in num_samples):
        raise GPTDatasetError(f"num_samples must be three non-negative counts, got {num_samples}")
    if seq_length < 1:
        raise GPTDatasetError(f"--seq-length must be >= 1, got {seq_length}")
    if eod_mask_loss and eod_token is None:
        raise GPTDatasetError("eod_mask_loss=True needs eod_token")
    if mid_level_dataset_surplus < 0:
        raise GPTDatasetError(f"--mid-level-dataset-surplus must be >= 0, got {mid_level_dataset_surplus}")
    blends = ([parse_data_path(p) if p else None for p in per_split] if per_split is not None
              else [parse_data_path(data_path)] * 3)
    fractions = None if per_split is not None else parse_split(split)
    first = next(b for b in blends if b is not None)[0][0]
    if cache_dir is None:
        cache_dir = os.path.join(os.path.dirname(os.path.abspath(first)), "index-cache")
    ctx = _Context(int(seq_length), int(seed), cache_dir, float(mid_level_dataset_surplus),
                   {"eod_token": eod_token, "eod_mask_loss": eod_mask_loss}, mock_vocab_size)
    result: list = [None, None, None]
    for s in range(3):
        size = int(num_samples[s])
        if blends[s] is None or size == 0 or (fractions is not None and fractions[s] == 0):
            continue
        prefixes, weights = blends[s]
        for p in prefixes:
            if len(ctx.indexed(p)) == 0:
                raise GPTDatasetError(f"{p}: dataset has no sequences")
        result[s] = _split_dataset(ctx, prefixes, weights, s, size, fractions, split)
    if is_builder:
        for ds in result:
            for d in _datasets_of(ds) if ds is not None else ():
                d.ensure_index()
    if barrier is not None:
        barrier()
    for ds in result:
        for d in _datasets_of(ds) if ds is not None else ():
            d.load_index()
    return tuple(result)
