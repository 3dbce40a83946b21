"""Process-group state: start torch.distributed, build TP/CP/DP/PP groups, answer "who am I" questions.

This module doubles as DeepSpeed's ``mpu=`` argument: DeepSpeed calls the module-level getters below
(``get_model_parallel_*``, ``get_data_parallel_*``, ``get_tensor_model_parallel_*``,
``get_pipeline_model_parallel_*`` / ``get_pipe_parallel_*``, ``get_slice_parallel_*``,
``get_sequence_parallel_*``, ``get_sequence_data_parallel_*``, ``get_data_parallel_group_ranks``).
It deliberately does NOT define ``initialize_sequence_parallel``: DeepSpeed takes that attribute as the
mark of a Ulysses-only mpu and then ignores our model-parallel group.

Getters are safe before :func:`initialize_model_parallel`: sizes are 1, ranks 0, groups ``None``
(the data-parallel getters report the whole world when torch.distributed alone is running, which is the
truth when nothing is model-parallel).
"""
from __future__ import annotations

import datetime
import os
from typing import Any

import torch
import torch.distributed as dist

from megatron_ls.parallel import timeouts
from megatron_ls.parallel.launch_env import discover_mpi_launch, free_port
from megatron_ls.parallel.topology import RankLayout, build_rank_layout, check_parallel_sizes

# Collective timeout once the group is up (DeepSpeed's default too); the rendezvous has its own timeout.
DEFAULT_COLLECTIVE_TIMEOUT_S = 1800.0

_LAYOUT: RankLayout | None = None
_GROUPS: dict[str, Any] = {}
_RANKS: dict[str, list[int]] = {}


# ----------------------------------------------------------------------------- torch.distributed start-up
def _free_local_port() -> int:
    return free_port("127.0.0.1")


def _env_int(*names: str) -> int | None:
    for name in names:
        value = os.environ.get(name)
        if value not in (None, ""):
            try:
                return int(value)
            except ValueError:
                raise ValueError(f"environment variable {name}={value!r} is not an integer") from None
    return None


