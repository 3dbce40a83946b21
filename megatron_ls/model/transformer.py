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


class MLP(nn.Module):
    """h -> ffn (column-parallel) -> GELU -> h (row-parallel): one all-reduce forward, as in Megatron."""

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.dense_h_to_4h = ColumnParallelLinear(config.hidden_size, config.ffn_hidden_size, bias=True,
                                                  gather_output=False,
                                                  init_method=init_method_normal(config.init_method_std))
        self.dense_4h_to_h = RowParallelLinear(config.ffn_hidden_size, config.hidden_size, bias=True,
                                               input_is_parallel=True,
                                               init_method=scaled_init_method_normal(config.init_method_std,
                                                                                     config.num_layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense_4h_to_h(F.gelu(self.dense_h_to_4h(x)))


class TransformerLayer(nn.Module):
    """One pre-LN block; its attention kind (LS or full) comes from ``config.full_attention_layers``."""

    def __init__(self, config: TransformerConfig, layer_index: int) -> None:
        super().__init__()
        self.layer_index = layer_index
        with seeded_init(config.seed, LAYER_SALT + layer_index):
            self.input_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layernorm_epsilon)
            self.self_attention = SelfAttention(config, layer_index)
            self.post_attention_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layernorm_epsilon)
            self.mlp = MLP(config)
        self.hidden_dropout = nn.Dropout(config.hidden_dropout)

    def forward(self, x: torch.Tensor, key_padding_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = x + self.hidden_dropout(self.self_attention(self.input_layernorm(x), key_padding_mask))
        return x + self.hidden_dropout(self.mlp(self.post_attention_layernorm(x)))
