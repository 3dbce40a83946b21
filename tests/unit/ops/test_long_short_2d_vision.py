"""2D op options for vision: the released post-CLS, the window relative-position bias, the window rule, and the
attention pattern (what a query can and cannot see)."""
import pytest
import torch
import torch.nn as nn

from megatron_ls.model.vit_attention import grid_offset_index, window_offset_index
from megatron_ls.ops import long_short_attention_2d
from megatron_ls.ops.checks import window_extension


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def dense_vision(q, k, v, pl, *, grid, window, ne, ln_l, ln_g, bias, scale):
    """Dense float64 definition: patches see their square (+ bias), the CLS keys and the r projected keys
    (P over the patches applied to the LN_L-normed keys, then LN_G); a CLS query sees its own key and the patch
    outputs, as the released post-CLS."""
    b, h, n, d = q.shape
    gh, gw = grid
    e = window_extension(window, "floor")
    s = window + 2 * e
    kl, vl = ln_l(k), ln_l(v)
    p = torch.softmax(pl[:, :, ne:], dim=2)  # (B, H, P, r)
    kg, vg = ln_g(p.transpose(-1, -2) @ kl[:, :, ne:]), ln_g(p.transpose(-1, -2) @ vl[:, :, ne:])
    out = torch.zeros(b, h, n, d, dtype=q.dtype)
    for qi in range(gh * gw):
        y, x = divmod(qi, gw)
        by, bx = y // window, x // window
        scores, values = [], []
        for ki in range(gh * gw):
            ky, kx = divmod(ki, gw)
            c, dd = ky - (by * window - e), kx - (bx * window - e)
            if 0 <= c < s and 0 <= dd < s:
                t = (y - by * window) * window + (x - bx * window)
                scores.append((q[:, :, ne + qi] * kl[:, :, ne + ki]).sum(-1) * scale + bias[:, t, c * s + dd])
                values.append(vl[:, :, ne + ki])
        for j in range(ne):
            scores.append((q[:, :, ne + qi] * kl[:, :, j]).sum(-1) * scale)
            values.append(vl[:, :, j])
        for j in range(kg.shape[2]):
            scores.append((q[:, :, ne + qi] * kg[:, :, j]).sum(-1) * scale)
            values.append(vg[:, :, j])
        prob = torch.softmax(torch.stack(scores, -1), -1)
        out[:, :, ne + qi] = (prob[..., None] * torch.stack(values, -2)).sum(-2)
    patches = out[:, :, ne:].clone()
    for j in range(ne):
        keys = torch.cat([kl[:, :, :ne], patches], dim=2)
        vals = torch.cat([vl[:, :, :ne], patches], dim=2)
        prob = torch.softmax((q[:, :, j:j + 1] @ keys.transpose(-1, -2)) * scale, -1)
        out[:, :, j] = (prob @ vals)[:, :, 0]
    return out


@pytest.mark.parametrize("gh,gw,w,ne,r", [(5, 6, 2, 1, 2), (7, 7, 3, 1, 3), (4, 5, 4, 0, 1), (6, 5, 3, 2, 2)])
def test_post_cls_and_window_bias_match_dense(gh, gw, w, ne, r):
    b, h, d = 2, 2, 4
    n = ne + gh * gw
    q, k, v = (_rand(b, h, n, d, seed=i).requires_grad_() for i in range(3))
    pl = _rand(b, h, n, r, seed=3).requires_grad_()
    s = w + 2 * window_extension(w, "floor")
    bias = (_rand(h, w * w, s * s, seed=4) * 0.5).requires_grad_()
    torch.manual_seed(0)
    ln_l, ln_g = nn.LayerNorm(d).double(), nn.LayerNorm(d).double()
    with torch.no_grad():
        for ln in (ln_l, ln_g):
            ln.weight.uniform_(0.5, 1.5)
            ln.bias.uniform_(-0.5, 0.5)
    kw = dict(grid=(gh, gw), window=w, ne=ne, ln_l=ln_l, ln_g=ln_g, bias=bias, scale=0.45)
    ref = dense_vision(q, k, v, pl, **kw)
    out = long_short_attention_2d(q, k, v, pl, grid=(gh, gw), window=w, num_extra_tokens=ne, local_norm=ln_l,
                                  global_norm=ln_g, scale=0.45, project_normed=True, window_bias=bias,
                                  extra_queries="post")
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-10)
    params = [q, k, v, pl, bias, *ln_l.parameters(), *ln_g.parameters()]
    g = torch.randn_like(ref)
    for a, want in zip(torch.autograd.grad(out, params, g), torch.autograd.grad(ref, params, g)):
        torch.testing.assert_close(a, want, rtol=1e-8, atol=1e-9)


