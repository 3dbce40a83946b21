"""The attention ops on CUDA: FlexAttention and the blockwise torch backend against a float64 reference.

The reference is the torch backend in float64 on CPU (itself checked against the dense definition in
``tests/unit/ops``); one test also compares with that dense definition directly. Values and gradients of q, k,
v, proj_logits and both DualLN (``HeadwiseLayerNorm``) parameter pairs, causal and bidirectional, with and
without padding, r = 0, w = 0, N below / at / past FlexAttention's 128-token block and past the torch backend's
2048-query CUDA tile, fp32 (tight) and bf16 (loose), eager and under ``torch.compile``.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

from megatron_ls.model.norms import HeadwiseLayerNorm
from megatron_ls.ops import long_short_attention, long_short_attention_2d, select_backend
from tests.cuda.helpers import CUDA_MARKS, DEVICE, HAS_CUDA, assert_close_rel, need_gpu, raise_compile_limits

from ls_reference import dense_long_short, dense_long_short_2d  # noqa: E402  (tests/unit/ops, see helpers)

pytestmark = CUDA_MARKS

# (causal, N, window, segment_len, r, head_dim, padding)
CASES = [
    (True, 7, 4, 2, 1, 16, "none"),       # N far below one 128-token flex block
    (True, 130, 16, 8, 1, 16, "holes"),   # just past one block; holes include a fully padded batch row
    (True, 256, 32, 16, 2, 16, "none"),   # exact multiple of block, window and chunk
    (True, 333, 37, 8, 3, 32, "left"),    # w not a multiple of l, N a multiple of nothing
    (True, 200, 0, 8, 2, 16, "holes"),    # w = 0: projection only (chunk-0 queries see no key)
    (True, 200, 24, 8, 0, 16, "right"),   # r = 0: window only
    (True, 1100, 64, 16, 1, 64, "right"),  # many query blocks and chunks (the paper's l = 16, r = 1)
    (True, 4500, 128, 16, 1, 64, "none"),  # past the torch backend's 2048-query CUDA tile
    (False, 7, 4, None, 1, 16, "none"),
    (False, 130, 16, None, 1, 16, "holes"),
    (False, 256, 32, None, 2, 16, "right"),
    (False, 333, 37, None, 3, 32, "none"),
    (False, 200, 0, None, 2, 16, "holes"),
    (False, 200, 24, None, 0, 16, "right"),
    (False, 1100, 64, None, 1, 64, "none"),
    (False, 4500, 128, None, 1, 64, "holes"),
]
BF16_CASES = [CASES[1], CASES[6], CASES[9], CASES[14]]
COMPILE_CASES = [CASES[2], CASES[9]]
NAMES = ("q", "k", "v", "proj_logits", "local_norm.weight", "local_norm.bias", "global_norm.weight",
         "global_norm.bias")
# (relative error of the whole tensor, of the worst row) for outputs and for gradients
TOL = {torch.float32: ((1e-4, 1e-3), (3e-4, 3e-3)), torch.bfloat16: ((3e-2, 1e-1), (6e-2, 2e-1))}


def _ids(case):
    causal, n, w, l, r, d, pad = case
    return f"{'causal' if causal else 'bidir'}-N{n}-w{w}-l{l}-r{r}-d{d}-{pad}"


@pytest.fixture(autouse=True)
def _fp32_is_fp32():
    """Keep TF32 off (its 10-bit mantissa would swamp the fp32 tolerances), and restore the settings."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    raise_compile_limits()
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def _padding(b, n, kind):
    if kind == "none":
        return None
    pad = torch.zeros(b, n, dtype=torch.bool)
    if kind == "right":
        pad[-1, n - max(1, n // 3):] = True
    elif kind == "left":
        pad[0, :max(1, n // 3)] = True
    else:  # holes: every third token, and a batch row that is all padding
        pad[:, ::3] = True
        pad[-1, :] = True
    return pad


def _problem(case, b=2, h=2, seed=0):
    """float64 CPU inputs, output gradient, DualLN pair (None when the part is off) and padding of one case."""
    causal, n, w, l, r, d, kind = case
    g = torch.Generator().manual_seed(seed)
    q, k, v, g_out = (torch.randn(b, h, n, d, generator=g, dtype=torch.float64) for _ in range(4))
    pl = torch.randn(b, h, n, r, generator=g, dtype=torch.float64) * 2 if r else None
    norms = []
    for on in (w > 0, r > 0):
        ln = HeadwiseLayerNorm(h, d).double() if on else None
        if ln is not None:
            with torch.no_grad():  # non-trivial affine parameters, so their gradients are checked too
                ln.weight.copy_(torch.rand(h, d, generator=g, dtype=torch.float64) + 0.5)
                ln.bias.copy_(torch.rand(h, d, generator=g, dtype=torch.float64) - 0.5)
        norms.append(ln)
    return (q, k, v, pl), g_out, norms, _padding(b, n, kind)


def _cast(problem, dtype, device):
    """The problem in ``dtype`` on ``device`` (inputs and norm parameters), leaves requiring grad."""
    tensors, g_out, norms, pad = problem
    moved = [None if t is None else t.to(device, dtype).requires_grad_() for t in tensors]
    norms = [None if ln is None else copy.deepcopy(ln).to(device, dtype) for ln in norms]
    return moved, g_out.to(device, dtype), norms, None if pad is None else pad.to(device)


def _rounded_reference(problem, dtype):
    """The same problem after rounding every input to ``dtype`` (the reference then sees what the GPU sees)."""
    tensors, g_out, norms, pad = problem
    rnd = [None if t is None else t.to(dtype).double().requires_grad_() for t in tensors]
    norms = [None if ln is None else copy.deepcopy(ln).to(dtype).double() for ln in norms]
    return rnd, g_out.to(dtype).double(), norms, pad


def _forward_backward(problem, case, *, backend, compiled=False, grads=True):
    """Output and the gradients of (q, k, v, proj_logits, norm parameters); absent ones come back as None."""
    (q, k, v, pl), g_out, (ln_l, ln_g), pad = problem
    causal, _, w, l, _, _, _ = case

    def fn(q, k, v, pl):
        return long_short_attention(q, k, v, pl, window=w, causal=causal, segment_len=l, key_padding_mask=pad,
                                    local_norm=ln_l, global_norm=ln_g, backend=backend)

    run = torch.compile(fn) if compiled else fn
    if not grads:
        with torch.no_grad():
            return run(q, k, v, pl), None
    out = run(q, k, v, pl)
    leaves = [q, k, v, pl]
    for ln in (ln_l, ln_g):
        leaves += [None, None] if ln is None else [ln.weight, ln.bias]
    present = [t for t in leaves if t is not None]
    got = iter(torch.autograd.grad(out, present, g_out, allow_unused=True))
    return out, [None if t is None else next(got) for t in leaves]


def _check(case, dtype, backend, compiled=False):
    problem = _problem(case)
    ref_out, ref_grads = _forward_backward(_rounded_reference(problem, dtype), case, backend="torch")
    on_gpu = _cast(problem, dtype, DEVICE)
    grads = HAS_CUDA or backend == "torch"  # CPU flex has no backward: a CPU plumbing run checks values only
    out, got = _forward_backward(on_gpu, case, backend=backend, compiled=compiled, grads=grads)
    assert out.dtype == dtype and out.device.type == DEVICE.type
    ctx = f"[{backend}{' compiled' if compiled else ''} {dtype} {_ids(case)}]"
    (val_tol, val_row), (grad_tol, grad_row) = TOL[dtype]
    assert_close_rel("output", out, ref_out, rel=val_tol, row_rel=val_row, context=ctx)
    pad = on_gpu[3]
    if pad is not None:  # padded query rows are exactly 0
        assert out[pad[:, None, :, None].expand_as(out)].eq(0).all(), f"padded rows not zero {ctx}"
    if not grads:
        return
    for name, g, want in zip(NAMES, got, ref_grads):
        if want is None and g is None:
            continue
        want = torch.zeros_like(g) if want is None else want
        g = torch.zeros_like(want) if g is None else g
        if name == "proj_logits":  # r is tiny: judge each head's (N*r) vector rather than single elements
            g, want = g.flatten(-2), want.flatten(-2)
        assert_close_rel(f"grad {name}", g, want, rel=grad_tol, row_rel=grad_row, context=ctx)


@pytest.mark.parametrize("backend", ["flex", "torch"])
@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_fp32_matches_reference(case, backend):
    _check(case, torch.float32, backend)


@pytest.mark.parametrize("backend", ["flex", "torch"])
@pytest.mark.parametrize("case", BF16_CASES, ids=_ids)
def test_bf16_matches_reference(case, backend):
    _check(case, torch.bfloat16, backend)


@pytest.mark.parametrize("backend", ["flex", "torch"])
@pytest.mark.parametrize("case", COMPILE_CASES, ids=_ids)
def test_under_torch_compile(case, backend):
    """The op inside a torch.compile'd function (as in a compiled model) keeps values and gradients."""
    need_gpu("compiling the op")
    _check(case, torch.float32, backend, compiled=True)


@pytest.mark.parametrize("causal", [True, False])
def test_flex_matches_dense_definition(causal):
    """Flex on the device against the dense O(N^2) definition (nn.LayerNorm norms, holes padding)."""
    b, h, n, d, w, l, r = 2, 2, 70, 16, 6, 3, 2
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(b, h, n, d, generator=g, dtype=torch.float64) for _ in range(3))
    pl = torch.randn(b, h, n, r, generator=g, dtype=torch.float64)
    pad = _padding(b, n, "holes")
    torch.manual_seed(1)
    ln_l, ln_g = nn.LayerNorm(d).double(), nn.LayerNorm(d).double()
    kw = dict(window=w, causal=causal, segment_len=l if causal else None)
    ref = dense_long_short(q, k, v, pl, key_padding_mask=pad, local_norm=ln_l, global_norm=ln_g, **kw)
    dev = [t.to(DEVICE, torch.float32) for t in (q, k, v, pl)]
    ln_l, ln_g = ln_l.to(DEVICE, torch.float32), ln_g.to(DEVICE, torch.float32)
    with torch.no_grad():
        out = long_short_attention(*dev, key_padding_mask=pad.to(DEVICE), local_norm=ln_l, global_norm=ln_g,
                                   backend="flex", **kw)
    assert_close_rel("output", out, ref, rel=1e-4, row_rel=1e-3, context=f"[flex causal={causal}]")


def test_auto_picks_flex_on_cuda():
    need_gpu("backend='auto' choosing flex")
    q = torch.zeros(1, 1, 8, 64, device=DEVICE)
    assert select_backend("auto", q, 0.0) == "flex"
    assert select_backend("auto", q, 0.1) == "torch"  # dropout runs on the torch backend
    assert select_backend("auto", q[..., :24], 0.0) == "torch"  # D not a power of two


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_2d_op_on_device(dtype):
    """long_short_attention_2d has no flex path: its plain-autograd path on the device against the definition."""
    b, h, d, gh, gw, w, ne, r = 2, 2, 16, 9, 11, 4, 1, 2
    n = ne + gh * gw
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(b, h, n, d, generator=g).to(dtype).double() for _ in range(3))
    pl = torch.randn(b, h, n, r, generator=g).to(dtype).double()
    pad = torch.zeros(b, n, dtype=torch.bool)
    pad[1, -20:] = True
    kw = dict(grid=(gh, gw), window=w, num_extra_tokens=ne)
    leaves = [t.clone().requires_grad_() for t in (q, k, v, pl)]
    ref = dense_long_short_2d(*leaves, key_padding_mask=pad, **kw)
    g_out = torch.randn(ref.shape, generator=g).to(dtype).double()
    ref_grads = torch.autograd.grad(ref, leaves, g_out)
    dev = [t.to(DEVICE, dtype).requires_grad_() for t in (q, k, v, pl)]
    out = long_short_attention_2d(*dev, key_padding_mask=pad.to(DEVICE), **kw)
    grads = torch.autograd.grad(out, dev, g_out.to(DEVICE, dtype))
    (vt, vr), (gt, gr) = TOL[dtype]
    assert_close_rel("2d output", out, ref, rel=vt, row_rel=vr, context=str(dtype))
    for name, got, want in zip(NAMES, grads, ref_grads):
        assert_close_rel(f"2d grad {name}", got, want, rel=gt, row_rel=gr, context=str(dtype))
