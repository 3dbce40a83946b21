"""Weighted blending of several datasets (``--data-path 0.7 a 0.3 b``) in Megatron-LM's order, cached.

Megatron's rule (``build_blending_indices``): sample ``i`` of the blend comes from the dataset with the
largest shortfall ``w_d * max(i, 1) - taken_d`` (the first such dataset on a tie), and is that dataset's
next unused sample. The comparison is done in float64 exactly as megatron-core does, so ties (common
with round weights) fall the same way; the result equals megatron-core's arrays (tested).
"""
from __future__ import annotations

import os
from typing import Sequence

import numpy as np

from megatron_ls.data.index_cache import IndexCache

__all__ = ["BlendedDataset", "BlendedDatasetError", "blending_indices", "normalize_weights"]

_BLEND_VERSION = 2


class BlendedDatasetError(ValueError):
    """Inconsistent weights, sizes or parts for a blend."""


def normalize_weights(weights: Sequence[float]) -> list[float]:
    """Megatron's ``normalize``: float64 weights divided by their numpy sum (bit-identical rounding)."""
    w = np.array(weights, dtype=np.float64)
    return (w / np.sum(w)).tolist()


def _greedy_choices(w: list[float], size: int) -> np.ndarray:
    """Dataset chosen at each of ``size`` positions (the largest-shortfall rule, float64 as Megatron)."""
    out = np.empty(size, dtype=np.int16)
    taken = [0] * len(w)
    if len(w) == 1:
        out[:] = 0
        return out
    if len(w) == 2:  # the common case, unrolled
        w0, w1 = w
        c0 = c1 = 0
        picks = bytearray(size)
        for i in range(size):
            t = float(i) if i > 1 else 1.0
            if w1 * t - c1 > w0 * t - c0:
                picks[i] = 1
                c1 += 1
            else:
                c0 += 1
        out[:] = np.frombuffer(picks, dtype=np.uint8)
        return out
    others = range(1, len(w))
    w0 = w[0]
    for i in range(size):
        t = float(i) if i > 1 else 1.0
        best, best_err = 0, w0 * t - taken[0]
        for d in others:
            err = w[d] * t - taken[d]
            if err > best_err:
                best, best_err = d, err
        out[i] = best
        taken[best] += 1
    return out


def blending_indices(weights: Sequence[float], size: int) -> tuple[np.ndarray, np.ndarray]:
    """``(dataset_index int16, dataset_sample_index int64)`` of length ``size`` for normalised ``weights``."""
    w = [float(x) for x in weights]
    if not w or any(not np.isfinite(x) or x <= 0 for x in w):
        raise BlendedDatasetError(f"blend weights must be positive numbers, got {list(weights)}")
    if len(w) >= np.iinfo(np.int16).max:
        raise BlendedDatasetError(f"at most {np.iinfo(np.int16).max - 1} datasets can be blended, got {len(w)}")
    dataset_index = _greedy_choices(w, int(size))
    dataset_sample_index = np.empty(int(size), dtype=np.int64)
    for d in range(len(w)):
        where = np.flatnonzero(dataset_index == d)
        dataset_sample_index[where] = np.arange(len(where), dtype=np.int64)
    return dataset_index, dataset_sample_index


class BlendedDataset:
    """``size`` samples drawn from ``parts`` (built GPT datasets) in Megatron's blend order."""

    def __init__(self, parts: Sequence, weights: Sequence[float], size: int, cache_dir: str,
                 split_name: str) -> None:
        if len(weights) != len(parts):
            raise BlendedDatasetError(f"{len(weights)} weights for {len(parts)} datasets")
        self.parts = list(parts)
        self.weights = normalize_weights(weights)  # Megatron normalises again here (bit-for-bit)
        self.size = int(size)
        self.split_name = split_name
        description = {
            "class": "BlendedDataset",
            "version": _BLEND_VERSION,
            "weights": self.weights,
            "size": self.size,
            "parts": [os.path.basename(p.cache.stem) for p in self.parts],
            "split": split_name,
        }
        self.cache = IndexCache(cache_dir, f"blend-{split_name}", description,
                                ("dataset_index", "dataset_sample_index"))
        self._loaded = False

    def _compute(self) -> dict[str, np.ndarray]:
        dataset_index, dataset_sample_index = blending_indices(self.weights, self.size)
        counts = np.bincount(dataset_index, minlength=len(self.parts))
        for d, part in enumerate(self.parts):
            if counts[d] > len(part):
                raise BlendedDatasetError(
                    f"the {self.split_name} blend takes {counts[d]} samples from {part!r}, which has {len(part)}; "
                    "raise --mid-level-dataset-surplus (Megatron's remedy)")
        return {"dataset_index": dataset_index, "dataset_sample_index": dataset_sample_index}

    def _validate(self, arrays: dict) -> str | None:
        if arrays["dataset_index"].shape != (self.size,) or arrays["dataset_sample_index"].shape != (self.size,):
            return "blend index shapes do not match"
        return None

    def ensure_index(self) -> bool:
        """Build (or reuse) the cached blend order. True when it built it."""
        return self.cache.ensure(self._compute, self._validate)

    def load_index(self) -> None:
        """Memory-map the blend order."""
        arrays = self.cache.load()
        problem = self._validate(arrays)
        if problem is not None:
            raise BlendedDatasetError(f"index cache {self.cache.stem}: {problem}")
        self.dataset_index = arrays["dataset_index"]
        self.dataset_sample_index = arrays["dataset_sample_index"]
        self._loaded = True

    # Pickling sends the parts (which pickle small) and reloads the blend order from the cache.
    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k not in ("dataset_index", "dataset_sample_index")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        if self._loaded:
            self.load_index()

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, idx: int) -> dict[str, np.ndarray]:
        if not self._loaded:
            raise BlendedDatasetError("BlendedDataset used before load_index()")
        i = int(idx)
        if i < 0:
            i += self.size
        if not 0 <= i < self.size:
            raise IndexError(f"sample {idx} out of range ({self.size} samples in the {self.split_name} blend)")
        return self.parts[int(self.dataset_index[i])][int(self.dataset_sample_index[i])]

    def dataset_of(self, idx: int) -> int:
        """Which part sample ``idx`` comes from."""
        return int(self.dataset_index[idx])

    def __repr__(self) -> str:
        return f"BlendedDataset(split={self.split_name}, size={self.size}, weights={self.weights})"
