"""Context parallelism (CP): attention over a sequence split across the ranks of the CP group.

Each CP rank holds ``layout.local_length`` tokens (its pieces, see ``cp_layout``); everything but attention is
token-wise, so only these functions communicate. The math stays in ``megatron_ls.ops``; this module moves tensors.

Long-Short layers exchange only what the method needs (docs/parallelism.md, "Context parallelism"):

* **window**: each piece receives the window keys/values just before it (causal: ``w−1`` tokens; bidirectional:
  ``e`` tokens on each side) from the ranks that own them, point to point; the gradients go back the same way.
  Volume per layer ``O(w·d)``, independent of the sequence length.
* **causal projection**: each rank compresses its own chunks (``r`` keys per ``l`` tokens) and the compressed
  keys/values are all-gathered (reduce-scattered in backward): ``O(n·r/l·d)``.
* **bidirectional projection**: the softmax over the whole sequence is combined from per-rank max/sum
  statistics and weighted sums: one all-reduce of ``O(r·d)`` per head.

Full-attention (MASFormer) layers all-gather K/V across CP (reduce-scatter of their gradients): ``O(n·d)``.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from megatron_ls.ops import full_attention_at, long_short_attention_shard
from megatron_ls.ops.checks import window_extension as window_extension_size
from megatron_ls.ops.projection import finish_projection, project_causal, projection_partials
from megatron_ls.ops.rotary import Rotary, chunk_positions
from megatron_ls.parallel import state
from megatron_ls.parallel.cp_comm import (
    all_reduce_max_no_grad,
    all_reduce_sum,
    build_halo_plan,
    extend_with_halos,
    extend_with_halos_no_grad,
    gather_sequence,
    gather_sequence_no_grad,
)
from megatron_ls.parallel.cp_layout import LAYOUTS, ContextLayout

Norm = Optional[Callable[[torch.Tensor], torch.Tensor]]
_LAYOUT_KIND = "balanced"  # measured: contiguous shards leave causal CP4 43% imbalanced, balanced 2%


def set_context_layout_kind(kind: str) -> None:
    """Choose how sequences are split over CP ranks (``--context-parallel-layout``); call before building models."""
    global _LAYOUT_KIND
    if kind not in LAYOUTS:
        raise ValueError(f"--context-parallel-layout must be one of {LAYOUTS}, got {kind!r}")
    _LAYOUT_KIND = kind


def get_context_layout_kind() -> str:
    return _LAYOUT_KIND


def get_context_layout(seq_length: int) -> ContextLayout:
    """The split of a ``seq_length``-token sequence over this rank's CP group."""
    return ContextLayout(seq_length, state.get_context_parallel_world_size(), state.get_context_parallel_rank(),
                         _LAYOUT_KIND)


def _norm(fn: Norm, x: torch.Tensor) -> torch.Tensor:
    return x if fn is None else fn(x).to(x.dtype)


def _pieces(x: Optional[torch.Tensor], layout: ContextLayout, dim: int = 2):
    p = layout.piece_length
    return [None if x is None else x.narrow(dim, j * p, p) for j in range(len(layout.pieces()))]


