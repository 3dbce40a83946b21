"""The fused patch-query kernel (long_short_2d_fused) and the dense-masked path against the autograd path and the
dense float64 references: values and gradients of q, k, v, proj_logits, both norms' parameters and window_bias,
across window rules, extra tokens, padding, projection-only and window-only layers, and chunkings that split rows,
heads and batch; and which path ``implementation="auto"`` takes."""
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import megatron_ls.ops.long_short_2d as ls2d
import megatron_ls.ops.long_short_2d_fused as fused
from megatron_ls.model.norms import FullWidthLayerNorm
from megatron_ls.ops import long_short_attention_2d
from megatron_ls.ops.checks import window_extension

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the dense references live beside us
from ls_reference import dense_long_short_2d  # noqa: E402
from test_long_short_2d_vision import dense_vision  # noqa: E402


def _rand(*shape, seed=0, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _norms(d, full_width=False, heads=2):
    torch.manual_seed(0)
    make = (lambda: FullWidthLayerNorm(heads, d)) if full_width else (lambda: nn.LayerNorm(d))
    ln_l, ln_g = make().double(), make().double()
    with torch.no_grad():
        for ln in (ln_l, ln_g):
            ln.weight.uniform_(0.5, 1.5)
            ln.bias.uniform_(-0.5, 0.5)
    return ln_l, ln_g


def _inputs(b, h, n, d, r, seed=0, dtype=torch.float64):
    q, k, v = (_rand(b, h, n, d, seed=seed + i, dtype=dtype).requires_grad_() for i in range(3))
    pl = _rand(b, h, n, r, seed=seed + 3, dtype=dtype).requires_grad_() if r else None
    return q, k, v, pl


def _grads(out, params, seed=7):
    g = _rand(*out.shape, seed=seed, dtype=out.dtype)
    got = torch.autograd.grad(out, params, g, allow_unused=True, retain_graph=True)
    return [torch.zeros_like(p) if x is None else x for p, x in zip(params, got)]


def _assert_same(out, ref, params, rtol=1e-9, atol=1e-10):
    torch.testing.assert_close(out, ref, rtol=rtol, atol=atol)
    for i, (a, b) in enumerate(zip(_grads(out, params), _grads(ref, params))):
        torch.testing.assert_close(a, b, rtol=rtol * 10, atol=atol * 10, msg=lambda m: f"grad #{i}: {m}")


# (gh, gw, w, extension, extra tokens, r): odd/even w, grids not multiples of w, w > grid, w = 0 and r = 0
CASES = [(5, 7, 2, "floor", 1, 3), (7, 6, 3, "floor", 2, 2), (7, 6, 3, "ceil", 1, 2), (4, 5, 4, "ceil", 0, 1),
         (6, 6, 3, "floor", 1, 0), (5, 4, 0, "floor", 2, 2), (3, 3, 5, "floor", 1, 2), (8, 5, 4, "floor", 0, 0)]
FAST = pytest.mark.parametrize("impl", ["fused", "dense"])


@pytest.mark.parametrize("gh,gw,w,ext,ne,r", CASES)
@pytest.mark.parametrize("extra_queries", ["post", "full"])
@pytest.mark.parametrize("budget", [1, 10 ** 9])  # one block row per chunk / everything in one chunk
@FAST
def test_fused_equals_autograd(gh, gw, w, ext, ne, r, extra_queries, budget, impl, monkeypatch):
    """Padding mask, window bias, projection of the normed keys, per-head norms: fused == autograd path."""
    monkeypatch.setattr(fused, "CHUNK_SCORES", budget)
    b, h, d = 2, 2, 4
    n = ne + gh * gw
    q, k, v, pl = _inputs(b, h, n, d, r)
    ln_l, ln_g = _norms(d)
    bias = None
    params = [q, k, v] + ([pl] if r else []) + [*ln_l.parameters(), *ln_g.parameters()]
    if w:
        s = w + 2 * window_extension(w, ext)
        bias = (_rand(h, w * w, s * s, seed=4) * 0.5).requires_grad_()
        params.append(bias)
    pad = torch.zeros(b, n, dtype=torch.bool)
    pad[1, n - gh * gw // 3:] = True  # trailing patches of sample 1
    pad[0, 0] = True  # an extra token (or the first patch) of sample 0
    kw = dict(grid=(gh, gw), window=w, num_extra_tokens=ne, key_padding_mask=pad, local_norm=ln_l,
              global_norm=ln_g if r else None, scale=0.4, window_extension=ext, project_normed=bool(r),
              window_bias=bias, extra_queries=extra_queries)
    out = long_short_attention_2d(q, k, v, pl, implementation=impl, **kw)
    ref = long_short_attention_2d(q, k, v, pl, implementation="autograd", **kw)
    _assert_same(out, ref, params)
    assert out[pad[:, None, :, None].expand_as(out)].eq(0).all()


@pytest.mark.parametrize("budget", [1, 300, 3000, 10 ** 9])  # rows / heads / batch split across chunks, or none
@pytest.mark.parametrize("gh,gw,w,ne,r", [(5, 7, 2, 1, 3), (7, 7, 3, 1, 2), (4, 5, 0, 1, 2), (6, 5, 3, 0, 0)])
@FAST
def test_fused_matches_dense_reference(budget, gh, gw, w, ne, r, impl, monkeypatch):
    """Extra queries "full" with padding (ls_reference.dense_long_short_2d), any chunking."""
    monkeypatch.setattr(fused, "CHUNK_SCORES", budget)
    b, h, d = 3, 2, 4
    n = ne + gh * gw
    q, k, v, pl = _inputs(b, h, n, d, r, seed=10)
    ln_l, ln_g = _norms(d)
    pad = torch.zeros(b, n, dtype=torch.bool)
    pad[2, -(gh * gw // 2):] = True
    if ne:
        pad[1, 0] = True
    kw = dict(grid=(gh, gw), window=w, num_extra_tokens=ne, key_padding_mask=pad, local_norm=ln_l,
              global_norm=ln_g, scale=0.35)
    params = [q, k, v] + ([pl] if r else []) + [*ln_l.parameters(), *ln_g.parameters()]
    _assert_same(long_short_attention_2d(q, k, v, pl, implementation=impl, **kw),
                 dense_long_short_2d(q, k, v, pl, **kw), params)


@pytest.mark.parametrize("gh,gw,w,ne,r", [(5, 6, 2, 1, 2), (7, 7, 3, 1, 3), (6, 5, 3, 2, 2), (4, 5, 4, 0, 1)])
@FAST
def test_fused_matches_dense_post_cls_and_bias(gh, gw, w, ne, r, impl, monkeypatch):
    """The released vision layer (post-CLS, window bias, normed projection) against dense_vision."""
    monkeypatch.setattr(fused, "CHUNK_SCORES", 200)
    b, h, d = 2, 2, 4
    n = ne + gh * gw
    q, k, v, pl = _inputs(b, h, n, d, r, seed=20)
    s = w + 2 * window_extension(w, "floor")
    bias = (_rand(h, w * w, s * s, seed=24) * 0.5).requires_grad_()
    ln_l, ln_g = _norms(d)
    ref = dense_vision(q, k, v, pl, grid=(gh, gw), window=w, ne=ne, ln_l=ln_l, ln_g=ln_g, bias=bias, scale=0.45)
    out = long_short_attention_2d(q, k, v, pl, grid=(gh, gw), window=w, num_extra_tokens=ne, local_norm=ln_l,
                                  global_norm=ln_g, scale=0.45, project_normed=True, window_bias=bias,
                                  extra_queries="post", implementation=impl)
    _assert_same(out, ref, [q, k, v, pl, bias, *ln_l.parameters(), *ln_g.parameters()])


@pytest.mark.parametrize("w,r", [(3, 2), (0, 2), (2, 0)])
@FAST
def test_rows_with_nothing_visible(w, r, impl):
    """A fully padded sample: every row of it sees no key; outputs 0, gradients finite and equal to autograd."""
    b, h, d, gh, gw = 2, 2, 4, 5, 6
    n = 1 + gh * gw
    q, k, v, pl = _inputs(b, h, n, d, r, seed=70)
    pad = torch.zeros(b, n, dtype=torch.bool)
    pad[1] = True
    kw = dict(grid=(gh, gw), window=w, num_extra_tokens=1, key_padding_mask=pad, extra_queries="post")
    out = long_short_attention_2d(q, k, v, pl, implementation=impl, **kw)
    assert out[1].eq(0).all()
    params = [q, k, v] + ([pl] if r else [])
    assert all(torch.isfinite(g).all() for g in _grads(out, params))
    _assert_same(out, long_short_attention_2d(q, k, v, pl, implementation="autograd", **kw), params)


@FAST
def test_full_width_norms_as_in_the_model(impl):
    """DualLN over all heads' width (the model's default scope): fused == autograd, norms' grads included."""
    b, h, d, gh, gw = 2, 3, 4, 9, 10
    n = 1 + gh * gw
    q, k, v, pl = _inputs(b, h, n, d, 4, seed=30)
    ln_l, ln_g = _norms(d, full_width=True, heads=h)
    s = 4 + 2 * 2
    bias = (_rand(h, 16, s * s, seed=34) * 0.5).requires_grad_()
    kw = dict(grid=(gh, gw), window=4, num_extra_tokens=1, local_norm=ln_l, global_norm=ln_g,
              project_normed=True, window_bias=bias, extra_queries="post")
    params = [q, k, v, pl, bias, *ln_l.parameters(), *ln_g.parameters()]
    _assert_same(long_short_attention_2d(q, k, v, pl, implementation=impl, **kw),
                 long_short_attention_2d(q, k, v, pl, implementation="autograd", **kw), params)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-5), (torch.bfloat16, 3e-2)])
@FAST
def test_low_precision_forward_and_backward(dtype, tol, impl):
    """fp32 / bf16 inputs (fp32 compute): outputs close to float64, gradients finite and close to autograd."""
    gh = gw = 10
    n = 1 + gh * gw
    q, k, v, pl = (x.detach().to(dtype).requires_grad_() for x in _inputs(2, 2, n, 16, 4, seed=40))
    kw = dict(grid=(gh, gw), window=4, num_extra_tokens=1, extra_queries="post")
    out = long_short_attention_2d(q, k, v, pl, implementation=impl, **kw)
    assert out.dtype == dtype and torch.isfinite(out).all()
    ref = long_short_attention_2d(*(x.detach().double() for x in (q, k, v, pl)), **kw)
    torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol)
    params = [q, k, v, pl]
    got = _grads(out.float(), params)
    want = _grads(long_short_attention_2d(q, k, v, pl, implementation="autograd", **kw).float(), params)
    for a, b in zip(got, want):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a.float(), b.float(), rtol=tol, atol=tol)


