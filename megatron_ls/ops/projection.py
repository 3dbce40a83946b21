"""Dynamic low-rank projection (the long-range half of long-short attention).

``P = softmax(proj_logits)`` over the sequence axis (padding excluded), ``K̄ = Pᵀ k``, ``V̄ = Pᵀ v``. All of it is
O(N·r·D) and runs in plain autograd; the results are returned in the input dtype, ready for ``global_norm``.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Softmaxes and score math run in fp32 for half inputs, in the input dtype otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _masked_softmax(logits: torch.Tensor, keep: Optional[torch.Tensor], dim: int) -> torch.Tensor:
    """Softmax over ``dim`` where ``keep`` is False contributes nothing; an all-masked slice gives all zeros.

    Finite fill instead of -inf keeps the all-masked case NaN-free in both value and gradient.
    """
    if keep is not None:
        logits = logits.masked_fill(~keep, float("-inf"))
    mx = logits.amax(dim=dim, keepdim=True)
    mx = torch.where(torch.isfinite(mx), mx, torch.zeros_like(mx)).detach()
    e = torch.exp(logits - mx)
    den = e.sum(dim=dim, keepdim=True)
    return e / torch.where(den > 0, den, torch.ones_like(den))


def project_bidirectional(k: torch.Tensor, v: torch.Tensor, proj_logits: torch.Tensor,
                          pad: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    """r global keys/values per (batch, head): softmax over the whole unpadded sequence.

    Shapes: k, v (B, H, N, D); proj_logits (B, H, N, r); pad (B, N) bool or None. Returns (B, H, r, D) twice.
    """
    cd = compute_dtype(k.dtype)
    keep = None if pad is None else (~pad)[:, None, :, None]
    p = _masked_softmax(proj_logits.to(cd), keep, dim=2)  # (B, H, N, r)
    kbar = torch.einsum("bhnr,bhnd->bhrd", p, k.to(cd))
    vbar = torch.einsum("bhnr,bhnd->bhrd", p, v.to(cd))
    return kbar.to(k.dtype), vbar.to(v.dtype)


def num_causal_chunks(n: int, segment_len: int) -> int:
    """Chunks whose keys some query can see: chunk c is visible to t >= (c+1)·l, so c < (N-1)//l.

    Every such chunk is complete, so no internal padding of the sequence is needed for the projection.
    """
    return (n - 1) // segment_len


def project_causal(k: torch.Tensor, v: torch.Tensor, proj_logits: torch.Tensor, pad: Optional[torch.Tensor],
                   segment_len: int, num_chunks: Optional[int] = None
                   ) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """Per-chunk projection for causal attention: r keys per chunk of ``segment_len`` tokens.

    Returns ``kbar, vbar`` of shape (B, H, C·r, D) (key ``c·r + j`` is the j-th key of chunk c) and
    ``chunk_valid`` (B, C) bool -- False for a chunk made only of padding (it has no keys) -- or None without
    padding. C defaults to (N-1)//l (the chunks some query of this sequence sees) and may be 0; a context-parallel
    shard projects all its N/l chunks (``num_chunks``), since later ranks' queries see them.
    """
    b, h, n, d = k.shape
    r = proj_logits.shape[-1]
    l = segment_len
    c = num_causal_chunks(n, l) if num_chunks is None else num_chunks
    cd = compute_dtype(k.dtype)
    logits = proj_logits[:, :, : c * l].to(cd).reshape(b, h, c, l, r)
    keep = None
    chunk_valid = None
    if pad is not None:
        keep_tok = (~pad[:, : c * l]).reshape(b, c, l)
        keep = keep_tok[:, None, :, :, None]
        chunk_valid = keep_tok.any(dim=-1)
    p = _masked_softmax(logits, keep, dim=3)  # (B, H, C, l, r)
    kc = k[:, :, : c * l].to(cd).reshape(b, h, c, l, d)
    vc = v[:, :, : c * l].to(cd).reshape(b, h, c, l, d)
    kbar = torch.einsum("bhclr,bhcld->bhcrd", p, kc).reshape(b, h, c * r, d)
    vbar = torch.einsum("bhclr,bhcld->bhcrd", p, vc).reshape(b, h, c * r, d)
    return kbar.to(k.dtype), vbar.to(v.dtype), chunk_valid


def projection_partials(k: torch.Tensor, v: torch.Tensor, proj_logits: torch.Tensor, pad: Optional[torch.Tensor]
                        ) -> Tuple[torch.Tensor, torch.Tensor]:
    """One shard's share of the bidirectional projection, for combining across context-parallel ranks.

    Returns ``row_max`` (B, H, 1, r), detached (the softmax does not depend on the shift), and ``sums``
    (B, H, r, 1 + 2D) = [Σ e | Σ e·k | Σ e·v] with ``e = exp(logits - row_max)`` over the unpadded tokens, in
    the compute dtype. Rescale each shard's sums by ``exp(row_max - global_max)``, add them, then call
    :func:`finish_projection`. An all-padding shard has ``row_max = -inf`` and zero sums.
    """
    cd = compute_dtype(k.dtype)
    logits = proj_logits.to(cd)
    if pad is not None:
        logits = logits.masked_fill(pad[:, None, :, None], float("-inf"))
    row_max = logits.amax(dim=2, keepdim=True).detach()
    e = torch.exp(logits - torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max)))
    den = e.sum(dim=2).unsqueeze(-1)  # (B, H, r, 1)
    kw = torch.einsum("bhnr,bhnd->bhrd", e, k.to(cd))
    vw = torch.einsum("bhnr,bhnd->bhrd", e, v.to(cd))
    return row_max, torch.cat([den, kw, vw], dim=-1)


def finish_projection(sums: torch.Tensor, dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
    """Global keys/values (B, H, r, D) from combined :func:`projection_partials` sums (all-zero when empty)."""
    d = (sums.shape[-1] - 1) // 2
    den = sums[..., :1]
    den = torch.where(den > 0, den, torch.ones_like(den))
    return (sums[..., 1:1 + d] / den).to(dtype), (sums[..., 1 + d:] / den).to(dtype)
