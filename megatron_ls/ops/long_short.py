"""``long_short_attention``: the functional Transformer-LS attention (window keys + dynamic projection keys).

This module validates arguments, applies the norms and the projection (plain autograd, O(N·D)), and hands the
core -- one softmax per query over [window keys ; visible global keys] -- to a backend:
``blockwise.LongShortCore`` (torch, any device, flash-style backward) or ``flex.flex_long_short``.
"""
from __future__ import annotations

import warnings
from typing import Callable, Optional

import torch

from . import checks
from .blockwise import LongShortCore, attention_with_dropout, make_plan
from .flex import flex_available, flex_long_short
from .projection import num_causal_chunks, project_bidirectional, project_causal
from .rotary import Rotary

Norm = Optional[Callable[[torch.Tensor], torch.Tensor]]
_FLEX_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def select_backend(backend: str, q: torch.Tensor, dropout_p: float) -> str:
    """Resolve ``backend="auto"``: flex on CUDA (no dropout, fp32/fp16/bf16, power-of-two D >= 16), else torch."""
    if backend != "auto":
        return backend
    d = q.shape[-1]
    if (q.is_cuda and flex_available() and dropout_p == 0.0 and q.dtype in _FLEX_DTYPES
            and d >= 16 and d & (d - 1) == 0):
        return "flex"
    return "torch"


def _apply_norm(name: str, norm: Norm, x: torch.Tensor) -> torch.Tensor:
    if norm is None:
        return x
    y = norm(x)
    if not isinstance(y, torch.Tensor) or y.shape != x.shape:
        raise ValueError(f"{name} must map a tensor of shape {tuple(x.shape)} to the same shape, got "
                         f"{getattr(y, 'shape', type(y).__name__)}")
    return y.to(x.dtype)


