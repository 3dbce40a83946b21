"""GPT-LS model pieces, single process: LS attention module wiring, DualLN, layer kinds, causality, init."""
import sys
from pathlib import Path

import pytest
import torch

from megatron_ls.config import TransformerConfig
from megatron_ls.model import FullAttention, GPTModel, LongShortAttention

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "ops"))
from ls_reference import dense_full, dense_long_short  # noqa: E402


def _config(**over):
    base = dict(num_layers=3, hidden_size=32, num_attention_heads=4, vocab_size=64, seq_length=40,
                window_size=8, segment_length=4, projection_rank=2, hidden_dropout=0.0, attention_dropout=0.0,
                seed=3)
    base.update(over)
    return TransformerConfig(**base)


def _heads(module, x):
    b, n, _ = x.shape
    mixed = module.qkvp(x).view(b, n, module.num_heads, module.per_head).transpose(1, 2)
    d = module.head_dim
    return mixed[..., :d], mixed[..., d:2 * d], mixed[..., 2 * d:3 * d], mixed[..., 3 * d:]


def _full_width(norm):
    """The released code's DualLN written directly: one LayerNorm over all heads' width of each token."""
    def apply(t):
        b, h, n, d = t.shape
        flat = t.transpose(1, 2).reshape(b, n, h * d)
        y = torch.nn.functional.layer_norm(flat, (h * d,), norm.weight.reshape(-1), norm.bias.reshape(-1), norm.eps)
        return y.view(b, n, h, d).transpose(1, 2)
    return apply


@pytest.mark.parametrize("dual_ln,scope", [(True, "head"), (True, "full"), (False, "full")])
def test_long_short_module_matches_dense_reference(dual_ln, scope):
    torch.manual_seed(0)
    cfg = _config(dual_ln=dual_ln, dual_ln_scope=scope)
    attn = LongShortAttention(cfg).double()
    if dual_ln:  # make the DualLN affine parameters non-trivial so their wiring is checked too
        with torch.no_grad():
            for p in list(attn.local_norm.parameters()) + list(attn.global_norm.parameters()):
                p.add_(0.3 * torch.randn_like(p))
    else:
        assert attn.local_norm is None and attn.global_norm is None
    x = torch.randn(2, 37, cfg.hidden_size, dtype=torch.float64, requires_grad=True)
    out = attn(x)
    q, k, v, p = _heads(attn, x)

    def head_norm(norm, h):  # the reference calls norms on one head's slices: give it that head's LayerNorm
        if norm is None:
            return None
        return lambda t: torch.nn.functional.layer_norm(t, (t.shape[-1],), norm.weight[h], norm.bias[h], norm.eps)

    if dual_ln and scope == "full":
        ctx = dense_long_short(q, k, v, p, window=8, causal=True, segment_len=4,
                               local_norm=_full_width(attn.local_norm), global_norm=_full_width(attn.global_norm))
    else:
        ctx = torch.cat([dense_long_short(q[:, h:h + 1], k[:, h:h + 1], v[:, h:h + 1], p[:, h:h + 1], window=8,
                                          causal=True, segment_len=4, local_norm=head_norm(attn.local_norm, h),
                                          global_norm=head_norm(attn.global_norm, h))
                         for h in range(attn.num_heads)], dim=1)
    ref = attn.dense(ctx.transpose(1, 2).reshape(2, 37, cfg.hidden_size))
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    g = torch.randn_like(out)
    (gx,) = torch.autograd.grad(out, x, g, retain_graph=True)
    (gx_ref,) = torch.autograd.grad(ref, x, g)
    torch.testing.assert_close(gx, gx_ref, rtol=1e-9, atol=1e-10)


def test_full_attention_layers_follow_the_config():
    cfg = _config(full_attention_layers=(1,))
    model = GPTModel(cfg)
    assert [layer.self_attention.full for layer in model.layers] == [False, True, False]
    full = model.layers[1].self_attention
    assert full.rank == 0 and full.local_norm is None  # no projection logits, no DualLN in full layers
    x = torch.randn(1, 20, cfg.hidden_size)
    q, k, v, _ = _heads(full, x)
    ref = full.dense(dense_full(q, k, v, causal=True).float().transpose(1, 2).reshape(1, 20, cfg.hidden_size))
    torch.testing.assert_close(full(x), ref, rtol=1e-5, atol=1e-5)
    assert isinstance(FullAttention(cfg), torch.nn.Module)


@pytest.mark.parametrize("over", [dict(), dict(window_size=0), dict(projection_rank=0),
                                  dict(full_attention_layers=(0, 2)), dict(position_embedding_type="none")])
def test_gpt_is_causal_and_shaped(over):
    torch.manual_seed(0)
    model = GPTModel(_config(**over)).eval()
    tokens = torch.randint(0, 64, (2, 40))
    logits = model(tokens)
    assert logits.shape == (2, 40, 64)
    edited = tokens.clone()
    edited[:, 25:] = torch.randint(0, 64, (2, 15))
    torch.testing.assert_close(model(edited)[:, :25], logits[:, :25], rtol=0, atol=1e-6)
    assert not torch.allclose(model(edited)[:, 25:], logits[:, 25:])


def test_same_seed_same_weights_and_losses_per_token():
    a, b = GPTModel(_config()), GPTModel(_config())
    for (na, pa), (nb, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert na == nb and torch.equal(pa, pb)
    c = GPTModel(_config(seed=4))
    assert not torch.equal(a.layers[0].mlp.dense_h_to_4h.weight, c.layers[0].mlp.dense_h_to_4h.weight)
    tokens = torch.randint(0, 64, (2, 41))
    losses = a(tokens[:, :-1], tokens[:, 1:])
    ref = torch.nn.functional.cross_entropy(a(tokens[:, :-1]).reshape(-1, 64), tokens[:, 1:].reshape(-1),
                                            reduction="none").view(2, 40)
    torch.testing.assert_close(losses, ref, rtol=1e-5, atol=1e-5)


def test_layer_weights_do_not_depend_on_what_was_built_before():
    # A pipeline stage builds only its own layers: layer 2 must come out the same on its own.
    from megatron_ls.model import TransformerLayer

    cfg = _config()
    whole = GPTModel(cfg)
    torch.manual_seed(999)
    alone = TransformerLayer(cfg, 2)
    for (name, p), (_, q) in zip(whole.layers[2].state_dict().items(), alone.state_dict().items()):
        assert torch.equal(p, q), name


def test_recompute_activations_gives_same_gradients():
    torch.manual_seed(0)
    tokens = torch.randint(0, 64, (2, 41))
    grads = []
    for recompute in (False, True):
        model = GPTModel(_config(recompute_activations=recompute, hidden_dropout=0.1, attention_dropout=0.1))
        torch.manual_seed(5)
        model(tokens[:, :-1], tokens[:, 1:]).mean().backward()
        grads.append(model.layers[0].self_attention.qkvp.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-7)


def test_config_errors_name_the_flags():
    from megatron_ls.config import ConfigError

    with pytest.raises(ConfigError, match="--window-size >= --segment-length"):
        _config(window_size=2, segment_length=4).validate()
    with pytest.raises(ConfigError, match="--num-attention-heads 4 is not divisible by --tensor-model-parallel"):
        _config().validate(tensor_model_parallel_size=3)
    with pytest.raises(ConfigError, match="--full-attention-layers"):
        _config(full_attention_layers=(5,)).validate()
