"""ClassificationModel: padding invariance, the post-CLS rule against a dense float64 reference, locality."""
from __future__ import annotations

import math

import pytest
import torch

from megatron_ls.config import TransformerConfig
from megatron_ls.model.classification import ClassificationModel, post_cls_layer
from megatron_ls.model.transformer import TransformerLayer


def make_config(**overrides) -> TransformerConfig:
    values = dict(num_layers=2, hidden_size=24, num_attention_heads=3, ffn_hidden_size=40, vocab_size=40,
                  seq_length=64, window_size=4, projection_rank=2, causal=False, hidden_dropout=0.0,
                  attention_dropout=0.0, seed=5)
    values.update(overrides)
    return TransformerConfig(**values)


def padded_batch(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(2, 40, (3, 37), generator=g)
    tokens[1, 29:] = 0
    tokens[2, 11:] = 0
    return tokens


def randomize_norms(module: torch.nn.Module, seed: int = 1) -> None:
    """Non-trivial affine parameters everywhere, so a reference that skips one would differ."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "norm" in name:
                p.copy_(p + 0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))


CASES = [dict(pooling="mean"), dict(pooling="cls"), dict(cls_last_layer=True),
         dict(cls_last_layer=True, full_attention_layers=(1,)), dict(cls_last_layer=True, projection_rank=0),
         dict(cls_last_layer=True, window_size=0, projection_rank=3), dict(cls_last_layer=True, dual_ln_scope="head"),
         dict(pooling="mean", projection_input="raw")]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_padding_does_not_change_logits(case):
    model_keys = {"pooling", "cls_last_layer"}
    config = make_config(**{k: v for k, v in case.items() if k not in model_keys})
    model = ClassificationModel(config, 7, **{k: v for k, v in case.items() if k in model_keys}).double().eval()
    randomize_norms(model)
    tokens = padded_batch()
    logits = model(tokens)
    assert logits.shape == (3, 7) and torch.isfinite(logits).all()
    for i in range(3):
        n = int((tokens[i] != 0).sum())
        alone = model(tokens[i:i + 1, :n])
        torch.testing.assert_close(alone, logits[i:i + 1], rtol=1e-10, atol=1e-12)
        # more padding, a different batch partner: still the same
        longer = torch.cat([tokens[i:i + 1, :n], torch.zeros(1, 9, dtype=torch.long)], dim=1)
        torch.testing.assert_close(model(longer), logits[i:i + 1], rtol=1e-10, atol=1e-12)
    losses = model(tokens, torch.tensor([0, 3, 6]))
    assert losses.shape == (3,)
    losses.mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, missing


def ref_norm(x: torch.Tensor, norm) -> torch.Tensor:
    """LayerNorm of (B, H, M, D) over all heads' width (full) or per head, from the definition."""
    if norm is None:
        return x
    b, h, m, d = x.shape
    if type(norm).__name__ == "FullWidthLayerNorm":
        flat = x.transpose(1, 2).reshape(b, m, h * d)
        mu, var = flat.mean(-1, keepdim=True), flat.var(-1, unbiased=False, keepdim=True)
        y = ((flat - mu) / torch.sqrt(var + norm.eps)).view(b, m, h, d).transpose(1, 2)
    else:
        mu, var = x.mean(-1, keepdim=True), x.var(-1, unbiased=False, keepdim=True)
        y = (x - mu) / torch.sqrt(var + norm.eps)
    return y * norm.weight[None, :, None, :] + norm.bias[None, :, None, :]


def reference_post_cls(layer: TransformerLayer, x, cls, pad):
    """The released rule written out densely with Python loops over queries."""
    attn = layer.self_attention
    cfg = attn.config
    b, n, _ = x.shape
    h, d, r, w = attn.num_heads, attn.head_dim, attn.rank, attn.window
    weight, bias = attn.qkvp.weight, attn.qkvp.bias

    def heads(t):
        mixed = (t @ weight.T + bias).view(t.shape[0], t.shape[1], h, 3 * d + r).transpose(1, 2)
        return mixed[..., :d], mixed[..., d:2 * d], mixed[..., 2 * d:3 * d], mixed[..., 3 * d:]

    q, k, v, logits = heads(layer.input_layernorm(x))
    qc, kc, vc, _ = heads(cls)
    keep = ~pad
    ctx = torch.zeros_like(q)
    if attn.full:
        keys, values = torch.cat([kc, k], 2), torch.cat([vc, v], 2)
        visible = lambda bi, i: [0] + [1 + j for j in range(n) if keep[bi, j]]  # noqa: E731
        glob_k = glob_v = None
    else:
        kl, vl = ref_norm(k, attn.local_norm), ref_norm(v, attn.local_norm)
        gk, gv = kc, vc
        if r:
            src_k, src_v = (kl, vl) if attn.project_normed else (k, v)
            p = torch.softmax(logits.masked_fill(pad[:, None, :, None], -math.inf), dim=2)
            gk = torch.cat([kc, torch.einsum("bhnr,bhnd->bhrd", p, src_k)], 2)
            gv = torch.cat([vc, torch.einsum("bhnr,bhnd->bhrd", p, src_v)], 2)
        glob_k, glob_v = ref_norm(gk, attn.global_norm), ref_norm(gv, attn.global_norm)
        keys, values = torch.cat([kl, glob_k], 2), torch.cat([vl, glob_v], 2)
        e = max(w // 2, 1) if w else 0

        def visible(bi, i):
            s = i // w if w else 0
            local = [j for j in range(max(0, s * w - e), min(n, (s + 1) * w + e)) if keep[bi, j]] if w else []
            return local + [n + g for g in range(glob_k.shape[2])]
    for bi in range(b):
        for i in range(n):
            if not keep[bi, i]:
                continue
            idx = torch.tensor(visible(bi, i))
            s = (q[bi, :, i, None, :] * keys[bi][:, idx]).sum(-1) / math.sqrt(d)
            ctx[bi, :, i] = torch.einsum("hj,hjd->hd", torch.softmax(s, -1), values[bi][:, idx])
    s_cls = torch.cat([(qc * kc).sum(-1, keepdim=True), qc @ ctx.transpose(-1, -2)], -1) / math.sqrt(d)
    s_cls[..., 1:] = s_cls[..., 1:].masked_fill(pad[:, None, None, :], -math.inf)
    pc = torch.softmax(s_cls, -1)
    cls_ctx = pc[..., :1] * vc + pc[..., 1:] @ ctx
    both = torch.cat([cls_ctx, ctx], 2).transpose(1, 2).reshape(b, n + 1, h * d)
    y = torch.cat([cls, x], 1) + attn.dense(both)
    y = y + layer.mlp(layer.post_attention_layernorm(y))
    return y[:, 1:], y[:, :1]


@pytest.mark.parametrize("overrides", [dict(), dict(window_size=3), dict(projection_rank=0),
                                       dict(window_size=0), dict(dual_ln_scope="head"),
                                       dict(projection_input="raw"), dict(dual_ln=False),
                                       dict(full_attention_layers=(0,))],
                         ids=["ls", "odd-w", "window-only", "projection-only", "head-dualln", "raw-proj",
                              "no-dualln", "full"])
def test_post_cls_layer_matches_dense_reference(overrides):
    torch.manual_seed(0)
    config = make_config(num_layers=1, **overrides)
    layer = TransformerLayer(config, 0).double()
    randomize_norms(layer)
    x = torch.randn(2, 23, config.hidden_size, dtype=torch.float64)
    cls = torch.randn(2, 1, config.hidden_size, dtype=torch.float64, requires_grad=True)
    pad = torch.zeros(2, 23, dtype=torch.bool)
    pad[1, 15:] = True
    tokens, cls_out = post_cls_layer(layer, x, cls, pad)
    ref_tokens, ref_cls = reference_post_cls(layer, x, cls, pad)
    torch.testing.assert_close(cls_out, ref_cls, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(tokens[~pad], ref_tokens[~pad], rtol=1e-10, atol=1e-10)
    grad, = torch.autograd.grad(cls_out.sum(), cls, retain_graph=True)
    ref_grad, = torch.autograd.grad(ref_cls.sum(), cls)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-9, atol=1e-10)


def test_window_only_cls_cannot_see_far_tokens_but_ls_and_full_can():
    """The FAR_RECALL argument: after L window-only layers position 0 depends on positions < L*w + e only."""
    from megatron_ls.data.far_recall import window_receptive_field

    tokens = torch.randint(2, 40, (1, 60), generator=torch.Generator().manual_seed(3))
    field = window_receptive_field(4, 2)  # model positions; the CLS token takes position 0
    far = tokens.clone()
    far[0, field - 1:] = torch.randint(2, 40, (60 - field + 1,), generator=torch.Generator().manual_seed(4))
    near = tokens.clone()
    near[0, field - 2] = 2 if near[0, field - 2] != 2 else 3
    results = {}
    for name, kw in {"window": dict(projection_rank=0), "ls": dict(), "full": dict(full_attention_layers=(0, 1))
                     }.items():
        model = ClassificationModel(make_config(**kw), 7, pooling="cls").double().eval()
        base = model(tokens)
        results[name] = ((model(far) - base).abs().max().item(), (model(near) - base).abs().max().item())
    assert results["window"][0] == 0.0 and results["window"][1] > 0
    assert results["ls"][0] > 1e-8 and results["full"][0] > 1e-8


def test_errors_are_clear():
    with pytest.raises(ValueError, match="causal must be False"):
        ClassificationModel(make_config(causal=True), 3)
    with pytest.raises(ValueError, match="pick one"):
        ClassificationModel(make_config(), 3, pooling="cls", cls_last_layer=True)
    with pytest.raises(ValueError, match="--pooling"):
        ClassificationModel(make_config(), 3, pooling="max")
    model = ClassificationModel(make_config(seq_length=16), 3, pooling="cls")
    with pytest.raises(ValueError, match="exceed the 15"):
        model(torch.ones(1, 16, dtype=torch.long))


@pytest.mark.parametrize("cls_init_std", [0.0, 0.5])
def test_same_seed_same_weights(cls_init_std):
    a = ClassificationModel(make_config(), 4, cls_last_layer=True, cls_init_std=cls_init_std).state_dict()
    b = ClassificationModel(make_config(), 4, cls_last_layer=True, cls_init_std=cls_init_std).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    cls = a["cls_embed"]
    assert (cls == 0).all() if cls_init_std == 0 else 0.3 < float(cls.std()) < 0.7
