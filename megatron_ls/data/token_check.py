"""Token ids checked against the vocabulary when a dataset is opened.

An id outside the embedding table either crashes training (an ``IndexError`` deep in the embedding, with one
tensor-parallel rank) or, with several, is silently masked to zero by the vocab-parallel embedding. The smallest
and largest id of a ``.bin`` are computed once (a chunked pass over the memory-mapped file) and cached as a small
JSON next to the index caches, keyed by the ``.bin``/``.idx`` sizes and modification times, so later runs pay
nothing.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Callable, Optional, Sequence


from megatron_ls.data.atomic import atomic_write_text
from megatron_ls.data.indexed_dataset import IndexedDataset, data_file_path, index_file_path

__all__ = ["TokenIdError", "token_id_range", "check_token_ids", "data_path_prefixes"]

_CHUNK = 1 << 24  # tokens per pass step: bounded memory whatever the file size


class TokenIdError(ValueError):
    """A dataset holds a token id the model's vocabulary does not have."""


def _cache_path(prefix: str, cache_dir: Optional[str]) -> str:
    stats = [os.stat(data_file_path(prefix)), os.stat(index_file_path(prefix))]
    key = json.dumps([os.path.abspath(prefix)] + [(s.st_size, s.st_mtime_ns) for s in stats])
    digest = hashlib.md5(key.encode(), usedforsecurity=False).hexdigest()
    directory = cache_dir or os.path.join(os.path.dirname(os.path.abspath(prefix)), "index-cache")
    return os.path.join(directory, f"{os.path.basename(prefix)}-token-range-{digest}.json")


def _scan(prefix: str) -> tuple[int, int]:
    tokens = IndexedDataset(prefix).tokens
    if tokens.size == 0:
        return 0, -1
    low, high = None, None
    for start in range(0, tokens.size, _CHUNK):
        chunk = tokens[start:start + _CHUNK]
        lo, hi = int(chunk.min()), int(chunk.max())
        low = lo if low is None else min(low, lo)
        high = hi if high is None else max(high, hi)
    return int(low), int(high)


def token_id_range(prefix: str, cache_dir: Optional[str] = None, *, write_cache: bool = True) -> tuple[int, int]:
    """``(min, max)`` token id of ``prefix.bin`` (``(0, -1)`` when empty), from the cache when it is current."""
    path = _cache_path(prefix, cache_dir)
    try:
        with open(path, encoding="utf-8") as fh:
            cached = json.load(fh)
        return int(cached["min"]), int(cached["max"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    low, high = _scan(prefix)
    if write_cache:
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            atomic_write_text(path, json.dumps({"prefix": os.path.abspath(prefix), "min": low, "max": high}) + "\n")
        except OSError:
            pass  # a read-only data directory: the check still runs, it is just not cached
    return low, high


def data_path_prefixes(data_path: Sequence[str]) -> list[str]:
    """The dataset prefixes of a Megatron ``--data-path`` (``P1 P2 ...`` or ``W1 P1 W2 P2 ...``)."""
    items = [str(x) for x in data_path]
    try:
        float(items[0])
    except (IndexError, ValueError):
        return items
    return items[1::2]


def check_token_ids(prefixes: Sequence[str], vocab_size: int, what: str, cache_dir: Optional[str] = None, *,
                    is_builder: bool = True, barrier: Optional[Callable[[], None]] = None) -> None:
    """Raise :class:`TokenIdError` naming the file, the id and ``vocab_size`` when an id is outside it.

    ``what`` says where the vocabulary comes from (e.g. "--tokenizer-type ByteTokenizer"). In a multi-process job
    the builder scans and caches first; after ``barrier`` every process reads the cached range, so all of them
    raise the same error.
    """
    if is_builder:
        for prefix in prefixes:
            token_id_range(prefix, cache_dir)
    if barrier is not None:
        barrier()
    for prefix in prefixes:
        low, high = token_id_range(prefix, cache_dir, write_cache=False)
        if high >= vocab_size or low < 0:
            bad = high if high >= vocab_size else low
            raise TokenIdError(f"{data_file_path(prefix)} holds token id {bad}, outside the vocabulary of "
                               f"{vocab_size} ids ({what}); re-tokenize the data with this tokenizer, or use the "
                               f"tokenizer it was made with")
