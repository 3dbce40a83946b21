"""Blockwise pure-torch core of long-short attention (the ``backend="torch"`` path).

The core sees already-normed local keys/values ``kL, vL`` (B, H, N, D) and already-normed global keys/values
``kG, vG`` (B, H, G, D) and computes, per query, ONE softmax over the union of its window keys and the global keys
it may see. It never builds an N×N tensor:

* queries are cut into blocks of ``tq``; block ``b`` scores only against a contiguous key *slab* of ``slab`` keys
  (an ``unfold`` view of the zero-padded keys) with an exact per-token mask inside the slab;
* global keys are scored per tile of queries; in causal mode a tile only looks at the prefix of chunks visible to
  its last query, so the global work is triangular, like the method's cost;
* :class:`LongShortCore` stores only the inputs, the output and the per-row logsumexp, and recomputes scores tile
  by tile in backward (flash-attention style), so memory is O(N·D) plus one tile of scores.

Dropout needs the probabilities it dropped, so ``dropout_p > 0`` takes :func:`attention_with_dropout`, the same
tile loop in plain autograd (exact, memory O(N·(slab + G)) for the saved probabilities).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from .projection import compute_dtype

NEG_INF = float("-inf")
# Queries per tile: big enough for efficient matmuls, small enough that a tile of scores stays in cache.
TILE_QUERIES = 256
# On CUDA the loop's kernel-launch overhead dominates small tiles, and there is memory to spare.
TILE_QUERIES_CUDA = 2048
# Causal query block: smaller blocks waste less of the 2-block slab on the masked upper triangle.
CAUSAL_BLOCK = 64


@dataclass
class Plan:
    """Static layout of one call: block sizes, slab geometry, padding and the masks that depend on it."""

    b: int
    h: int
    n: int
    d: int
    causal: bool
    window: int
    segment_len: int
    rank: int
    n_global: int
    scale: float
    cd: torch.dtype
    tq: int  # queries per block
    nb: int  # query blocks (N padded to nb·tq)
    tile_blocks: int  # blocks per tile
    pad_left: int  # zero keys in front of the sequence in the padded key buffer
    slab: int  # keys scored per query block
    key_len: int  # length of the padded key buffer (a multiple of tq)
    static_keep: Optional[torch.Tensor] = None  # (tq, slab) bool: the in-window pattern of every block
    slab_key_ok: Optional[torch.Tensor] = None  # (B|1, nb, slab) bool: slab key exists (in range, not padding)
    static_bias: Optional[torch.Tensor] = None  # (tq, slab) 0/-inf band of a block whose slab keys all exist
    static_all_visible: bool = False  # bidirectional: a full block sees its whole slab, no mask at all
    block_full: Optional[List[bool]] = None  # per block: every key of its slab exists (no edge, no padding)
    global_key_valid: Optional[torch.Tensor] = None  # (B, G) bool, None when all global keys exist
    # Context parallelism: the local keys carry halo_left keys before and halo_right keys after the query span,
    # and query i sits at global position q_offset + i (only the causal chunk rule needs it).
    q_offset: int = 0
    halo_left: int = 0
    halo_right: int = 0

    @property
    def has_local(self) -> bool:
        return self.window > 0

    @property
    def has_global(self) -> bool:
        return self.n_global > 0

    @property
    def key_span(self) -> Tuple[int, int]:
        """Where the local keys (halos included) sit in the padded key buffer."""
        return self.pad_left - self.halo_left, self.pad_left + self.n + self.halo_right

    def tiles(self) -> Iterator[Tuple[int, int]]:
        """(first block, number of blocks) of each query tile."""
        for b0 in range(0, self.nb, self.tile_blocks):
            yield b0, min(self.tile_blocks, self.nb - b0)

    def global_range(self, t0: int, t1: int) -> Tuple[int, int]:
        """Global keys ``[0, g_tile)`` scored by queries ``[t0, t1)``; keys ``< g_full`` are visible to all of them."""
        if not self.causal:
            return self.n_global, self.n_global
        chunks = self.n_global // self.rank
        g_full = min(chunks, (self.q_offset + t0) // self.segment_len) * self.rank
        g_tile = min(chunks, (self.q_offset + t1 - 1) // self.segment_len) * self.rank
        return g_full, g_tile


def make_plan(b: int, h: int, n: int, d: int, *, causal: bool, window: int, segment_len: int, rank: int,
              n_global: int, scale: float, dtype: torch.dtype, device: torch.device,
              pad: Optional[torch.Tensor], chunk_valid: Optional[torch.Tensor],
              block: Optional[int] = None, tile_queries: Optional[int] = None, q_offset: int = 0,
              halo_left: int = 0, halo_right: int = 0, extension: Optional[int] = None) -> Plan:
    """Build the :class:`Plan` (block geometry and masks) for one call.

    ``block`` (causal query block) and ``tile_queries`` default to the module's CAUSAL_BLOCK / TILE_QUERIES,
    read at call time so tests can shrink them to exercise many tiles on short sequences.
    ``pad`` is the key padding mask over the ``halo_left + n + halo_right`` local keys (True = padding).
    ``extension``: keys a bidirectional segment sees beyond each side (default ceil(w/2); see
    ``checks.window_extension``).
    """
    tile_queries = tile_queries or (TILE_QUERIES_CUDA if torch.device(device).type == "cuda" else TILE_QUERIES)
    if window > 0:
        if causal:
            # query t sees t-w+1 .. t: block b needs keys [b·tq - (w-1), (b+1)·tq)
            tq = block or min(window, CAUSAL_BLOCK)
            pad_left, slab = window - 1, tq + window - 1
        else:
            # segment s sees [s·w - e, (s+1)·w + e): the slab is exactly the window
            tq = window
            e = (window + 1) // 2 if extension is None else extension
            pad_left, slab = e, window + 2 * e
    else:
        tq = block or min(n, CAUSAL_BLOCK)
        pad_left, slab = 0, 0
    nb = -(-n // tq)
    slab_blocks = -(-slab // tq) if slab else 1
    key_len = (nb + slab_blocks - 1) * tq
    if halo_left > pad_left or pad_left + n + halo_right > key_len:
        raise ValueError(f"halo of {halo_left} + {halo_right} keys does not fit the window geometry "
                         f"(at most {pad_left} before and {key_len - pad_left - n} after {n} queries)")
    plan = Plan(b=b, h=h, n=n, d=d, causal=causal, window=window, segment_len=segment_len, rank=rank,
                n_global=n_global, scale=scale, cd=compute_dtype(dtype), tq=tq, nb=nb,
                tile_blocks=max(1, tile_queries // tq), pad_left=pad_left, slab=slab, key_len=key_len,
                q_offset=q_offset, halo_left=halo_left, halo_right=halo_right)
    if window > 0:
        a = torch.arange(tq, device=device)[:, None]
        c = torch.arange(slab, device=device)[None, :]
        static_keep = (c >= a) & (c <= a + window - 1) if causal else torch.ones(
            tq, slab, dtype=torch.bool, device=device)
        plan.static_keep = static_keep
        plan.static_bias = _bias(static_keep, plan.cd)
        plan.static_all_visible = not causal
        # keys that exist: inside [0, N) and not padding, laid out like the padded key buffer
        kvalid = torch.zeros(1 if pad is None else b, key_len, dtype=torch.bool, device=device)
        kvalid[:, pad_left - halo_left:pad_left + n + halo_right] = True if pad is None else ~pad
        kv_slab = kvalid.unfold(1, slab, tq)[:, :nb]  # (B|1, nb, slab)
        plan.slab_key_ok = kv_slab
        plan.block_full = kv_slab.all(dim=2).all(dim=0).tolist()
    if n_global > 0 and chunk_valid is not None and not bool(chunk_valid.all()):
        plan.global_key_valid = chunk_valid.repeat_interleave(rank, dim=1)
    return plan


def _bias(keep: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """0 where kept, -inf elsewhere."""
    return torch.zeros(keep.shape, dtype=dtype, device=keep.device).masked_fill_(~keep, NEG_INF)


def _add_(scores: torch.Tensor, bias: torch.Tensor, inplace: bool) -> torch.Tensor:
    return scores.add_(bias) if inplace else scores + bias


def tile_scores(plan: Plan, qx: torch.Tensor, k_slabs: Optional[torch.Tensor], k_glob: Optional[torch.Tensor],
                b0: int, m: int, inplace: bool) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor], int]:
    """Masked scores of one tile: local (Z, m, tq, slab) and global (Z, m, tq, g_tile), -inf where not visible.

    ``qx`` is the block-padded query (Z, nb·tq, D); ``k_slabs`` the unfold view (Z, nb', D, slab) and
    ``k_glob`` (Z, G, D) of the keys, both already multiplied by the softmax scale.
    Returns (local scores or None, global scores or None, g_tile).
    """
    z, tq, bsz, nh = qx.shape[0], plan.tq, plan.b, plan.h
    t0, t1 = b0 * tq, (b0 + m) * tq
    qt = qx[:, t0:t1].reshape(z, m, tq, -1)
    s_loc = None
    if plan.has_local:
        s_loc = torch.matmul(qt, k_slabs[:, b0:b0 + m])
        if all(plan.block_full[b0:b0 + m]):  # interior tile: the shared band (or nothing) masks it
            if not plan.static_all_visible:
                s_loc = _add_(s_loc, plan.static_bias, inplace)
        else:  # edge or padding: exact per-block mask
            s5 = s_loc.view(bsz, nh, m, tq, plan.slab)
            keep = plan.static_keep & plan.slab_key_ok[:, b0:b0 + m, None, :]  # (B|1, m, tq, slab)
            s5 = _add_(s5, _bias(keep, plan.cd)[:, None], inplace)
            s_loc = s5.view(z, m, tq, plan.slab)
    s_glb, g_tile = None, 0
    if plan.has_global:
        g_full, g_tile = plan.global_range(t0, t1)
        if g_tile > 0:
            s_glb = torch.matmul(qt.reshape(z, m * tq, -1), k_glob[:, :g_tile].transpose(1, 2))
            if g_tile > g_full:  # causal: chunks only some queries of the tile may see
                t = (torch.arange(t0, t1, device=qx.device)[:, None] + plan.q_offset) // plan.segment_len
                ch = torch.arange(g_full, g_tile, device=qx.device)[None, :] // plan.rank
                part = _bias(ch < t, plan.cd)
                if inplace:
                    s_glb[:, :, g_full:].add_(part)
                else:
                    s_glb = torch.cat([s_glb[:, :, :g_full], s_glb[:, :, g_full:] + part], dim=2)
            if plan.global_key_valid is not None:
                gb = _bias(plan.global_key_valid[:, :g_tile], plan.cd)[:, None, None, :]
                s_glb = _add_(s_glb.view(bsz, nh, m * tq, g_tile), gb, inplace).view(z, m * tq, g_tile)
            s_glb = s_glb.view(z, m, tq, g_tile)
    return s_loc, s_glb, g_tile


def _row_max(s_loc: Optional[torch.Tensor], s_glb: Optional[torch.Tensor]) -> torch.Tensor:
    """Row max over both parts; rows with no visible key get 0 so exp(-inf - 0) = 0 instead of NaN."""
    parts = [s.amax(dim=-1) for s in (s_loc, s_glb) if s is not None]
    mx = parts[0] if len(parts) == 1 else torch.maximum(parts[0], parts[1])
    return mx.masked_fill(mx == NEG_INF, 0.0)


def _rows(x: torch.Tensor, z: int, n: int, rows: int, cd: torch.dtype) -> torch.Tensor:
    """(B, H, n, D) -> (Z, rows, D) in dtype cd, zero rows appended; a free view when nothing changes."""
    flat = x.reshape(z, n, x.shape[-1]).to(cd)
    return flat if rows == n else F.pad(flat, (0, 0, 0, rows - n))


class _Inputs:
    """Compute-dtype, block-padded, flattened (Z = B·H) views of the core inputs.

    The softmax scale is folded into the key copies (which exist anyway for the slab padding), so the query
    needs no copy at all when it is already contiguous in the compute dtype and N is a multiple of the block.
    """

    def __init__(self, plan: Plan, q, k_loc, v_loc, k_glob, v_glob):
        z, n, cd = plan.b * plan.h, plan.n, plan.cd
        self.q = _rows(q, z, n, plan.nb * plan.tq, cd)
        self.k_slabs = self.v_slabs = None
        if plan.has_local:
            lo, hi = plan.key_span
            self.k_pad = q.new_zeros(z, plan.key_len, plan.d, dtype=cd)
            self.v_pad = q.new_zeros(z, plan.key_len, plan.d, dtype=cd)
            self.k_pad[:, lo:hi] = k_loc.reshape(z, hi - lo, plan.d)
            self.k_pad[:, lo:hi] *= plan.scale
            self.v_pad[:, lo:hi] = v_loc.reshape(z, hi - lo, plan.d)
            self.k_slabs = self.k_pad.unfold(1, plan.slab, plan.tq)  # (Z, nb', D, slab)
            self.v_slabs = self.v_pad.unfold(1, plan.slab, plan.tq)
        self.k_glob = self.v_glob = None
        if plan.has_global:
            self.k_glob = k_glob.reshape(z, plan.n_global, -1).to(cd) * plan.scale
            self.v_glob = v_glob.reshape(z, plan.n_global, -1).to(cd)


class LongShortCore(torch.autograd.Function):
    """Flash-style core: saves inputs, output and logsumexp; recomputes scores per tile in backward."""

    @staticmethod
    def forward(ctx, plan: Plan, q, k_loc, v_loc, k_glob, v_glob):
        x = _Inputs(plan, q, k_loc, v_loc, k_glob, v_glob)
        z, tq = plan.b * plan.h, plan.tq
        out = torch.zeros(z, plan.nb * tq, plan.d, dtype=plan.cd, device=q.device)
        lse = torch.empty(z, plan.nb * tq, dtype=plan.cd, device=q.device)
        for b0, m in plan.tiles():
            s_loc, s_glb, g_tile = tile_scores(plan, x.q, x.k_slabs, x.k_glob, b0, m, inplace=True)
            t0, t1 = b0 * tq, (b0 + m) * tq
            if s_loc is None and s_glb is None:  # causal projection-only, first chunk: nothing visible
                lse[:, t0:t1] = float("inf")
                continue
            mx = _row_max(s_loc, s_glb)[..., None]
            o = torch.zeros(z, m, tq, plan.d, dtype=plan.cd, device=q.device)
            den = torch.zeros(z, m, tq, 1, dtype=plan.cd, device=q.device)
            if s_loc is not None:
                p = s_loc.sub_(mx).exp_()
                den += p.sum(-1, keepdim=True)
                o += torch.matmul(p, x.v_slabs[:, b0:b0 + m].transpose(-1, -2))
            if s_glb is not None:
                p = s_glb.sub_(mx).exp_()
                den += p.sum(-1, keepdim=True)
                o += torch.matmul(p, x.v_glob[:, None, :g_tile])
            empty = den == 0
            o /= den.masked_fill(empty, 1.0)
            out[:, t0:t1] = o.view(z, m * tq, plan.d)
            # +inf for empty rows makes the backward's exp(s - lse) exactly 0 there
            lse[:, t0:t1] = (mx + den.log()).masked_fill(empty, float("inf")).view(z, m * tq)
        result = out[:, :plan.n].reshape(plan.b, plan.h, plan.n, plan.d).to(q.dtype)
        ctx.plan = plan
        # save the returned tensor itself (not the buffer it may view) so autograd's version check catches
        # any in-place change to it before backward
        ctx.save_for_backward(q, k_loc, v_loc, k_glob, v_glob, result, lse)
        return result

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        plan: Plan = ctx.plan
        q, k_loc, v_loc, k_glob, v_glob, out, lse = ctx.saved_tensors
        x = _Inputs(plan, q, k_loc, v_loc, k_glob, v_glob)
        z, tq, n, d, cd = plan.b * plan.h, plan.tq, plan.n, plan.d, plan.cd
        nq = plan.nb * tq
        g_o = _rows(grad_out, z, n, nq, cd)
        o_flat = out.reshape(z, n, d)
        dq = torch.zeros(z, nq, d, dtype=cd, device=q.device)
        if plan.has_local:
            dk_pad = torch.zeros(z, plan.key_len // tq, tq, d, dtype=cd, device=q.device)
            dv_pad = torch.zeros_like(dk_pad)
        if plan.has_global:
            dk_g = torch.zeros(z, plan.n_global, d, dtype=cd, device=q.device)
            dv_g = torch.zeros_like(dk_g)
        for b0, m in plan.tiles():
            t0, t1 = b0 * tq, (b0 + m) * tq
            s_loc, s_glb, g_tile = tile_scores(plan, x.q, x.k_slabs, x.k_glob, b0, m, inplace=True)
            if s_loc is None and s_glb is None:
                continue
            lse_t = lse[:, t0:t1].view(z, m, tq, 1)
            do_t = g_o[:, t0:t1].view(z, m, tq, d)
            # rowsum(dO ∘ O) per tile (rows past N have dO = 0, so delta = 0 there)
            dl_t = torch.zeros(z, m * tq, dtype=cd, device=q.device)
            real = min(t1, n) - t0
            dl_t[:, :real] = (g_o[:, t0:t0 + real] * o_flat[:, t0:t0 + real].to(cd)).sum(-1)
            dl_t = dl_t.view(z, m, tq, 1)
            q_t = x.q[:, t0:t1].view(z, m, tq, d)
            dq_t = dq[:, t0:t1].view(z, m, tq, d)
            if s_loc is not None:
                p = s_loc.sub_(lse_t).exp_()
                ds = torch.matmul(do_t, x.v_slabs[:, b0:b0 + m]).sub_(dl_t).mul_(p)
                dq_t += torch.matmul(ds, x.k_slabs[:, b0:b0 + m].transpose(-1, -2))
                _scatter_slabs(dk_pad, torch.matmul(ds.transpose(-1, -2), q_t), b0, plan)
                _scatter_slabs(dv_pad, torch.matmul(p.transpose(-1, -2), do_t), b0, plan)
            if s_glb is not None:
                p = s_glb.sub_(lse_t).exp_().view(z, m * tq, g_tile)
                do_f, q_f = do_t.reshape(z, m * tq, d), q_t.reshape(z, m * tq, d)
                ds = torch.matmul(do_f, x.v_glob[:, :g_tile].transpose(1, 2))
                ds.sub_(dl_t.reshape(z, m * tq, 1)).mul_(p)
                dq_t += torch.matmul(ds, x.k_glob[:, :g_tile]).view(z, m, tq, d)
                dk_g[:, :g_tile] += torch.matmul(ds.transpose(1, 2), q_f)
                dv_g[:, :g_tile] += torch.matmul(p.transpose(1, 2), do_f)
        # keys were scaled, so dq is already right; dk = scale · dsᵀ q. Slices are returned as views (no copy).
        shape = (plan.b, plan.h, n, d)
        grads = [dq[:, :n].view(shape).to(q.dtype), None, None, None, None]
        if plan.has_local:
            lo, hi = plan.key_span
            kshape = (plan.b, plan.h, hi - lo, d)
            grads[1] = dk_pad.view(z, -1, d)[:, lo:hi].mul_(plan.scale).view(kshape).to(k_loc.dtype)
            grads[2] = dv_pad.view(z, -1, d)[:, lo:hi].view(kshape).to(v_loc.dtype)
        if plan.has_global:
            gshape = (plan.b, plan.h, plan.n_global, d)
            grads[3] = dk_g.mul_(plan.scale).view(gshape).to(k_glob.dtype)
            grads[4] = dv_g.view(gshape).to(v_glob.dtype)
        return (None, *grads)


def _scatter_slabs(dst: torch.Tensor, slab_grads: torch.Tensor, b0: int, plan: Plan) -> None:
    """Add per-slab key gradients (Z, m, slab, D) into the block-shaped padded buffer (Z, key_len/tq, tq, D).

    Slab of block b covers padded positions [b·tq, b·tq + slab): its rows [j·tq, (j+1)·tq) belong to key block
    b + j, so the overlap between neighbouring slabs is summed with one vectorised add per piece j.
    """
    m, tq = slab_grads.shape[1], plan.tq
    for j in range(math.ceil(plan.slab / tq)):
        lo, hi = j * tq, min((j + 1) * tq, plan.slab)
        dst[:, b0 + j:b0 + j + m, :hi - lo] += slab_grads[:, :, lo:hi]


def attention_with_dropout(plan: Plan, q, k_loc, v_loc, k_glob, v_glob, dropout_p: float) -> torch.Tensor:
    """The same tile loop in plain autograd with dropout on the attention probabilities."""
    x = _Inputs(plan, q, k_loc, v_loc, k_glob, v_glob)
    z, tq = plan.b * plan.h, plan.tq
    outs: List[torch.Tensor] = []
    for b0, m in plan.tiles():
        s_loc, s_glb, g_tile = tile_scores(plan, x.q, x.k_slabs, x.k_glob, b0, m, inplace=False)
        # start from 0·q so a tile without any visible key still joins the graph (with zero gradient)
        o = x.q[:, b0 * tq:(b0 + m) * tq].reshape(z, m, tq, plan.d) * 0
        if s_loc is None and s_glb is None:
            outs.append(o.reshape(z, m * tq, plan.d))
            continue
        mx = _row_max(s_loc, s_glb).detach()[..., None]
        probs = [None if s is None else torch.exp(s - mx) for s in (s_loc, s_glb)]
        den = sum(p.sum(-1, keepdim=True) for p in probs if p is not None)
        den = den.masked_fill(den == 0, 1.0)
        if probs[0] is not None:
            o = o + torch.matmul(F.dropout(probs[0] / den, dropout_p), x.v_slabs[:, b0:b0 + m].transpose(-1, -2))
        if probs[1] is not None:
            o = o + torch.matmul(F.dropout(probs[1] / den, dropout_p), x.v_glob[:, None, :g_tile])
        outs.append(o.reshape(z, m * tq, plan.d))
    out = torch.cat(outs, dim=1)[:, :plan.n]
    return out.reshape(plan.b, plan.h, plan.n, plan.d).to(q.dtype)