def long_short_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, proj_logits: Optional[torch.Tensor],
                         *, window: int, causal: bool, segment_len: Optional[int] = None,
                         key_padding_mask: Optional[torch.Tensor] = None, local_norm: Norm = None,
                         global_norm: Norm = None, dropout_p: float = 0.0, scale: Optional[float] = None,
                         backend: str = "auto", window_extension: str = "floor",
                         project_normed: bool = False, rotary: Optional[Rotary] = None,
                         positions: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Long-short attention of Transformer-LS; returns (B, H, N, D) in q's dtype.

    q, k, v: (B, H, N, D). proj_logits: (B, H, N, r) or None. Local keys/values are ``local_norm(k/v)`` inside
    the window (bidirectional: segments of ``window`` plus ``e`` on each side, ``e = max(w // 2, 1)`` with
    ``window_extension="floor"`` (released code) or ``ceil(w / 2)`` with ``"ceil"``; causal: the last ``window``
    tokens). Global keys/values are ``global_norm(Pᵀk / Pᵀv)`` with P = softmax(proj_logits) over the unpadded
    sequence (bidirectional) or inside each chunk of ``segment_len`` (causal: query t sees chunks < t // l);
    with ``project_normed`` (bidirectional only, the released LRA/vision code) P applies to ``local_norm(k/v)``.
    Norms are callables on (B, H, *, D) tensors (per head, or over all heads' width together).
    ``rotary`` (causal only): RoPE on q, the normed window keys and the normed compressed keys (at their chunk's
    last position), with token ``i`` at ``positions[i]`` (default ``i``); see ``ops/rotary.py``.
    ``key_padding_mask`` (B, N) bool, True = padding; padded query rows and rows with no visible key are 0.
    ``segment_len`` is only used in causal mode. See docs/attention.md for the full contract.
    """
    checks.check_qkv(q, k, v)
    rank = checks.check_proj_logits(proj_logits, q)
    window = checks.check_int("window", window, 0)
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {causal!r}")
    pad = checks.check_padding_mask(key_padding_mask, q)
    dropout_p = checks.check_dropout(dropout_p)
    scale = checks.resolve_scale(scale, q.shape[-1])
    backend = checks.check_backend(backend)
    checks.check_norm("local_norm", local_norm)
    checks.check_norm("global_norm", global_norm)
    extension = checks.window_extension(window, window_extension)
    if rotary is not None and not causal:
        raise ValueError("rotary position embedding is supported for causal long-short attention only (the "
                         "bidirectional projection keys have no position); use learned or no positions")
    if project_normed and causal:
        raise ValueError("project_normed applies to bidirectional attention only (the released autoregressive "
                         "code compresses the raw keys/values)")
    use_global = rank > 0
    if window == 0 and not use_global:
        raise ValueError("long_short_attention needs a window or a projection: got window=0 and "
                         f"proj_logits={'None' if proj_logits is None else 'with r=0'}")
    seg = 0
    if causal and use_global:
        if segment_len is None:
            raise ValueError(f"segment_len is required in causal mode with a projection (r={rank}), got None")
        seg = checks.check_int("segment_len", segment_len, 1)
        if window > 0 and window < seg:
            raise ValueError(f"causal long-short attention needs window >= segment_len (the window must cover "
                             f"the query's own chunk), got window={window} < segment_len={seg}")

    b, h, n, d = q.shape
    k_loc = v_loc = k_glob = v_glob = chunk_valid = None
    if window > 0:
        k_loc = _apply_norm("local_norm", local_norm, k)
        v_loc = _apply_norm("local_norm", local_norm, v)
    if use_global:
        if causal:
            if num_causal_chunks(n, seg) > 0:
                k_glob, v_glob, chunk_valid = project_causal(k, v, proj_logits, pad, seg)
        elif project_normed:
            k_src = k_loc if k_loc is not None else _apply_norm("local_norm", local_norm, k)
            v_src = v_loc if v_loc is not None else _apply_norm("local_norm", local_norm, v)
            k_glob, v_glob = project_bidirectional(k_src, v_src, proj_logits, pad)
        else:
            k_glob, v_glob = project_bidirectional(k, v, proj_logits, pad)
        if k_glob is not None:
            k_glob = _apply_norm("global_norm", global_norm, k_glob)
            v_glob = _apply_norm("global_norm", global_norm, v_glob)
    n_global = 0 if k_glob is None else k_glob.shape[2]
    if rotary is not None:
        pos = torch.arange(n, device=q.device) if positions is None else positions
        q_att = rotary.rotate(q, pos)
        if k_loc is not None:
            k_loc = rotary.rotate(k_loc, pos)
        if k_glob is not None:
            last = (torch.arange(n_global // rank, device=q.device) + 1) * seg - 1
            k_glob = rotary.rotate(k_glob, pos[..., last].repeat_interleave(rank, dim=-1))
    else:
        q_att = q

    if window == 0 and n_global == 0:
        # causal projection-only with N <= segment_len: no query sees any key. Tie every input in with a zero
        # gradient (not None) so optimizers and ZeRO see the same parameters used at every length.
        out = (q + k + v + proj_logits.sum(dim=-1, keepdim=True)) * 0
    else:
        out = long_short_attention_shard(
            q_att, k_loc, v_loc, k_glob, v_glob, window=window, causal=causal, segment_len=seg, projection_rank=rank,
            key_padding_mask=pad, query_padding_mask=pad, chunk_valid=chunk_valid, dropout_p=dropout_p,
            scale=scale, backend=backend, window_extension=window_extension)
    return out


def long_short_attention_shard(q: torch.Tensor, k_local: Optional[torch.Tensor], v_local: Optional[torch.Tensor],
                               k_global: Optional[torch.Tensor], v_global: Optional[torch.Tensor], *,
                               window: int, causal: bool, segment_len: int, projection_rank: int,
                               key_padding_mask: Optional[torch.Tensor] = None,
                               query_padding_mask: Optional[torch.Tensor] = None,
                               chunk_valid: Optional[torch.Tensor] = None, q_offset: int = 0, halo_left: int = 0,
                               halo_right: int = 0, dropout_p: float = 0.0, scale: Optional[float] = None,
                               backend: str = "auto", window_extension: str = "floor") -> torch.Tensor:
    """The core of long-short attention on prepared keys: one softmax per query over window + global keys.

    This is the piece context parallelism calls on local + received tensors. ``k_local/v_local``
    (B, H, halo_left + N + halo_right, D) are the already-normed window keys of the N queries plus halo keys
    before/after them (None without a window); ``k_global/v_global`` (B, H, G, D) are already projected and
    normed, ``G = chunks · r`` numbered from the sequence start (causal) or ``r`` (bidirectional).
    ``key_padding_mask`` covers the local keys, ``query_padding_mask`` (B, N) the queries (their rows are 0);
    ``chunk_valid`` (B, chunks) marks causal chunks that have keys. Query ``i`` sits at global position
    ``q_offset + i`` for the causal chunk rule; window visibility is relative and needs no offset.
    """
    scale = checks.resolve_scale(scale, q.shape[-1])
    extension = None if causal else checks.window_extension(window, window_extension)
    b, h, n, d = q.shape
    n_global = 0 if k_global is None else k_global.shape[2]
    if window > 0 and k_local is None:
        raise ValueError("long_short_attention_shard: window > 0 needs k_local/v_local")
    if window > 0 and k_local.shape[2] != halo_left + n + halo_right:
        raise ValueError(f"k_local has {k_local.shape[2]} keys, expected halo_left + N + halo_right = "
                         f"{halo_left} + {n} + {halo_right}")
    if window == 0:
        k_local = v_local = None
        key_padding_mask = None
    chosen = select_backend(backend, q, dropout_p)
    if chosen == "flex":
        if dropout_p > 0:
            raise ValueError(f"backend='flex' does not support dropout_p > 0 (got {dropout_p}); "
                             "use backend='torch' or 'auto'")
        with warnings.catch_warnings():
            # CPU flex runs the unfused reference path on purpose (tests); its advice to compile is noise here
            warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
            out = flex_long_short(q, k_local, v_local, k_global, v_global, causal=causal, window=window,
                                  segment_len=segment_len, rank=projection_rank, pad=key_padding_mask,
                                  chunk_valid=chunk_valid, scale=scale, halo_left=halo_left, q_offset=q_offset,
                                  query_pad=query_padding_mask, extension=extension)
    else:
        plan = make_plan(b, h, n, d, causal=causal, window=window, segment_len=segment_len, rank=projection_rank,
                         n_global=n_global, scale=scale, dtype=q.dtype, device=q.device, pad=key_padding_mask,
                         chunk_valid=chunk_valid, q_offset=q_offset, halo_left=halo_left, halo_right=halo_right,
                         extension=extension)
        if dropout_p > 0:
            out = attention_with_dropout(plan, q, k_local, v_local, k_global, v_global, dropout_p)
        else:
            out = LongShortCore.apply(plan, q, k_local, v_local, k_global, v_global)
    if query_padding_mask is not None:
        out = out.masked_fill(query_padding_mask[:, None, :, None], 0.0)
    return out
