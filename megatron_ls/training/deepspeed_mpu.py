"""The ``mpu`` handed to DeepSpeed: our groups, with data parallel = DP x CP and no "sequence parallel".

Context-parallel (CP) ranks hold the same parameters and see different tokens of the same samples, so for
DeepSpeed they are data-parallel replicas. Handing DeepSpeed ``megatron_ls.parallel.state`` directly (whose
``get_sequence_*`` names describe CP) is not uniform across DeepSpeed's paths (measured by
``tests/e2e/workers/ds_cp_scaling.py``):

* plain engine, ZeRO 0/1/2: gradients summed over DP x CP, divided by DP (a sum over CP);
* ZeRO-3: parameters partitioned over ``mpu.get_data_parallel_group()`` = DP only, so gradients are never
  reduced across CP ranks and the CP replicas drift apart;
* pipeline engine (its own grid, data axis = DP x CP): averaged over DP x CP.

With this view every engine and ZeRO stage averages over DP x CP, exactly like plain data parallelism, and each
CP rank's loss is ``CP x`` its share of the micro-batch loss (Megatron-LM's convention; see
``megatron_ls.model.gpt.context_parallel_loss``). With CP = 1 it reports what ``state`` reports.
"""
from __future__ import annotations

from typing import Any

from megatron_ls.parallel import state as ps


class DataContextParallelMpu:
    """DeepSpeed's Megatron-style ``mpu`` interface over ``megatron_ls.parallel.state``, CP folded into DP."""

    # data parallel, as DeepSpeed must see it: every rank holding the same parameters (DP x CP)
    @staticmethod
    def get_data_parallel_group() -> Any:
        return ps.get_data_parallel_group_with_context_parallel()

    @staticmethod
    def get_data_parallel_world_size() -> int:
        return ps.get_data_parallel_world_size_with_context_parallel()

    @staticmethod
    def get_data_parallel_rank() -> int:
        return ps.get_data_parallel_rank_with_context_parallel()

    @staticmethod
    def get_data_parallel_group_ranks() -> list[int]:
        layout = ps.get_rank_layout()
        if layout is None:
            return ps.get_data_parallel_group_ranks()
        import torch.distributed as dist

        return list(layout.group_of("data_context", dist.get_rank()))

    # everything else is our state's answer
    get_model_parallel_group = staticmethod(ps.get_model_parallel_group)
    get_model_parallel_world_size = staticmethod(ps.get_model_parallel_world_size)
    get_model_parallel_rank = staticmethod(ps.get_model_parallel_rank)
    get_tensor_model_parallel_group = staticmethod(ps.get_tensor_model_parallel_group)
    get_tensor_model_parallel_world_size = staticmethod(ps.get_tensor_model_parallel_world_size)
    get_tensor_model_parallel_rank = staticmethod(ps.get_tensor_model_parallel_rank)
    get_tensor_model_parallel_src_rank = staticmethod(ps.get_tensor_model_parallel_src_rank)
    get_pipeline_model_parallel_group = staticmethod(ps.get_pipeline_model_parallel_group)
    get_pipeline_model_parallel_world_size = staticmethod(ps.get_pipeline_model_parallel_world_size)
    get_pipeline_model_parallel_rank = staticmethod(ps.get_pipeline_model_parallel_rank)
    get_pipe_parallel_group = staticmethod(ps.get_pipeline_model_parallel_group)
    get_pipe_parallel_world_size = staticmethod(ps.get_pipeline_model_parallel_world_size)
    get_pipe_parallel_rank = staticmethod(ps.get_pipeline_model_parallel_rank)
    get_slice_parallel_group = staticmethod(ps.get_tensor_model_parallel_group)
    get_slice_parallel_world_size = staticmethod(ps.get_tensor_model_parallel_world_size)
    get_slice_parallel_rank = staticmethod(ps.get_tensor_model_parallel_rank)


def deepspeed_mpu() -> DataContextParallelMpu:
    """The object to pass as ``deepspeed.initialize(..., mpu=...)`` for a non-pipeline engine."""
    return DataContextParallelMpu()
