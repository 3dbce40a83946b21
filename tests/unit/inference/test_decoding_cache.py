"""Prefill + incremental decoding with the Long-Short cache equals a full forward pass, at every position."""
import pytest
import torch

from megatron_ls.inference.cache import FullLayerCache, LongShortLayerCache, new_cache
from megatron_ls.inference.incremental import forward_step, prefill

W, L = 16, 8
N = 70  # crosses 8 chunk and 4 window boundaries

CONFIGS = {
    "window_only": dict(window_size=W, projection_rank=0),
    "projection_only": dict(window_size=0, projection_rank=2),
    "both": dict(window_size=W, projection_rank=2),
    "no_dual_ln": dict(window_size=W, projection_rank=1, dual_ln=False),
    "head_dual_ln": dict(window_size=W, projection_rank=1, dual_ln_scope="head"),
    "full_layer": dict(window_size=W, projection_rank=1, full_attention_layers=(1,)),
    "rope": dict(window_size=W, projection_rank=2, position_embedding_type="rope"),
    "no_positions_full_layer": dict(window_size=W, projection_rank=1, position_embedding_type="none",
                                    full_attention_layers=(0,)),
    "llama_style": dict(window_size=W, projection_rank=2, position_embedding_type="rope", normalization="RMSNorm",
                        swiglu=True, add_bias_linear=False, untie_embeddings_and_output_weights=True),
}
PROMPT_LENGTHS = (1, L - 1, L, W + 1)