def _launch_env() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun / deepspeed / OpenMPI / MPICH variables, else (0, 1, 0)."""
    rank = _env_int("RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK")
    world = _env_int("WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE")
    local = _env_int("LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID")
    if rank is None and world is None:
        return 0, 1, 0
    if rank is None or world is None:
        raise RuntimeError(f"incomplete launcher environment: rank={rank}, world size={world}; set both "
                           f"RANK and WORLD_SIZE (torchrun and the deepspeed launcher do this)")
    if not 0 <= rank < world:
        raise RuntimeError(f"RANK={rank} is outside WORLD_SIZE={world}")
    return rank, world, (local if local is not None else 0)


def initialize_distributed(backend: str | None = None, timeout_s: float = 300,
                           collective_timeout_s: float | None = None) -> None:
    """Start torch.distributed from the launcher environment (idempotent).

    torchrun / the deepspeed launcher provide RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT; under mpirun they
    are found through mpi4py (:mod:`megatron_ls.parallel.launch_env`); plain ``python`` gets a world of 1 on
    a free local port. ``backend`` defaults to nccl with CUDA, gloo without.
    The CUDA device is set from LOCAL_RANK. If the rendezvous at MASTER_ADDR:MASTER_PORT cannot be completed
    within ``timeout_s`` seconds a RuntimeError is raised. Collectives afterwards time out after
    ``collective_timeout_s`` (default 30 min), in this group and in every group made here later
    (:mod:`megatron_ls.parallel.timeouts`; with NCCL its watchdog enforces it).
    """
    if dist.is_initialized():
        return
    if not dist.is_available():
        raise RuntimeError("torch.distributed is not available in this torch build")
    discover_mpi_launch()  # mpirun: RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT via mpi4py
    rank, world, local_rank = _launch_env()
    cuda = torch.cuda.is_available()
    backend = backend or ("nccl" if cuda else "gloo")
    if backend == "nccl" and not cuda:
        raise RuntimeError("backend 'nccl' needs CUDA, which is not available; use backend='gloo'")
    if cuda and backend in ("nccl", "cpu:gloo,cuda:nccl"):
        if local_rank >= torch.cuda.device_count():
            raise RuntimeError(f"LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} CUDA devices "
                               f"are visible; launch at most that many processes per node")
        torch.cuda.set_device(local_rank)
    elif cuda:
        torch.cuda.set_device(local_rank % torch.cuda.device_count())

    if world == 1 and "MASTER_PORT" not in os.environ:
        # Plain `python`: make the environment look like a one-process launch (DeepSpeed reads it too).
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ["MASTER_PORT"] = str(_free_local_port())
        for name, value in (("RANK", 0), ("WORLD_SIZE", 1), ("LOCAL_RANK", 0)):
            os.environ.setdefault(name, str(value))
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        if not os.environ.get(name):
            raise RuntimeError(f"{name} is not set for a world of {world} processes; launch with torchrun, "
                               f"the deepspeed launcher or mpirun (with mpi4py), or export MASTER_ADDR and "
                               f"MASTER_PORT")
    addr, port = os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"]
    rdzv_timeout = datetime.timedelta(seconds=float(timeout_s))
    pg_timeout = timeouts.set_collective_timeout(collective_timeout_s
                                                 or max(DEFAULT_COLLECTIVE_TIMEOUT_S, timeout_s))
    timeouts.apply_backend_environment(backend)  # NCCL reads its error handling mode when the group is made
    try:
        # Rendezvous first (TCPStore, honours torchrun's agent store), bounded by timeout_s; rank 0's
        # store waits for all WORLD_SIZE clients, so a missing peer also ends in an error, not a hang.
        store, _, _ = next(dist.rendezvous("env://", rank=rank, world_size=world, timeout=rdzv_timeout))
        store.set_timeout(pg_timeout)
        dist.init_process_group(backend=backend, store=dist.PrefixStore("default_pg", store), rank=rank,
                                world_size=world, **timeouts.group_kwargs())
    except Exception as exc:  # noqa: BLE001 - re-raised with the launch context
        raise RuntimeError(
            f"torch.distributed rendezvous failed for rank {rank}/{world} at MASTER_ADDR={addr} "
            f"MASTER_PORT={port} (backend {backend}, timeout {timeout_s}s): {exc}. Check that MASTER_ADDR is "
            f"reachable from every node, MASTER_PORT is free on it, and all {world} processes were started"
        ) from exc


def shutdown_distributed() -> None:
    """Barrier, drop the model-parallel groups and destroy the default process group (if initialised)."""
    destroy_model_parallel()
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


# ----------------------------------------------------------------------------- model-parallel groups
def initialize_model_parallel(tensor_model_parallel_size: int = 1, pipeline_model_parallel_size: int = 1,
                              context_parallel_size: int = 1) -> None:
    """Create the TP, CP, DP, PP, model (TP x PP), DP x CP and embedding groups (collective on all ranks).

    Rank layout: ``rank = ((pp*DP + dp)*CP + cp)*TP + tp``. Raises ValueError when the world size is not
    divisible by TP*PP*CP.
    """
    global _LAYOUT
    if not dist.is_initialized():
        raise RuntimeError("initialize_model_parallel() needs torch.distributed; call "
                           "initialize_distributed() first")
    world, rank = dist.get_world_size(), dist.get_rank()
    check_parallel_sizes(world, tensor_model_parallel_size, pipeline_model_parallel_size,
                         context_parallel_size)
    if _LAYOUT is not None:
        same = (_LAYOUT.tensor_model_parallel_size, _LAYOUT.pipeline_model_parallel_size,
                _LAYOUT.context_parallel_size) == (tensor_model_parallel_size, pipeline_model_parallel_size,
                                                   context_parallel_size)
        if same and _LAYOUT.world_size == world:
            return
        raise RuntimeError("model parallel is already initialised with a different layout; call "
                           "destroy_model_parallel() first")
    layout = build_rank_layout(world, tensor_model_parallel_size, pipeline_model_parallel_size,
                               context_parallel_size)
    for kind in ("tensor", "pipeline", "data", "context", "model", "data_context", "embedding"):
        for ranks in getattr(layout, kind):
            # Every rank must call new_group for every group, in the same order.
            group = dist.new_group(ranks=ranks, **timeouts.group_kwargs())
            if rank in ranks:
                _GROUPS[kind] = group
                _RANKS[kind] = list(ranks)
    _LAYOUT = layout


def model_parallel_is_initialized() -> bool:
    """True once :func:`initialize_model_parallel` has run (and not been destroyed)."""
    return _LAYOUT is not None


def destroy_model_parallel() -> None:
    """Forget the model-parallel groups (the default process group is left alone)."""
    global _LAYOUT
    if dist.is_available() and dist.is_initialized():
        for group in {id(g): g for g in _GROUPS.values() if g is not None}.values():
            try:
                dist.destroy_process_group(group)
            except (RuntimeError, ValueError):  # already gone with the default group
                pass
    _GROUPS.clear()
    _RANKS.clear()
    _LAYOUT = None


def get_rank_layout() -> RankLayout | None:
    """The full layout of the world (all groups), or None before initialisation."""
    return _LAYOUT


def _group(kind: str) -> Any:
    return _GROUPS.get(kind) if _LAYOUT is not None else None


def _size(kind: str) -> int:
    return len(_RANKS[kind]) if _LAYOUT is not None else 1


def _rank_in(kind: str) -> int:
    if _LAYOUT is None:
        return 0
    return _RANKS[kind].index(dist.get_rank())


# tensor model parallel
def get_tensor_model_parallel_group() -> Any:
    """The TP group of this rank (None before initialisation)."""
    return _group("tensor")


def get_tensor_model_parallel_world_size() -> int:
    """Number of ranks sharing one layer's weights."""
    return _size("tensor")


def get_tensor_model_parallel_rank() -> int:
    """This rank's index inside its TP group."""
    return _rank_in("tensor")


