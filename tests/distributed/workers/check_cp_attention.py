"""torchrun worker: context-parallel LS and full attention equal the one-process op, rank by rank.

Every rank computes the one-process result on the full sequence itself (float64), then the CP version on its
own tokens, and compares its slice of the outputs and of the q/k/v/projection-logit gradients; DualLN parameter
gradients are summed over CP and compared whole. argv: layout kinds to test (contiguous, balanced).
"""
import sys
import zlib

import torch
import torch.distributed as dist

from megatron_ls.ops import Rotary, full_attention, long_short_attention
from megatron_ls.parallel import CommCounter
from megatron_ls.parallel import state as ps
from megatron_ls.parallel.context_parallel import cp_full_attention, cp_long_short_attention
from megatron_ls.parallel.cp_layout import ContextLayout

# (name, causal, window, segment_len, rank, N, padding)
CASES = [
    ("causal-both", True, 8, 4, 2, 32, False),
    ("causal-both-pad", True, 8, 4, 2, 32, True),
    ("causal-shard-shorter-than-window", True, 12, 4, 1, 32, False),
    ("causal-window-only-odd", True, 5, 4, 0, 32, True),
    ("causal-projection-only", True, 0, 4, 2, 32, True),
    ("bidir-both", False, 4, 4, 2, 32, False),
    ("bidir-both-pad", False, 4, 4, 3, 32, True),
    ("bidir-odd-window", False, 3, 4, 1, 48, False),
    ("bidir-window-only", False, 4, 4, 0, 32, True),
    ("bidir-projection-only", False, 0, 4, 3, 32, True),
    ("bidir-odd-window-ceil-normed-projection", False, 3, 4, 2, 48, True,
     dict(window_extension="ceil", project_normed=True)),
    ("bidir-normed-projection", False, 4, 4, 2, 32, True, dict(project_normed=True)),
    ("causal-rope", True, 8, 4, 2, 32, True, dict(rotary=Rotary(100.0, 6))),
    ("causal-rope-shard-shorter-than-window", True, 12, 4, 1, 32, False, dict(rotary=Rotary(100.0, 8))),
]
B, H, D = 2, 2, 8


class Norm(torch.nn.Module):
    def __init__(self, seed: int):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.weight = torch.nn.Parameter(1 + 0.3 * torch.randn(D, dtype=torch.float64, generator=g))
        self.bias = torch.nn.Parameter(0.2 * torch.randn(D, dtype=torch.float64, generator=g))

    def forward(self, x):
        return torch.nn.functional.layer_norm(x, (D,), self.weight, self.bias)


