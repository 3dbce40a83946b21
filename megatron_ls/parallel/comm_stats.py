"""Communication accounting: every collective issued by ``megatron_ls.parallel`` is recorded here.

Usage::

    with CommCounter() as cc:
        loss = model(x).sum(); loss.backward()
    cc.calls[("all_reduce", "forward")], cc.bytes[("all_reduce", "backward")]

Bytes are the payload this rank hands to the collective (``numel * element_size`` of its local input
tensor), not wire traffic: an all-reduce of a ``b x s x h`` fp32 tensor counts ``4*b*s*h`` bytes whatever
the algorithm; an all-gather counts the local shard. Collectives over a group of size 1 are never issued
and never recorded.
"""
from __future__ import annotations

from collections import Counter
from typing import Iterator

import torch

_ACTIVE: list["CommCounter"] = []

OPS = ("all_reduce", "all_gather", "reduce_scatter", "broadcast", "all_to_all", "send", "recv")
DIRECTIONS = ("forward", "backward")


class CommCounter:
    """Context manager tallying collective calls and bytes per (op, direction) while active (nestable)."""

    def __init__(self) -> None:
        self.calls: Counter[tuple[str, str]] = Counter()
        self.bytes: Counter[tuple[str, str]] = Counter()
        self.elements: Counter[tuple[str, str]] = Counter()

    def __enter__(self) -> "CommCounter":
        _ACTIVE.append(self)
        return self

    def __exit__(self, *exc: object) -> None:
        _ACTIVE.remove(self)

    def add(self, op: str, direction: str, numel: int, nbytes: int) -> None:
        """Record one collective."""
        key = (op, direction)
        self.calls[key] += 1
        self.elements[key] += numel
        self.bytes[key] += nbytes

    def count(self, op: str | None = None, direction: str | None = None) -> int:
        """Number of calls, optionally restricted to one op and/or direction."""
        return sum(v for k, v in self.calls.items() if _match(k, op, direction))

    def total_bytes(self, op: str | None = None, direction: str | None = None) -> int:
        """Bytes, optionally restricted to one op and/or direction."""
        return sum(v for k, v in self.bytes.items() if _match(k, op, direction))

    def total_elements(self, op: str | None = None, direction: str | None = None) -> int:
        """Elements, optionally restricted to one op and/or direction."""
        return sum(v for k, v in self.elements.items() if _match(k, op, direction))

    def reset(self) -> None:
        """Zero all tallies."""
        self.calls.clear()
        self.bytes.clear()
        self.elements.clear()

    def summary(self) -> dict[str, dict[str, int]]:
        """``{"all_reduce/forward": {"calls": n, "bytes": b, "elements": e}, ...}`` (JSON-friendly)."""
        return {f"{op}/{d}": {"calls": self.calls[(op, d)], "bytes": self.bytes[(op, d)],
                              "elements": self.elements[(op, d)]}
                for op, d in sorted(self.calls)}

    def __repr__(self) -> str:
        return f"CommCounter({self.summary()})"


def _match(key: tuple[str, str], op: str | None, direction: str | None) -> bool:
    return (op is None or key[0] == op) and (direction is None or key[1] == direction)


def record_collective(op: str, direction: str, tensor: torch.Tensor) -> None:
    """Tell every active :class:`CommCounter` that ``op`` ran on ``tensor`` in ``direction``."""
    if not _ACTIVE:
        return
    if op not in OPS:
        raise ValueError(f"unknown collective kind {op!r}; expected one of {OPS}")
    if direction not in DIRECTIONS:
        raise ValueError(f"unknown direction {direction!r}; expected one of {DIRECTIONS}")
    numel = tensor.numel()
    nbytes = numel * tensor.element_size()
    for counter in _ACTIVE:
        counter.add(op, direction, numel, nbytes)


def active_counters() -> Iterator[CommCounter]:
    """The counters currently recording (innermost last)."""
    return iter(list(_ACTIVE))