def get_tensor_model_parallel_src_rank() -> int:
    """Global rank of TP index 0 in this rank's TP group (broadcast source for TP-replicated inputs)."""
    return _RANKS["tensor"][0] if _LAYOUT is not None else 0


def get_tensor_model_parallel_ranks() -> list[int]:
    """Global ranks of this rank's TP group."""
    return list(_RANKS["tensor"]) if _LAYOUT is not None else [0]


# pipeline model parallel
def get_pipeline_model_parallel_group() -> Any:
    """The PP group of this rank (one rank per stage)."""
    return _group("pipeline")


def get_pipeline_model_parallel_world_size() -> int:
    """Number of pipeline stages."""
    return _size("pipeline")


def get_pipeline_model_parallel_rank() -> int:
    """This rank's pipeline stage."""
    return _rank_in("pipeline")


def get_pipeline_model_parallel_ranks() -> list[int]:
    """Global ranks of this rank's pipeline, stage 0 first."""
    return list(_RANKS["pipeline"]) if _LAYOUT is not None else [0]


def is_pipeline_first_stage() -> bool:
    """True on pipeline stage 0."""
    return get_pipeline_model_parallel_rank() == 0


def is_pipeline_last_stage() -> bool:
    """True on the last pipeline stage."""
    return get_pipeline_model_parallel_rank() == get_pipeline_model_parallel_world_size() - 1


# data parallel
def get_data_parallel_group() -> Any:
    """The DP group (replicas of the same shard); None = the world when model parallel is not set up."""
    return _group("data")


def get_data_parallel_world_size() -> int:
    """Number of data-parallel replicas."""
    if _LAYOUT is None:
        return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    return _size("data")


def get_data_parallel_rank() -> int:
    """This rank's data-parallel index (selects its slice of each global batch)."""
    if _LAYOUT is None:
        return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    return _rank_in("data")


def get_data_parallel_group_ranks() -> list[int]:
    """Global ranks of this rank's DP group."""
    if _LAYOUT is None:
        return list(range(get_data_parallel_world_size()))
    return list(_RANKS["data"])


# context parallel
def get_context_parallel_group() -> Any:
    """The CP group (ranks holding different sequence chunks of the same samples)."""
    return _group("context")


def get_context_parallel_world_size() -> int:
    """Number of sequence chunks per sample."""
    return _size("context")


def get_context_parallel_rank() -> int:
    """Which sequence chunk this rank holds."""
    return _rank_in("context")


def get_context_parallel_ranks() -> list[int]:
    """Global ranks of this rank's CP group."""
    return list(_RANKS["context"]) if _LAYOUT is not None else [0]


def get_data_parallel_group_with_context_parallel() -> Any:
    """DP x CP group: every rank holding the same parameters (gradients are reduced over it)."""
    return _group("data_context")


def get_data_parallel_world_size_with_context_parallel() -> int:
    """Size of the DP x CP group."""
    return get_data_parallel_world_size() if _LAYOUT is None else _size("data_context")


def get_data_parallel_rank_with_context_parallel() -> int:
    """This rank's index in the DP x CP group."""
    return get_data_parallel_rank() if _LAYOUT is None else _rank_in("data_context")


# model parallel = TP x PP (DeepSpeed: grad-norm reduction, checkpoint mp_rank)
def get_model_parallel_group() -> Any:
    """TP x PP group: the ranks that together hold one full model replica."""
    return _group("model")


def get_model_parallel_world_size() -> int:
    """TP size x PP size."""
    return _size("model")


def get_model_parallel_rank() -> int:
    """Index in the TP x PP group (``pp * TP + tp``); DeepSpeed names checkpoint files with it."""
    return _rank_in("model")


def get_embedding_group() -> Any:
    """First + last pipeline stage (for tied input/output embeddings)."""
    return _group("embedding")


def get_embedding_group_ranks() -> list[int]:
    """Global ranks of this rank's embedding group."""
    return list(_RANKS["embedding"]) if _LAYOUT is not None else [0]


# DeepSpeed aliases (deepspeed.utils.bwc and runtime/pipe look these names up).
get_pipe_parallel_group = get_pipeline_model_parallel_group
get_pipe_parallel_world_size = get_pipeline_model_parallel_world_size
get_pipe_parallel_rank = get_pipeline_model_parallel_rank
get_slice_parallel_group = get_tensor_model_parallel_group
get_slice_parallel_world_size = get_tensor_model_parallel_world_size
get_slice_parallel_rank = get_tensor_model_parallel_rank
# DeepSpeed's "sequence parallel" = our context parallel; it reduces gradients over the
# "sequence-data-parallel" group (DP x CP) and divides by DP only, i.e. sums over CP ranks.
get_sequence_parallel_group = get_context_parallel_group
get_sequence_parallel_world_size = get_context_parallel_world_size
get_sequence_parallel_rank = get_context_parallel_rank
get_sequence_data_parallel_group = get_data_parallel_group_with_context_parallel
get_sequence_data_parallel_world_size = get_data_parallel_world_size_with_context_parallel
get_sequence_data_parallel_rank = get_data_parallel_rank_with_context_parallel
