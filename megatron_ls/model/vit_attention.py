"""Vision self-attention: 2D Long-Short (window squares + dynamic projection + CLS) or full, per layer.

Tensor-parallel like the language ``SelfAttention``: one column-parallel projection gives each local head its
``[q | k | v | r projection logits]``, DualLN parameters and relative position tables are sharded with the heads
(``partition_dim`` on the head axis), the output projection is row-parallel.

Relative position bias (the released configs turn it on; ``--no-relative-position-bias`` turns it off):

* long-short layers: one learnable value per head and 2D offset ``(dy, dx)`` between a query of a ``w x w`` block
  and a key of the ``S x S`` square it sees (``S = w + 2e``), ``|dy|, |dx| <= w + e - 1``; added to the window
  scores only (not to the CLS or projected keys, as released). The released table is indexed
  ``(dy + w + e' - 1) * (w + 2e') + (dx + w + e' - 1)`` with ``e' = w // 2``, which lets different offsets share
  an entry; here every offset has its own entry (docs/vision.md);
* full layers: a Swin/ViL-style table over all patch offsets of the grid, plus CLS-to-patch, patch-to-CLS and
  CLS-to-CLS biases per head (the released ``full_attention.py``).
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from megatron_ls.config import TransformerConfig
from megatron_ls.model.norms import dual_ln
from megatron_ls.ops import long_short_attention_2d
from megatron_ls.ops.checks import window_extension
from megatron_ls.parallel import state as ps
from megatron_ls.parallel.init import init_method_normal, scaled_init_method_normal
from megatron_ls.parallel.layers import ColumnParallelLinear, RowParallelLinear, set_tensor_model_parallel_attributes
from megatron_ls.parallel.random import get_rng_tracker
from megatron_ls.parallel.utils import divide

RPE_STD = 0.02


def _model_parallel_rng():
    tracker = get_rng_tracker()
    if ps.get_tensor_model_parallel_world_size() > 1 and "model-parallel-rng" in tracker:
        return tracker.fork("model-parallel-rng")
    return contextlib.nullcontext()


def head_sharded_parameter(shape: tuple[int, ...], head_dim: int, std: float) -> nn.Parameter:
    """A parameter with a head axis: the full tensor drawn (truncated normal), this TP rank's heads kept."""
    full = torch.empty(shape)
    nn.init.trunc_normal_(full, std=std, a=-2 * std, b=2 * std)
    tp, rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    per = divide(shape[head_dim], tp)
    param = nn.Parameter(full.narrow(head_dim, rank * per, per).clone())
    set_tensor_model_parallel_attributes(param, True, head_dim)
    return param


def window_offset_index(window: int, extension: int) -> torch.Tensor:
    """``(w², S²)`` index of the 2D offset between block query ``a·w+b`` and square key ``c·S+d``."""
    s = window + 2 * extension
    span = window + extension - 1  # largest |offset| on one axis
    qy, qx = torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")
    ky, kx = torch.meshgrid(torch.arange(s) - extension, torch.arange(s) - extension, indexing="ij")
    dy = qy.reshape(-1, 1) - ky.reshape(1, -1) + span
    dx = qx.reshape(-1, 1) - kx.reshape(1, -1) + span
    return dy * (2 * span + 1) + dx


def grid_offset_index(gh: int, gw: int) -> torch.Tensor:
    """``(P, P)`` index of the 2D offset between patches of a ``gh x gw`` grid (Swin's table layout)."""
    y, x = torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij")
    y, x = y.reshape(-1), x.reshape(-1)
    return (y[:, None] - y[None, :] + gh - 1) * (2 * gw - 1) + (x[:, None] - x[None, :] + gw - 1)


