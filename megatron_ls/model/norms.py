"""Normalisation layers: the block norm (LayerNorm or RMSNorm), and DualLN's per head or over the full width of
all heads (the released code)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from megatron_ls.config import TransformerConfig
from megatron_ls.parallel import state as ps
from megatron_ls.parallel.mappings import sum_over_tensor_model_parallel_region
from megatron_ls.parallel.sequence_parallel import LayerNorm, RMSNorm


def block_norm(config: TransformerConfig) -> nn.Module:
    """The pre-attention / pre-MLP / final norm of ``--normalization`` (sequence-parallel aware)."""
    cls = RMSNorm if config.normalization == "RMSNorm" else LayerNorm
    return cls(config.hidden_size, eps=config.layernorm_epsilon, sequence_parallel=config.sequence_parallel)


class HeadwiseLayerNorm(nn.Module):
    """LayerNorm over the head dimension with separate affine parameters per head.

    Input layout is ``(B, H, ..., D)``: dimension 1 indexes heads, the last one is normalised. Parameters have shape
    ``(H, D)``; under tensor parallelism a rank holds the rows of its own heads (``partition_dim = 0``).
    """

    def __init__(self, num_heads: int, head_dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_heads, head_dim))
        self.bias = nn.Parameter(torch.zeros(num_heads, head_dim))
        for p in (self.weight, self.bias):
            p.tensor_model_parallel = True
            p.partition_dim = 0
            p.partition_stride = 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() < 3 or x.shape[1] != self.weight.shape[0] or x.shape[-1] != self.weight.shape[1]:
            raise ValueError(f"HeadwiseLayerNorm expects (B, {self.weight.shape[0]}, ..., {self.weight.shape[1]}),"
                             f" got {tuple(x.shape)}")
        # Normalise in fp32 for half inputs (as the attention softmaxes do), in the input's precision otherwise.
        compute = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
        y = F.layer_norm(x.to(compute), (x.shape[-1],), eps=self.eps)
        shape = (self.weight.shape[0],) + (1,) * (x.dim() - 3) + (self.weight.shape[1],)
        y = y * self.weight.to(compute).view(shape) + self.bias.to(compute).view(shape)
        return y.to(x.dtype)


class FullWidthLayerNorm(HeadwiseLayerNorm):
    """LayerNorm over all heads' keys/values of a token together (width ``H·D``), as the authors' released code.

    Same ``(H, D)`` parameters as :class:`HeadwiseLayerNorm` (a TP rank holds its heads' rows, so checkpoints of
    both scopes have the same shapes), but one mean and variance per token over every head. Under tensor
    parallelism the heads are split across ranks: the statistics are summed over the TP group (one all-reduce of
    ``2`` values per token forward, one backward).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        heads, d = self.weight.shape
        if x.dim() != 4 or x.shape[1] != heads or x.shape[-1] != d:
            raise ValueError(f"FullWidthLayerNorm expects (B, {heads}, N, {d}), got {tuple(x.shape)}")
        compute = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
        xc = x.to(compute)
        w, b = self.weight.to(compute)[None, :, None, :], self.bias.to(compute)[None, :, None, :]
        tp = ps.get_tensor_model_parallel_world_size()
        if tp == 1:
            bsz, _, n, _ = x.shape
            flat = xc.transpose(1, 2).reshape(bsz, n, heads * d)
            y = F.layer_norm(flat, (heads * d,), eps=self.eps).view(bsz, n, heads, d).transpose(1, 2)
            return (y * w + b).to(x.dtype)
        width = heads * d * tp
        # one all-reduce for both moments: [Σx, Σx²] per token over this rank's heads
        moments = torch.stack([xc.sum(dim=(1, 3)), xc.square().sum(dim=(1, 3))], dim=-1)
        moments = sum_over_tensor_model_parallel_region(moments) / width
        mean = moments[..., 0][:, None, :, None]
        var = (moments[..., 1][:, None, :, None] - mean.square()).clamp(min=0.0)
        y = (xc - mean) * torch.rsqrt(var + self.eps)
        return (y * w + b).to(x.dtype)


def dual_ln(scope: str, num_heads: int, head_dim: int, eps: float) -> HeadwiseLayerNorm:
    """The DualLN LayerNorm for ``--dual-ln-scope`` (``full`` or ``head``)."""
    if scope == "full":
        return FullWidthLayerNorm(num_heads, head_dim, eps)
    if scope == "head":
        return HeadwiseLayerNorm(num_heads, head_dim, eps)
    raise ValueError(f"--dual-ln-scope must be 'full' or 'head', got {scope!r}")