def cp_long_short_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, proj_logits: Optional[torch.Tensor],
                            *, layout: ContextLayout, window: int, causal: bool, segment_len: Optional[int] = None,
                            key_padding_mask: Optional[torch.Tensor] = None, local_norm: Norm = None,
                            global_norm: Norm = None, dropout_p: float = 0.0, scale: Optional[float] = None,
                            backend: str = "auto", window_extension: str = "floor",
                            project_normed: bool = False, rotary: Optional[Rotary] = None) -> torch.Tensor:
    """Long-short attention of this rank's tokens; same contract (and keywords) as ``ops.long_short_attention``
    on the full sequence (whose outputs this equals, rank by rank). ``q, k, v`` (B, H, n_local, D), ``proj_logits``
    (B, H, n_local, r) or None, ``key_padding_mask`` (B, n_local), all in local order."""
    rank_r = 0 if proj_logits is None else proj_logits.shape[-1]
    layout.check_attention(causal=causal, window=window, segment_length=segment_len or 1, projection_rank=rank_r)
    if q.shape[2] != layout.local_length:
        raise ValueError(f"context parallel attention expects {layout.local_length} local tokens, got {q.shape[2]}")
    pad = key_padding_mask
    b, h, n_loc, d = q.shape
    if rotary is not None and not causal:
        raise ValueError("rotary position embedding is supported for causal long-short attention only")
    positions = layout.local_positions(q.device)
    q_att = q if rotary is None else rotary.rotate(q, positions)

    kv_ext = pad_ext = plan = k_loc = v_loc = None
    if project_normed and causal:
        raise ValueError("project_normed applies to bidirectional attention only")
    if window > 0:
        e = window_extension_size(window, window_extension)
        plan = build_halo_plan(layout, window - 1 if causal else e, 0 if causal else e)
        k_loc, v_loc = _norm(local_norm, k), _norm(local_norm, v)
        k_win = k_loc if rotary is None else rotary.rotate(k_loc, positions)  # halos arrive rotated
        kv_ext = extend_with_halos(torch.cat([k_win, v_loc], dim=-1), plan)
        if pad is not None:
            pad_ext = extend_with_halos_no_grad(pad[:, None, :, None], plan)[:, 0, :, 0]

    k_glob = v_glob = chunk_valid = None
    if rank_r > 0:
        if causal:
            l = segment_len
            kc, vc, valid = [], [], []
            for (start, _), kp, vp, lp, padp in zip(layout.pieces(), _pieces(k, layout), _pieces(v, layout),
                                                    _pieces(proj_logits, layout), _pieces(pad, layout, dim=1)):
                kb, vb, cv = project_causal(kp, vp, lp, padp, l, num_chunks=layout.piece_length // l)
                if rotary is not None:  # normed, then rotated by each chunk's last position
                    cpos = chunk_positions(start // l, layout.piece_length // l, rank_r, l, q.device)
                    kb = rotary.rotate(_norm(global_norm, kb), cpos)
                kc.append(kb)
                vc.append(vb)
                valid.append(cv)
            k_all = torch.cat(kc, dim=2)
            kv = torch.cat([k_all if rotary is not None else _norm(global_norm, k_all),
                            _norm(global_norm, torch.cat(vc, dim=2))], dim=-1)
            chunk_layout = ContextLayout(layout.seq_length // l * rank_r, layout.cp, layout.rank, layout.kind)
            kv = gather_sequence(kv, chunk_layout)
            k_glob, v_glob = kv[..., :d], kv[..., d:]
            if pad is not None:
                chunk_valid = gather_sequence_no_grad(
                    torch.cat(valid, dim=1), ContextLayout(layout.seq_length // l, layout.cp, layout.rank,
                                                           layout.kind), dim=1)
        else:
            k_src, v_src = k, v
            if project_normed:  # released bidirectional code: the projection takes the LN_L-normalised keys
                k_src = k_loc if k_loc is not None else _norm(local_norm, k)
                v_src = v_loc if v_loc is not None else _norm(local_norm, v)
            row_max, sums = projection_partials(k_src, v_src, proj_logits, pad)
            global_max = all_reduce_max_no_grad(row_max)
            global_max = torch.where(torch.isfinite(global_max), global_max, torch.zeros_like(global_max))
            sums = sums * torch.exp(row_max - global_max).transpose(2, 3)
            k_glob, v_glob = finish_projection(all_reduce_sum(sums), k.dtype)
            k_glob, v_glob = _norm(global_norm, k_glob), _norm(global_norm, v_glob)

    outs, pos = [], 0
    for j, (start, length) in enumerate(layout.pieces()):
        sl = slice(j * length, (j + 1) * length)
        k_piece = v_piece = key_pad = None
        hl = hr = 0
        if window > 0:
            _, hl, hr = plan.local_halos(layout.rank)[j]
            kv_piece = kv_ext.narrow(2, pos, hl + length + hr)
            k_piece, v_piece = kv_piece[..., :d], kv_piece[..., d:]
            if pad is not None:
                key_pad = pad_ext[:, pos:pos + hl + length + hr]
            pos += hl + length + hr
        if window == 0 and causal and start + length - 1 < segment_len:
            # no query of this piece sees any key (causal projection-only, first chunk): a zero output that still
            # depends on every input, so each rank runs the same backward collectives
            tie = proj_logits[:, :, sl].sum(-1, keepdim=True) + (k_glob.sum() + v_glob.sum())
            outs.append((q[:, :, sl] + k[:, :, sl] + v[:, :, sl] + tie) * 0)
            continue
        outs.append(long_short_attention_shard(
            q_att[:, :, sl], k_piece, v_piece, k_glob, v_glob, window=window, causal=causal,
            segment_len=segment_len or 0, projection_rank=rank_r, key_padding_mask=key_pad,
            query_padding_mask=None if pad is None else pad[:, sl], chunk_valid=chunk_valid, q_offset=start,
            halo_left=hl, halo_right=hr, dropout_p=dropout_p, scale=scale, backend=backend,
            window_extension=window_extension))
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)


def cp_full_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, layout: ContextLayout, causal: bool,
                      key_padding_mask: Optional[torch.Tensor] = None, dropout_p: float = 0.0,
                      scale: Optional[float] = None) -> torch.Tensor:
    """Full attention of this rank's queries over the whole sequence: K/V are all-gathered across CP (one
    all-gather of ``2·n·d`` per layer, a reduce-scatter of their gradients in backward)."""
    d = q.shape[-1]
    kv = gather_sequence(torch.cat([k, v], dim=-1), layout)
    full_pad = None if key_padding_mask is None else gather_sequence_no_grad(key_padding_mask, layout, dim=1)
    return full_attention_at(q, kv[..., :d], kv[..., d:], query_positions=layout.local_positions(q.device),
                             causal=causal, key_padding_mask=full_pad, query_padding_mask=key_padding_mask,
                             dropout_p=dropout_p, scale=scale)
