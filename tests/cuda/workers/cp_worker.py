"""torchrun worker: context-parallel attention on the device equals the one-process op, rank by rank.

argv: BACKEND (nccl | gloo) [probe]. Every rank computes the one-process op on the full sequence (torch backend, float64)
on its own device, then the CP version on its tokens: the torch backend in float64 (tight) and, on CUDA, the
flex backend in float32; it compares its slices of the output and of the q/k/v/logit gradients, and the CP-summed
DualLN gradients. Prints ``CP-OK <layout> <case> <impl>`` per check. ``probe`` only checks that gloo moves CUDA
tensors correctly through every collective CP uses (see ``probe_collectives``).
"""
import os
import sys
import zlib

import torch
import torch.distributed as dist

from megatron_ls.model.norms import HeadwiseLayerNorm
from megatron_ls.ops import full_attention, long_short_attention
from megatron_ls.parallel import state as ps
from megatron_ls.parallel.context_parallel import cp_full_attention, cp_long_short_attention
from megatron_ls.parallel.cp_layout import ContextLayout
from tests.cuda.helpers import assert_close_rel, raise_compile_limits

# (name, causal, window, segment_len, r, padded); N = 512 splits into pieces of 64 up to CP=4 balanced
CASES = [
    ("causal-both", True, 64, 16, 1, False),
    ("causal-both-pad", True, 64, 16, 2, True),
    ("causal-window-spans-ranks", True, 96, 16, 1, False),  # w - 1 > piece: halos come from two ranks
    ("causal-window-only", True, 48, 16, 0, True),
    ("causal-projection-only", True, 0, 16, 2, True),
    ("bidir-both", False, 32, None, 2, False),
    ("bidir-both-pad", False, 64, None, 1, True),
    ("bidir-projection-only", False, 0, None, 3, True),
]
FLEX_CASES = ("causal-both-pad", "causal-window-spans-ranks", "bidir-both-pad")  # flex compiles per shard shape
N, B, H, D = 512, 2, 2, 64
TIGHT = dict(rtol=1e-9, atol=1e-11)


def say(msg: str) -> None:
    if dist.get_rank() == 0:
        print(msg, flush=True)


