"""PretrainingSampler: exact resume, data-parallel coverage, argument errors."""
import itertools

import pytest

from megatron_ls.data.sampler import PretrainingSampler, SamplerError


def global_batches(total, consumed, micro, dp, num_micro):
    """Global batches as the union over ranks, assembled the way a training loop consumes them."""
    iters = [iter(PretrainingSampler(total, consumed, micro, r, dp)) for r in range(dp)]
    while True:
        batch = []
        try:
            for _ in range(num_micro):
                for it in iters:
                    batch.append(next(it))
        except StopIteration:
            return
        yield batch


@pytest.mark.parametrize("micro, dp, num_micro", [(1, 1, 1), (2, 4, 1), (3, 2, 4), (4, 3, 2)])
def test_resume_gives_exactly_the_next_global_batch(micro, dp, num_micro):
    total = 1000
    gbs = micro * dp * num_micro
    full = list(global_batches(total, 0, micro, dp, num_micro))
    assert len(full) == total // gbs
    for k in (0, 1, 7, len(full) - 1):
        resumed = list(global_batches(total, k * gbs, micro, dp, num_micro))
        assert resumed == full[k:]  # every later batch, rank by rank, micro-batch by micro-batch


@pytest.mark.parametrize("micro, dp, num_micro", [(2, 4, 1), (3, 2, 4), (5, 3, 2)])
def test_dp_shards_cover_each_global_batch_exactly_once(micro, dp, num_micro):
    gbs = micro * dp * num_micro
    for i, batch in enumerate(global_batches(600, 0, micro, dp, num_micro)):
        flat = sorted(itertools.chain.from_iterable(batch))
        assert flat == list(range(i * gbs, (i + 1) * gbs))  # a contiguous slab, no gaps, no repeats
    # Within one step, rank r holds the r-th micro-batch-sized slice of the slab.
    sampler = PretrainingSampler(100, 10, 3, 2, 4)
    assert next(iter(sampler)) == [16, 17, 18]


def test_length_and_drop_last():
    s = PretrainingSampler(103, 3, 4, 1, 5)
    assert len(s) == len(list(s)) == 5
    keep = [list(PretrainingSampler(103, 0, 4, r, 5, drop_last=False)) for r in range(5)]
    assert [len(k) for k in keep] == [len(PretrainingSampler(103, 0, 4, r, 5, drop_last=False)) for r in range(5)]
    flat = sorted(itertools.chain.from_iterable(itertools.chain.from_iterable(keep)))
    assert flat == list(range(103))
    assert keep[0][-1] == [100, 101, 102] and keep[1][-1] == [84, 85, 86, 87]


@pytest.mark.parametrize(
    "args, message",
    [
        ((0, 0, 1, 0, 1), "total_samples"),
        ((10, 0, 0, 0, 1), "--micro-batch-size"),
        ((10, 0, 1, 0, 0), "data_parallel_size"),
        ((10, 0, 1, 2, 2), "data_parallel_rank 2"),
        ((10, 11, 1, 0, 1), "consumed_samples 11"),
    ],
)
def test_bad_arguments(args, message):
    with pytest.raises(SamplerError, match=message):
        PretrainingSampler(*args)
