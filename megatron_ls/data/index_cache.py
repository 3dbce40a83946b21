"""On-disk caches of dataset index arrays (``.npy``), keyed by a hash of everything that shapes them.

A cache entry is a set of ``{stem}-{name}.npy`` files plus ``{stem}-description.json``. The description
(the full, human-readable key) is written last, atomically, so its presence marks a complete entry;
the stem contains a hash of the description, so a changed input selects a different entry (stale
entries are never reused). One rank builds (``is_builder``), the others memory-map the result.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Callable

import numpy as np

from megatron_ls.data.atomic import atomic_save_npy, atomic_write_text

__all__ = ["IndexCache", "IndexCacheError", "hash_array"]


class IndexCacheError(ValueError):
    """An index cache is missing (on a non-building rank), unwritable or corrupt."""


def hash_array(array: np.ndarray) -> str:
    """Hex digest of an array's dtype, shape and contents."""
    h = hashlib.blake2b(digest_size=16)
    arr = np.ascontiguousarray(array)
    h.update(f"{arr.dtype.str}{arr.shape}".encode())
    h.update(memoryview(arr).cast("B"))
    return h.hexdigest()


class IndexCache:
    """One cache entry: ``description`` (a JSON-able dict) determines the file names."""

    def __init__(self, cache_dir: str, label: str, description: dict, names: tuple[str, ...]) -> None:
        self.cache_dir = cache_dir
        self.description = description
        self.names = names
        text = json.dumps(description, sort_keys=True)
        digest = hashlib.md5(text.encode(), usedforsecurity=False).hexdigest()
        self.stem = os.path.join(cache_dir, f"{label}-{digest}")
        self._text = text

    def path(self, name: str) -> str:
        """Path of the ``.npy`` for array ``name``."""
        return f"{self.stem}-{name}.npy"

    @property
    def description_path(self) -> str:
        """Path of the description (completion marker)."""
        return f"{self.stem}-description.json"

    def is_complete(self) -> bool:
        """True when the description matches and every array file exists."""
        try:
            with open(self.description_path, encoding="utf-8") as f:
                if json.dumps(json.load(f), sort_keys=True) != self._text:
                    return False
        except (OSError, ValueError):
            return False
        return all(os.path.isfile(self.path(n)) for n in self.names)

    def build(self, compute: Callable[[], dict[str, np.ndarray]]) -> None:
        """Compute the arrays and write them (arrays first, description last, all atomic)."""
        try:
            os.makedirs(self.cache_dir, exist_ok=True)
        except OSError as exc:
            raise IndexCacheError(
                f"cannot create index cache directory {self.cache_dir}: {exc.strerror}; pass a writable cache_dir"
            ) from exc
        arrays = compute()
        if set(arrays) != set(self.names):
            raise IndexCacheError(f"{self.stem}: computed arrays {sorted(arrays)} != expected {sorted(self.names)}")
        # Remove the marker first so a crash mid-rewrite (e.g. after corruption) leaves no "complete" entry.
        if os.path.exists(self.description_path):
            os.remove(self.description_path)
        for name in self.names:
            atomic_save_npy(self.path(name), arrays[name])
        atomic_write_text(self.description_path, json.dumps(self.description, sort_keys=True, indent=1) + "\n")

    def load(self) -> dict[str, np.ndarray]:
        """Memory-map every array; raises ``IndexCacheError`` when the entry is missing or unreadable."""
        if not self.is_complete():
            raise IndexCacheError(
                f"index cache {self.description_path} is missing or incomplete; the building rank "
                "(is_builder=True) must create it before the others load it (pass a barrier)"
            )
        out = {}
        for name in self.names:
            try:
                # np.asarray drops the np.memmap subclass, whose Python-level __array_finalize__
                # would otherwise run on every slice in the per-sample hot path.
                out[name] = np.asarray(np.load(self.path(name), mmap_mode="r", allow_pickle=False))
            except (OSError, ValueError) as exc:
                raise IndexCacheError(f"index cache file {self.path(name)} is corrupt: {exc}") from exc
        return out

    def ensure(self, compute: Callable[[], dict[str, np.ndarray]], validate: Callable[[dict], str | None]) -> bool:
        """Build unless a complete, valid entry exists. Returns True when it (re)built."""
        if self.is_complete():
            try:
                problem = validate(self.load())
            except IndexCacheError as exc:
                problem = str(exc)
            if problem is None:
                return False
        self.build(compute)
        return True
