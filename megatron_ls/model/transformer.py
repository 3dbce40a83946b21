"""Pre-norm transformer layer: x + drop(attn(norm(x))), then x + drop(MLP(norm(x))); LayerNorm or RMSNorm, GELU or
SwiGLU MLP."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from megatron_ls.config import TransformerConfig
from megatron_ls.model.attention import SelfAttention
from megatron_ls.model.init_rng import LAYER_SALT, seeded_init
from megatron_ls.model.norms import block_norm
from megatron_ls.parallel.init import init_method_normal, scaled_init_method_normal
from megatron_ls.parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron_ls.parallel.sequence_parallel import sequence_parallel_active, sequence_parallel_rng


class MLP(nn.Module):
    """h -> ffn (column-parallel) -> GELU -> h (row-parallel): one all-reduce forward, as in Megatron (under
    sequence parallelism an all-gather before and a reduce-scatter after).

    With ``--swiglu``: ``dense_4h_to_h(silu(dense_h_to_4h_gate(x)) * dense_h_to_4h(x))``. Megatron-LM keeps gate and
    up in one matrix; here they are two column-parallel layers, so each is split along its output rows like any
    other and a checkpoint re-shards to another TP size without interleaving rules.
    """

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        sp, bias = config.sequence_parallel, config.add_bias_linear

        def column() -> ColumnParallelLinear:
            return ColumnParallelLinear(config.hidden_size, config.ffn_hidden_size, bias=bias, gather_output=False,
                                        sequence_parallel=sp, init_method=init_method_normal(config.init_method_std))

        self.dense_h_to_4h = column()
        self.dense_h_to_4h_gate = column() if config.swiglu else None
        self.dense_4h_to_h = RowParallelLinear(config.ffn_hidden_size, config.hidden_size, bias=bias,
                                               input_is_parallel=True, sequence_parallel=sp,
                                               init_method=scaled_init_method_normal(config.init_method_std,
                                                                                     config.num_layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.dense_h_to_4h_gate is not None:
            return self.dense_4h_to_h(F.silu(self.dense_h_to_4h_gate(x)) * self.dense_h_to_4h(x))
        return self.dense_4h_to_h(F.gelu(self.dense_h_to_4h(x)))


class TransformerLayer(nn.Module):
    """One pre-norm block; its attention kind (LS or full) comes from ``config.full_attention_layers``.

    Under sequence parallelism ``x`` is this TP rank's slice of the sequence (dim 1) and so is the output; the
    residual dropout then draws from the TP tracker, so every slice gets its own masks.
    """

    def __init__(self, config: TransformerConfig, layer_index: int) -> None:
        super().__init__()
        self.layer_index = layer_index
        with seeded_init(config.seed, LAYER_SALT + layer_index):
            self.input_layernorm = block_norm(config)
            self.self_attention = SelfAttention(config, layer_index)
            self.post_attention_layernorm = block_norm(config)
            self.mlp = MLP(config)
        self.hidden_dropout = nn.Dropout(config.hidden_dropout)
        self.sequence_parallel = sequence_parallel_active(config.sequence_parallel)

    def forward(self, x: torch.Tensor, key_padding_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        attn = self.self_attention(self.input_layernorm(x), key_padding_mask)
        with sequence_parallel_rng(self.sequence_parallel):
            x = x + self.hidden_dropout(attn)
        mlp = self.mlp(self.post_attention_layernorm(x))
        with sequence_parallel_rng(self.sequence_parallel):
            return x + self.hidden_dropout(mlp)
