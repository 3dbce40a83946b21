"""Process start-up: accelerator selection, torch.distributed, model-parallel groups, seeds, shutdown."""
from __future__ import annotations

import contextlib
import io
import os
import random
import warnings

import numpy as np
import torch


def select_accelerator() -> str:
    """Point DeepSpeed at the CPU accelerator when there is no CUDA (must run before deepspeed is imported)."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        return "cpu"
    return "cuda"


# Context-parallel ranks hold different tokens: their dropout streams are offset by this much per CP rank.
CONTEXT_PARALLEL_SEED_STRIDE = 100_003


def initialize_megatron_ls(tensor_model_parallel_size: int = 1, pipeline_model_parallel_size: int = 1,
                           context_parallel_size: int = 1, backend: str | None = None,
                           timeout_minutes: float = 10.0, seed: int = 1234,
                           context_parallel_layout: str = "balanced") -> None:
    """torch.distributed (from the launcher's env, or a world of one), TP/CP/DP/PP groups, the CP token layout,
    and every RNG seeded.

    Weights never come from these streams (each module seeds its own, ``model/init_rng.py``); they drive dropout.
    Under context parallelism each CP rank's streams are offset, so the CP pieces of one sample do not share one
    dropout pattern (TP ranks of a CP rank still share the default stream, as they must).
    """
    select_accelerator()
    from megatron_ls.parallel import state as ps
    from megatron_ls.parallel.random import model_parallel_manual_seed
    from megatron_ls.training import faults

    # --distributed-timeout-minutes bounds the rendezvous and every collective (not torch's 30-minute default);
    # with NCCL, initialize_distributed also switches on the watchdog's error handling (parallel/timeouts.py).
    ps.initialize_distributed(backend=backend, timeout_s=timeout_minutes * 60,
                              collective_timeout_s=timeout_minutes * 60)
    import deepspeed
    import torch.distributed as dist

    # DeepSpeed keeps its own communication handle; let it adopt the process group we just made. Lines every
    # rank would print the same (DeepSpeed's op-build line, library warnings) come from rank 0 only.
    quiet = dist.get_rank() != 0
    if quiet:
        for category in (FutureWarning, DeprecationWarning, UserWarning):
            warnings.filterwarnings("ignore", category=category)
    with contextlib.redirect_stdout(io.StringIO()) if quiet else contextlib.nullcontext():
        deepspeed.init_distributed(dist_backend=dist.get_backend(), auto_mpi_discovery=False,
                                   dist_init_required=False)
    if not ps.model_parallel_is_initialized():
        ps.initialize_model_parallel(tensor_model_parallel_size, pipeline_model_parallel_size,
                                     context_parallel_size)
    faults.bound_collective_timeouts(timeout_minutes)
    from megatron_ls.parallel.context_parallel import set_context_layout_kind

    set_context_layout_kind(context_parallel_layout)
    seed = seed + CONTEXT_PARALLEL_SEED_STRIDE * ps.get_context_parallel_rank()
    set_seed(seed)
    model_parallel_manual_seed(seed)


def set_seed(seed: int) -> None:
    """Seed python, numpy and torch identically on every rank (weights are then layout-independent)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def shutdown() -> None:
    """Barrier, then destroy the process group: skipping this makes gloo runs abort at exit now and then."""
    from megatron_ls.parallel import state as ps

    ps.destroy_model_parallel()
    ps.shutdown_distributed()
