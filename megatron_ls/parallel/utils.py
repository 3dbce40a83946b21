"""Small helpers shared by the parallel code: exact division, last-dim splitting, an any-rank vote."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist


def divide(numerator: int, denominator: int, what: str | None = None) -> int:
    """Return ``numerator // denominator``; raise ValueError unless it divides exactly.

    ``what`` names the quantity in the error message (e.g. ``"hidden_size"``).
    """
    if denominator <= 0:
        raise ValueError(f"cannot divide {what or 'a size'}={numerator} into {denominator} partitions: "
                         f"the number of partitions must be positive")
    if numerator % denominator != 0:
        raise ValueError(f"{what or 'size'}={numerator} is not divisible by {denominator}"
                         f" (the tensor-parallel size or partition count); choose sizes that divide exactly")
    return numerator // denominator


def split_tensor_along_last_dim(tensor: torch.Tensor, num_partitions: int,
                                contiguous_split_chunks: bool = False) -> tuple[torch.Tensor, ...]:
    """Split ``tensor`` into ``num_partitions`` equal chunks along its last dimension.

    The chunks are views unless ``contiguous_split_chunks`` is set.
    """
    last = divide(tensor.size(-1), num_partitions, "last dimension")
    chunks = torch.split(tensor, last, dim=-1)
    if contiguous_split_chunks:
        return tuple(c.contiguous() for c in chunks)
    return chunks


def any_rank(flags: Sequence[bool]) -> list[bool]:
    """Element-wise OR of ``flags`` over all ranks, known to every rank (one all-reduce; local without a group)."""
    if not dist.is_initialized():
        return [bool(f) for f in flags]
    value = torch.tensor([1.0 if f else 0.0 for f in flags])
    if dist.get_backend() == "nccl":
        value = value.cuda()
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return [bool(v > 0) for v in value.tolist()]
