"""FlexAttention backend (``backend="flex"``): one flex_attention call over keys ``[window keys ; global keys]``.

The visibility rule of long-short attention is written once as a ``mask_mod`` over (query, key) indices; the
key axis is the concatenation of the N local (window) keys and the G projected keys. On CUDA the call is
``torch.compile``d and the block mask skips every key block no query of a query block can see, so cost follows
the sparsity. On CPU torch runs FlexAttention's unfused reference path (it materialises the scores, and has no
backward), which is only meant for testing the mask against the torch backend.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch

try:  # FlexAttention is in torch >= 2.5; keep the package importable without it
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
except ImportError:  # pragma: no cover - torch is pinned to a version that has it
    create_block_mask = flex_attention = None


def flex_available() -> bool:
    """True when this torch build ships FlexAttention."""
    return flex_attention is not None


@functools.lru_cache(maxsize=1)
def _compiled_flex():
    # compiled once per process; dynamic=False keeps one specialised kernel per shape (shapes repeat in training)
    return torch.compile(flex_attention, dynamic=False)


def make_mask_mod(n: int, *, causal: bool, window: int, n_local: int, segment_len: int, rank: int,
                  pad: Optional[torch.Tensor], chunk_valid: Optional[torch.Tensor], halo_left: int = 0,
                  q_offset: int = 0, query_pad: Optional[torch.Tensor] = None, extension: Optional[int] = None):
    """The long-short visibility rule as a FlexAttention mask_mod over keys [local (n_local) ; global].

    The local keys are ``halo_left`` keys before the ``n`` queries, the queries' own keys, then any halo after
    them (context parallelism); ``pad`` (B, n_local) marks padded local keys, ``query_pad`` (B, n) padded
    queries (default: ``pad`` when there is no halo), and query ``i`` sits at global position ``q_offset + i``.
    """
    e = (window + 1) // 2 if extension is None else extension
    n_chunks = 0 if chunk_valid is None else chunk_valid.shape[1]
    if query_pad is None and pad is not None and n_local == n:
        query_pad = pad

    def mask_mod(b, h, q_idx, kv_idx):
        is_local = kv_idx < n_local
        kpos = kv_idx - halo_left  # key position relative to the first query
        if window > 0:
            if causal:
                local = (kpos <= q_idx) & (kpos > q_idx - window)
            else:
                start = (q_idx // window) * window - e
                local = (kpos >= start) & (kpos < start + window + 2 * e)
            if pad is not None:
                local = local & ~pad[b, kv_idx.clamp(max=n_local - 1)]
        else:
            local = kv_idx < 0  # all False, as a tensor
        g = (kv_idx - n_local).clamp(min=0)
        if causal:
            glob = (g // max(rank, 1)) < ((q_idx + q_offset) // max(segment_len, 1))
            if chunk_valid is not None and n_chunks > 0:
                glob = glob & chunk_valid[b, (g // max(rank, 1)).clamp(max=n_chunks - 1)]
        else:
            glob = kv_idx >= n_local
        keep = torch.where(is_local, local, glob)
        if query_pad is not None:
            keep = keep & ~query_pad[b, q_idx]
        return keep

    return mask_mod


@functools.lru_cache(maxsize=16)
def _static_block_mask(n: int, n_keys: int, causal: bool, window: int, n_local: int, segment_len: int, rank: int,
                       device: str, halo_left: int = 0, q_offset: int = 0, extension: Optional[int] = None):
    mask_mod = make_mask_mod(n, causal=causal, window=window, n_local=n_local, segment_len=segment_len,
                             rank=rank, pad=None, chunk_valid=None, halo_left=halo_left, q_offset=q_offset,
                             extension=extension)
    dev = torch.device(device)
    return create_block_mask(mask_mod, None, None, n, n_keys, device=dev, _compile=dev.type == "cuda")


def flex_long_short(q: torch.Tensor, k_loc: Optional[torch.Tensor], v_loc: Optional[torch.Tensor],
                    k_glob: Optional[torch.Tensor], v_glob: Optional[torch.Tensor], *, causal: bool, window: int,
                    segment_len: int, rank: int, pad: Optional[torch.Tensor],
                    chunk_valid: Optional[torch.Tensor], scale: float, halo_left: int = 0, q_offset: int = 0,
                    query_pad: Optional[torch.Tensor] = None, extension: Optional[int] = None) -> torch.Tensor:
    """Long-short attention through one FlexAttention call; same arguments as the torch core.

    ``pad`` masks the local keys (halos included), ``query_pad`` the queries. Rows with no visible key come
    back as 0 (FlexAttention's convention for fully masked rows).
    """
    if not flex_available():
        raise RuntimeError("backend='flex' needs torch.nn.attention.flex_attention (torch >= 2.5)")
    inputs = (q, k_loc, v_loc, k_glob, v_glob)
    if not q.is_cuda and torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs):
        raise RuntimeError(f"backend='flex' has no backward on device {q.device}: run it under torch.no_grad() "
                           "or use backend='torch' (backend='auto' picks torch off CUDA)")
    b, _, n, _ = q.shape
    keys = [t for t in (k_loc, k_glob) if t is not None]
    vals = [t for t in (v_loc, v_glob) if t is not None]
    key = keys[0] if len(keys) == 1 else torch.cat(keys, dim=2)
    val = vals[0] if len(vals) == 1 else torch.cat(vals, dim=2)
    n_local = k_loc.shape[2] if k_loc is not None else 0
    on_cuda = q.is_cuda
    if pad is None and chunk_valid is None and query_pad is None:
        # the mask depends only on the shape: build it once per layout (every layer and step reuses it)
        block_mask = _static_block_mask(n, key.shape[2], causal, window, n_local, segment_len, rank,
                                        str(q.device), halo_left, q_offset, extension)
    else:
        mask_mod = make_mask_mod(n, causal=causal, window=window, n_local=n_local, segment_len=segment_len,
                                 rank=rank, pad=pad, chunk_valid=chunk_valid, halo_left=halo_left,
                                 q_offset=q_offset, query_pad=query_pad, extension=extension)
        block_mask = create_block_mask(mask_mod, b, None, n, key.shape[2], device=q.device, _compile=on_cuda)
    fn = _compiled_flex() if on_cuda else flex_attention
    if not on_cuda:  # flex refuses CPU inputs that require grad even under no_grad; we checked grad is off
        q, key, val = q.detach(), key.detach(), val.detach()
    return fn(q, key.contiguous(), val.contiguous(), block_mask=block_mask, scale=scale)
