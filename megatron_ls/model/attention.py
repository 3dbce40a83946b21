"""Self-attention modules: Long-Short attention (Transformer-LS) and full attention (MASFormer layers).

Both are tensor-parallel in Megatron's way: one column-parallel projection produces, for each local head, its
query, key, value and (LS only) ``r`` dynamic-projection logits; the per-head DualLN parameters live with their
heads; the output projection is row-parallel. So the LS parts add no communication to Megatron's layer.
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch
from torch import nn

from megatron_ls.config import TransformerConfig
from megatron_ls.model.norms import HeadwiseLayerNorm, dual_ln
from megatron_ls.ops import Rotary, full_attention, long_short_attention
from megatron_ls.parallel import state as ps
from megatron_ls.parallel.context_parallel import cp_full_attention, cp_long_short_attention, get_context_layout
from megatron_ls.parallel.init import init_method_normal, scaled_init_method_normal
from megatron_ls.parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron_ls.parallel.random import checkpoint as rng_checkpoint
from megatron_ls.parallel.random import get_rng_tracker
from megatron_ls.parallel.utils import divide


def _model_parallel_rng():
    """Dropout on sharded heads must differ across TP ranks: draw it from the model-parallel stream."""
    tracker = get_rng_tracker()
    if ps.get_tensor_model_parallel_world_size() > 1 and "model-parallel-rng" in tracker:
        return tracker.fork("model-parallel-rng")
    return contextlib.nullcontext()


class SelfAttention(nn.Module):
    """Causal or bidirectional self-attention whose kind (LS or full) is fixed per layer.

    ``x: (B, N, hidden) -> (B, N, hidden)``. ``key_padding_mask: (B, N)`` bool, True = padding. Under sequence
    parallelism ``x`` and the output hold this TP rank's ``N / TP`` tokens; the attention core sees all ``N``.
    With ``recompute_granularity="selective"`` the core (softmax, dropout) is recomputed in backward.
    """

    def __init__(self, config: TransformerConfig, layer_index: int, full: Optional[bool] = None) -> None:
        super().__init__()
        self.config = config
        self.layer_index = layer_index
        self.full = config.layer_uses_full_attention(layer_index) if full is None else full
        tp = ps.get_tensor_model_parallel_world_size()
        self.num_heads = divide(config.num_attention_heads, tp)
        self.head_dim = config.head_dim
        self.rank = 0 if self.full else config.projection_rank
        self.window = 0 if self.full else config.window_size
        # the released bidirectional code projects the LN_L-normalised keys, its autoregressive code the raw ones
        self.project_normed = (not config.causal and config.projection_input == "normed" and config.dual_ln
                               and self.rank > 0)
        # Per head: [q (D) | k (D) | v (D) | projection logits (r)], heads contiguous so a TP shard is whole heads.
        self.per_head = 3 * self.head_dim + self.rank
        self.qkvp = ColumnParallelLinear(config.hidden_size, config.num_attention_heads * self.per_head,
                                         bias=config.add_bias_linear, gather_output=False,
                                         sequence_parallel=config.sequence_parallel,
                                         init_method=init_method_normal(config.init_method_std))
        self.dense = RowParallelLinear(config.num_attention_heads * self.head_dim, config.hidden_size,
                                       bias=config.add_bias_linear, input_is_parallel=True,
                                       sequence_parallel=config.sequence_parallel,
                                       init_method=scaled_init_method_normal(config.init_method_std,
                                                                             config.num_layers))
        self.rotary: Optional[Rotary] = None
        if config.position_embedding_type == "rope":
            self.rotary = Rotary.for_head(self.head_dim, config.rotary_base, config.rotary_percent)
        self.local_norm: Optional[HeadwiseLayerNorm] = None
        self.global_norm: Optional[HeadwiseLayerNorm] = None
        if not self.full and config.dual_ln:
            eps = config.layernorm_epsilon
            scope = config.dual_ln_scope
            if self.window > 0 or (self.rank > 0 and self.project_normed):
                self.local_norm = dual_ln(scope, self.num_heads, self.head_dim, eps)
            if self.rank > 0:
                self.global_norm = dual_ln(scope, self.num_heads, self.head_dim, eps)

    def forward(self, x: torch.Tensor, key_padding_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Under context parallelism ``x`` and the mask hold this rank's tokens (see ``parallel.cp_layout``)."""
        mixed = self.qkvp(x)  # the whole (CP-local) sequence, also under sequence parallelism
        b, n, _ = mixed.shape
        mixed = mixed.view(b, n, self.num_heads, self.per_head).transpose(1, 2)  # (B, H, N, 3D + r)
        d = self.head_dim
        q, k, v = mixed[..., :d], mixed[..., d:2 * d], mixed[..., 2 * d:3 * d]
        proj_logits = mixed[..., 3 * d:] if self.rank > 0 else None
        if self.config.recompute_granularity == "selective" and self.training and torch.is_grad_enabled():
            # Megatron's selective recomputation: keep the projections, recompute the core (RNG tracker replayed)
            ctx = rng_checkpoint(self.core_attention, q, k, v, proj_logits, key_padding_mask)
        else:
            ctx = self.core_attention(q, k, v, proj_logits, key_padding_mask)
        ctx = ctx.transpose(1, 2).reshape(b, n, self.num_heads * d)
        return self.dense(ctx)

    def core_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, proj_logits: Optional[torch.Tensor],
                       key_padding_mask: Optional[torch.Tensor]) -> torch.Tensor:
        """Per-head contexts ``(B, H, N, D)`` from queries, keys, values and projection logits (``(B, H, N, r)``)."""
        n = q.shape[2]
        dropout_p = self.config.attention_dropout if self.training else 0.0
        cp = ps.get_context_parallel_world_size()
        layout = get_context_layout(n * cp) if cp > 1 else None
        positions = torch.arange(n, device=q.device) if layout is None else layout.local_positions(q.device)
        with _model_parallel_rng():
            if self.full:
                if self.rotary is not None:
                    q, k = self.rotary.rotate(q, positions), self.rotary.rotate(k, positions)
                if cp > 1:
                    ctx = cp_full_attention(q, k, v, layout=layout, causal=self.config.causal,
                                            key_padding_mask=key_padding_mask, dropout_p=dropout_p)
                else:
                    ctx = full_attention(q, k, v, causal=self.config.causal, key_padding_mask=key_padding_mask,
                                         dropout_p=dropout_p)
            else:
                kwargs = dict(window=self.window, causal=self.config.causal,
                              segment_len=self.config.segment_length if self.rank > 0 else None,
                              key_padding_mask=key_padding_mask, local_norm=self.local_norm,
                              global_norm=self.global_norm, dropout_p=dropout_p,
                              backend=self.config.attention_backend,
                              window_extension=self.config.window_extension, project_normed=self.project_normed,
                              rotary=self.rotary)
                if cp > 1:
                    ctx = cp_long_short_attention(q, k, v, proj_logits, layout=layout, **kwargs)
                else:
                    ctx = long_short_attention(q, k, v, proj_logits, positions=positions, **kwargs)
        return ctx


class LongShortAttention(SelfAttention):
    """Transformer-LS attention: sliding window + dynamic low-rank projection, DualLN (unless ``dual_ln=False``)."""

    def __init__(self, config: TransformerConfig, layer_index: int = 0) -> None:
        super().__init__(config, layer_index, full=False)


class FullAttention(SelfAttention):
    """Ordinary softmax attention over all (visible) keys: MASFormer's few full layers, and baselines."""

    def __init__(self, config: TransformerConfig, layer_index: int = 0) -> None:
        super().__init__(config, layer_index, full=True)
