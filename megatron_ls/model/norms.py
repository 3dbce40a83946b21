"""Normalisation layers: per-head LayerNorm for DualLN."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


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
