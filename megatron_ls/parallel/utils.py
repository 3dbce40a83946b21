"""Small helpers shared by the parallel layers: exact division and last-dim splitting."""
from __future__ import annotations

import torch


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
