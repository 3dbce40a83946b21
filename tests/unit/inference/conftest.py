"""Tiny GPT-LS models for the decoding-cache and generation tests (hidden 32, 2 layers, fp64 by default)."""
import pytest
import torch

from megatron_ls.config import TransformerConfig
from megatron_ls.model import GPTModel

VOCAB = 64


def build_model(dtype=torch.float64, seed=7, sharpen=True, **overrides) -> GPTModel:
    """An eval-mode GPTModel without dropout; ``overrides`` are TransformerConfig fields."""
    fields = dict(num_layers=2, hidden_size=32, num_attention_heads=4, seq_length=160, vocab_size=VOCAB,
                  hidden_dropout=0.0, attention_dropout=0.0, window_size=16, segment_length=8, projection_rank=2,
                  attention_backend="torch", seed=seed, init_method_std=0.5)
    fields.update(overrides)
    model = GPTModel(TransformerConfig(**fields)).to(dtype).eval()
    # A small random model with tied embeddings mostly repeats its last token; wide weights and strong residual
    # branches make its greedy choices vary with the context (and keep them far from ties).
    if sharpen:
        with torch.no_grad():
            for layer in model.layers:
                layer.self_attention.dense.weight.mul_(5.0)
                layer.mlp.dense_4h_to_h.weight.mul_(5.0)
    return model


@pytest.fixture
def make_model():
    return build_model