def test_saves_no_scores():
    """The fused path keeps O(N·D) for backward; the autograd path keeps its N × (S² + X) scores."""
    b, h, d, gh, gw, w = 1, 2, 4, 24, 24, 8
    n = 1 + gh * gw
    q, k, v, pl = _inputs(b, h, n, d, 4, seed=50, dtype=torch.float32)
    ln_l, ln_g = _norms(d)
    ln_l, ln_g = ln_l.float(), ln_g.float()
    kw = dict(grid=(gh, gw), window=w, num_extra_tokens=1, local_norm=ln_l, global_norm=ln_g,
              project_normed=True, extra_queries="post")

    def saved_numel(implementation):
        sizes = {}

        def pack(t):
            sizes[(t.data_ptr(), t.numel())] = t.numel()
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            long_short_attention_2d(q, k, v, pl, implementation=implementation, **kw)
        return sum(sizes.values()), max(sizes.values())

    scores = b * h * gh * gw * ((w + 2 * 4) ** 2 + 1 + 4)  # e = 4
    total_fused, largest_fused = saved_numel("fused")
    total_autograd, _ = saved_numel("autograd")
    assert largest_fused < scores / 8 and total_fused < scores / 2, (total_fused, largest_fused, scores)
    assert total_autograd > 2 * scores, (total_autograd, scores)


