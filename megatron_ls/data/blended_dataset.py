"""Weighted blending of several datasets (``--data-path 0.7 a 0.3 b``) with a cached, deterministic order.

Interleaving rule: the ``k``-th sample taken from dataset ``d`` gets the key ``(k + 0.5) / w_d``; the
blended order is all keys sorted (ties go to the lower dataset index) and cut after ``size`` entries.
Every prefix of the blended stream therefore holds each dataset within one sample of its share
``w_d * n`` (a Sainte-Laguë-style apportionment), so even short runs see the requested mix.
"""
from __future__ import annotations

import os
from typing import Sequence

import numpy as np

from megatron_ls.data.index_cache import IndexCache

__all__ = ["BlendedDataset", "BlendedDatasetError", "blending_indices"]

_BLEND_VERSION = 1


class BlendedDatasetError(ValueError):
    """Inconsistent weights, sizes or parts for a blend."""


def blending_indices(weights: Sequence[float], size: int) -> tuple[np.ndarray, np.ndarray]:
    """(dataset_index, dataset_sample_index) of length ``size`` for normalised ``weights``."""
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim != 1 or len(w) == 0 or np.any(~np.isfinite(w)) or np.any(w <= 0):
        raise BlendedDatasetError(f"blend weights must be positive numbers, got {list(weights)}")
    if len(w) > np.iinfo(np.int16).max:
        raise BlendedDatasetError(f"at most {np.iinfo(np.int16).max} datasets can be blended, got {len(w)}")
    w = w / w.sum()
    # Dataset d can never hold more than w_d * (size + D) + 1 of the first `size` keys (see module doc),
    # so generating that many candidates per dataset makes the truncated merge exact.
    limits = np.ceil(w * (size + len(w))).astype(np.int64) + 1
    keys = np.concatenate([(np.arange(n, dtype=np.float64) + 0.5) / wd for n, wd in zip(limits, w)])
    owner = np.repeat(np.arange(len(w), dtype=np.int16), limits)
    local = np.concatenate([np.arange(n, dtype=np.int64) for n in limits])
    # Stable sort on the key; candidates are laid out by dataset, so ties resolve to the lower index.
    order = np.argsort(keys, kind="stable")[:size]
    dataset_index = owner[order]
    dataset_sample_index = local[order]
    counts = np.bincount(dataset_index, minlength=len(w))
    if np.any(counts >= limits):  # cannot happen by the bound above; guard against silent truncation
        raise BlendedDatasetError("internal error: blend candidate list too short")
    return dataset_index, dataset_sample_index


class BlendedDataset:
    """``size`` samples drawn from ``parts`` in the cached blend order."""

    def __init__(self, weights: Sequence[float], size: int, cache_dir: str, split_name: str,
                 prefixes: Sequence[str]) -> None:
        if len(weights) != len(prefixes):
            raise BlendedDatasetError(f"{len(weights)} weights for {len(prefixes)} dataset prefixes")
        self.weights = [float(x) for x in weights]
        self.size = int(size)
        self.split_name = split_name
        description = {
            "class": "BlendedDataset",
            "version": _BLEND_VERSION,
            "weights": self.weights,
            "size": self.size,
            "prefixes": [os.path.basename(p) for p in prefixes],
            "split": split_name,
        }
        self.cache = IndexCache(cache_dir, f"blend-{split_name}", description,
                                ("dataset_index", "dataset_sample_index", "counts"))
        self.parts: list | None = None

    def _compute(self) -> dict[str, np.ndarray]:
        dataset_index, dataset_sample_index = blending_indices(self.weights, self.size)
        counts = np.bincount(dataset_index, minlength=len(self.weights)).astype(np.int64)
        return {"dataset_index": dataset_index, "dataset_sample_index": dataset_sample_index, "counts": counts}

    def _validate(self, arrays: dict) -> str | None:
        if arrays["dataset_index"].shape != (self.size,) or arrays["counts"].shape != (len(self.weights),):
            return "blend index shapes do not match"
        return None

    def ensure_index(self) -> bool:
        """Build (or reuse) the cached blend order. True when it built it."""
        return self.cache.ensure(self._compute, self._validate)

    def load_counts(self) -> np.ndarray:
        """How many samples each part must provide (read from the cache)."""
        arrays = self.cache.load()
        problem = self._validate(arrays)
        if problem is not None:
            raise BlendedDatasetError(f"index cache {self.cache.stem}: {problem}")
        return np.asarray(arrays["counts"])

    def load_index(self, parts: Sequence) -> None:
        """Memory-map the blend order and attach the part datasets (None for unused parts)."""
        arrays = self.cache.load()
        counts = np.asarray(arrays["counts"])
        for d, part in enumerate(parts):
            have = 0 if part is None else len(part)
            if have < counts[d]:
                raise BlendedDatasetError(
                    f"blend part {d} has {have} samples but the {self.split_name} blend needs {counts[d]}"
                )
        self._dataset_index = arrays["dataset_index"]
        self._dataset_sample_index = arrays["dataset_sample_index"]
        self.parts = list(parts)

    # Pickling sends the parts (which pickle small) and reloads the blend order from the cache.
    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k not in ("_dataset_index", "_dataset_sample_index")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        if self.parts is not None:
            self.load_index(self.parts)

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, idx: int):
        if self.parts is None:
            raise BlendedDatasetError("BlendedDataset used before load_index()")
        i = int(idx)
        if i < 0:
            i += self.size
        if not 0 <= i < self.size:
            raise IndexError(f"sample {idx} out of range ({self.size} samples in the {self.split_name} blend)")
        return self.parts[int(self._dataset_index[i])][int(self._dataset_sample_index[i])]

    def dataset_of(self, idx: int) -> int:
        """Which part sample ``idx`` comes from."""
        return int(self._dataset_index[idx])

    def __repr__(self) -> str:
        return f"BlendedDataset(split={self.split_name}, size={self.size}, weights={self.weights})"
