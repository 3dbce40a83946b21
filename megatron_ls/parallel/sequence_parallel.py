"""Megatron sequence parallelism (SP): autograd collectives along the sequence over the tensor-parallel group.

Outside the tensor-parallel blocks (LayerNorms, dropout, residual adds) each TP rank holds ``1/TP`` of the
tokens, ``(B, N/TP, h)``; the TP blocks all-gather the sequence before their column-parallel linear and
reduce-scatter it after their row-parallel one, instead of Megatron's plain all-reduce (Korthikanti et al.,
"Reducing Activation Recomputation in Large Transformer Models").

=========================================  =========================  =========================
function                                    forward                    backward
=========================================  =========================  =========================
scatter_to_sequence_parallel_region         keep own sequence slice    all-gather
gather_from_sequence_parallel_region        all-gather                 reduce-scatter
linear_with_sequence_gather                 all-gather, linear         all-gather again, reduce-scatter
reduce_scatter_to_sequence_parallel_region  reduce-scatter             all-gather
sequence_parallel_grad                      identity                   all-reduce (param grads)
=========================================  =========================  =========================

The sequence is dimension 1 (tensors are ``(B, N, ...)``); rank ``t`` holds tokens ``[t·N/TP, (t+1)·N/TP)`` of
its (context-parallel local) sequence. Parameters used on sequence slices (LayerNorms, row-parallel biases, the
position table) see only this rank's tokens, so their gradients are summed over TP (Megatron marks them
``sequence_parallel`` and all-reduces them after backward; here ``sequence_parallel_grad`` does it at the use).
"""
from __future__ import annotations

import contextlib
from typing import Callable, ContextManager

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from megatron_ls.parallel import state
from megatron_ls.parallel.comm_stats import record_collective
from megatron_ls.parallel.random import MODEL_PARALLEL_RNG, get_rng_tracker

SEQUENCE_DIM = 1


def _tp() -> int:
    return state.get_tensor_model_parallel_world_size()


def sequence_parallel_active(enabled: bool) -> bool:
    """SP is on when asked for and there is more than one TP rank (Megatron turns it off at TP = 1)."""
    return bool(enabled) and _tp() > 1


def split_sequence(x: torch.Tensor) -> torch.Tensor:
    """This TP rank's contiguous slice of dimension 1 (no communication, no autograd)."""
    tp = _tp()
    if x.shape[SEQUENCE_DIM] % tp:
        raise ValueError(f"sequence parallelism: {x.shape[SEQUENCE_DIM]} tokens do not split over "
                         f"{tp} tensor-parallel ranks")
    return x.chunk(tp, dim=SEQUENCE_DIM)[state.get_tensor_model_parallel_rank()].contiguous()


def all_gather_sequence(x: torch.Tensor, direction: str) -> torch.Tensor:
    """Every TP rank's slice, concatenated along dimension 1 in rank order (no autograd)."""
    x = x.contiguous()
    record_collective("all_gather", direction, x)
    parts = [torch.empty_like(x) for _ in range(_tp())]
    dist.all_gather(parts, x, group=state.get_tensor_model_parallel_group())
    return torch.cat(parts, dim=SEQUENCE_DIM)


def reduce_scatter_sequence(x: torch.Tensor, direction: str) -> torch.Tensor:
    """Sum ``x`` over TP ranks and keep this rank's slice of dimension 1 (no autograd)."""
    parts = [p.contiguous() for p in x.chunk(_tp(), dim=SEQUENCE_DIM)]
    record_collective("reduce_scatter", direction, x)
    out = torch.empty_like(parts[0])
    dist.reduce_scatter(out, parts, group=state.get_tensor_model_parallel_group())
    return out


def _mapping(name: str, forward: Callable[[torch.Tensor], torch.Tensor],
             backward: Callable[[torch.Tensor], torch.Tensor]) -> type:
    """An autograd function applying ``forward`` to the input and ``backward`` to the gradient."""

    def fwd(ctx, x: torch.Tensor) -> torch.Tensor:
        return forward(x)

    def bwd(ctx, grad: torch.Tensor) -> torch.Tensor:
        return backward(grad)

    return type(name, (torch.autograd.Function,), {"forward": staticmethod(fwd), "backward": staticmethod(bwd)})


_ScatterToSequence = _mapping("_ScatterToSequence", split_sequence,
                              lambda g: all_gather_sequence(g, "backward"))
# the consumer of a gathered sequence is tensor-parallel: each rank's gradient is a partial sum over its shard
_GatherFromSequence = _mapping("_GatherFromSequence", lambda x: all_gather_sequence(x, "forward"),
                               lambda g: reduce_scatter_sequence(g, "backward"))
_ReduceScatterToSequence = _mapping("_ReduceScatterToSequence", lambda x: reduce_scatter_sequence(x, "forward"),
                                    lambda g: all_gather_sequence(g, "backward"))


