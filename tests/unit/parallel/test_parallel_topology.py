"""Rank layout arithmetic, size validation, divide(), and the not-initialised defaults of the getters."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from megatron_ls.parallel import state
from megatron_ls.parallel.topology import build_rank_layout, check_parallel_sizes, global_rank, rank_coord
from megatron_ls.parallel.utils import divide, split_tensor_along_last_dim

KINDS = ("tensor", "pipeline", "data", "context", "model", "data_context")


def test_world_size_mismatch_message() -> None:
    with pytest.raises(ValueError) as info:
        check_parallel_sizes(6, tensor_model_parallel_size=4, pipeline_model_parallel_size=1)
    msg = str(info.value)
    assert "world size 6" in msg and "tensor_model_parallel_size (4)" in msg
    assert "pipeline_model_parallel_size (1)" in msg and "context_parallel_size (1)" in msg and "= 4" in msg
    with pytest.raises(ValueError, match="pipeline_model_parallel_size must be a positive integer"):
        check_parallel_sizes(4, pipeline_model_parallel_size=0)
    assert check_parallel_sizes(16, 2, 2, 2) == 2


@pytest.mark.parametrize("world,tp,pp,cp", [(16, 2, 2, 2), (8, 1, 2, 1), (12, 3, 1, 2), (1, 1, 1, 1)])
def test_layout_is_a_partition_with_the_documented_formula(world: int, tp: int, pp: int, cp: int) -> None:
    layout = build_rank_layout(world, tp, pp, cp)
    dp = layout.data_parallel_size
    assert dp * tp * pp * cp == world
    for kind in KINDS:
        flat = sorted(r for g in getattr(layout, kind) for r in g)
        assert flat == list(range(world)), kind
    sizes = {"tensor": tp, "pipeline": pp, "data": dp, "context": cp, "model": tp * pp, "data_context": dp * cp}
    for kind, size in sizes.items():
        assert all(len(g) == size for g in getattr(layout, kind)), kind
    for rank in range(world):
        c = rank_coord(rank, tp, cp, dp)
        assert rank == ((c.pp * dp + c.dp) * cp + c.cp) * tp + c.tp == global_rank(c.pp, c.dp, c.cp, c.tp,
                                                                                   tp, cp, dp)
        # TP groups are runs of adjacent ranks; a TP group shares every other coordinate.
        assert layout.group_of("tensor", rank) == list(range(rank - c.tp, rank - c.tp + tp))
        assert all((layout.coord(r).dp, layout.coord(r).cp) == (c.dp, c.cp)
                   for r in layout.group_of("model", rank))
        assert all(layout.coord(r).tp == c.tp for r in layout.group_of("data_context", rank))
    for pipe, emb in zip(layout.pipeline, layout.embedding):
        assert emb == sorted({pipe[0], pipe[-1]})


@pytest.mark.parametrize("pp,tp,dp", [(2, 2, 2), (1, 4, 2), (4, 1, 2), (2, 1, 3)])
def test_layout_matches_deepspeed_topology(pp: int, tp: int, dp: int) -> None:
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

    topo = PipeModelDataParallelTopology(num_pp=pp, num_mp=tp, num_dp=dp)
    layout = build_rank_layout(pp * tp * dp, tp, pp, 1)
    singles = [[r] for r in range(pp * tp * dp)]  # DeepSpeed lists no groups for an axis of size 1
    assert sorted(layout.tensor) == sorted(topo.get_axis_comm_lists("model") or singles)
    assert sorted(layout.data) == sorted(topo.get_axis_comm_lists("data") or singles)
    assert sorted(layout.pipeline) == sorted(topo.get_axis_comm_lists("pipe") or singles)
    for rank in range(pp * tp * dp):
        c, ds = layout.coord(rank), topo.get_coord(rank)
        assert (c.pp, c.dp, c.tp) == (ds.pipe, ds.data, ds.model)


def test_getters_default_without_initialisation() -> None:
    if state.model_parallel_is_initialized():
        pytest.skip("another test left model parallel initialised")
    assert state.get_tensor_model_parallel_world_size() == 1 and state.get_tensor_model_parallel_rank() == 0
    assert state.get_tensor_model_parallel_group() is None and state.get_tensor_model_parallel_src_rank() == 0
    assert state.get_pipeline_model_parallel_world_size() == 1 and state.get_pipeline_model_parallel_rank() == 0
    assert state.is_pipeline_first_stage() and state.is_pipeline_last_stage()
    assert state.get_context_parallel_world_size() == 1 and state.get_context_parallel_group() is None
    assert state.get_model_parallel_world_size() == 1 and state.get_model_parallel_rank() == 0
    assert state.get_embedding_group() is None and state.get_model_parallel_group() is None
    assert state.get_pipe_parallel_world_size() == 1 and state.get_slice_parallel_rank() == 0
    if not dist.is_initialized():
        assert state.get_data_parallel_world_size() == 1 and state.get_data_parallel_rank() == 0
        assert state.get_data_parallel_group() is None and state.get_data_parallel_group_ranks() == [0]
        with pytest.raises(RuntimeError, match="initialize_distributed"):
            state.initialize_model_parallel(2)
    # DeepSpeed treats an mpu with this attribute as Ulysses-only and ignores our model-parallel group.
    assert not hasattr(state, "initialize_sequence_parallel")


def test_launch_env_parsing(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE",
                 "OMPI_COMM_WORLD_LOCAL_RANK", "PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID"):
        monkeypatch.delenv(name, raising=False)
    assert state._launch_env() == (0, 1, 0)
    monkeypatch.setenv("OMPI_COMM_WORLD_RANK", "3")
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "8")
    monkeypatch.setenv("OMPI_COMM_WORLD_LOCAL_RANK", "1")
    assert state._launch_env() == (3, 8, 1)
    monkeypatch.setenv("RANK", "9")
    monkeypatch.setenv("WORLD_SIZE", "8")
    with pytest.raises(RuntimeError, match="RANK=9 is outside WORLD_SIZE=8"):
        state._launch_env()
    monkeypatch.setenv("RANK", "x")
    with pytest.raises(ValueError, match="RANK='x'"):
        state._launch_env()


def test_divide_and_split() -> None:
    assert divide(12, 4) == 3
    with pytest.raises(ValueError, match="hidden_size=10 is not divisible by 4"):
        divide(10, 4, "hidden_size")
    with pytest.raises(ValueError, match="must be positive"):
        divide(10, 0)
    t = torch.arange(12.0).reshape(2, 6)
    parts = split_tensor_along_last_dim(t, 3)
    assert [p.tolist() for p in parts] == [[[0, 1], [6, 7]], [[2, 3], [8, 9]], [[4, 5], [10, 11]]]
    assert all(p.is_contiguous() for p in split_tensor_along_last_dim(t, 3, contiguous_split_chunks=True))
    with pytest.raises(ValueError, match="last dimension=6 is not divisible by 4"):
        split_tensor_along_last_dim(t, 4)
