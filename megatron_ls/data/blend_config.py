"""Megatron-LM's data flags as numbers: ``--data-path`` blends, ``--split`` ranges, per-dataset sample counts.

Each function follows megatron-core (0.16) to the float: the split is normalised with numpy, its
cumulative bookends are summed left to right and each is rounded with Python's ``round`` (half to even)
against the number of *sequences*; per-dataset counts are ``ceil(ceil(size * w) * (1 + surplus))``.
"""
from __future__ import annotations

import math
import re
from typing import Sequence

from megatron_ls.data.blended_dataset import normalize_weights
from megatron_ls.data.gpt_dataset import GPTDatasetError

__all__ = ["SPLIT_NAMES", "parse_data_path", "parse_split", "split_matrix", "split_ranges", "samples_per_dataset"]

SPLIT_NAMES = ("train", "valid", "test")


def parse_data_path(data_path: Sequence[str] | str) -> tuple[list[str], list[float] | None]:
    """``[prefix]``, ``[p1, p2, ...]`` or ``[w1, p1, w2, p2, ...]`` -> (prefixes, raw weights or None).

    As in Megatron, weights are given for all prefixes or for none; without weights Megatron weights the
    prefixes by their sample counts (see ``dataset_builder``).
    """
    items = data_path.split() if isinstance(data_path, str) else [str(x).strip() for x in data_path]
    if not items:
        raise GPTDatasetError("--data-path is empty")

    def as_float(x: str) -> float | None:
        try:
            return float(x)
        except ValueError:
            return None

    numbers = [as_float(x) for x in items[0::2]]
    if len(items) % 2 == 1 or all(v is None for v in numbers):
        if any(as_float(x) is not None for x in items):
            raise GPTDatasetError(f"--data-path {' '.join(items)}: expected weight/prefix pairs or prefixes only")
        return items, None
    weights = []
    for raw, v in zip(items[0::2], numbers):
        if v is None or not math.isfinite(v) or v <= 0:
            raise GPTDatasetError(f"--data-path: weight {raw!r} is not a positive number")
        weights.append(v)
    return items[1::2], weights


def parse_split(split: str) -> list[float]:
    """``"949,50,1"`` (any separator) -> three fractions normalised as Megatron does; missing parts are 0."""
    parts = [p for p in re.split(r"[,/\s]+", split.strip()) if p]
    try:
        values = [float(p) for p in parts]
    except ValueError:
        raise GPTDatasetError(f"--split {split!r}: expected up to three comma-separated numbers") from None
    if not values or len(values) > 3 or any(not math.isfinite(v) or v < 0 for v in values) or sum(values) <= 0:
        raise GPTDatasetError(f"--split {split!r}: expected up to three non-negative numbers with a positive sum")
    values += [0.0] * (3 - len(values))
    return normalize_weights(values)


def split_matrix(fractions: Sequence[float]) -> list[tuple[float, float] | None]:
    """Bookends ``(begin, end)`` of each part as fractions of the data; None for an empty part."""
    bounds = [0]
    for f in fractions:
        bounds.append(bounds[-1] + f)
    return [(a, b) if b > a else None for a, b in zip(bounds[:-1], bounds[1:])]


def split_ranges(num_sequences: int, fractions: Sequence[float]) -> list[tuple[int, int] | None]:
    """Sequence ranges ``[begin, end)`` of the three parts (None where the split gives a part nothing)."""
    out: list[tuple[int, int] | None] = []
    for bookend in split_matrix(fractions):
        if bookend is None:
            out.append(None)
        else:
            out.append((int(round(bookend[0] * float(num_sequences))), int(round(bookend[1] * float(num_sequences)))))
    return out


def samples_per_dataset(weights: Sequence[float], size: int, surplus: float = 0.0) -> list[int]:
    """Samples each blended dataset provides for a blend of ``size`` (``weights`` normalised once)."""
    return [int(math.ceil(math.ceil(size * w) * (1 + surplus))) for w in weights]
