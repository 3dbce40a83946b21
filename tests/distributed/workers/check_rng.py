"""RNG rule across ranks: default stream identical everywhere, tracked stream per TP rank."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from _common import all_gather_obj
from megatron_ls.parallel import state
from megatron_ls.parallel.random import get_rng_tracker, model_parallel_manual_seed

SEED = 1234


def check_tracker() -> None:
    model_parallel_manual_seed(SEED)
    ones = torch.ones(64)
    outside = F.dropout(ones, p=0.5, training=True)
    with get_rng_tracker().fork():
        inside = F.dropout(ones, p=0.5, training=True)
    after = torch.rand(4)
    tp_rank = state.get_tensor_model_parallel_rank()
    tp_size = state.get_tensor_model_parallel_world_size()

    # Forking does not disturb the default stream: replay without the fork and compare.
    model_parallel_manual_seed(SEED)
    F.dropout(ones, p=0.5, training=True)
    assert torch.equal(torch.rand(4), after), "fork() disturbed the default generator"

    everyone = all_gather_obj((tp_rank, outside.tolist(), inside.tolist()))
    for other_tp, other_out, other_in in everyone:
        assert other_out == outside.tolist(), "dropout outside the TP region differs across ranks"
        if other_tp == tp_rank:
            assert other_in == inside.tolist(), "tracked dropout differs between ranks of equal TP index"
        else:
            assert other_in != inside.tolist(), "tracked dropout is equal across TP ranks"
    assert len({t for t, _, _ in everyone}) == tp_size


def check_tracked_seed_value() -> None:
    model_parallel_manual_seed(SEED)
    with get_rng_tracker().fork():
        got = torch.rand(8)
    want = torch.rand(8, generator=torch.Generator().manual_seed(SEED + 2718
                                                                 + state.get_tensor_model_parallel_rank()))
    assert torch.equal(got, want), "model-parallel-rng is not seeded with seed + 2718 + tp_rank"


def checks(tag: str) -> list[tuple[str, Callable[[], None]]]:
    """RNG checks named with the layout ``tag``."""
    return [(f"{tag}:rng-tracker", check_tracker), (f"{tag}:rng-seed", check_tracked_seed_value)]
