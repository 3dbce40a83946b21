"""Hugging Face configuration of an exported megatron_ls GPT-LS model (Transformer-LS / MASFormer layers).

Self-contained: imports only ``transformers``. Written next to ``config.json`` by
``tools/convert_checkpoint.py --to-hf`` and loaded with ``trust_remote_code=True``.
"""
from __future__ import annotations

from typing import Optional, Sequence

from transformers import PretrainedConfig


class MegatronLSConfig(PretrainedConfig):
    """GPT-LS shape and attention: per layer Long-Short attention (window ``w`` + ``r`` compressed keys per chunk
    of ``l`` tokens, DualLN) or, for ``full_attention_layers``, ordinary causal attention."""

    model_type = "megatron_ls"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(self, vocab_size: int = 256, hidden_size: int = 128, num_hidden_layers: int = 2,
                 num_attention_heads: int = 4, intermediate_size: Optional[int] = None,
                 max_position_embeddings: int = 512, position_embedding_type: str = "learned",
                 rotary_base: float = 10000.0, rotary_percent: float = 1.0, layer_norm_epsilon: float = 1e-5,
                 window_size: int = 128, segment_length: int = 16, projection_rank: int = 1,
                 full_attention_layers: Sequence[int] = (), dual_ln: bool = True, dual_ln_scope: str = "full",
                 attention_block_size: int = 128, initializer_range: float = 0.02,
                 bos_token_id: Optional[int] = None, eos_token_id: Optional[int] = None,
                 pad_token_id: Optional[int] = None, tie_word_embeddings: bool = True,
                 normalization: str = "LayerNorm", swiglu: bool = False, add_bias_linear: bool = True,
                 **kwargs) -> None:
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.intermediate_size = intermediate_size if intermediate_size is not None else 4 * hidden_size
        self.max_position_embeddings = max_position_embeddings
        self.position_embedding_type = position_embedding_type
        self.rotary_base = rotary_base
        self.rotary_percent = rotary_percent
        self.layer_norm_epsilon = layer_norm_epsilon
        self.window_size = window_size
        self.segment_length = segment_length
        self.projection_rank = projection_rank
        self.full_attention_layers = [int(i) for i in full_attention_layers]
        self.dual_ln = dual_ln
        self.dual_ln_scope = dual_ln_scope
        self.attention_block_size = attention_block_size
        self.initializer_range = initializer_range
        self.use_cache = kwargs.pop("use_cache", True)
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id
        self.pad_token_id = pad_token_id
        self.tie_word_embeddings = tie_word_embeddings
        self.normalization = normalization
        self.swiglu = swiglu
        self.add_bias_linear = add_bias_linear
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)
        self.check()

    def check(self) -> None:
        """Raise ``ValueError`` naming the first inconsistent setting."""
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                             f"{self.num_attention_heads}")
        if self.position_embedding_type not in ("learned", "rope", "none"):
            raise ValueError(f"position_embedding_type must be learned, rope or none, got "
                             f"{self.position_embedding_type!r}")
        if self.normalization not in ("LayerNorm", "RMSNorm"):
            raise ValueError(f"normalization must be LayerNorm or RMSNorm, got {self.normalization!r}")
        if self.dual_ln_scope not in ("full", "head"):
            raise ValueError(f"dual_ln_scope must be full or head, got {self.dual_ln_scope!r}")
        if self.window_size < 0 or self.projection_rank < 0:
            raise ValueError(f"window_size and projection_rank must be >= 0, got {self.window_size}, "
                             f"{self.projection_rank}")
        bad = [i for i in self.full_attention_layers if not 0 <= i < self.num_hidden_layers]
        if bad:
            raise ValueError(f"full_attention_layers {bad} out of range for {self.num_hidden_layers} layers")
        ls_layers = len(self.full_attention_layers) < self.num_hidden_layers
        if ls_layers and self.window_size == 0 and self.projection_rank == 0:
            raise ValueError("window_size 0 and projection_rank 0 leave Long-Short layers no keys")
        if ls_layers and self.projection_rank > 0:
            if self.segment_length <= 0:
                raise ValueError(f"segment_length must be positive with a projection, got {self.segment_length}")
            if 0 < self.window_size < self.segment_length:
                raise ValueError(f"window_size {self.window_size} < segment_length {self.segment_length}: the "
                                 "window must cover the query's own chunk")
        if self.attention_block_size < 1:
            raise ValueError(f"attention_block_size must be >= 1, got {self.attention_block_size}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def is_full_attention(self, layer_idx: int) -> bool:
        """True for MASFormer full-attention layers."""
        return layer_idx in self.full_attention_layers