def _decode_all(model, tokens, prompt_len, chunk=None):
    cache = new_cache(model, tokens.shape[0])
    outs = [prefill(model, tokens[:, :prompt_len], cache, all_logits=True, chunk_size=chunk)]
    for t in range(prompt_len, tokens.shape[1]):
        outs.append(forward_step(model, tokens[:, t:t + 1], cache))
    return torch.cat(outs, dim=1), cache


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_prefill_then_decode_equals_full_forward(make_model, name):
    model = make_model(**CONFIGS[name])
    tokens = torch.randint(0, 64, (2, N), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(tokens)
    for prompt_len in PROMPT_LENGTHS:
        got, cache = _decode_all(model, tokens, prompt_len)
        assert got.shape == full.shape
        err = (got - full).abs().max().item()
        assert err < 1e-10, f"{name}, prompt {prompt_len}: max |diff| {err:.3e}"
        assert cache.length == N


def test_float32_matches_full_forward(make_model):
    model = make_model(dtype=torch.float32, **CONFIGS["both"], full_attention_layers=(1,))
    tokens = torch.randint(0, 64, (1, 50), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model(tokens)
    got, _ = _decode_all(model, tokens, 9)
    torch.testing.assert_close(got, full, rtol=1e-4, atol=1e-4)


def _cache_state(cache):
    """Every tensor a cache holds, in the order tokens arrived (ring slots as stored)."""
    parts = []
    for layer in cache.layers:
        if isinstance(layer, FullLayerCache):
            parts += [layer.k.view(), layer.v.view()]
            continue
        if layer.ring_k is not None:
            parts += [layer.ring_k, layer.ring_v]
        if layer.comp_k is not None:
            p = layer.part_len
            parts += [layer.comp_k.view(), layer.comp_v.view(), layer.part_k[:, :, :p], layer.part_v[:, :, :p],
                      layer.part_logits[:, :, :p]]
    return parts


@pytest.mark.parametrize("name", ["both", "full_layer", "rope"])
def test_prefill_leaves_the_cache_token_by_token_decoding_leaves(make_model, name):
    model = make_model(**CONFIGS[name])
    tokens = torch.randint(0, 64, (2, 45), generator=torch.Generator().manual_seed(3))
    one_pass = new_cache(model, 2)
    prefill(model, tokens, one_pass)
    stepped = new_cache(model, 2)
    for t in range(tokens.shape[1]):
        forward_step(model, tokens[:, t:t + 1], stepped)
    pieces = new_cache(model, 2)
    prefill(model, tokens, pieces, chunk_size=11)  # pieces that straddle chunk and window boundaries
    for other in (stepped, pieces):
        content = [dict(s.__dict__, allocated_bytes=None) for s in other.sizes()]  # growth steps may differ
        assert content == [dict(s.__dict__, allocated_bytes=None) for s in one_pass.sizes()]
        for a, b in zip(_cache_state(one_pass), _cache_state(other)):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_chunked_prefill_logits_equal_one_pass(make_model):
    model = make_model(**CONFIGS["both"])
    tokens = torch.randint(0, 64, (1, 60), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        full = model(tokens)
    for chunk in (5, 8, 17):
        got = prefill(model, tokens, new_cache(model, 1), all_logits=True, chunk_size=chunk)
        assert (got - full).abs().max().item() < 1e-10


@pytest.mark.parametrize("name", ["both", "projection_only", "window_only"])
def test_cache_size_follows_the_formula(make_model, name):
    model = make_model(**CONFIGS[name])
    w, r = model.config.window_size, model.config.projection_rank
    cache = new_cache(model, 1)
    ring_bytes = None
    tokens = torch.randint(0, 64, (1, 100), generator=torch.Generator().manual_seed(5))
    for t in range(1, 101):
        forward_step(model, tokens[:, t - 1:t], cache)
        for layer, size in zip(cache.layers, cache.sizes()):
            assert isinstance(layer, LongShortLayerCache)
            assert size.ring_capacity == w and size.ring_filled == min(t, w)
            assert size.compressed == r * (t // L)
            assert size.partial == (t % L if r else 0)
            if w:  # the window part never grows
                assert layer.ring_k.shape[2] == w
        fixed = cache.layers[0].size().used_bytes - (0 if not r else cache.layers[0].comp_k.used_bytes() * 2)
        ring_bytes = fixed if ring_bytes is None else ring_bytes
        assert fixed == ring_bytes
    # bytes: w ring entries + r per finished chunk + one chunk's raw state, keys and values (+ r logits), fp64
    d, heads = model.config.head_dim, model.config.num_attention_heads
    per_entry = 2 * heads * d * 8
    expected = (w + r * (100 // L)) * per_entry + ((L * per_entry + L * heads * r * 8) if r else 0)
    assert cache.layers[0].size().used_bytes == expected


def test_full_attention_layer_cache_holds_every_token(make_model):
    model = make_model(**CONFIGS["full_layer"])
    cache = new_cache(model, 3)
    prefill(model, torch.zeros(3, 37, dtype=torch.long), cache)
    sizes = cache.sizes()
    assert sizes[1].kind == "full" and sizes[1].full == 37
    assert sizes[0].kind == "long_short" and sizes[0].compressed == 37 // L


def test_positions_beyond_the_learned_table_are_refused(make_model):
    model = make_model(**CONFIGS["both"], seq_length=40)
    cache = new_cache(model, 1)
    prefill(model, torch.zeros(1, 40, dtype=torch.long), cache)
    with pytest.raises(ValueError, match="max-position-embeddings 40"):
        forward_step(model, torch.zeros(1, 1, dtype=torch.long), cache)


@pytest.mark.parametrize("kind", ["rope", "none"])
def test_no_position_table_decodes_past_seq_length(make_model, kind):
    model = make_model(**CONFIGS["both"], seq_length=24, position_embedding_type=kind)
    tokens = torch.randint(0, 64, (1, 64), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        full = model(tokens)
    got, _ = _decode_all(model, tokens, 5)
    assert (got - full).abs().max().item() < 1e-10


def test_bfloat16_decoding_runs_close_to_float32(make_model):
    ref = make_model(dtype=torch.float32, **CONFIGS["both"])
    half = make_model(dtype=torch.bfloat16, **CONFIGS["both"])
    tokens = torch.randint(0, 64, (1, 30), generator=torch.Generator().manual_seed(8))
    a, cache = _decode_all(ref, tokens, 4)
    b, half_cache = _decode_all(half, tokens, 4)
    assert half_cache.layers[0].ring_k.dtype == torch.bfloat16
    assert torch.isfinite(b).all()
    rel = ((a - b.float()).norm() / a.norm()).item()
    assert rel < 0.05, rel
