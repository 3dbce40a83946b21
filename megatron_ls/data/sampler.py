"""Resumable, data-parallel-sharded pretraining sampler (Megatron's ``MegatronPretrainingSampler``).

Samples are consumed in order ``consumed_samples, consumed_samples + 1, ...`` (the dataset itself is
already shuffled). Each step takes the next ``micro_batch_size * data_parallel_size`` indices as one
contiguous slab; data-parallel rank ``r`` gets the ``r``-th ``micro_batch_size`` slice of it. A global
batch is ``num_micro_batches`` consecutive slabs, so it is a contiguous range of sample indices, and
resuming means constructing the sampler with the ``consumed_samples`` saved in the checkpoint.
"""
from __future__ import annotations

from typing import Iterator

__all__ = ["PretrainingSampler", "SamplerError"]


class SamplerError(ValueError):
    """Inconsistent sampler arguments."""


class PretrainingSampler:
    """Yields this rank's micro-batches (lists of sample indices) starting at ``consumed_samples``."""

    def __init__(
        self,
        total_samples: int,
        consumed_samples: int,
        micro_batch_size: int,
        data_parallel_rank: int,
        data_parallel_size: int,
        drop_last: bool = True,
    ) -> None:
        if total_samples <= 0:
            raise SamplerError(f"total_samples must be > 0, got {total_samples}")
        if micro_batch_size <= 0:
            raise SamplerError(f"--micro-batch-size must be > 0, got {micro_batch_size}")
        if data_parallel_size <= 0:
            raise SamplerError(f"data_parallel_size must be > 0, got {data_parallel_size}")
        if not 0 <= data_parallel_rank < data_parallel_size:
            raise SamplerError(f"data_parallel_rank {data_parallel_rank} not in [0, {data_parallel_size})")
        if not 0 <= consumed_samples <= total_samples:
            raise SamplerError(
                f"consumed_samples {consumed_samples} outside [0, {total_samples}]: the checkpoint was made "
                "with more samples than this dataset has"
            )
        self.total_samples = int(total_samples)
        self.consumed_samples = int(consumed_samples)
        self.micro_batch_size = int(micro_batch_size)
        self.data_parallel_rank = int(data_parallel_rank)
        self.data_parallel_size = int(data_parallel_size)
        self.drop_last = drop_last
        self._slab = self.micro_batch_size * self.data_parallel_size

    def __len__(self) -> int:
        """Number of micro-batches this rank will yield."""
        remaining = self.total_samples - self.consumed_samples
        full = remaining // self._slab
        if not self.drop_last and remaining % self._slab > self.data_parallel_rank * self.micro_batch_size:
            full += 1
        return full

    def __iter__(self) -> Iterator[list[int]]:
        start = self.data_parallel_rank * self.micro_batch_size
        end = start + self.micro_batch_size
        slab_start = self.consumed_samples
        while slab_start + self._slab <= self.total_samples:
            yield list(range(slab_start + start, slab_start + end))
            slab_start += self._slab
        if not self.drop_last and slab_start + start < self.total_samples:
            # A short last slab: each rank takes what is left of its slice (possibly fewer samples).
            yield list(range(slab_start + start, min(slab_start + end, self.total_samples)))
