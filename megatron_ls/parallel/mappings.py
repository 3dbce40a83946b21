"""Autograd-aware collectives over the tensor-parallel group (Megatron's f / g operators).

=======================================  ======================  ======================
function                                  forward                 backward
=======================================  ======================  ======================
copy_to_tensor_model_parallel_region      identity                all-reduce
reduce_from_tensor_model_parallel_region  all-reduce              identity
scatter_to_tensor_model_parallel_region   keep own last-dim chunk all-gather (last dim)
gather_from_tensor_model_parallel_region  all-gather (last dim)   keep own chunk
sum_over_tensor_model_parallel_region     all-reduce              all-reduce
=======================================  ======================  ======================

All are the identity when the TP size is 1. Every collective is recorded in ``comm_stats``.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_ls.parallel import state
from megatron_ls.parallel.comm_stats import record_collective
from megatron_ls.parallel.utils import split_tensor_along_last_dim


def _owned_contiguous(t: torch.Tensor) -> torch.Tensor:
    # In-place collectives must not write into a tensor autograd (or the caller) still holds.
    return t.clone(memory_format=torch.contiguous_format) if t.is_contiguous() else t.contiguous()


def all_reduce_tp(t: torch.Tensor, direction: str) -> torch.Tensor:
    """Sum ``t`` over the TP group into a fresh tensor (no autograd)."""
    out = _owned_contiguous(t)
    record_collective("all_reduce", direction, out)
    dist.all_reduce(out, group=state.get_tensor_model_parallel_group())
    return out


def _split_last(t: torch.Tensor) -> torch.Tensor:
    world = state.get_tensor_model_parallel_world_size()
    return split_tensor_along_last_dim(t, world)[state.get_tensor_model_parallel_rank()].contiguous()


def all_gather_last_dim_tp(t: torch.Tensor, direction: str) -> torch.Tensor:
    """Concatenate every TP rank's ``t`` along the last dimension, in TP-rank order (no autograd)."""
    world = state.get_tensor_model_parallel_world_size()
    t = t.contiguous()
    record_collective("all_gather", direction, t)
    parts = [torch.empty_like(t) for _ in range(world)]
    dist.all_gather(parts, t, group=state.get_tensor_model_parallel_group())
    return torch.cat(parts, dim=-1)


class _CopyToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return all_reduce_tp(grad, "backward")


class _ReduceFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return all_reduce_tp(x, "forward")

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return grad


class _ScatterToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return _split_last(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return all_gather_last_dim_tp(grad, "backward")


class _GatherFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return all_gather_last_dim_tp(x, "forward")

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return _split_last(grad)


class _SumOverTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return all_reduce_tp(x, "forward")

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return all_reduce_tp(grad, "backward")


def _tp_active() -> bool:
    return state.get_tensor_model_parallel_world_size() > 1


def copy_to_tensor_model_parallel_region(x: torch.Tensor) -> torch.Tensor:
    """Identity forward, all-reduce of the gradient backward (input of a column-parallel layer)."""
    return _CopyToTP.apply(x) if _tp_active() else x


def reduce_from_tensor_model_parallel_region(x: torch.Tensor) -> torch.Tensor:
    """All-reduce forward, identity backward (output of a row-parallel layer)."""
    return _ReduceFromTP.apply(x) if _tp_active() else x


def scatter_to_tensor_model_parallel_region(x: torch.Tensor) -> torch.Tensor:
    """Keep this rank's chunk of the last dim forward; all-gather the gradient backward."""
    return _ScatterToTP.apply(x) if _tp_active() else x


def gather_from_tensor_model_parallel_region(x: torch.Tensor) -> torch.Tensor:
    """All-gather along the last dim forward; keep this rank's chunk of the gradient backward."""
    return _GatherFromTP.apply(x) if _tp_active() else x


def sum_over_tensor_model_parallel_region(x: torch.Tensor) -> torch.Tensor:
    """All-reduce forward and backward: a sum of per-rank partial values that every rank then uses
    (e.g. LayerNorm statistics over heads split across TP ranks)."""
    return _SumOverTP.apply(x) if _tp_active() else x
