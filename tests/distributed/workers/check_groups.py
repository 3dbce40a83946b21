"""Group layout at 4 ranks: which ranks share which group, and that the groups really communicate."""
from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist

from megatron_ls.parallel import state

# (tp, pp, cp) -> expected groups in a world of 4; rank = ((pp*DP + dp)*CP + cp)*TP + tp
SINGLES = [[0], [1], [2], [3]]
EXPECTED: dict[tuple[int, int, int], dict[str, list[list[int]]]] = {
    (2, 2, 1): {"tensor": [[0, 1], [2, 3]], "pipeline": [[0, 2], [1, 3]], "data": SINGLES,
                "context": SINGLES, "model": [[0, 1, 2, 3]], "data_context": SINGLES,
                "embedding": [[0, 2], [1, 3]]},
    (2, 1, 1): {"tensor": [[0, 1], [2, 3]], "pipeline": SINGLES, "data": [[0, 2], [1, 3]],
                "context": SINGLES, "model": [[0, 1], [2, 3]], "data_context": [[0, 2], [1, 3]],
                "embedding": SINGLES},
    (2, 1, 2): {"tensor": [[0, 1], [2, 3]], "pipeline": SINGLES, "data": SINGLES,
                "context": [[0, 2], [1, 3]], "model": [[0, 1], [2, 3]], "data_context": [[0, 2], [1, 3]],
                "embedding": SINGLES},
    (1, 2, 1): {"tensor": SINGLES, "pipeline": [[0, 2], [1, 3]], "data": [[0, 1], [2, 3]],
                "context": SINGLES, "model": [[0, 2], [1, 3]], "data_context": [[0, 1], [2, 3]],
                "embedding": [[0, 2], [1, 3]]},
    (4, 1, 1): {"tensor": [[0, 1, 2, 3]], "pipeline": SINGLES, "data": SINGLES, "context": SINGLES,
                "model": [[0, 1, 2, 3]], "data_context": SINGLES, "embedding": SINGLES},
}

GETTERS = {  # kind -> (group getter, size getter, rank getter)
    "tensor": (state.get_tensor_model_parallel_group, state.get_tensor_model_parallel_world_size,
               state.get_tensor_model_parallel_rank),
    "pipeline": (state.get_pipeline_model_parallel_group, state.get_pipeline_model_parallel_world_size,
                 state.get_pipeline_model_parallel_rank),
    "data": (state.get_data_parallel_group, state.get_data_parallel_world_size, state.get_data_parallel_rank),
    "context": (state.get_context_parallel_group, state.get_context_parallel_world_size,
                state.get_context_parallel_rank),
    "model": (state.get_model_parallel_group, state.get_model_parallel_world_size,
              state.get_model_parallel_rank),
    "data_context": (state.get_data_parallel_group_with_context_parallel,
                     state.get_data_parallel_world_size_with_context_parallel,
                     state.get_data_parallel_rank_with_context_parallel),
    "embedding": (state.get_embedding_group, lambda: len(state.get_embedding_group_ranks()),
                  lambda: state.get_embedding_group_ranks().index(dist.get_rank())),
}


def _mine(groups: list[list[int]]) -> list[int]:
    me = dist.get_rank()
    return next(g for g in groups if me in g)


def check_layout(key: tuple[int, int, int]) -> None:
    me = dist.get_rank()
    expected = EXPECTED[key]
    layout = state.get_rank_layout()
    assert layout is not None and state.model_parallel_is_initialized()
    for kind, groups in expected.items():
        assert getattr(layout, kind) == groups, f"{kind}: layout {getattr(layout, kind)} != {groups}"
        ranks = _mine(groups)
        group_fn, size_fn, rank_fn = GETTERS[kind]
        group = group_fn()
        assert size_fn() == len(ranks) == dist.get_world_size(group), f"{kind} size"
        assert rank_fn() == ranks.index(me) == dist.get_rank(group), f"{kind} rank"
        # The group is real: summing global ranks over it gives the sum of its members.
        t = torch.tensor([float(me)])
        dist.all_reduce(t, group=group)
        assert t.item() == sum(ranks), f"{kind}: all-reduce over the group gave {t.item()}, members {ranks}"
    tp, pp, _ = key
    coord = layout.coord(me)
    assert state.get_model_parallel_rank() == coord.pp * tp + coord.tp
    assert state.get_tensor_model_parallel_src_rank() == _mine(expected["tensor"])[0]
    assert state.get_data_parallel_group_ranks() == _mine(expected["data"])
    assert state.is_pipeline_first_stage() == (coord.pp == 0)
    assert state.is_pipeline_last_stage() == (coord.pp == pp - 1)
    # The DeepSpeed-facing aliases answer like the Megatron names.
    assert state.get_pipe_parallel_world_size() == pp and state.get_slice_parallel_world_size() == tp
    assert state.get_sequence_parallel_world_size() == key[2]
    assert state.get_sequence_data_parallel_world_size() == len(_mine(expected["data_context"]))


def check_bad_size() -> None:
    state.destroy_model_parallel()
    try:
        state.initialize_model_parallel(tensor_model_parallel_size=3)
    except ValueError as exc:
        msg = str(exc)
        assert "world size 4" in msg and "tensor_model_parallel_size (3)" in msg, msg
    else:
        raise AssertionError("TP=3 on 4 ranks did not raise ValueError")
    assert not state.model_parallel_is_initialized()


def checks(key: tuple[int, int, int]) -> list[tuple[str, Callable[[], None]]]:
    """Group checks for layout ``key`` (only for worlds of 4)."""
    if dist.get_world_size() != 4 or key not in EXPECTED:
        return []
    return [(f"{key}:groups", lambda: check_layout(key))]
