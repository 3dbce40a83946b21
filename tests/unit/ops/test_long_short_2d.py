"""long_short_attention_2d against the dense float64 reference (values and gradients) and its errors."""
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from megatron_ls.ops import long_short_attention_2d

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the dense reference lives beside us
from ls_reference import dense_long_short_2d  # noqa: E402


def _rand(*shape, seed=0, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# (gh, gw, window, extra, r): grids not multiples of w, w larger than the grid, w = 1, odd w, r = 0, w = 0
CASES = [(5, 7, 2, 1, 3), (6, 6, 3, 0, 2), (4, 5, 8, 2, 1), (3, 4, 1, 1, 2), (7, 5, 3, 1, 0), (5, 4, 0, 1, 2),
         (1, 1, 2, 0, 1), (6, 9, 4, 0, 0)]


@pytest.mark.parametrize("gh,gw,w,ne,r", CASES)
@pytest.mark.parametrize("use_ln", [False, True])
@pytest.mark.parametrize("padded", [False, True])
def test_matches_dense(gh, gw, w, ne, r, use_ln, padded):
    _check_dense(gh, gw, w, ne, r, use_ln, padded)


@pytest.mark.parametrize("gh,gw,w,ne,r", [c for c in CASES if c[2] % 2 == 1 or c[4] > 0])
@pytest.mark.parametrize("extension", ["floor", "ceil"])
@pytest.mark.parametrize("project_normed", [False, True])
def test_released_options_match_dense(gh, gw, w, ne, r, extension, project_normed):
    """Window extension rule (max(w // 2, 1) or ceil) and projection of the LN_L-normed keys."""
    _check_dense(gh, gw, w, ne, r, True, True, window_extension=extension, project_normed=project_normed)


def _check_dense(gh, gw, w, ne, r, use_ln, padded, **options):
    b, h, d = 2, 2, 8
    n = ne + gh * gw
    q, k, v = (_rand(b, h, n, d, seed=i).requires_grad_() for i in range(3))
    pl = _rand(b, h, n, r, seed=3).requires_grad_() if r else None
    ln_l = ln_g = None
    params = [q, k, v] + ([pl] if pl is not None else [])
    if use_ln:
        torch.manual_seed(0)
        ln_l, ln_g = nn.LayerNorm(d).double(), nn.LayerNorm(d).double()
        with torch.no_grad():
            for ln in (ln_l, ln_g):
                ln.weight.uniform_(0.5, 1.5)
                ln.bias.uniform_(-0.5, 0.5)
        params += list(ln_l.parameters()) + list(ln_g.parameters())
    pad = None
    if padded:
        pad = torch.zeros(b, n, dtype=torch.bool)
        pad[1, n - max(1, gh * gw // 3):] = True  # trailing padded patches
        if n > 1:
            pad[0, 0] = True  # a padded extra token (or first patch)
    kw = dict(grid=(gh, gw), window=w, num_extra_tokens=ne, key_padding_mask=pad, local_norm=ln_l,
              global_norm=ln_g, scale=0.4, **options)
    if w == 0 and r == 0:
        pytest.skip("both parts off is an error, tested below")
    ref = dense_long_short_2d(q, k, v, pl, **kw)
    out = long_short_attention_2d(q, k, v, pl, **kw)
    assert out.shape == q.shape and out.dtype == q.dtype
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-10)
    g = torch.randn_like(ref)
    got = torch.autograd.grad(out, params, g, allow_unused=True)
    want = torch.autograd.grad(ref, params, g, allow_unused=True)
    for i, (a, bb) in enumerate(zip(got, want)):
        a = torch.zeros_like(params[i]) if a is None else a
        bb = torch.zeros_like(params[i]) if bb is None else bb
        torch.testing.assert_close(a, bb, rtol=1e-8, atol=1e-9, msg=lambda m: f"grad #{i}: {m}")
    if padded:
        assert out[pad[:, None, :, None].expand_as(out)].eq(0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_low_precision(dtype):
    q, k, v = (_rand(1, 2, 1 + 10 * 10, 16, seed=i, dtype=torch.float32).to(dtype).requires_grad_()
               for i in range(3))
    pl = (_rand(1, 2, 101, 4, seed=5, dtype=torch.float32) * 1e3).to(dtype).requires_grad_()
    kw = dict(grid=(10, 10), window=4, num_extra_tokens=1)
    out = long_short_attention_2d(q, k, v, pl, **kw)
    assert out.dtype == dtype and torch.isfinite(out).all()
    ref = dense_long_short_2d(q, k, v, pl, **kw)
    tol = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 3e-2}[dtype]
    torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol)
    out.float().sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v, pl))


def test_dropout_seeded_and_finite():
    q, k, v = (_rand(1, 1, 17, 8, seed=i).requires_grad_() for i in range(3))
    pl = _rand(1, 1, 17, 2, seed=3).requires_grad_()
    kw = dict(grid=(4, 4), window=2, num_extra_tokens=1, dropout_p=0.5)
    torch.manual_seed(1)
    a = long_short_attention_2d(q, k, v, pl, **kw)
    torch.manual_seed(1)
    b = long_short_attention_2d(q, k, v, pl, **kw)
    assert torch.equal(a, b)
    assert not torch.allclose(a, long_short_attention_2d(q, k, v, pl, **{**kw, "dropout_p": 0.0}))
    a.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v, pl))


@pytest.mark.parametrize("over,exc,words", [
    (dict(grid=(4, 5)), ValueError, "must equal num_extra_tokens"),
    (dict(grid=(4,)), ValueError, "grid must be a pair"),
    (dict(grid=(4, 0)), ValueError, "grid must be a pair"),
    (dict(num_extra_tokens=-1), ValueError, "num_extra_tokens must be >= 0"),
    (dict(window=-2), ValueError, "window must be >= 0"),
    (dict(window=0, proj_logits=None), ValueError, "needs a window or a projection"),
    (dict(proj_logits=_rand(1, 1, 16, 2)), ValueError, "proj_logits must have shape"),
    (dict(key_padding_mask=torch.zeros(1, 16, dtype=torch.bool)), ValueError, "key_padding_mask must have shape"),
])
def test_errors(over, exc, words):
    a = dict(q=_rand(1, 1, 17, 4), k=_rand(1, 1, 17, 4), v=_rand(1, 1, 17, 4), proj_logits=_rand(1, 1, 17, 2),
             grid=(4, 4), window=2, num_extra_tokens=1)
    a.update(over)
    with pytest.raises(exc, match=words):
        long_short_attention_2d(a.pop("q"), a.pop("k"), a.pop("v"), a.pop("proj_logits"), **a)
