"""Pre-LN transformer layer: x + drop(attn(LN(x))), then x + drop(MLP(LN(x)))."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from megatron_ls.config import TransformerConfig
from megatron_ls.model.attention import SelfAttention
from megatron_ls.model.init_rng import LAYER_SALT, seeded_init
from megatron_ls.parallel.init import init_method_normal, scaled_init_method_normal
from megatron_ls.parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron_ls.parallel.sequence_parallel import LayerNorm, sequence_parallel_active, sequence_parallel_rng


class MLP(nn.Module):
    """h -> ffn (column-parallel) -> GELU -> h (row-parallel): one all-reduce forward, as in Megatron (under
    sequence parallelism an all-gather before and a reduce-scatter after)."""

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        sp = config.sequence_parallel
        self.dense_h_to_4h = ColumnParallelLinear(config.hidden_size, config.ffn_hidden_size, bias=True,
                                                  gather_output=False, sequence_parallel=sp,
                                                  init_method=init_method_normal(config.init_method_std))
        self.dense_4h_to_h = RowParallelLinear(config.ffn_hidden_size, config.hidden_size, bias=True,
                                               input_is_parallel=True, sequence_parallel=sp,
                                               init_method=scaled_init_method_normal(config.init_method_std,
                                                                                     config.num_layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense_4h_to_h(F.gelu(self.dense_h_to_4h(x)))


class TransformerLayer(nn.Module):
    """One pre-LN block; its attention kind (LS or full) comes from ``config.full_attention_layers``.

    Under sequence parallelism ``x`` is this TP rank's slice of the sequence (dim 1) and so is the output; the
    residual dropout then draws from the TP tracker, so every slice gets its own masks.
    """

    def __init__(self, config: TransformerConfig, layer_index: int) -> None:
        super().__init__()
        self.layer_index = layer_index
        sp, eps = config.sequence_parallel, config.layernorm_epsilon
        with seeded_init(config.seed, LAYER_SALT + layer_index):
            self.input_layernorm = LayerNorm(config.hidden_size, eps=eps, sequence_parallel=sp)
            self.self_attention = SelfAttention(config, layer_index)
            self.post_attention_layernorm = LayerNorm(config.hidden_size, eps=eps, sequence_parallel=sp)
            self.mlp = MLP(config)
        self.hidden_dropout = nn.Dropout(config.hidden_dropout)
        self.sequence_parallel = sequence_parallel_active(sp)

    def forward(self, x: torch.Tensor, key_padding_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        attn = self.self_attention(self.input_layernorm(x), key_padding_mask)
        with sequence_parallel_rng(self.sequence_parallel):
            x = x + self.hidden_dropout(attn)
        mlp = self.mlp(self.post_attention_layernorm(x))
        with sequence_parallel_rng(self.sequence_parallel):
            return x + self.hidden_dropout(mlp)