def inputs(n: int, r: int, padded: bool, seed: int):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, n, D, dtype=torch.float64, generator=g) for _ in range(3))
    logits = torch.randn(B, H, n, r, dtype=torch.float64, generator=g) if r else None
    pad = None
    if padded:
        pad = torch.rand(B, n, generator=g) < 0.3
        pad[1, : n // 2] = True  # whole pieces of padding on some ranks
    grad = torch.randn(B, H, n, D, dtype=torch.float64, generator=g)
    return q, k, v, logits, pad, grad


def leaves(*ts):
    return [None if t is None else t.clone().requires_grad_(True) for t in ts]


def check_case(name, causal, w, l, r, n, padded, options=None, *, kind):
    cp, rank = ps.get_context_parallel_world_size(), ps.get_context_parallel_rank()
    layout = ContextLayout(n, cp, rank, kind)
    q, k, v, logits, pad, grad = inputs(n, r, padded, seed=zlib.crc32(name.encode()) % 1000)
    norms = (Norm(1) if w or (options or {}).get("project_normed") else None, Norm(2) if r else None)
    kw = dict(window=w, causal=causal, segment_len=l if r else None, local_norm=norms[0], global_norm=norms[1],
              **(options or {}))
    fq, fk, fv, fl = leaves(q, k, v, logits)
    ref = long_short_attention(fq, fk, fv, fl, key_padding_mask=pad, backend="torch", **kw)
    ref.backward(grad)
    ref_norm_grads = [p.grad.clone() for m in norms if m is not None for p in m.parameters()]
    for m in norms:
        if m is not None:
            m.zero_grad()
    cut = layout.slice_sequence
    lq, lk, lv, ll = leaves(cut(q, 2), cut(k, 2), cut(v, 2), None if logits is None else cut(logits, 2))
    out = cp_long_short_attention(lq, lk, lv, ll, layout=layout, key_padding_mask=None if pad is None else cut(pad, 1),
                                  backend="torch", **kw)
    out.backward(cut(grad, 2))
    tol = dict(rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(out, cut(ref.detach(), 2), **tol, msg=lambda m: f"{name} output: {m}")
    for what, got, want in (("dq", lq, fq), ("dk", lk, fk), ("dv", lv, fv), ("dlogits", ll, fl)):
        if got is not None:
            torch.testing.assert_close(got.grad, cut(want.grad, 2), **tol, msg=lambda m: f"{name} {what}: {m}")
    got_norm = [p.grad.clone() for m in norms if m is not None for p in m.parameters()]
    for g_local, g_ref in zip(got_norm, ref_norm_grads):
        dist.all_reduce(g_local, group=ps.get_context_parallel_group())
        torch.testing.assert_close(g_local, g_ref, **tol, msg=lambda m: f"{name} norm grad: {m}")


def check_full(causal, padded, kind):
    cp, rank = ps.get_context_parallel_world_size(), ps.get_context_parallel_rank()
    n = 32
    layout = ContextLayout(n, cp, rank, kind)
    q, k, v, _, pad, grad = inputs(n, 0, padded, seed=7)
    fq, fk, fv = leaves(q, k, v)
    ref = full_attention(fq, fk, fv, causal=causal, key_padding_mask=pad)
    ref.backward(grad)
    cut = layout.slice_sequence
    lq, lk, lv = leaves(cut(q, 2), cut(k, 2), cut(v, 2))
    out = cp_full_attention(lq, lk, lv, layout=layout, causal=causal,
                            key_padding_mask=None if pad is None else cut(pad, 1))
    out.backward(cut(grad, 2))
    tol = dict(rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(out, cut(ref.detach(), 2), **tol)
    for got, want in ((lq, fq), (lk, fk), (lv, fv)):
        torch.testing.assert_close(got.grad, cut(want.grad, 2), **tol)


def check_comm_volume(kind):
    """Causal LS layer: halo bytes = (w-1)·2D per piece boundary, independent of n; compressed keys n·r/l·2D."""
    cp, rank = ps.get_context_parallel_world_size(), ps.get_context_parallel_rank()
    w, l, r = 8, 4, 2
    results = {}
    for n in (16 * cp, 64 * cp):
        layout = ContextLayout(n, cp, rank, kind)
        q, k, v, logits, _, grad = inputs(n, r, False, seed=3)
        cut = layout.slice_sequence
        lq, lk, lv, ll = leaves(cut(q, 2), cut(k, 2), cut(v, 2), cut(logits, 2))
        with CommCounter() as cc:
            out = cp_long_short_attention(lq, lk, lv, ll, layout=layout, window=w, causal=True, segment_len=l,
                                          backend="torch")
            out.backward(cut(grad, 2))
        elem = 8  # float64
        # each piece whose preceding piece sits on another rank receives w-1 tokens of k|v (pieces >= w-1 here)
        p = layout.piece_length
        boundaries = sum(1 for start, _ in layout.pieces() if start > 0 and layout.piece_owner(start // p - 1)[0] != rank)
        own_halo_recv = boundaries * (w - 1) * B * H * 2 * D * elem
        assert cc.total_bytes("recv", "forward") == own_halo_recv, (cc.summary(), own_halo_recv)
        assert cc.total_bytes("send", "backward") == own_halo_recv, cc.summary()
        compressed = layout.local_length // l * r * B * H * 2 * D * elem
        assert cc.total_bytes("all_gather", "forward") == compressed, (cc.summary(), compressed)
        assert cc.total_bytes("reduce_scatter", "backward") == compressed * cp, cc.summary()
        results[n] = cc.total_bytes("recv", "forward")
    assert len(set(results.values())) == 1, f"halo volume grows with n: {results}"


def main(kinds):
    ps.initialize_distributed(backend="gloo", timeout_s=120)
    cp = dist.get_world_size()
    ps.initialize_model_parallel(context_parallel_size=cp)
    for kind in kinds:
        for case in CASES:
            check_case(*case, kind=kind)
            if dist.get_rank() == 0:
                print(f"CHECK-OK cp-attention {kind} {case[0]}", flush=True)
        for causal in (True, False):
            for padded in (False, True):
                check_full(causal, padded, kind)
                if dist.get_rank() == 0:
                    print(f"CHECK-OK cp-full {kind} causal={causal} pad={padded}", flush=True)
        check_comm_volume(kind)
        if dist.get_rank() == 0:
            print(f"CHECK-OK cp-comm {kind}", flush=True)
    ps.destroy_model_parallel()
    ps.shutdown_distributed()


if __name__ == "__main__":
    main(sys.argv[1:] or ["contiguous"])
