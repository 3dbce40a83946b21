"""GPT-LS with RoPE: causal (no future leak), no length limit (a model configured for n runs at 2n and agrees with
itself on the prefix), and the rotation reaches both LS and full-attention layers."""
import pytest
import torch

from megatron_ls.config import ConfigError, TransformerConfig
from megatron_ls.model import GPTModel


def _model(**over):
    cfg = dict(num_layers=2, hidden_size=32, num_attention_heads=4, vocab_size=64, seq_length=32,
               window_size=8, segment_length=4, projection_rank=2, hidden_dropout=0.0, attention_dropout=0.0,
               position_embedding_type="rope", rotary_base=1000.0, full_attention_layers=(1,), seed=5)
    cfg.update(over)
    torch.manual_seed(0)
    return GPTModel(TransformerConfig(**cfg)).double().eval()


def test_no_position_table_and_runs_at_twice_the_length():
    model = _model()
    assert model.embedding.position_embeddings is None
    tokens = torch.randint(0, 64, (2, 64), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        long = model(tokens)  # 2 x seq_length
        short = model(tokens[:, :32])
    torch.testing.assert_close(long[:, :32], short, rtol=1e-10, atol=1e-10)


def test_no_future_leak():
    model = _model()
    tokens = torch.randint(0, 64, (1, 48), generator=torch.Generator().manual_seed(2))
    changed = tokens.clone()
    changed[0, 30:] = (changed[0, 30:] + 7) % 64
    with torch.no_grad():
        a, b = model(tokens), model(changed)
    torch.testing.assert_close(a[:, :30], b[:, :30], rtol=0, atol=0)
    assert not torch.allclose(a[:, 30:], b[:, 30:])


@pytest.mark.parametrize("full_layers", [(), (0, 1)])
def test_rope_changes_the_function(full_layers):
    tokens = torch.randint(0, 64, (1, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        rope = _model(full_attention_layers=full_layers)(tokens)
        none = _model(full_attention_layers=full_layers, position_embedding_type="none")(tokens)
    assert not torch.allclose(rope, none)


def test_rope_config_errors():
    with pytest.raises(ConfigError, match="causal"):
        TransformerConfig(position_embedding_type="rope", causal=False).validate()
    with pytest.raises(ConfigError, match="rotary-percent"):
        TransformerConfig(position_embedding_type="rope", rotary_percent=1.5).validate()