def test_dropout_takes_the_autograd_path():
    """With dropout the fused kernel gives exactly the autograd path's (seeded) result and gradients."""
    q, k, v, pl = _inputs(1, 2, 1 + 36, 4, 2, seed=60)
    kw = dict(grid=(6, 6), window=2, num_extra_tokens=1, dropout_p=0.3)
    torch.manual_seed(3)
    a = long_short_attention_2d(q, k, v, pl, implementation="fused", **kw)
    torch.manual_seed(3)
    b = long_short_attention_2d(q, k, v, pl, implementation="autograd", **kw)
    assert torch.equal(a, b)
    for x, y in zip(_grads(a, [q, k, v, pl]), _grads(b, [q, k, v, pl])):
        assert torch.equal(x, y)


def test_bad_implementation_raises():
    q = torch.zeros(1, 1, 17, 4)
    with pytest.raises(ValueError, match="implementation must be one of"):
        long_short_attention_2d(q, q, q, None, grid=(4, 4), window=2, num_extra_tokens=1, implementation="cuda")


@pytest.mark.parametrize("grid,w,ext,dropout,want", [
    ((7, 7), 3, "floor", 0.0, "dense"),  # Fashion-MNIST: 49 patches, 5x5 squares
    ((8, 16), 3, "floor", 0.0, "dense"),  # 128 patches: DENSE_MAX_PATCHES
    ((11, 12), 3, "floor", 0.0, "fused"),
    ((11, 12), 3, "floor", 0.2, "autograd"),  # the fused kernel has no dropout
    ((16, 16), 8, "floor", 0.0, "fused"),  # 256 patches = one 16x16 square: still fused (measured faster)
    ((64, 64), 8, "floor", 0.0, "fused"),
    ((9, 9), 0, "floor", 0.2, "dense")])  # projection only: no squares at all
def test_auto_picks_dense_on_small_grids(grid, w, ext, dropout, want, monkeypatch):
    """The rule (at most DENSE_MAX_PATCHES patches, or no window), and "auto" == the path it names."""
    assert ls2d.DENSE_MAX_PATCHES == 128
    geom = fused.Geometry(*grid, w, window_extension(w, ext) if w else 0)
    assert ls2d._choose("auto", geom, dropout) == want
    taken = []
    for name in ("fused", "dense", "autograd"):
        real = getattr(ls2d, f"_patch_queries_{name}")
        monkeypatch.setattr(ls2d, f"_patch_queries_{name}",
                            lambda *a, _name=name, _real=real: taken.append(_name) or _real(*a))
    q, k, v, pl = _inputs(1, 2, 1 + grid[0] * grid[1], 4, 2, seed=80)
    kw = dict(grid=grid, window=w, num_extra_tokens=1, dropout_p=dropout, window_extension=ext)
    torch.manual_seed(5)
    auto = long_short_attention_2d(q, k, v, pl, **kw)
    torch.manual_seed(5)
    assert torch.equal(auto, long_short_attention_2d(q, k, v, pl, implementation=want, **kw))
    assert taken == [want, want]