class RelativePositionBias(nn.Module):
    """Learnable per-head bias on window keys (LS layer) or on every token pair (full layer); ``num_heads`` is
    the model's (a TP rank keeps its heads' columns)."""

    def __init__(self, num_heads: int, *, grid: tuple[int, int], cls_tokens: int, window: int = 0,
                 extension: int = 0, full: bool) -> None:
        super().__init__()
        self.full, self.cls_tokens = full, cls_tokens
        if full:
            gh, gw = grid
            self.register_buffer("index", grid_offset_index(gh, gw), persistent=False)
            entries = (2 * gh - 1) * (2 * gw - 1)
        else:
            self.register_buffer("index", window_offset_index(window, extension), persistent=False)
            entries = (2 * (window + extension) - 1) ** 2
        # ``.bias`` names keep these out of weight decay, as the released code does for relative positions.
        self.bias = head_sharded_parameter((entries, num_heads), 1, RPE_STD)
        if full and cls_tokens:
            self.cls = nn.Module()
            self.cls.bias = head_sharded_parameter((num_heads, cls_tokens, cls_tokens + 2), 0, RPE_STD)

    def forward(self) -> torch.Tensor:
        """LS: ``(H, w², S²)``; full: ``(H, N, N)`` with the CLS tokens first."""
        table = self.bias[self.index].permute(2, 0, 1)  # (H, rows, cols)
        if not self.full or not self.cls_tokens:
            return table
        e, p = self.cls_tokens, table.shape[-1]
        g2g, g2l, l2g = self.cls.bias[..., :e], self.cls.bias[..., e], self.cls.bias[..., e + 1]
        top = torch.cat([g2g, g2l[..., None].expand(-1, e, p)], dim=-1)  # (H, E, N)
        bottom = torch.cat([l2g[:, None, :].expand(-1, p, e), table], dim=-1)  # (H, P, N)
        return torch.cat([top, bottom], dim=1)


class VisionSelfAttention(nn.Module):
    """Bidirectional attention over ``[CLS tokens; gh x gw patches]``: 2D LS or full (``config.full_attention_layers``).

    ``x: (B, E + gh*gw, hidden) -> same shape``.
    """

    def __init__(self, config: TransformerConfig, layer_index: int, grid: tuple[int, int], cls_tokens: int,
                 relative_position_bias: bool = True, cls_attention: str = "post") -> None:
        super().__init__()
        if config.causal:
            raise ValueError("VisionSelfAttention is bidirectional: config.causal must be False")
        self.config, self.grid, self.cls_tokens, self.cls_attention = config, tuple(grid), cls_tokens, cls_attention
        self.full = config.layer_uses_full_attention(layer_index)
        self.num_heads = divide(config.num_attention_heads, ps.get_tensor_model_parallel_world_size())
        self.head_dim = config.head_dim
        self.rank = 0 if self.full else config.projection_rank
        self.window = 0 if self.full else config.window_size
        self.extension = window_extension(self.window, config.window_extension)
        self.project_normed = config.projection_input == "normed" and config.dual_ln and self.rank > 0
        self.per_head = 3 * self.head_dim + self.rank
        self.qkvp = ColumnParallelLinear(config.hidden_size, config.num_attention_heads * self.per_head, bias=True,
                                         gather_output=False, init_method=init_method_normal(config.init_method_std))
        self.dense = RowParallelLinear(config.num_attention_heads * self.head_dim, config.hidden_size, bias=True,
                                       input_is_parallel=True,
                                       init_method=scaled_init_method_normal(config.init_method_std,
                                                                             config.num_layers))
        self.local_norm = self.global_norm = None
        if not self.full and config.dual_ln:
            eps, scope = config.layernorm_epsilon, config.dual_ln_scope
            if self.window > 0 or cls_tokens > 0 or self.project_normed:
                self.local_norm = dual_ln(scope, self.num_heads, self.head_dim, eps)
            if self.rank > 0:
                self.global_norm = dual_ln(scope, self.num_heads, self.head_dim, eps)
        self.relative_position = None
        if relative_position_bias and (self.full or self.window > 0):
            self.relative_position = RelativePositionBias(config.num_attention_heads, grid=self.grid, cls_tokens=cls_tokens,
                                                          window=self.window, extension=self.extension,
                                                          full=self.full)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        gh, gw = self.grid
        if n != self.cls_tokens + gh * gw:
            raise ValueError(f"expected {self.cls_tokens} + {gh}x{gw} tokens, got {n}")
        d = self.head_dim
        mixed = self.qkvp(x).view(b, n, self.num_heads, self.per_head).transpose(1, 2)
        q, k, v = mixed[..., :d], mixed[..., d:2 * d], mixed[..., 2 * d:3 * d]
        dropout_p = self.config.attention_dropout if self.training else 0.0
        bias = self.relative_position() if self.relative_position is not None else None
        with _model_parallel_rng():
            if self.full:
                mask = None if bias is None else bias.to(q.dtype)[None]
                ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
            else:
                ctx = long_short_attention_2d(
                    q, k, v, mixed[..., 3 * d:] if self.rank > 0 else None, grid=self.grid, window=self.window,
                    num_extra_tokens=self.cls_tokens, local_norm=self.local_norm, global_norm=self.global_norm,
                    dropout_p=dropout_p, window_extension=self.config.window_extension,
                    project_normed=self.project_normed, window_bias=bias, extra_queries=self.cls_attention)
        return self.dense(ctx.transpose(1, 2).reshape(b, n, self.num_heads * d))
