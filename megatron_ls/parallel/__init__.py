"""Parallelism: process groups, Megatron-style tensor-parallel layers and collectives, RNG rules.

Depends only on torch (and may use ``megatron_ls.ops``); never on model/training/data.
"""
from megatron_ls.parallel import state
from megatron_ls.parallel.comm_stats import CommCounter
from megatron_ls.parallel.cross_entropy import vocab_parallel_cross_entropy
from megatron_ls.parallel.init import init_method_normal, scaled_init_method_normal
from megatron_ls.parallel.layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    param_is_tensor_parallel,
    parallel_lm_logits,
)
from megatron_ls.parallel.mappings import (
    copy_to_tensor_model_parallel_region,
    gather_from_tensor_model_parallel_region,
    reduce_from_tensor_model_parallel_region,
    scatter_to_tensor_model_parallel_region,
)
from megatron_ls.parallel.random import (
    get_rng_state_dict,
    get_rng_tracker,
    model_parallel_manual_seed,
    set_rng_state_dict,
)
from megatron_ls.parallel.state import (
    destroy_model_parallel,
    initialize_distributed,
    initialize_model_parallel,
    model_parallel_is_initialized,
    shutdown_distributed,
)
from megatron_ls.parallel.utils import divide, split_tensor_along_last_dim

__all__ = [
    "state", "CommCounter", "vocab_parallel_cross_entropy", "init_method_normal", "scaled_init_method_normal",
    "ColumnParallelLinear", "RowParallelLinear", "VocabParallelEmbedding", "param_is_tensor_parallel",
    "parallel_lm_logits", "copy_to_tensor_model_parallel_region", "gather_from_tensor_model_parallel_region",
    "reduce_from_tensor_model_parallel_region", "scatter_to_tensor_model_parallel_region",
    "get_rng_state_dict", "get_rng_tracker", "model_parallel_manual_seed", "set_rng_state_dict",
    "destroy_model_parallel", "initialize_distributed", "initialize_model_parallel",
    "model_parallel_is_initialized", "shutdown_distributed", "divide", "split_tensor_along_last_dim",
]
