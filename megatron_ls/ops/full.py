"""``full_attention``: ordinary softmax attention through ``F.scaled_dot_product_attention``.

Used by MASFormer-style full-attention layers and as the baseline in benchmarks. Padding follows the same
contract as ``long_short_attention``: padded keys are never attended and padded query rows return exactly 0.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from . import checks


def full_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool,
                   key_padding_mask: Optional[torch.Tensor] = None, dropout_p: float = 0.0,
                   scale: Optional[float] = None) -> torch.Tensor:
    """Full (optionally causal) attention over (B, H, N, D) tensors; returns (B, H, N, D) in q's dtype."""
    checks.check_qkv(q, k, v)
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {causal!r}")
    pad = checks.check_padding_mask(key_padding_mask, q)
    dropout_p = checks.check_dropout(dropout_p)
    scale = checks.resolve_scale(scale, q.shape[-1])
    if pad is None:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=causal, scale=scale)
    n = q.shape[2]
    keep = ~pad[:, None, None, :]  # (B, 1, 1, N) keys that exist
    if causal:
        keep = keep & torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
    # A padded query row may have no visible key (SDPA would return NaN there): let it see every key, then
    # zero it. Its output is discarded, so its gradient is exactly zero.
    keep = keep | pad[:, None, :, None]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=keep, dropout_p=dropout_p, scale=scale)
    return out.masked_fill(pad[:, None, :, None], 0.0)


def full_attention_at(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, query_positions: torch.Tensor,
                      causal: bool, key_padding_mask: Optional[torch.Tensor] = None,
                      query_padding_mask: Optional[torch.Tensor] = None, dropout_p: float = 0.0,
                      scale: Optional[float] = None) -> torch.Tensor:
    """Full attention of some queries over a whole sequence of keys (context parallelism).

    ``q`` (B, H, M, D) holds the queries at ``query_positions`` (M,) of a sequence whose keys/values ``k, v``
    are (B, H, N, D); causal queries see keys at positions ``<=`` their own. ``key_padding_mask`` (B, N) and
    ``query_padding_mask`` (B, M) follow :func:`full_attention`'s contract (padded query rows are 0).
    """
    if q.dim() != 4 or k.shape != v.shape or q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
        raise ValueError(f"q {tuple(q.shape)} and k/v {tuple(k.shape)}/{tuple(v.shape)} must be (B, H, M|N, D)")
    if query_positions.shape != (q.shape[2],):
        raise ValueError(f"query_positions must have shape ({q.shape[2]},), got {tuple(query_positions.shape)}")
    dropout_p = checks.check_dropout(dropout_p)
    scale = checks.resolve_scale(scale, q.shape[-1])
    n = k.shape[2]
    keep = torch.ones(1, 1, q.shape[2], n, dtype=torch.bool, device=q.device)
    if causal:
        keep = keep & (torch.arange(n, device=q.device)[None, :] <= query_positions.to(q.device)[:, None])
    if key_padding_mask is not None:
        keep = keep & ~key_padding_mask[:, None, None, :]
    if query_padding_mask is not None:
        # as in full_attention: a padded query sees every key (no NaN row), and is zeroed afterwards
        keep = keep | query_padding_mask[:, None, :, None]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=keep, dropout_p=dropout_p, scale=scale)
    if query_padding_mask is not None:
        out = out.masked_fill(query_padding_mask[:, None, :, None], 0.0)
    return out
