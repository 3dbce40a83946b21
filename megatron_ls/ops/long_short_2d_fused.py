"""Fused patch-query kernel of the 2D long-short op: one softmax per patch query, scores recomputed in backward.

Every patch query of a ``w × w`` block sees the same keys: the ``S × S`` square of local keys around its block
(``S = w + 2e``, zero padded at the image border and masked there) followed by ``X`` shared keys (extra/CLS
tokens and projected keys) that every block sees. :class:`PatchQueryAttention` takes the already normalised
(and, for q, scaled) tensors and, chunk by chunk over block rows,

* gathers each block's square from a zero-padded ``(D, H', W')`` grid (an ``unfold`` view, copied per chunk),
  appends the shared keys, computes the scores, adds the window bias and the 0/-inf masks, and keeps only the
  output and the per-row logsumexp;
* in backward recomputes the probabilities from the logsumexp, ``dS = P ∘ (dP - rowsum(dO ∘ O))``, and
  scatter-adds the squares' key/value gradients back into the padded grid (at most ``ceil(S/w)²`` strided adds
  per chunk: square rows ``[a·w, (a+1)·w)`` belong to grid block row ``i + a``).

Memory: the saved inputs and output (O(N·D)) plus one chunk of scores, instead of the autograd path's
``N × (S² + X)`` scores, probabilities and their copies. No dropout here: the caller takes the autograd path
when ``dropout_p > 0`` (it needs the dropped probabilities).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator, Optional, Tuple

import torch
from torch.autograd.function import once_differentiable

NEG_INF = float("-inf")
# Scores per chunk (elements): a chunk of fp32 scores of ~2 MiB stays in cache on a CPU; on CUDA kernel-launch
# overhead dominates small chunks and memory is plentiful. Read at call time, so tests can shrink it.
CHUNK_SCORES = 1 << 19
CHUNK_SCORES_CUDA = 1 << 26


@dataclass(frozen=True)
class Geometry:
    """Patch grid ``gh × gw`` cut in ``window``-blocks whose squares extend ``extension`` patches each side.

    ``window == 0`` (projection only): one "block" holding every patch and no square.
    """

    gh: int
    gw: int
    window: int
    extension: int

    @property
    def side(self) -> int:
        return self.window + 2 * self.extension if self.window else 0

    @property
    def blocks(self) -> Tuple[int, int]:
        if not self.window:
            return 1, 1
        return -(-self.gh // self.window), -(-self.gw // self.window)

    @property
    def pieces(self) -> int:
        """Grid blocks a square spans on one axis."""
        return math.ceil(self.side / self.window)

    @property
    def padded(self) -> Tuple[int, int]:
        """Padded grid size: a multiple of w that holds every block's square."""
        nbh, nbw = self.blocks
        return (nbh + self.pieces - 1) * self.window, (nbw + self.pieces - 1) * self.window


def padded_grid(x: torch.Tensor, geom: Geometry) -> torch.Tensor:
    """(B, H, gh·gw, D) patches -> (B, H, D, H', W') zero-padded grid (the patch at (y, x) sits at (y+e, x+e))."""
    b, h, _, d = x.shape
    hp, wp = geom.padded
    e = geom.extension
    g = x.new_zeros(b, h, d, hp, wp)
    g[:, :, :, e:e + geom.gh, e:e + geom.gw] = x.transpose(-1, -2).reshape(b, h, d, geom.gh, geom.gw)
    return g


def _squares(grid: torch.Tensor, geom: Geometry) -> torch.Tensor:
    """(B, H, D, H', W') grid -> (B, H, nbh, nbw, D, S, S) view of every block's key square."""
    nbh, nbw = geom.blocks
    s, w = geom.side, geom.window
    return grid.unfold(3, s, w).unfold(4, s, w)[:, :, :, :nbh, :nbw].permute(0, 1, 3, 4, 2, 5, 6)