def _all_reduce_grad(grad: torch.Tensor) -> torch.Tensor:
    out = grad.clone(memory_format=torch.contiguous_format)
    record_collective("all_reduce", "backward", out)
    dist.all_reduce(out, group=state.get_tensor_model_parallel_group())
    return out


_SumGradOverTP = _mapping("_SumGradOverTP", lambda p: p.view_as(p), _all_reduce_grad)


class _LinearWithSequenceGather(torch.autograd.Function):
    """``F.linear(all_gather(x), W, b)`` that keeps only the local ``x`` for backward and all-gathers it again
    there (Megatron's column-parallel linear under sequence parallelism): the full-sequence input is never held
    between forward and backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor,  # type: ignore[override]
                bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return F.linear(all_gather_sequence(x, "forward"), weight, bias)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        x, weight = ctx.saved_tensors
        full = all_gather_sequence(x, "backward")
        grad_x = reduce_scatter_sequence(grad.matmul(weight), "backward")
        grad_2d = grad.reshape(-1, grad.shape[-1])
        grad_w = grad_2d.t().matmul(full.reshape(-1, full.shape[-1]))
        grad_b = grad_2d.sum(dim=0) if ctx.has_bias else None
        return grad_x, grad_w, grad_b


def scatter_to_sequence_parallel_region(x: torch.Tensor) -> torch.Tensor:
    """Keep this rank's sequence slice forward; all-gather the gradient backward."""
    return _ScatterToSequence.apply(x) if _tp() > 1 else x


def gather_from_sequence_parallel_region(x: torch.Tensor) -> torch.Tensor:
    """All-gather the sequence forward (before a column-parallel linear); reduce-scatter the gradient."""
    return _GatherFromSequence.apply(x) if _tp() > 1 else x


def linear_with_sequence_gather(x: torch.Tensor, weight: torch.Tensor,
                                bias: torch.Tensor | None = None) -> torch.Tensor:
    """A column-parallel linear on this rank's sequence slice ``x``: all-gather, then ``x W^T + b``; backward
    all-gathers ``x`` again and reduce-scatters its gradient."""
    if _tp() == 1:
        return F.linear(x, weight, bias)
    return _LinearWithSequenceGather.apply(x, weight, bias)


def reduce_scatter_to_sequence_parallel_region(x: torch.Tensor) -> torch.Tensor:
    """Sum partial outputs over TP and keep this rank's sequence slice (after a row-parallel linear)."""
    return _ReduceScatterToSequence.apply(x) if _tp() > 1 else x


def sequence_parallel_grad(param: torch.Tensor) -> torch.Tensor:
    """``param`` unchanged; its gradient is summed over TP (it was used on this rank's tokens only)."""
    return _SumGradOverTP.apply(param) if _tp() > 1 else param


def mark_sequence_parallel(param: torch.Tensor) -> None:
    """Tag a TP-replicated parameter whose gradient is summed over the sequence slices (as Megatron does)."""
    param.sequence_parallel = True  # type: ignore[attr-defined]


def sequence_parallel_rng(active: bool) -> ContextManager[None]:
    """Dropout on sequence slices draws from the TP tracker: each rank's tokens get their own masks."""
    tracker = get_rng_tracker()
    if active and MODEL_PARALLEL_RNG in tracker:
        return tracker.fork(MODEL_PARALLEL_RNG)
    return contextlib.nullcontext()


class RMSNorm(nn.Module):
    """RMSNorm (Zhang & Sennrich, 2019): ``x / sqrt(mean(x^2) + eps) * weight``, no bias, computed in fp32 for half
    inputs; under sequence parallelism its weight gradient is summed over the TP ranks like :class:`LayerNorm`'s."""

    def __init__(self, hidden_size: int, eps: float = 1e-5, sequence_parallel: bool = False) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.sequence_parallel = sequence_parallel_active(sequence_parallel)
        if self.sequence_parallel:
            mark_sequence_parallel(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = sequence_parallel_grad(self.weight) if self.sequence_parallel else self.weight
        compute = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
        y = F.rms_norm(x.to(compute), (x.shape[-1],), eps=self.eps)
        return y.to(x.dtype) * weight.to(x.dtype)


class LayerNorm(nn.LayerNorm):
    """``nn.LayerNorm`` (same parameters and state dict) that, under sequence parallelism, sums its parameter
    gradients over the TP ranks holding the other slices of the sequence."""

    def __init__(self, hidden_size: int, eps: float = 1e-5, sequence_parallel: bool = False) -> None:
        super().__init__(hidden_size, eps=eps)
        self.sequence_parallel = sequence_parallel_active(sequence_parallel)
        if self.sequence_parallel:
            mark_sequence_parallel(self.weight)
            mark_sequence_parallel(self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.sequence_parallel:
            return super().forward(x)
        return F.layer_norm(x, self.normalized_shape, sequence_parallel_grad(self.weight),
                            sequence_parallel_grad(self.bias), self.eps)
