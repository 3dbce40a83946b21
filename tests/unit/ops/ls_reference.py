"""Dense O(N²) reference for long-short attention, written straight from the definition (tests only).

It builds an explicit boolean visibility matrix over [all N local keys ; all projected keys] with plain Python
loops over positions and chunks, then runs one masked softmax in float64. Nothing here is shared with the
implementation under test.
"""
from __future__ import annotations

import math
from typing import Optional

import torch


def _safe_masked_softmax_apply(scores, visible, values):
    """softmax over visible entries of each row, times values; rows without any visible entry give 0."""
    s = scores.masked_fill(~visible, 0.0)
    mx = scores.masked_fill(~visible, float("-inf")).amax(-1, keepdim=True)
    mx = torch.where(torch.isfinite(mx), mx, torch.zeros_like(mx)).detach()
    e = torch.exp(s - mx) * visible
    den = e.sum(-1, keepdim=True)
    p = e / torch.where(den > 0, den, torch.ones_like(den))
    return p @ values


def _projection_weights(logits, keep):
    """softmax of logits (L, r) over L restricted to keep (L,); all-masked -> zeros."""
    if not bool(keep.any()):
        return torch.zeros_like(logits)
    sub = torch.softmax(logits[keep], dim=0)
    out = torch.zeros_like(logits)
    out[keep] = sub
    return out


