"""Megatron-style tensor-parallel layers: column/row-parallel linear, vocab-parallel embedding, LM logits.

Initialisation rule (the exactness contract): each layer builds the FULL weight on CPU in fp32, calls
``init_method(full_weight)`` with torch's default generator (every rank seeded identically by the caller),
then keeps its contiguous shard. The same seed therefore gives the same full model at any TP size, and at
TP=1 these layers are exactly ``nn.Linear`` / ``nn.Embedding`` initialised with ``init_method``.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from megatron_ls.parallel import state
from megatron_ls.parallel.init import InitMethod, default_init_method
from megatron_ls.parallel.mappings import (
    copy_to_tensor_model_parallel_region,
    gather_from_tensor_model_parallel_region,
    reduce_from_tensor_model_parallel_region,
    scatter_to_tensor_model_parallel_region,
)
from megatron_ls.parallel.sequence_parallel import (
    linear_with_sequence_gather,
    mark_sequence_parallel,
    reduce_scatter_to_sequence_parallel_region,
    sequence_parallel_active,
    sequence_parallel_grad,
)
from megatron_ls.parallel.utils import divide


def set_tensor_model_parallel_attributes(param: torch.Tensor, is_parallel: bool, partition_dim: int,
                                         partition_stride: int = 1) -> None:
    """Tag ``param`` so checkpoint re-sharding and grad-norm code know how it is split across TP ranks."""
    param.tensor_model_parallel = is_parallel  # type: ignore[attr-defined]
    param.partition_dim = partition_dim  # type: ignore[attr-defined]
    param.partition_stride = partition_stride  # type: ignore[attr-defined]


def param_is_tensor_parallel(param: torch.Tensor) -> bool:
    """True for parameters that are sharded across TP ranks (each rank holds a different slice)."""
    return bool(getattr(param, "tensor_model_parallel", False))


def _default_device() -> torch.device:
    # Under a distributed GPU launch, parameters live on this rank's GPU; otherwise follow torch's default
    # device, so a single-process model is an ordinary CPU nn.Module.
    if torch.cuda.is_available() and dist.is_available() and dist.is_initialized():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.get_default_device()


def _sharded_parameter(full_shape: tuple[int, int], partition_dim: int, init_method: InitMethod,
                       dtype: torch.dtype | None, device: torch.device | str | None) -> nn.Parameter:
    """Initialise the full weight on CPU in fp32, keep this TP rank's contiguous slice along partition_dim."""
    full = torch.empty(full_shape, dtype=torch.float32, device="cpu")
    init_method(full)
    world = state.get_tensor_model_parallel_world_size()
    per = divide(full_shape[partition_dim], world,
                 f"{'output' if partition_dim == 0 else 'input'} dimension")
    shard = full.narrow(partition_dim, state.get_tensor_model_parallel_rank() * per, per)
    shard = shard.to(dtype=dtype or torch.get_default_dtype(), device=device or _default_device())
    if world > 1 and shard.untyped_storage().data_ptr() == full.untyped_storage().data_ptr():
        shard = shard.clone(memory_format=torch.contiguous_format)  # don't keep the full weight alive
    param = nn.Parameter(shard.contiguous())
    set_tensor_model_parallel_attributes(param, True, partition_dim)
    return param


def _zeros(n: int, dtype: torch.dtype | None, device: torch.device | str | None) -> nn.Parameter:
    return nn.Parameter(torch.zeros(n, dtype=dtype or torch.get_default_dtype(),
                                    device=device or _default_device()))