def probe_collectives(device: torch.device) -> None:
    """Run every collective CP uses on small CUDA tensors and check the values that arrive.

    gloo's send/recv hand the tensor's pointer to its TCP transport without a device check, so on CUDA tensors
    they may crash or move garbage: run this in its own launch (``probe`` argument) before trusting gloo + CUDA.
    Prints ``CP-PROBE-OK`` or ``CP-UNSUPPORTED <collective>: <why>`` (then leaves with exit 0).
    """
    world, rank = dist.get_world_size(), dist.get_rank()
    mine = torch.full((4,), float(rank + 1), device=device)
    expect_sum = float(world * (world + 1) // 2)

    def p2p():
        got = torch.zeros_like(mine)
        ops = [dist.P2POp(dist.isend, mine.clone(), (rank + 1) % world),
               dist.P2POp(dist.irecv, got, (rank - 1) % world)]
        for req in dist.batch_isend_irecv(ops):
            req.wait()
        return got, float((rank - 1) % world + 1)

    def all_reduce(op, want):
        x = mine.clone()
        dist.all_reduce(x, op=op)
        return x, want

    def all_gather():
        parts = [torch.zeros_like(mine) for _ in range(world)]
        dist.all_gather(parts, mine)
        return torch.stack(parts)[:, 0], torch.arange(1, world + 1, dtype=mine.dtype, device=device)

    def reduce_scatter():
        out = torch.zeros_like(mine)
        dist.reduce_scatter(out, [mine.clone() for _ in range(world)])
        return out, expect_sum

    probes = {"all_reduce": lambda: all_reduce(dist.ReduceOp.SUM, expect_sum),
              "all_reduce(MAX)": lambda: all_reduce(dist.ReduceOp.MAX, float(world)),
              "all_gather": all_gather, "reduce_scatter": reduce_scatter, "batch_isend_irecv": p2p}
    for name, fn in probes.items():
        try:
            got, want = fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            ok = bool(torch.all(got.cpu() == (want.cpu() if torch.is_tensor(want) else want)))
            why = "wrong values arrived"
        except Exception as exc:  # noqa: BLE001 - any refusal means: this gloo cannot do CP on CUDA tensors
            ok, why = False, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        if not ok:
            print(f"CP-UNSUPPORTED gloo {name} on {device.type} tensors: {why}", flush=True)
            os._exit(0)  # the group may be unusable now; every rank fails the same probe the same way
    say("CP-PROBE-OK")


def inputs(name: str, r: int, padded: bool, device: torch.device):
    g = torch.Generator().manual_seed(zlib.crc32(name.encode()) % 1000)
    q, k, v, grad = (torch.randn(B, H, N, D, dtype=torch.float64, generator=g) for _ in range(4))
    logits = torch.randn(B, H, N, r, dtype=torch.float64, generator=g) if r else None
    pad = None
    if padded:
        pad = torch.rand(B, N, generator=g) < 0.3
        pad[1, :N // 2] = True  # whole pieces of padding on some ranks
    move = [None if t is None else t.to(device) for t in (q, k, v, logits, pad, grad)]
    return move


def norms(w: int, r: int, device: torch.device):
    out = []
    for seed, on in ((1, w > 0), (2, r > 0)):
        ln = None
        if on:
            torch.manual_seed(seed)
            ln = HeadwiseLayerNorm(H, D).double()
            with torch.no_grad():
                ln.weight.uniform_(0.5, 1.5)
                ln.bias.uniform_(-0.5, 0.5)
            ln = ln.to(device)
        out.append(ln)
    return out


def leaves(tensors, dtype):
    return [None if t is None else t.detach().to(dtype).requires_grad_() for t in tensors]


def norm_grads(lns):
    return [p.grad.detach().clone() for ln in lns if ln is not None for p in ln.parameters()]


def check_case(name, causal, w, l, r, padded, kind, device, impls):
    layout = ContextLayout(N, ps.get_context_parallel_world_size(), ps.get_context_parallel_rank(), kind)
    q, k, v, logits, pad, grad = inputs(name, r, padded, device)
    kw = dict(window=w, causal=causal, segment_len=l if r else None)
    lns = norms(w, r, device)
    ref_leaves = leaves((q, k, v, logits), torch.float64)
    ref = long_short_attention(*ref_leaves, key_padding_mask=pad, local_norm=lns[0], global_norm=lns[1],
                               backend="torch", **kw)
    ref.backward(grad)
    ref_norm = norm_grads(lns)
    cut = layout.slice_sequence
    for backend, dtype in impls:
        if backend == "flex" and name not in FLEX_CASES:
            continue
        run_lns = [None if ln is None else HeadwiseLayerNorm(H, D).to(device, dtype) for ln in lns]
        for ln, src in zip(run_lns, lns):
            if ln is not None:
                ln.load_state_dict(src.state_dict())
        loc = leaves([None if t is None else cut(t, 2) for t in (q, k, v, logits)], dtype)
        out = cp_long_short_attention(*loc, layout=layout, key_padding_mask=None if pad is None else cut(pad, 1),
                                      local_norm=run_lns[0], global_norm=run_lns[1], backend=backend, **kw)
        out.backward(cut(grad, 2).to(dtype))
        got_norm = norm_grads(run_lns)
        for g_local in got_norm:
            dist.all_reduce(g_local, group=ps.get_context_parallel_group())
        pairs = [("output", out, cut(ref.detach(), 2))]
        pairs += [(f"grad {n}", a.grad, cut(b.grad, 2)) for n, a, b in zip(("q", "k", "v", "logits"), loc, ref_leaves)
                  if a is not None]
        pairs += [(f"norm grad {i}", a, b) for i, (a, b) in enumerate(zip(got_norm, ref_norm))]
        ctx = f"[{kind} {name} {backend} rank {dist.get_rank()}]"
        for what, got, want in pairs:
            if dtype == torch.float64:
                torch.testing.assert_close(got, want, **TIGHT, msg=lambda m: f"{what} {ctx}: {m}")
            else:
                assert_close_rel(what, got, want, rel=3e-4, row_rel=3e-3, context=ctx)
        say(f"CP-OK {kind} {name} {backend}")


def check_full(causal, padded, kind, device, dtype):
    layout = ContextLayout(N, ps.get_context_parallel_world_size(), ps.get_context_parallel_rank(), kind)
    q, k, v, _, pad, grad = inputs("full", 0, padded, device)
    ref_leaves = leaves((q, k, v), torch.float64)
    ref = full_attention(*ref_leaves, causal=causal, key_padding_mask=pad)
    ref.backward(grad)
    cut = layout.slice_sequence
    loc = leaves([cut(t, 2) for t in (q, k, v)], dtype)
    out = cp_full_attention(*loc, layout=layout, causal=causal, key_padding_mask=None if pad is None else cut(pad, 1))
    out.backward(cut(grad, 2).to(dtype))
    ctx = f"[{kind} full causal={causal} pad={padded} {dtype} rank {dist.get_rank()}]"
    for what, got, want in [("output", out, cut(ref.detach(), 2))] + [
            (f"grad {n}", a.grad, cut(b.grad, 2)) for n, a, b in zip("qkv", loc, ref_leaves)]:
        if dtype == torch.float64:
            torch.testing.assert_close(got, want, **TIGHT, msg=lambda m: f"{what} {ctx}: {m}")
        else:
            assert_close_rel(what, got, want, rel=3e-4, row_rel=3e-3, context=ctx)
    say(f"CP-OK {kind} full-causal={causal}-pad={padded} {str(dtype).split('.')[-1]}")


def main(backend: str, probe_only: bool) -> None:
    torch.backends.cuda.matmul.allow_tf32 = False
    raise_compile_limits()
    ps.initialize_distributed(backend=backend, timeout_s=120, collective_timeout_s=300)
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    if probe_only:
        probe_collectives(device)
        ps.shutdown_distributed()
        return
    ps.initialize_model_parallel(context_parallel_size=dist.get_world_size())
    impls = [("torch", torch.float64)] + ([("flex", torch.float32)] if device.type == "cuda" else [])
    say(f"CP-DEVICE {backend} {device} world {dist.get_world_size()} impls {[i for i, _ in impls]}")
    for kind in ("contiguous", "balanced"):
        for case in CASES:
            check_case(*case, kind, device, impls)
        for causal in (True, False):
            for padded in (False, True):
                for dtype in (torch.float64, torch.float32):
                    check_full(causal, padded, kind, device, dtype)
    say("CP-DONE")
    ps.shutdown_distributed()


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "nccl", "probe" in sys.argv[2:])
