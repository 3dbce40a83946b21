"""2D long-short attention for vision (ViT-LS / CvT-LS style).

Sequence layout: ``num_extra_tokens`` leading tokens (CLS, distillation, ...) then the gh×gw patches row-major.

* local keys: the patch grid is cut into ``window × window`` blocks; every query of block (i, j) sees the
  square of patches rows ``[i·w - e, (i+1)·w + e)`` × cols ``[j·w - e, (j+1)·w + e)``, e = max(w // 2, 1) by default (the 1D
  rule on both axes: 2w × 2w for even w), clipped at the image border;
* extra tokens are keys visible to every query; their own queries see every token (``extra_queries="full"``)
  or, as the released vision code's "post-CLS" (``"post"``), their own keys and the patch queries' outputs
  (used as keys and values, in one softmax, without dropout);
* global keys: r keys ``Pᵀk`` with P = softmax(proj_logits) over the unpadded *patches* (extra tokens take no
  projection weight; their rows of proj_logits are ignored), seen by every query;
* one softmax per query over the union; local/extra keys go through ``local_norm``, global ones ``global_norm``;
  ``window_bias`` (H, w², S²) is added to the window scores of every block (a relative position bias: query
  ``a·w + b`` of a block, key ``c·S + d`` of its S×S square, S = w + 2e).

Patch queries with ``implementation="fused"`` go through ``long_short_2d_fused.PatchQueryAttention``:
one softmax per query over [square ; extra keys ; r projected keys], chunked over block rows, saving only its
inputs, output and logsumexp and recomputing the scores in backward -- memory O(N·D) plus one chunk of scores.
``implementation="dense"`` scores every patch query against every patch key at once and masks what lies outside
its block's square (bias and mask gathered from precomputed index tables): O(P²) scores, but no per-block gather,
scatter or chunk loop -- much faster when the square covers a good part of the grid (a 7×7 grid with 5×5 squares).
``implementation="autograd"`` is the reference: the same math vectorised over all blocks in plain autograd, memory
O(N·((w+2e)² + E + r)) for the scores, probabilities and their copies. ``"auto"`` (the default) takes "dense" when
the grid has at most ``DENSE_MAX_PATCHES`` (128) patches and "fused" otherwise. Attention dropout > 0
takes the autograd path unless "dense" was chosen (the fused kernel would need the dropped probabilities for
backward). The norms, the projection and the extra-token queries (E×N scores) run in plain autograd in all.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Callable, Optional, Tuple

import torch
import torch.nn.functional as F

from . import checks
from .long_short import _apply_norm
from .long_short_2d_fused import Geometry, fused_patch_attention
from .projection import compute_dtype, project_bidirectional

NEG_INF = float("-inf")
EXTRA_QUERY_MODES = ("full", "post")
IMPLEMENTATIONS = ("auto", "fused", "dense", "autograd")
# "auto" scores densely up to this many patches: below it the fused kernel's per-block gathers, scatters and chunk
# loop cost more than the P² scores. Measured on CPU, one thread, quiet machine (tools/bench_vision.py --kinds
# ls-fused,ls-dense; benchmarks/results/bench_vision_paths_cpu.json): dense/fused speed with w=3 2.2x at 49
# patches, 1.4x at 100, 1.0x at 196; with w=8 0.9x at 256, 0.5x at 576. Unmeasured on GPU.
DENSE_MAX_PATCHES = 128


def _check_grid(grid, n: int, num_extra: int) -> Tuple[int, int]:
    if (not isinstance(grid, (tuple, list)) or len(grid) != 2
            or not all(isinstance(g, int) and not isinstance(g, bool) and g >= 1 for g in grid)):
        raise ValueError(f"grid must be a pair of positive ints (gh, gw), got {grid!r}")
    gh, gw = grid
    if num_extra + gh * gw != n:
        raise ValueError(f"sequence length N={n} must equal num_extra_tokens + gh*gw = {num_extra} + {gh}*{gw} "
                         f"= {num_extra + gh * gw}")
    return gh, gw


def _grid_slabs(x: torch.Tensor, gh: int, gw: int, w: int, e: int, fill) -> torch.Tensor:
    """(..., gh·gw, C) patches -> (..., nbh, nbw, S·S, C) key squares around each block, S = w + 2e."""
    s = w + 2 * e
    nbh, nbw = -(-gh // w), -(-gw // w)
    lead = x.shape[:-2]
    g = x.reshape(*lead, gh, gw, x.shape[-1])
    # pad e before, enough after so every block's square exists; `fill` marks the padding
    g = F.pad(g.movedim(-1, -3), (e, nbw * w + e - gw, e, nbh * w + e - gh), value=fill)  # (..., C, H', W')
    g = g.unfold(-2, s, w).unfold(-2, s, w)  # (..., C, nbh, nbw, S, S)
    return g.flatten(-2).movedim(-4, -1)  # (..., nbh, nbw, S·S, C)


def _grid_blocks(x: torch.Tensor, gh: int, gw: int, w: int) -> torch.Tensor:
    """(..., gh·gw, C) patches -> (..., nbh, nbw, w·w, C) query blocks (zero padded at the border)."""
    nbh, nbw = -(-gh // w), -(-gw // w)
    lead, c = x.shape[:-2], x.shape[-1]
    g = F.pad(x.reshape(*lead, gh, gw, c), (0, 0, 0, nbw * w - gw, 0, nbh * w - gh))
    g = g.reshape(*lead, nbh, w, nbw, w, c).transpose(-4, -3)
    return g.reshape(*lead, nbh, nbw, w * w, c)


def _ungrid_blocks(x: torch.Tensor, gh: int, gw: int, w: int) -> torch.Tensor:
    """Inverse of :func:`_grid_blocks`: (..., nbh, nbw, w·w, C) -> (..., gh·gw, C)."""
    lead, (nbh, nbw, _, c) = x.shape[:-4], x.shape[-4:]
    g = x.reshape(*lead, nbh, nbw, w, w, c).transpose(-4, -3).reshape(*lead, nbh * w, nbw * w, c)
    return g[..., :gh, :gw, :].reshape(*lead, gh * gw, c)


def _softmax_union(parts, dropout_p: float):
    """One softmax over the concatenation of score tensors; all-masked rows give all-zero probabilities."""
    s = torch.cat(parts, dim=-1)
    mx = s.amax(-1, keepdim=True).detach()
    mx = mx.masked_fill(mx == NEG_INF, 0.0)
    p = torch.exp(s - mx)
    den = p.sum(-1, keepdim=True)
    p = p / den.masked_fill(den == 0, 1.0)
    return F.dropout(p, dropout_p) if dropout_p > 0 else p


def _additive(ok: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """bool keep-mask -> additive 0 / -inf."""
    return torch.zeros(ok.shape, dtype=dtype, device=ok.device).masked_fill(~ok, NEG_INF)


def _patch_queries_autograd(geom: Geometry, q_p, k_p, v_p, shared, window_bias, sq_ok, dropout_p: float):
    """Reference path in plain autograd: every block's scores against [square ; shared keys] at once.

    ``q_p`` (scaled), ``k_p``, ``v_p``: (B, H, P, D) patches; ``shared``: [(keys, values, keep (B|1, X))].
    Memory O(P·(S² + X)) for the scores, probabilities and the copies autograd saves.
    """
    gh, gw, window, e = geom.gh, geom.gw, geom.window, geom.extension
    qb = _grid_blocks(q_p, gh, gw, max(window, 1))  # (B, H, nbh, nbw, T, D)
    parts, vals = [], []
    if window > 0:
        ks = _grid_slabs(k_p, gh, gw, window, e, 0.0)
        vs = _grid_slabs(v_p, gh, gw, window, e, 0.0)
        scores = torch.matmul(qb, ks.transpose(-1, -2)) + _additive(sq_ok, qb.dtype)[:, None, :, :, None, :]
        if window_bias is not None:
            scores = scores + window_bias[None, :, None, None]
        parts.append(scores)
        vals.append(("slab", vs))
    for keys, values, keep in shared:
        parts.append(torch.einsum("bhijtd,bhed->bhijte", qb, keys) + _additive(keep, qb.dtype)[:, None, None, None,
                                                                                               None])
        vals.append(("shared", values))
    p = _softmax_union(parts, dropout_p)
    o, start = 0, 0
    for kind, val in vals:
        width = val.shape[-2]
        pp = p[..., start:start + width]
        o = o + (torch.matmul(pp, val) if kind == "slab" else torch.einsum("bhijtk,bhkd->bhijtd", pp, val))
        start += width
    return _ungrid_blocks(o, gh, gw, max(window, 1))


def _patch_queries_fused(geom: Geometry, q_p, k_p, v_p, shared, window_bias, sq_ok, padded: bool):
    """The same through :class:`~.long_short_2d_fused.PatchQueryAttention` (recomputes scores in backward).

    Masks are decided on the host (``padded``: a key padding mask was given), never by inspecting a tensor: that
    would synchronise a CUDA stream once per layer.
    """
    b, h, p, d = q_p.shape
    if geom.window > 0:
        qb = _grid_blocks(q_p, geom.gh, geom.gw, geom.window)
        sq_bias = _additive(sq_ok, q_p.dtype)  # squares at the border always reach outside the image
    else:  # projection only: one block of every patch
        qb, k_p, v_p, sq_bias = q_p.reshape(b, h, 1, 1, p, d), None, None, None
    kx = vx = x_bias = None
    if shared:
        kx = torch.cat([keys for keys, _, _ in shared], dim=2)
        vx = torch.cat([values for _, values, _ in shared], dim=2)
        if padded:  # without padding every extra token and every projected key is visible
            x_bias = _additive(torch.cat([ok.expand(b, -1) for _, _, ok in shared], dim=1), q_p.dtype)
    o = fused_patch_attention(geom, qb, k_p, v_p, kx, vx, window_bias, sq_bias, x_bias)
    return _ungrid_blocks(o, geom.gh, geom.gw, geom.window) if geom.window > 0 else o.reshape(b, h, p, d)


@lru_cache(maxsize=32)
def _square_tables(gh: int, gw: int, window: int, extension: int,
                   device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
    """(P, P) bool: patch key inside the query's block square; (P, P) long: index into window_bias.flatten(1).

    Cached per device: built once, no host-to-device copy per layer call.
    """
    s = window + 2 * extension
    y, x = torch.arange(gh).repeat_interleave(gw), torch.arange(gw).repeat(gh)  # row-major patch coordinates
    dy = y[None, :] - (y[:, None] // window * window - extension)  # key row inside the query block's square
    dx = x[None, :] - (x[:, None] // window * window - extension)
    inside = (dy >= 0) & (dy < s) & (dx >= 0) & (dx < s)
    slot = (y % window) * window + x % window  # the query's place in its block
    index = slot[:, None] * (s * s) + dy.clamp(0, s - 1) * s + dx.clamp(0, s - 1)
    return inside.to(device), index.to(device)


def _patch_queries_dense(geom: Geometry, q_p, k_p, v_p, shared, window_bias, patch_key_ok, dropout_p: float):
    """Every patch query against every patch key, masked to its square, plus the shared keys: one softmax."""
    parts, vals = [], []
    if geom.window > 0:
        inside, index = _square_tables(geom.gh, geom.gw, geom.window, geom.extension, q_p.device)
        scores = torch.matmul(q_p, k_p.transpose(-1, -2))
        if window_bias is not None:
            scores = scores + window_bias.flatten(1)[:, index]  # (H, P, P); outside the square masked below
        parts.append(scores + _additive(inside & patch_key_ok[:, None, :], q_p.dtype)[:, None])
        vals.append(v_p)
    for keys, values, keep in shared:
        parts.append(torch.matmul(q_p, keys.transpose(-1, -2)) + _additive(keep, q_p.dtype)[:, None, None, :])
        vals.append(values)
    return torch.matmul(_softmax_union(parts, dropout_p), torch.cat(vals, dim=2) if len(vals) > 1 else vals[0])


def _choose(implementation: str, geom: Geometry, dropout_p: float) -> str:
    if implementation == "auto":
        patches = geom.gh * geom.gw
        dense = geom.window == 0 or patches <= DENSE_MAX_PATCHES
        implementation = "dense" if dense else "fused"
    return "autograd" if implementation == "fused" and dropout_p > 0 else implementation


def long_short_attention_2d(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, proj_logits: Optional[torch.Tensor],
                            *, grid: Tuple[int, int], window: int, num_extra_tokens: int = 0,
                            key_padding_mask: Optional[torch.Tensor] = None,
                            local_norm: Optional[Callable] = None, global_norm: Optional[Callable] = None,
                            dropout_p: float = 0.0, scale: Optional[float] = None,
                            window_extension: str = "floor", project_normed: bool = False,
                            window_bias: Optional[torch.Tensor] = None,
                            extra_queries: str = "full", implementation: str = "auto") -> torch.Tensor:
    """2D long-short attention over (B, H, E + gh·gw, D) tensors; returns (B, H, N, D) in q's dtype.

    See the module docstring for the visibility rule. ``key_padding_mask`` (B, N) bool, True = padding (never
    attended, no projection weight, padded query rows return 0). ``window_extension`` and ``project_normed``
    as in ``long_short_attention`` (defaults: the released code's ``max(w // 2, 1)``; raw keys projected).
    ``window_bias``: (H, w², (w + 2e)²) added to the window scores; ``extra_queries``: "full" or "post".
    ``implementation``: "auto" (default: "dense" on small grids, else "fused"), "fused" (recompute in backward),
    "dense" (masked P×P scores) or "autograd" (the reference); with ``dropout_p > 0`` "fused" runs as "autograd".
    """
    checks.check_qkv(q, k, v)
    rank = checks.check_proj_logits(proj_logits, q)
    window = checks.check_int("window", window, 0)
    ne = checks.check_int("num_extra_tokens", num_extra_tokens, 0)
    b, h, n, d = q.shape
    gh, gw = _check_grid(grid, n, ne)
    pad = checks.check_padding_mask(key_padding_mask, q)
    dropout_p = checks.check_dropout(dropout_p)
    scale = checks.resolve_scale(scale, d)
    checks.check_norm("local_norm", local_norm)
    checks.check_norm("global_norm", global_norm)
    if window == 0 and rank == 0:
        raise ValueError("long_short_attention_2d needs a window or a projection: got window=0 and "
                         f"proj_logits={'None' if proj_logits is None else 'with r=0'}")
    extension = checks.window_extension(window, window_extension)
    if extra_queries not in EXTRA_QUERY_MODES:
        raise ValueError(f"extra_queries must be one of {EXTRA_QUERY_MODES}, got {extra_queries!r}")
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
    if window_bias is not None:
        side = window + 2 * extension
        want = (h, window * window, side * side)
        if window == 0 or tuple(window_bias.shape) != want:
            raise ValueError(f"window_bias must have shape (H, w*w, (w+2e)^2) = {want}, got "
                             f"{tuple(window_bias.shape)}")
    cd = compute_dtype(q.dtype)
    dev = q.device
    k_loc = _apply_norm("local_norm", local_norm, k).to(cd)
    v_loc = _apply_norm("local_norm", local_norm, v).to(cd)
    q_s = q.to(cd) * scale
    key_ok = torch.ones(1, n, dtype=torch.bool, device=dev) if pad is None else ~pad  # (B|1, N)

    k_glob = v_glob = None
    if rank > 0:
        no_weight = torch.zeros(b, n, dtype=torch.bool, device=dev) if pad is None else pad.clone()
        no_weight[:, :ne] = True  # the projection runs over patches only
        src = (k_loc.to(k.dtype), v_loc.to(v.dtype)) if project_normed else (k, v)
        k_glob, v_glob = project_bidirectional(*src, proj_logits, no_weight)
        k_glob = _apply_norm("global_norm", global_norm, k_glob).to(cd)
        v_glob = _apply_norm("global_norm", global_norm, v_glob).to(cd)
        glob_ok = (~no_weight).any(dim=1)[:, None, None, None]  # (B, 1, 1, 1): no patch left -> no keys

    geom = Geometry(gh, gw, window, extension)
    chosen = _choose(implementation, geom, dropout_p)
    sq_ok = None
    # (B|1, nbh, nbw, S²): which keys of each block's square exist (inside the image, not padding)
    if window > 0 and chosen != "dense":
        sq_ok = _grid_slabs(key_ok[:, ne:, None].to(cd), gh, gw, window, extension, 0.0)[..., 0] > 0
    shared = []  # keys every patch query sees: (keys, values, keep (B|1, X))
    if ne > 0:
        shared.append((k_loc[:, :, :ne], v_loc[:, :, :ne], key_ok[:, :ne]))
    if k_glob is not None:
        shared.append((k_glob, v_glob, glob_ok.view(-1, 1).expand(-1, rank)))
    wb = None if window_bias is None else window_bias.to(cd)
    patch_args = (geom, q_s[:, :, ne:], k_loc[:, :, ne:], v_loc[:, :, ne:], shared, wb)
    if chosen == "fused":
        out_patches = _patch_queries_fused(*patch_args, sq_ok, pad is not None)
    elif chosen == "dense":
        out_patches = _patch_queries_dense(*patch_args, key_ok[:, ne:], dropout_p)
    else:
        out_patches = _patch_queries_autograd(*patch_args, sq_ok, dropout_p)

    outs = []
    if ne > 0 and extra_queries == "post":  # own keys + the patch outputs as keys and values
        qe, ke, ve = q_s[:, :, :ne], k_loc[:, :, :ne], v_loc[:, :, :ne]
        eparts = [torch.matmul(qe, ke.transpose(-1, -2)) + _additive(key_ok[:, :ne], cd)[:, None, None, :],
                  torch.matmul(qe, out_patches.transpose(-1, -2)) + _additive(key_ok[:, ne:], cd)[:, None, None, :]]
        outs.append(torch.matmul(_softmax_union(eparts, 0.0), torch.cat([ve, out_patches], dim=2)))
    elif ne > 0:  # extra-token queries see every token and every global key
        qe = q_s[:, :, :ne]
        eparts = [torch.matmul(qe, k_loc.transpose(-1, -2)) + _additive(key_ok, cd)[:, None, None, :]]
        evals = [v_loc]
        if k_glob is not None:
            eparts.append(torch.matmul(qe, k_glob.transpose(-1, -2)) + _additive(glob_ok, cd))
            evals.append(v_glob)
        outs.append(torch.matmul(_softmax_union(eparts, dropout_p), torch.cat(evals, dim=2)))
    outs.append(out_patches)
    out = torch.cat(outs, dim=2) if len(outs) > 1 else outs[0]
    if pad is not None:
        out = out.masked_fill(pad[:, None, :, None], 0.0)
    return out.to(q.dtype)
