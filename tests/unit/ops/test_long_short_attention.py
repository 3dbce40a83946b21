"""long_short_attention against the dense float64 reference: values and gradients, both backends."""
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from megatron_ls.ops import blockwise, long_short_attention
sys.path.insert(0, str(Path(__file__).resolve().parent))  # the dense reference lives beside us
from ls_reference import dense_long_short  # noqa: E402

# (N, window, segment_len, r): N not a multiple of w or l, N < w, N = 1, w = 1, r = 0, w = 0
CAUSAL_CASES = [
    (23, 4, 3, 2), (16, 4, 4, 1), (5, 8, 2, 2), (1, 4, 2, 2), (17, 1, 1, 1), (19, 6, 4, 0),
    (21, 0, 4, 2), (33, 7, 5, 3), (2, 1, 1, 1), (30, 5, 5, 1),
]
BIDIR_CASES = [(23, 4, 2), (16, 4, 1), (5, 8, 2), (1, 4, 2), (17, 1, 1), (19, 6, 0), (21, 0, 3), (33, 7, 3),
               (12, 3, 0), (2, 2, 1)]


def _inputs(b, h, n, d, r, dtype=torch.float64, seed=0, proj_scale=1.0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, h, n, d, generator=g, dtype=dtype).requires_grad_() for _ in range(3))
    pl = (torch.randn(b, h, n, r, generator=g, dtype=dtype) * proj_scale).requires_grad_() if r else None
    return q, k, v, pl


class FullWidthLN(nn.Module):
    """LayerNorm over all heads' width together on (B, H, *, D) tensors (the released code's DualLN)."""

    def __init__(self, h, d):
        super().__init__()
        self.ln = nn.LayerNorm(h * d)
        self.weight, self.bias = self.ln.weight, self.ln.bias

    def forward(self, x):
        b, h, n, d = x.shape
        y = self.ln(x.transpose(1, 2).reshape(b, n, h * d))
        return y.view(b, n, h, d).transpose(1, 2)


def _norms(use_ln, d, seed=1, full_width_heads=0):
    if not use_ln:
        return None, None
    torch.manual_seed(seed)
    if full_width_heads:
        ln_l, ln_g = FullWidthLN(full_width_heads, d).double(), FullWidthLN(full_width_heads, d).double()
    else:
        ln_l, ln_g = nn.LayerNorm(d).double(), nn.LayerNorm(d).double()
    with torch.no_grad():  # non-trivial affine parameters so their gradients are checked too
        for ln in (ln_l, ln_g):
            ln.weight.uniform_(0.5, 1.5)
            ln.bias.uniform_(-0.5, 0.5)
    return ln_l, ln_g