def released_window(gh, gw, w, qy, qx):
    """Keys of query (qy, qx) by the released tiling: pad the grid by max(w // 2, 1), cut (w + 2e)-wide tiles with
    stride w, drop the padding (the released code masks exactly the padded border rows/columns)."""
    side = max(w // 2, 1)
    ids = torch.full((gh + 2 * side, gw + 2 * side), -1, dtype=torch.long)
    ids[side:side + gh, side:side + gw] = torch.arange(gh * gw).view(gh, gw)
    by, bx = qy // w, qx // w
    tile = ids[by * w:by * w + w + 2 * side, bx * w:bx * w + w + 2 * side]
    return set(tile[tile >= 0].tolist())


def visible_keys(gh, gw, w, qi, **kw):
    """Keys the op lets patch query ``qi`` see: with q = 0 the softmax is uniform over them, so the output's
    gradient with respect to v is non-zero exactly there (no CLS, no projection)."""
    v = torch.zeros(1, 1, gh * gw, 2, dtype=torch.float64, requires_grad=True)
    q = torch.zeros(1, 1, gh * gw, 2, dtype=torch.float64)
    out = long_short_attention_2d(q, q.clone(), v, None, grid=(gh, gw), window=w, **kw)
    (grad,) = torch.autograd.grad(out[0, 0, qi].sum(), v)
    return set(torch.nonzero(grad[0, 0, :, 0]).flatten().tolist())


@pytest.mark.parametrize("w,gh,gw", [(2, 6, 6), (3, 9, 9), (4, 8, 8), (7, 14, 14)])
def test_window_rule_is_the_released_one(w, gh, gw):
    """Odd and even w: the default extension max(w // 2, 1) gives exactly the released tiles (w = 7: 13 x 13)."""
    for qi in range(0, gh * gw, 5):
        qy, qx = divmod(qi, gw)
        assert visible_keys(gh, gw, w, qi) == released_window(gh, gw, w, qy, qx), (w, qi)
    centre = (gh // 2) * gw + gw // 2
    side = w + 2 * max(w // 2, 1)
    if gh >= 3 * w:
        assert len(visible_keys(gh, gw, w, 4 * gw + 4 if w == 3 else centre)) == side * side
    if w % 2:  # ceil(w / 2) is wider for odd w
        assert visible_keys(gh, gw, w, centre, window_extension="ceil") > visible_keys(gh, gw, w, centre)


@pytest.mark.parametrize("impl", ["fused", "dense", "autograd"])
def test_patch_outside_square_with_no_projection_weight_is_invisible(impl):
    """Changing a patch outside the query's extended square and with zero projection weight leaves that query's
    output bit-identical (CLS and the other patches' projection still on); a patch inside the square, or one
    outside it that has projection weight, changes it."""
    gh = gw = 12
    w, ne, r, h, d = 3, 1, 2, 2, 4
    n = ne + gh * gw
    q, k, v = (_rand(1, h, n, d, seed=i) for i in range(3))
    pl = _rand(1, h, n, r, seed=3)
    # query (1, 1) is in block (0, 0), whose square is rows/cols [-1, 4) (e = max(3 // 2, 1) = 1)
    query, far, near, far_weighted = ne + 1 * gw + 1, ne + 11 * gw + 11, ne + 3 * gw + 3, ne + 1 * gw + 4
    pl[:, :, far] = pl[:, :, near] = -1e4  # exp underflows to exactly 0 in float64: no projection weight
    ln = nn.LayerNorm(d).double()

    def run(k_, v_):
        return long_short_attention_2d(q, k_, v_, pl, grid=(gh, gw), window=w, num_extra_tokens=ne,
                                       local_norm=ln, global_norm=ln, project_normed=True, extra_queries="post",
                                       implementation=impl)

    base = run(k, v)
    for target, changes in ((far, False), (near, True), (far_weighted, True)):
        k2, v2 = k.clone(), v.clone()
        k2[:, :, target] += torch.arange(d, dtype=k.dtype)  # not a constant shift: LN_L would remove that
        v2[:, :, target] -= torch.arange(d, dtype=k.dtype).flip(0) ** 2
        out = run(k2, v2)
        assert torch.equal(out[:, :, query], base[:, :, query]) is not changes, target


def test_offset_indices_are_one_entry_per_offset():
    """Each 2D offset (dy, dx) between a block query and a square key has its own table entry, and only it."""
    w, e = 7, 3
    s, span = w + 2 * e, w + e - 1
    idx = window_offset_index(w, e)
    assert idx.shape == (w * w, s * s) and int(idx.max()) < (2 * span + 1) ** 2
    for t in range(0, w * w, 6):
        for c in range(0, s * s, 7):
            dy = t // w - (c // s - e)
            dx = t % w - (c % s - e)
            assert divmod(int(idx[t, c]), 2 * span + 1) == (dy + span, dx + span)
    g = grid_offset_index(3, 4)
    assert g.shape == (12, 12) and int(g[0, 0]) == int(g[5, 5]) and int(g[0, 1]) != int(g[0, 4])


def test_bad_options_raise():
    q = torch.zeros(1, 1, 17, 4)
    with pytest.raises(ValueError, match="extra_queries"):
        long_short_attention_2d(q, q, q, None, grid=(4, 4), window=2, num_extra_tokens=1, extra_queries="pre")
    with pytest.raises(ValueError, match="window_bias must have shape"):
        long_short_attention_2d(q, q, q, None, grid=(4, 4), window=2, num_extra_tokens=1,
                                window_bias=torch.zeros(1, 4, 4))
