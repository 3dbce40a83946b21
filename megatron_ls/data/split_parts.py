"""Validation/test parts that ``--split`` leaves without data: Megatron-LM skips them instead of refusing.

With the default ``969,30,1`` a 55-document corpus gives the test part ``round(55 x 1.0) - round(55 x 0.999) = 0``
documents; Megatron builds no test dataset then and trains on. The caller asks no samples of such a part (so the
builder returns None for it) and says so once. An empty train part stays an error (the builder's).
"""
from __future__ import annotations

from typing import Sequence

from megatron_ls.data.indexed_dataset import IndexedDataset

SPLIT_NAMES = ("train", "valid", "test")


def empty_eval_parts(data_path: Sequence[str], split: str) -> dict[int, str]:
    """``{split index: reason}`` for each validation/test part with a positive share but no sequence of some
    ``--data-path`` prefix (split by sequences, as megatron-core does; one per document after preprocessing)."""
    from megatron_ls.data.blend_config import parse_data_path, parse_split, split_ranges

    prefixes, _ = parse_data_path(list(data_path))
    fractions = parse_split(split)
    empty: dict[int, str] = {}
    for prefix in prefixes:
        count = len(IndexedDataset(prefix))
        ranges = split_ranges(count, fractions)
        for s in (1, 2):
            if ranges[s] is not None and ranges[s][1] <= ranges[s][0] and s not in empty:
                empty[s] = (f"--split {split}: the {SPLIT_NAMES[s]} part gets 0 of the {count} documents of "
                            f"{prefix}: no {SPLIT_NAMES[s]} evaluation (as in Megatron-LM; give it a larger share "
                            f"to have one)")
    return empty