def extension_of(window: int, rule: str) -> int:
    """Keys a bidirectional segment sees beyond each side: released code max(w // 2, 1), or ceil(w / 2)."""
    if window == 0:
        return 0
    return max(window // 2, 1) if rule == "floor" else math.ceil(window / 2)


def local_visibility(n: int, window: int, causal: bool, extension: str = "floor") -> torch.Tensor:
    """(N, N) bool: query i may see local key j (no padding)."""
    vis = torch.zeros(n, n, dtype=torch.bool)
    if window == 0:
        return vis
    e = extension_of(window, extension)
    for i in range(n):
        if causal:
            lo, hi = i - window + 1, i + 1
        else:
            s = i // window
            lo, hi = s * window - e, (s + 1) * window + e
        vis[i, max(lo, 0):min(hi, n)] = True
    return vis


def rope_reference(x, positions, base: float, dim: int):
    """RoPE written with complex numbers: channel pairs (i, i + dim/2) turned by angle pos · base^(-2i/dim)."""
    half = dim // 2
    z = torch.complex(x[..., :half].double(), x[..., half:dim].double())
    theta = positions.double()[:, None] * base ** (-2.0 * torch.arange(half, dtype=torch.float64) / dim)
    z = z * torch.polar(torch.ones_like(theta), theta)
    return torch.cat([z.real, z.imag, x[..., dim:].double()], dim=-1)


def dense_long_short(q, k, v, proj_logits, *, window: int, causal: bool, segment_len: Optional[int] = None,
                     key_padding_mask=None, local_norm=None, global_norm=None, scale=None,
                     window_extension: str = "floor", project_normed: bool = False, rotary=None, positions=None):
    """Reference long-short attention, computed in float64 and returned in float64.

    ``rotary`` = (base, dim): q and the normed window keys rotated by their positions, compressed keys of chunk c
    by the position of the chunk's last token (``positions`` default 0..N-1)."""
    q, k, v = q.double(), k.double(), v.double()
    b, h, n, d = q.shape
    scale = d ** -0.5 if scale is None else scale
    pad = torch.zeros(b, n, dtype=torch.bool) if key_padding_mask is None else key_padding_mask.cpu()
    kl = local_norm(k) if local_norm is not None else k
    vl = local_norm(v) if local_norm is not None else v
    pos = torch.arange(n) if positions is None else positions
    k_win = kl if rotary is None else rope_reference(kl, pos, *rotary)
    q_att = q if rotary is None else rope_reference(q, pos, *rotary)
    base_vis = local_visibility(n, window, causal, window_extension)
    kp = k if not project_normed else (local_norm(k) if local_norm is not None else k)  # projection sources
    vp = v if not project_normed else (local_norm(v) if local_norm is not None else v)
    # global keys of every (batch, head) first, so global_norm sees (B, H, G, D) like the op gives it (a norm
    # may mix heads, e.g. DualLN over the full width)
    kg = vg = None
    gvis = [torch.zeros(n, 0, dtype=torch.bool) for _ in range(b)]
    if proj_logits is not None and proj_logits.shape[-1] > 0:
        r = proj_logits.shape[-1]
        chunks = [slice(0, n)] if not causal else [slice(c * segment_len, min((c + 1) * segment_len, n))
                                                     for c in range(math.ceil(n / segment_len))]
        kg = torch.zeros(b, h, len(chunks) * r, d, dtype=torch.float64)
        vg = torch.zeros_like(kg)
        for bi in range(b):
            cols = []
            for c, sl in enumerate(chunks):
                keep = ~pad[bi, sl]
                for hi in range(h):
                    p = _projection_weights(proj_logits[bi, hi, sl].double(), keep)
                    src_k, src_v = (kp, vp) if not causal else (k, v)
                    kg[bi, hi, c * r:(c + 1) * r] = p.t() @ src_k[bi, hi, sl]
                    vg[bi, hi, c * r:(c + 1) * r] = p.t() @ src_v[bi, hi, sl]
                if causal:
                    col = torch.tensor([c < i // segment_len for i in range(n)])[:, None] & bool(keep.any())
                else:
                    col = torch.ones(n, 1, dtype=torch.bool)
                cols.append(col.expand(n, r))
            gvis[bi] = torch.cat(cols, dim=1)
        if global_norm is not None:
            kg, vg = global_norm(kg), global_norm(vg)
        if rotary is not None:
            last = torch.tensor([min((c + 1) * segment_len, n) - 1 for c in range(len(chunks)) for _ in range(r)])
            kg = rope_reference(kg, pos[last], *rotary)
    rows = []
    for bi in range(b):
        heads = []
        for hi in range(h):
            keys, vals, vis_cols = [k_win[bi, hi]], [vl[bi, hi]], [base_vis & ~pad[bi][None, :], gvis[bi]]
            if kg is not None:
                keys.append(kg[bi, hi])
                vals.append(vg[bi, hi])
            kk, vv, vis = torch.cat(keys), torch.cat(vals), torch.cat(vis_cols, dim=1)
            vis = vis & ~pad[bi][:, None]  # padded queries see nothing
            heads.append(_safe_masked_softmax_apply(q_att[bi, hi] @ kk.t() * scale, vis, vv))
        rows.append(torch.stack(heads))
    return torch.stack(rows)


def dense_full(q, k, v, *, causal: bool, key_padding_mask=None, scale=None):
    """Reference full attention with the same padding semantics (padded query rows 0)."""
    b, h, n, d = q.shape
    scale = d ** -0.5 if scale is None else scale
    pad = torch.zeros(b, n, dtype=torch.bool) if key_padding_mask is None else key_padding_mask
    vis = torch.ones(n, n, dtype=torch.bool)
    if causal:
        vis = vis.tril()
    vis = vis[None, None] & ~pad[:, None, None, :] & ~pad[:, None, :, None]
    return _safe_masked_softmax_apply(q.double() @ k.double().transpose(-1, -2) * scale, vis, v.double())


def dense_long_short_2d(q, k, v, proj_logits, *, grid, window: int, num_extra_tokens: int = 0,
                        key_padding_mask=None, local_norm=None, global_norm=None, scale=None,
                        window_extension: str = "floor", project_normed: bool = False):
    """Reference 2D long-short attention: extra tokens first, then gh×gw patches row-major."""
    q, k, v = q.double(), k.double(), v.double()
    b, h, n, d = q.shape
    gh, gw = grid
    ne = num_extra_tokens
    scale = d ** -0.5 if scale is None else scale
    pad = torch.zeros(b, n, dtype=torch.bool) if key_padding_mask is None else key_padding_mask
    e = extension_of(window, window_extension)
    vis_loc = torch.zeros(n, n, dtype=torch.bool)
    vis_loc[:, :ne] = True  # extra tokens are visible to everyone
    vis_loc[:ne, :] = True  # and see everything
    for qi in range(gh * gw):
        if window == 0:
            break
        y, x = divmod(qi, gw)
        by, bx = y // window, x // window
        for ki in range(gh * gw):
            ky, kx = divmod(ki, gw)
            if (by * window - e <= ky < (by + 1) * window + e) and (bx * window - e <= kx < (bx + 1) * window + e):
                vis_loc[ne + qi, ne + ki] = True
    kl = local_norm(k) if local_norm is not None else k
    vl = local_norm(v) if local_norm is not None else v
    rows = []
    for bi in range(b):
        heads = []
        for hi in range(h):
            keys, vals, cols = [kl[bi, hi]], [vl[bi, hi]], [vis_loc & ~pad[bi][None, :]]
            if proj_logits is not None and proj_logits.shape[-1] > 0:
                keep = ~pad[bi].clone()
                keep[:ne] = False  # the projection runs over patches only
                p = _projection_weights(proj_logits[bi, hi].double(), keep)
                src_k, src_v = (kl, vl) if project_normed else (k, v)
                kb, vb = p.t() @ src_k[bi, hi], p.t() @ src_v[bi, hi]
                if global_norm is not None:  # per-head norms only here (the 2D tests use per-head norms)
                    kb, vb = global_norm(kb), global_norm(vb)
                keys.append(kb)
                vals.append(vb)
                cols.append(torch.ones(n, kb.shape[0], dtype=torch.bool) & bool(keep.any()))
            kk, vv, vis = torch.cat(keys), torch.cat(vals), torch.cat(cols, dim=1)
            vis = vis & ~pad[bi][:, None]
            heads.append(_safe_masked_softmax_apply(q[bi, hi] @ kk.t() * scale, vis, vv))
        rows.append(torch.stack(heads))
    return torch.stack(rows)