class ColumnParallelLinear(nn.Module):
    """``y = x A^T + b`` with ``A`` split by rows (output features) across TP ranks.

    Weight shape ``(output_size/tp, input_size)``: the tp-th contiguous block of the full weight's rows.
    Returns this rank's ``output_size/tp`` features, or all of them with ``gather_output=True``. With
    ``sequence_parallel`` the input is this rank's slice of the sequence (dim 1), all-gathered first.
    """

    def __init__(self, input_size: int, output_size: int, *, bias: bool = True, gather_output: bool = False,
                 init_method: InitMethod | None = None, params_dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None, sequence_parallel: bool = False) -> None:
        super().__init__()
        self.input_size, self.output_size = input_size, output_size
        self.gather_output = gather_output
        self.sequence_parallel = sequence_parallel_active(sequence_parallel)
        tp = state.get_tensor_model_parallel_world_size()
        self.output_size_per_partition = divide(output_size, tp, "ColumnParallelLinear output_size")
        self.weight = _sharded_parameter((output_size, input_size), 0, init_method or default_init_method(),
                                         params_dtype, device)
        if bias:
            self.bias = _zeros(self.output_size_per_partition, params_dtype, device)
            set_tensor_model_parallel_attributes(self.bias, True, 0)
        else:
            self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x[..., input_size] -> y[..., output_size/tp]`` (or ``[..., output_size]`` if gathered)."""
        if self.sequence_parallel:
            y = linear_with_sequence_gather(x, self.weight, self.bias)
        else:
            y = F.linear(copy_to_tensor_model_parallel_region(x), self.weight, self.bias)
        return gather_from_tensor_model_parallel_region(y) if self.gather_output else y

    def extra_repr(self) -> str:
        return (f"input_size={self.input_size}, output_size={self.output_size} "
                f"(local {self.output_size_per_partition}), bias={self.bias is not None}, "
                f"gather_output={self.gather_output}")


class RowParallelLinear(nn.Module):
    """``y = x A^T + b`` with ``A`` split by columns (input features) across TP ranks.

    Weight shape ``(output_size, input_size/tp)``; partial products are all-reduced, then the (replicated,
    unsharded) bias is added once. ``input_is_parallel=False`` scatters a full input first. With
    ``sequence_parallel`` the partial products are reduce-scattered along the sequence (dim 1) instead.
    """

    def __init__(self, input_size: int, output_size: int, *, bias: bool = True, input_is_parallel: bool = True,
                 init_method: InitMethod | None = None, params_dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None, sequence_parallel: bool = False) -> None:
        super().__init__()
        self.input_size, self.output_size = input_size, output_size
        self.input_is_parallel = input_is_parallel
        self.sequence_parallel = sequence_parallel_active(sequence_parallel)
        if self.sequence_parallel and not input_is_parallel:
            raise ValueError("RowParallelLinear: sequence_parallel needs input_is_parallel=True")
        tp = state.get_tensor_model_parallel_world_size()
        self.input_size_per_partition = divide(input_size, tp, "RowParallelLinear input_size")
        self.weight = _sharded_parameter((output_size, input_size), 1, init_method or default_init_method(),
                                         params_dtype, device)
        if bias:
            self.bias = _zeros(output_size, params_dtype, device)
            set_tensor_model_parallel_attributes(self.bias, False, 0)
            if self.sequence_parallel:
                mark_sequence_parallel(self.bias)
        else:
            self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x[..., input_size/tp] -> y[..., output_size]`` (same on every TP rank; under sequence parallelism
        this rank's slice of the sequence)."""
        if not self.input_is_parallel:
            x = scatter_to_tensor_model_parallel_region(x)
        if self.sequence_parallel:
            y = reduce_scatter_to_sequence_parallel_region(F.linear(x, self.weight))
            return y + sequence_parallel_grad(self.bias) if self.bias is not None else y
        y = reduce_from_tensor_model_parallel_region(F.linear(x, self.weight))
        return y + self.bias if self.bias is not None else y

    def extra_repr(self) -> str:
        return (f"input_size={self.input_size} (local {self.input_size_per_partition}), "
                f"output_size={self.output_size}, bias={self.bias is not None}, "
                f"input_is_parallel={self.input_is_parallel}")


class VocabParallelEmbedding(nn.Module):
    """Embedding table split by rows (vocabulary) across TP ranks; lookups are all-reduced.

    Rank ``t`` holds rows ``[t*V/tp, (t+1)*V/tp)``; ids outside its range contribute zeros. With
    ``reduce_scatter_embeddings`` (sequence parallelism) the lookups are reduce-scattered along the sequence.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, *, init_method: InitMethod | None = None,
                 params_dtype: torch.dtype | None = None, device: torch.device | str | None = None,
                 reduce_scatter_embeddings: bool = False) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.reduce_scatter_embeddings = sequence_parallel_active(reduce_scatter_embeddings)
        tp = state.get_tensor_model_parallel_world_size()
        self.num_embeddings_per_partition = divide(
            num_embeddings, tp, "VocabParallelEmbedding num_embeddings (pad the vocabulary, e.g. "
                                "--make-vocab-size-divisible-by)")
        self.vocab_start_index = state.get_tensor_model_parallel_rank() * self.num_embeddings_per_partition
        self.vocab_end_index = self.vocab_start_index + self.num_embeddings_per_partition
        self.weight = _sharded_parameter((num_embeddings, embedding_dim), 0,
                                         init_method or default_init_method(), params_dtype, device)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """``ids[...] (global vocabulary ids) -> embeddings[..., embedding_dim]``."""
        if state.get_tensor_model_parallel_world_size() == 1:
            return F.embedding(ids, self.weight)
        outside = (ids < self.vocab_start_index) | (ids >= self.vocab_end_index)
        local_ids = (ids - self.vocab_start_index).masked_fill(outside, 0)
        out = F.embedding(local_ids, self.weight).masked_fill(outside.unsqueeze(-1), 0.0)
        if self.reduce_scatter_embeddings:
            return reduce_scatter_to_sequence_parallel_region(out)
        return reduce_from_tensor_model_parallel_region(out)

    def extra_repr(self) -> str:
        return (f"{self.num_embeddings} (local {self.vocab_start_index}:{self.vocab_end_index}), "
                f"{self.embedding_dim}")


def parallel_lm_logits(hidden: torch.Tensor, word_embeddings_weight: torch.Tensor,
                       bias: torch.Tensor | None = None, sequence_parallel: bool = False) -> torch.Tensor:
    """Vocab-parallel logits ``hidden @ W_local^T (+ bias_local)``: ``[..., h] -> [..., V/tp]``.

    ``word_embeddings_weight`` is this rank's ``(V/tp, h)`` shard (e.g. a tied VocabParallelEmbedding
    weight). Feed the result to ``vocab_parallel_cross_entropy`` or gather it for full logits. With
    ``sequence_parallel`` ``hidden`` is this rank's sequence slice: it is all-gathered first.
    """
    if sequence_parallel_active(sequence_parallel):
        return linear_with_sequence_gather(hidden, word_embeddings_weight, bias)
    return F.linear(copy_to_tensor_model_parallel_region(hidden), word_embeddings_weight, bias)