def _pad_mask(b, n, kind):
    pad = torch.zeros(b, n, dtype=torch.bool)
    if kind == "right" and n > 1:
        pad[-1, n - max(1, n // 3):] = True
    elif kind == "left" and n > 1:
        pad[0, : max(1, n // 3)] = True
    elif kind == "holes":
        pad[:, ::3] = True
        pad[-1, :] = True  # a fully padded batch row
    return None if kind == "none" else pad


def _compare(n, w, l, r, *, causal, use_ln, pad_kind, scale=None, b=2, h=2, d=8, check_flex=True,
             extension="floor", project_normed=False, full_width=False):
    q, k, v, pl = _inputs(b, h, n, d, r)
    ln_l, ln_g = _norms(use_ln, d, full_width_heads=h if full_width else 0)
    pad = _pad_mask(b, n, pad_kind)
    kw = dict(window=w, causal=causal, segment_len=l, key_padding_mask=pad, local_norm=ln_l, global_norm=ln_g,
              scale=scale, window_extension=extension, project_normed=project_normed)
    params = [q, k, v] + ([pl] if pl is not None else [])
    if use_ln:
        params += list(ln_l.parameters()) + list(ln_g.parameters())
    ref = dense_long_short(q, k, v, pl, **kw)
    g_out = torch.randn_like(ref)
    ref_grads = [torch.zeros_like(p) if g is None else g
                 for p, g in zip(params, torch.autograd.grad(ref, params, g_out, allow_unused=True))]
    out = long_short_attention(q, k, v, pl, backend="torch", **kw)
    assert out.dtype == q.dtype and out.shape == q.shape
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-10)
    grads = torch.autograd.grad(out, params, g_out, allow_unused=True)
    for i, (got, want) in enumerate(zip(grads, ref_grads)):
        got = torch.zeros_like(want) if got is None else got
        torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-9, msg=lambda m: f"grad #{i}: {m}")
    if check_flex:
        with torch.no_grad():
            flex = long_short_attention(q, k, v, pl, backend="flex", **kw)
        torch.testing.assert_close(flex, ref, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("n,w,l,r", CAUSAL_CASES)
@pytest.mark.parametrize("use_ln", [False, True])
@pytest.mark.parametrize("pad_kind", ["none", "left", "holes"])
def test_causal_matches_dense(n, w, l, r, use_ln, pad_kind):
    _compare(n, w, l, r, causal=True, use_ln=use_ln, pad_kind=pad_kind)


@pytest.mark.parametrize("n,w,r", BIDIR_CASES)
@pytest.mark.parametrize("use_ln", [False, True])
@pytest.mark.parametrize("pad_kind", ["none", "right", "holes"])
def test_bidirectional_matches_dense(n, w, r, use_ln, pad_kind):
    _compare(n, w, None, r, causal=False, use_ln=use_ln, pad_kind=pad_kind)


@pytest.mark.parametrize("n,w,r", BIDIR_CASES)
@pytest.mark.parametrize("extension", ["floor", "ceil"])
@pytest.mark.parametrize("project_normed", [False, True])
def test_bidirectional_released_options_match_dense(n, w, r, extension, project_normed):
    """Window extension rule (released max(w // 2, 1) or ceil) and projection of LN_L-normed keys, with
    full-width DualLN (one LayerNorm over all heads), against the reference."""
    _compare(n, w, None, r, causal=False, use_ln=True, pad_kind="holes", extension=extension,
             project_normed=project_normed, full_width=True)


@pytest.mark.parametrize("n,w,l,r", CAUSAL_CASES[:6])
def test_causal_full_width_dual_ln_matches_dense(n, w, l, r):
    _compare(n, w, l, r, causal=True, use_ln=True, pad_kind="left", full_width=True)


def test_project_normed_is_bidirectional_only():
    q, k, v, pl = _inputs(1, 1, 8, 4, 1)
    with pytest.raises(ValueError, match="bidirectional"):
        long_short_attention(q, k, v, pl, window=4, causal=True, segment_len=2, project_normed=True)


@pytest.mark.parametrize("causal", [True, False])
def test_scale_given(causal):
    _compare(19, 4, 2 if causal else None, 2, causal=causal, use_ln=True, pad_kind="none", scale=0.37)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("block,tile", [(1, 1), (2, 3), (3, 7), (4, 8)])
def test_many_tiles(monkeypatch, causal, block, tile):
    """Shrink the query block / tile so short sequences cross many tile and slab boundaries."""
    monkeypatch.setattr(blockwise, "CAUSAL_BLOCK", block)
    monkeypatch.setattr(blockwise, "TILE_QUERIES", tile)
    for n, w, l, r in [(37, 5, 3, 2), (29, 4, 4, 1), (31, 0, 3, 2), (26, 3, 2, 0)]:
        _compare(n, w, l if causal else None, r, causal=causal, use_ln=True, pad_kind="holes", b=2, h=1,
                 check_flex=False)


def test_longer_sequence_default_tiles():
    """Default block/tile sizes with several tiles (N > TILE_QUERIES), causal and bidirectional."""
    _compare(600, 70, 16, 2, causal=True, use_ln=True, pad_kind="left", b=1, h=1, d=4, check_flex=False)
    _compare(600, 70, None, 3, causal=False, use_ln=False, pad_kind="right", b=1, h=1, d=4, check_flex=False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("causal", [True, False])
def test_low_precision_close_to_reference(dtype, causal):
    q, k, v, pl = _inputs(2, 2, 45, 16, 2, dtype=dtype)
    kw = dict(window=6, causal=causal, segment_len=4 if causal else None, key_padding_mask=_pad_mask(2, 45, "holes"))
    out = long_short_attention(q, k, v, pl, backend="torch", **kw)
    assert out.dtype == dtype
    ref = dense_long_short(q, k, v, pl, **kw)
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}[dtype]
    torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol)
    out.float().square().sum().backward()
    for t in (q, k, v, pl):
        assert t.grad.dtype == dtype and torch.isfinite(t.grad).all()
    with torch.no_grad():
        flex = long_short_attention(q, k, v, pl, backend="flex", **kw)
    torch.testing.assert_close(flex.double(), ref, rtol=tol * 2, atol=tol * 2)


@pytest.mark.parametrize("causal", [True, False])
def test_dropout_path_matches_core_without_dropout(causal):
    """The plain-autograd path used for dropout equals the flash-style core (values and grads) at p = 0."""
    q, k, v, pl = _inputs(2, 2, 40, 8, 2)
    pad = _pad_mask(2, 40, "holes")
    ln_l, ln_g = _norms(True, 8)
    args = dict(causal=causal, window=5, segment_len=3 if causal else 0, rank=2, scale=8 ** -0.5,
                dtype=q.dtype, device=q.device, pad=pad)
    from megatron_ls.ops.projection import project_bidirectional, project_causal
    if causal:
        kg, vg, cv = project_causal(k, v, pl, pad, 3)
    else:
        (kg, vg), cv = project_bidirectional(k, v, pl, pad), None
    kg, vg, kl, vl = ln_g(kg), ln_g(vg), ln_l(k), ln_l(v)
    plan = blockwise.make_plan(2, 2, 40, 8, n_global=kg.shape[2], chunk_valid=cv, **args)
    ins = (q, kl, vl, kg, vg)
    a = blockwise.LongShortCore.apply(plan, *ins)
    b = blockwise.attention_with_dropout(plan, *ins, 0.0)
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    g = torch.randn_like(a)
    for ga, gb in zip(torch.autograd.grad(a, ins, g), torch.autograd.grad(b, ins, g)):
        torch.testing.assert_close(ga, gb, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("causal", [True, False])
def test_dropout_is_unbiased_and_seeded(causal):
    q, k, v, pl = _inputs(1, 2, 24, 8, 2)
    kw = dict(window=4, causal=causal, segment_len=2 if causal else None, backend="torch")
    with torch.no_grad():
        clean = long_short_attention(q, k, v, pl, **kw)
        torch.manual_seed(5)
        a = long_short_attention(q, k, v, pl, dropout_p=0.3, **kw)
        torch.manual_seed(5)
        b = long_short_attention(q, k, v, pl, dropout_p=0.3, **kw)
        assert torch.equal(a, b) and not torch.allclose(a, clean)
        mean = sum(long_short_attention(q, k, v, pl, dropout_p=0.3, **kw) for _ in range(400)) / 400
    # inverted dropout keeps the expectation: the mean of 400 draws is close to the clean output
    assert (mean - clean).abs().mean() < 0.05 * clean.abs().mean()
    out = long_short_attention(q, k, v, pl, dropout_p=0.3, **kw)
    out.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v, pl))


def test_projection_logits_gradient_flows_only_through_unpadded_tokens():
    q, k, v, pl = _inputs(1, 1, 12, 4, 2)
    pad = torch.zeros(1, 12, dtype=torch.bool)
    pad[0, 7:] = True
    out = long_short_attention(q, k, v, pl, window=2, causal=False, key_padding_mask=pad)
    out.sum().backward()
    assert torch.all(pl.grad[0, 0, 7:] == 0) and pl.grad[0, 0, :7].abs().sum() > 0