def _chunks(b: int, h: int, nbh: int, unit: int, budget: int) -> Iterator[Tuple[slice, slice, slice]]:
    """(batch, head, block-row) slices whose scores hold about ``budget`` elements (``unit`` per row)."""
    rows = max(1, min(nbh, budget // unit))
    heads = max(1, min(h, budget // (unit * nbh))) if rows == nbh else 1
    batch = max(1, min(b, budget // (unit * nbh * h))) if heads == h else 1
    for b0 in range(0, b, batch):
        for h0 in range(0, h, heads):
            for r0 in range(0, nbh, rows):
                yield slice(b0, b0 + batch), slice(h0, h0 + heads), slice(r0, r0 + rows)


def _bsel(mask: Optional[torch.Tensor], bs: slice) -> Optional[torch.Tensor]:
    """Batch rows of a (B|1, ...) mask for a chunk."""
    return None if mask is None or mask.shape[0] == 1 else mask[bs]


class _Keys:
    """Per-chunk key/value tensors laid out ``(..., D, S² + X)``: the block's square, then the shared keys."""

    def __init__(self, geom: Geometry, k_grid, v_grid, kx, vx):
        self.geom = geom
        self.k_sq = None if k_grid is None else _squares(k_grid, geom)
        self.v_sq = None if v_grid is None else _squares(v_grid, geom)
        self.kx, self.vx = kx, vx

    def _gather(self, sq, x, bs, hs, rs, lead) -> torch.Tensor:
        s = self.geom.side
        d = (sq if sq is not None else x).shape[4 if sq is not None else 3]
        width = s * s + (0 if x is None else x.shape[2])
        buf = (sq if sq is not None else x).new_empty(*lead, d, width)
        if sq is not None:  # one copy straight into place (a reshape + cat would copy twice)
            buf[..., :s * s].unflatten(-1, (s, s)).copy_(sq[bs, hs, rs])
        if x is not None:  # (B, H, X, D) -> (b, h, rows, cols, D, X), shared by every block
            buf[..., s * s:] = x[bs, hs].transpose(-1, -2)[:, :, None, None]
        return buf

    def keys(self, bs, hs, rs, lead) -> torch.Tensor:
        return self._gather(self.k_sq, self.kx, bs, hs, rs, lead)

    def values(self, bs, hs, rs, lead) -> torch.Tensor:
        return self._gather(self.v_sq, self.vx, bs, hs, rs, lead)


def _scores(qc, kc, s2, window_bias, sq_bias, x_bias, bs, hs, rs) -> torch.Tensor:
    """Scores of one chunk (b, h, rows, cols, T, S² + X) with the window bias and the 0/-inf masks added."""
    s = torch.matmul(qc, kc)
    if window_bias is not None:
        s[..., :s2].add_(window_bias[hs][None, :, None, None])
    if sq_bias is not None:  # (B|1, nbh, nbw, S²): keys outside the image or padding
        sb = sq_bias[bs] if sq_bias.shape[0] > 1 else sq_bias
        s[..., :s2].add_(sb[:, None, rs, :, None, :])
    if x_bias is not None:  # (B|1, X): padded extra tokens, no patch left for the projection
        xb = x_bias[bs] if x_bias.shape[0] > 1 else x_bias
        s[..., s2:].add_(xb[:, None, None, None, None, :])
    return s


def _scatter_squares(dst: torch.Tensor, grads: torch.Tensor, geom: Geometry, rs: slice, bs: slice,
                     hs: slice) -> None:
    """Add square gradients (b, h, rows, nbw, D, S, S) into the padded grid (B, H, D, H', W').

    Square rows ``[a·w, a·w + ha)`` of block row ``i`` are grid rows ``[(i+a)·w, (i+a)·w + ha)``; same for columns.
    The grid is viewed as (B, H, D, H'/w, w, W'/w, w) so each piece ``(a, c)`` is one strided add for all blocks.
    """
    w, s, n = geom.window, geom.side, geom.pieces
    hp, wp = geom.padded
    b, h, d = dst.shape[:3]
    view = dst.view(b, h, d, hp // w, w, wp // w, w)[bs, hs]
    rows, cols = grads.shape[2], grads.shape[3]
    g = grads.permute(0, 1, 4, 2, 5, 3, 6)  # (b, h, D, rows, S, cols, S)
    for a in range(n):
        ha = min(w, s - a * w)
        for c in range(n):
            wc = min(w, s - c * w)
            view[:, :, :, rs.start + a:rs.start + a + rows, :ha, c:c + cols, :wc] += \
                g[:, :, :, :, a * w:a * w + ha, :, c * w:c * w + wc]


class PatchQueryAttention(torch.autograd.Function):
    """Patch queries over [block square ; shared keys]; saves inputs, output and logsumexp only.

    Inputs (compute dtype): ``qb`` (B, H, nbh, nbw, T, D) scaled query blocks; ``k_loc, v_loc`` (B, H, P, D)
    normalised patch keys/values, or None without a window; ``kx, vx`` (B, H, X, D) shared keys, or None;
    ``window_bias`` (H, T, S²) or None; ``sq_bias`` (B|1, nbh, nbw, S²) and ``x_bias`` (B|1, X) additive 0/-inf
    masks (None: all visible). Returns (B, H, nbh, nbw, T, D); a row with no visible key is 0.
    """

    @staticmethod
    def forward(ctx, geom: Geometry, qb, k_loc, v_loc, kx, vx, window_bias, sq_bias, x_bias):
        b, h, nbh, nbw, t, d = qb.shape
        k_grid = None if k_loc is None else padded_grid(k_loc, geom)
        v_grid = None if v_loc is None else padded_grid(v_loc, geom)
        keys = _Keys(geom, k_grid, v_grid, kx, vx)
        s2 = geom.side ** 2
        width = s2 + (0 if kx is None else kx.shape[2])
        out = torch.empty_like(qb)
        lse = torch.empty(qb.shape[:-1], dtype=qb.dtype, device=qb.device)
        for bs, hs, rs in _chunks(b, h, nbh, nbw * t * width, _budget(qb)):
            qc = qb[bs, hs, rs]
            lead = qc.shape[:4]
            s = _scores(qc, keys.keys(bs, hs, rs, lead), s2, window_bias, sq_bias, x_bias, bs, hs, rs)
            mx = s.amax(-1, keepdim=True)
            mx.masked_fill_(mx == NEG_INF, 0.0)  # a row with nothing visible: exp(-inf - 0) = 0, not NaN
            p = s.sub_(mx).exp_()
            den = p.sum(-1, keepdim=True)
            empty = den == 0
            o = torch.matmul(p, keys.values(bs, hs, rs, lead).transpose(-1, -2))
            out[bs, hs, rs] = o.div_(den.masked_fill_(empty, 1.0))
            # +inf for empty rows makes the backward's exp(s - lse) exactly 0 there
            lse[bs, hs, rs] = (mx + den.log()).masked_fill_(empty, float("inf"))[..., 0]
        ctx.geom = geom
        ctx.save_for_backward(qb, k_loc, v_loc, kx, vx, window_bias, sq_bias, x_bias, out, lse)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        geom: Geometry = ctx.geom
        qb, k_loc, v_loc, kx, vx, window_bias, sq_bias, x_bias, out, lse = ctx.saved_tensors
        b, h, nbh, nbw, t, d = qb.shape
        k_grid = None if k_loc is None else padded_grid(k_loc, geom)
        v_grid = None if v_loc is None else padded_grid(v_loc, geom)
        keys = _Keys(geom, k_grid, v_grid, kx, vx)
        s2 = geom.side ** 2
        nx = 0 if kx is None else kx.shape[2]
        do = grad_out.to(qb.dtype).contiguous()
        delta = (do * out).sum(-1, keepdim=True)  # rowsum(dO ∘ O)
        dq = torch.empty_like(qb)
        dk_grid = None if k_grid is None else torch.zeros_like(k_grid)
        dv_grid = None if v_grid is None else torch.zeros_like(v_grid)
        dkx = None if kx is None else torch.zeros_like(kx)
        dvx = None if vx is None else torch.zeros_like(vx)
        want_bias = window_bias is not None and ctx.needs_input_grad[6]
        dwb = torch.zeros_like(window_bias) if want_bias else None
        for bs, hs, rs in _chunks(b, h, nbh, nbw * t * (s2 + nx), _budget(qb)):
            qc, doc = qb[bs, hs, rs], do[bs, hs, rs]
            lead = qc.shape[:4]
            kc, vc = keys.keys(bs, hs, rs, lead), keys.values(bs, hs, rs, lead)
            s = _scores(qc, kc, s2, window_bias, sq_bias, x_bias, bs, hs, rs)
            p = s.sub_(lse[bs, hs, rs][..., None]).exp_()
            ds = torch.matmul(doc, vc).sub_(delta[bs, hs, rs]).mul_(p)  # (…, T, S² + X)
            dq[bs, hs, rs] = torch.matmul(ds, kc.transpose(-1, -2))
            dk_c = torch.matmul(qc.transpose(-1, -2), ds)  # (…, D, S² + X): the keys' own layout
            dv_c = torch.matmul(doc.transpose(-1, -2), p)
            if dk_grid is not None:
                sq_shape = (*lead, d, geom.side, geom.side)
                _scatter_squares(dk_grid, dk_c[..., :s2].reshape(sq_shape), geom, rs, bs, hs)
                _scatter_squares(dv_grid, dv_c[..., :s2].reshape(sq_shape), geom, rs, bs, hs)
            if dkx is not None:  # shared keys: summed over the chunk's blocks
                dkx[bs, hs] += dk_c[..., s2:].sum(dim=(2, 3)).transpose(-1, -2)
                dvx[bs, hs] += dv_c[..., s2:].sum(dim=(2, 3)).transpose(-1, -2)
            if dwb is not None:
                dwb[hs] += ds[..., :s2].sum(dim=(0, 2, 3))
        dk = dv = None
        if dk_grid is not None:
            e, p_ = geom.extension, geom.gh * geom.gw
            dk = dk_grid[:, :, :, e:e + geom.gh, e:e + geom.gw].reshape(b, h, d, p_).transpose(-1, -2)
            dv = dv_grid[:, :, :, e:e + geom.gh, e:e + geom.gw].reshape(b, h, d, p_).transpose(-1, -2)
        return None, dq, dk, dv, dkx, dvx, dwb, None, None


def _budget(x: torch.Tensor) -> int:
    return CHUNK_SCORES_CUDA if x.is_cuda else CHUNK_SCORES


def fused_patch_attention(geom: Geometry, qb: torch.Tensor, k_loc: Optional[torch.Tensor],
                          v_loc: Optional[torch.Tensor], kx: Optional[torch.Tensor], vx: Optional[torch.Tensor],
                          window_bias: Optional[torch.Tensor], sq_bias: Optional[torch.Tensor],
                          x_bias: Optional[torch.Tensor]) -> torch.Tensor:
    """Run :class:`PatchQueryAttention` (see it for shapes); every tensor must already be in the compute dtype."""
    if (k_loc is None) != (geom.window == 0) or (kx is None and k_loc is None):
        raise ValueError("fused_patch_attention needs square keys iff window > 0, and some key")
    return PatchQueryAttention.apply(geom, qb, k_loc, v_loc, kx, vx, window_bias, sq_bias, x_bias)
