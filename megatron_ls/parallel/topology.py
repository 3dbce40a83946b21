"""Pure rank-layout arithmetic (no process groups): which global ranks form which parallel group.

Layout, fastest-varying first: tensor (TP), context (CP), data (DP), pipeline (PP)::

    rank = ((pp * DP + dp) * CP + cp) * TP + tp

Adjacent ranks form a TP group (TP traffic is the heaviest, keep it inside a node). With CP=1 this is
DeepSpeed's ``PipeModelDataParallelTopology`` axis order (pipe, data, model).
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RankCoord:
    """Coordinates of one global rank in the (pp, dp, cp, tp) grid."""

    pp: int
    dp: int
    cp: int
    tp: int


@dataclass(frozen=True)
class RankLayout:
    """All parallel groups of a world, as sorted lists of global ranks."""

    world_size: int
    tensor_model_parallel_size: int
    pipeline_model_parallel_size: int
    context_parallel_size: int
    data_parallel_size: int
    tensor: list[list[int]]
    pipeline: list[list[int]]
    data: list[list[int]]
    context: list[list[int]]
    model: list[list[int]]            # TP x PP: everything that holds a different part of one replica
    data_context: list[list[int]]     # DP x CP: ranks holding the same parameters (gradient reduction)
    embedding: list[list[int]]        # first + last pipeline stage of every pipeline group

    def coord(self, rank: int) -> RankCoord:
        """Grid coordinates of ``rank``."""
        return rank_coord(rank, self.tensor_model_parallel_size, self.context_parallel_size,
                          self.data_parallel_size)

    def group_of(self, kind: str, rank: int) -> list[int]:
        """The group of ``kind`` (a field name such as ``"tensor"``) that contains ``rank``."""
        for ranks in getattr(self, kind):
            if rank in ranks:
                return ranks
        raise ValueError(f"rank {rank} is in no {kind!r} group of a world of {self.world_size}")


def check_parallel_sizes(world_size: int, tensor_model_parallel_size: int = 1,
                         pipeline_model_parallel_size: int = 1, context_parallel_size: int = 1) -> int:
    """Validate the parallel sizes against the world size and return the data-parallel size."""
    sizes = {"tensor_model_parallel_size": tensor_model_parallel_size,
             "pipeline_model_parallel_size": pipeline_model_parallel_size,
             "context_parallel_size": context_parallel_size}
    for name, value in sizes.items():
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if world_size < 1:
        raise ValueError(f"world size must be positive, got {world_size}")
    model = tensor_model_parallel_size * pipeline_model_parallel_size * context_parallel_size
    if world_size % model != 0:
        raise ValueError(
            f"world size {world_size} is not divisible by tensor_model_parallel_size "
            f"({tensor_model_parallel_size}) x pipeline_model_parallel_size ({pipeline_model_parallel_size}) "
            f"x context_parallel_size ({context_parallel_size}) = {model}; launch a multiple of {model} "
            f"processes or change --tensor-model-parallel-size / --pipeline-model-parallel-size / "
            f"--context-parallel-size")
    return world_size // model


def global_rank(pp: int, dp: int, cp: int, tp: int, tp_size: int, cp_size: int, dp_size: int) -> int:
    """Global rank of grid point (pp, dp, cp, tp)."""
    return ((pp * dp_size + dp) * cp_size + cp) * tp_size + tp


def rank_coord(rank: int, tp_size: int, cp_size: int, dp_size: int) -> RankCoord:
    """Inverse of :func:`global_rank`."""
    tp = rank % tp_size
    cp = (rank // tp_size) % cp_size
    dp = (rank // (tp_size * cp_size)) % dp_size
    pp = rank // (tp_size * cp_size * dp_size)
    return RankCoord(pp=pp, dp=dp, cp=cp, tp=tp)


def build_rank_layout(world_size: int, tensor_model_parallel_size: int = 1,
                      pipeline_model_parallel_size: int = 1, context_parallel_size: int = 1) -> RankLayout:
    """Compute every parallel group of the world (same result on every rank, no communication)."""
    tp_n, pp_n, cp_n = tensor_model_parallel_size, pipeline_model_parallel_size, context_parallel_size
    dp_n = check_parallel_sizes(world_size, tp_n, pp_n, cp_n)

    def r(pp: int, dp: int, cp: int, tp: int) -> int:
        return global_rank(pp, dp, cp, tp, tp_n, cp_n, dp_n)

    grid = [(pp, dp, cp) for pp in range(pp_n) for dp in range(dp_n) for cp in range(cp_n)]
    tensor = [[r(pp, dp, cp, tp) for tp in range(tp_n)] for pp, dp, cp in grid]
    context = [[r(pp, dp, cp, tp) for cp in range(cp_n)]
               for pp in range(pp_n) for dp in range(dp_n) for tp in range(tp_n)]
    data = [[r(pp, dp, cp, tp) for dp in range(dp_n)]
            for pp in range(pp_n) for cp in range(cp_n) for tp in range(tp_n)]
    pipeline = [[r(pp, dp, cp, tp) for pp in range(pp_n)]
                for dp in range(dp_n) for cp in range(cp_n) for tp in range(tp_n)]
    model = [sorted(r(pp, dp, cp, tp) for pp in range(pp_n) for tp in range(tp_n))
             for dp in range(dp_n) for cp in range(cp_n)]
    data_context = [sorted(r(pp, dp, cp, tp) for dp in range(dp_n) for cp in range(cp_n))
                    for pp in range(pp_n) for tp in range(tp_n)]
    embedding = [sorted({ranks[0], ranks[-1]}) for ranks in pipeline]
    return RankLayout(world_size=world_size, tensor_model_parallel_size=tp_n,
                      pipeline_model_parallel_size=pp_n, context_parallel_size=cp_n,
                      data_parallel_size=dp_n, tensor=tensor, pipeline=pipeline, data=data,
                      context=context, model=model, data_context=data_context, embedding=embedding)
