"""RoPE in long-short attention: matches the dense reference (values and gradients), is invariant to shifting
every position, leaves values alone, and is refused where it has no meaning (bidirectional projection)."""
import sys
from pathlib import Path

import pytest
import torch

from megatron_ls.ops import Rotary, long_short_attention
from megatron_ls.ops.rotary import chunk_positions

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ls_reference import dense_long_short, rope_reference  # noqa: E402
from test_long_short_attention import _inputs, _norms, _pad_mask  # noqa: E402


@pytest.mark.parametrize("n,w,l,r", [(23, 4, 3, 2), (33, 7, 5, 3), (19, 6, 4, 0), (21, 0, 4, 2)])
@pytest.mark.parametrize("percent", [1.0, 0.5])
@pytest.mark.parametrize("full_width", [False, True])
def test_rope_matches_dense(n, w, l, r, percent, full_width):
    b, h, d = 2, 2, 8
    q, k, v, pl = _inputs(b, h, n, d, r)
    ln_l, ln_g = _norms(True, d, full_width_heads=h if full_width else 0)
    rot = Rotary.for_head(d, 100.0, percent)
    pad = _pad_mask(b, n, "left")
    kw = dict(window=w, causal=True, segment_len=l, key_padding_mask=pad, local_norm=ln_l, global_norm=ln_g)
    params = [q, k, v] + ([pl] if pl is not None else []) + list(ln_l.parameters()) + list(ln_g.parameters())
    ref = dense_long_short(q, k, v, pl, rotary=(100.0, rot.dim), **kw)
    out = long_short_attention(q, k, v, pl, rotary=rot, backend="torch", **kw)
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-10)
    g = torch.randn_like(ref)
    for got, want in zip(torch.autograd.grad(out, params, g, allow_unused=True),
                         torch.autograd.grad(ref, params, g, allow_unused=True)):
        if want is None or got is None:  # an unused LN_L (w = 0): no gradient on one side, zero on the other
            assert (want is None or not want.any()) and (got is None or not got.any())
            continue
        torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-9)


def test_rotation_matches_complex_reference_and_keeps_norms():
    x = torch.randn(2, 3, 10, 16, dtype=torch.float64)
    pos = torch.arange(10) * 37 + 1_000_000  # large positions keep their precision (float64 angles)
    rot = Rotary(10000.0, 12)
    y = rot.rotate(x, pos)
    torch.testing.assert_close(y, rope_reference(x, pos, 10000.0, 12))
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1))
    torch.testing.assert_close(y[..., 12:], x[..., 12:])


@pytest.mark.parametrize("w,r", [(6, 0), (6, 2), (0, 2)])
def test_shifting_every_position_changes_nothing(w, r):
    """Scores depend on relative positions only, so positions + c gives the same output (window and chunks)."""
    q, k, v, pl = _inputs(1, 2, 40, 8, r)
    ln_l, ln_g = _norms(True, 8)
    kw = dict(window=w, causal=True, segment_len=4, local_norm=ln_l, global_norm=ln_g, rotary=Rotary(500.0, 8))
    base = long_short_attention(q, k, v, pl, positions=torch.arange(40), **kw)
    shifted = long_short_attention(q, k, v, pl, positions=torch.arange(40) + 12345, **kw)
    torch.testing.assert_close(shifted, base, rtol=1e-9, atol=1e-10)
    plain = long_short_attention(q, k, v, pl, **{**kw, "rotary": None})
    assert not torch.allclose(plain, base)  # the rotation does act


def test_chunk_positions_are_each_chunks_last_token():
    assert chunk_positions(2, 3, 2, 4).tolist() == [11, 11, 15, 15, 19, 19]


def test_rope_refused_for_bidirectional_and_bad_settings():
    q, k, v, pl = _inputs(1, 1, 8, 8, 1)
    with pytest.raises(ValueError, match="causal"):
        long_short_attention(q, k, v, pl, window=4, causal=False, rotary=Rotary(10000.0, 8))
    with pytest.raises(ValueError, match="rotary-percent"):
        Rotary.for_head(8, 10000.0, 0.0)
    with pytest.raises(ValueError, match="even"):
        Rotary(10000.0, 3)
