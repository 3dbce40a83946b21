"""Process start-up: accelerator selection, torch.distributed, model-parallel groups, seeds, shutdown."""
from __future__ import annotations

import os
import random

import numpy as np
import torch


def select_accelerator() -> str:
    """Point DeepSpeed at the CPU accelerator when there is no CUDA (must run before deepspeed is imported)."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        return "cpu"
    return "cuda"


def initialize_megatron_ls(tensor_model_parallel_size: int = 1, pipeline_model_parallel_size: int = 1,
                           context_parallel_size: int = 1, backend: str | None = None,
                           timeout_minutes: float = 10.0, seed: int = 1234) -> None:
    """torch.distributed (from the launcher's env, or a world of one), TP/PP/DP groups, and every RNG seeded."""
    select_accelerator()
    from megatron_ls.parallel import state as ps
    from megatron_ls.parallel.random import model_parallel_manual_seed

    ps.initialize_distributed(backend=backend, timeout_s=timeout_minutes * 60)
    import deepspeed
    import torch.distributed as dist

    # DeepSpeed keeps its own communication handle; let it adopt the process group we just made.
    deepspeed.init_distributed(dist_backend=dist.get_backend(), auto_mpi_discovery=False,
                               dist_init_required=False)
    if not ps.model_parallel_is_initialized():
        ps.initialize_model_parallel(tensor_model_parallel_size, pipeline_model_parallel_size,
                                     context_parallel_size)
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
