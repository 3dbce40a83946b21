"""Incremental forward passes of a GPT-LS with a decoding cache: prefill, chunked prefill and one-token steps.

``forward_step(model, tokens, cache)`` runs ``tokens`` (B, m) at positions ``cache.length ..`` through the model,
extends the cache, and returns logits. Any ``m`` works: a prompt in one pass (the blockwise op, linear memory),
a prompt in several pieces, or one token per call; the cache afterwards is the same either way, and the logits
equal those of a full forward pass over the whole sequence (tests/unit/inference).

Several new tokens (a prefill or a piece of one) are attended by ``ops.long_short_attention_shard`` -- the same
core the full forward and context parallelism use -- on prepared keys: the ring's last ``min(t0, w-1)`` normed
window keys as a left halo plus the new tokens' own, and every compressed key so far numbered from the sequence
start, with ``q_offset = t0`` so the chunk rule (query t sees chunks ``c < t // l``) holds. A single new token (a
decode step) takes a direct path with the same math: its own key goes into the ring first, which then holds
exactly its window, and it attends the ring and the compressed keys of chunks ``c < t // l`` in one softmax.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from megatron_ls.inference.cache import DecodingCache, FullLayerCache, LongShortLayerCache
from megatron_ls.ops import full_attention, full_attention_at, long_short_attention_shard
from megatron_ls.ops.projection import compute_dtype, project_causal
from megatron_ls.ops.rotary import chunk_positions


def _norm(fn, x: torch.Tensor) -> torch.Tensor:
    return x if fn is None else fn(x).to(x.dtype)


def _absorb_into_chunks(attn, cache: LongShortLayerCache, k: torch.Tensor, v: torch.Tensor,
                        logits: torch.Tensor) -> None:
    """Add raw keys/values/projection logits of new tokens to the partial chunk; compress completed chunks."""
    l, r, p = cache.segment_len, cache.rank, cache.part_len
    m = k.shape[2]
    if p + m < l:  # the chunk is still not complete: just store the raw tokens
        cache.part_k[:, :, p:p + m] = k
        cache.part_v[:, :, p:p + m] = v
        cache.part_logits[:, :, p:p + m] = logits
        cache.part_len = p + m
        return
    if p:
        k = torch.cat([cache.part_k[:, :, :p], k], dim=2)
        v = torch.cat([cache.part_v[:, :, :p], v], dim=2)
        logits = torch.cat([cache.part_logits[:, :, :p], logits], dim=2)
    total = k.shape[2]
    done = total // l
    if done:
        first_chunk = (cache.length - p) // l
        kb, vb, _ = project_causal(k[:, :, :done * l], v[:, :, :done * l], logits[:, :, :done * l], None, l,
                                   num_chunks=done)
        kb, vb = _norm(attn.global_norm, kb), _norm(attn.global_norm, vb)
        if attn.rotary is not None:  # normed, then rotated by each chunk's last position (as the full forward)
            kb = attn.rotary.rotate(kb, chunk_positions(first_chunk, done, r, l, kb.device))
        cache.comp_k.append(kb)
        cache.comp_v.append(vb)
    rest = total - done * l
    if rest:
        cache.part_k[:, :, :rest] = k[:, :, done * l:]
        cache.part_v[:, :, :rest] = v[:, :, done * l:]
        cache.part_logits[:, :, :rest] = logits[:, :, done * l:]
    cache.part_len = rest


def _one_query_attention(q: torch.Tensor, cache: LongShortLayerCache, t: int) -> torch.Tensor:
    """Decode fast path: query ``t`` (B, H, 1, D) over the ring (which holds exactly keys ``t-w+1 .. t``, its own
    included, once written) and the compressed keys of chunks ``c < t // l``, in one softmax.

    The same math as the shard op (scaled scores and softmax in fp32 for half inputs, fp64 for fp64), without
    its block padding, which would multiply the work of a single query by the block size.
    """
    cd = compute_dtype(q.dtype)
    scale = q.shape[-1] ** -0.5
    qc = q.to(cd)
    keys, values = [], []
    if cache.window > 0:
        filled = min(t + 1, cache.window)
        keys.append(cache.ring_k[:, :, :filled])
        values.append(cache.ring_v[:, :, :filled])
    visible = cache.rank * (t // cache.segment_len) if cache.rank > 0 else 0
    if visible:
        keys.append(cache.comp_k.view()[:, :, :visible])
        values.append(cache.comp_v.view()[:, :, :visible])
    if not keys:  # projection only, query in the first chunk: no key at all
        return torch.zeros_like(q)
    scores = torch.cat([torch.matmul(qc, kk.to(cd).transpose(-1, -2)) for kk in keys], dim=-1) * scale
    probs = torch.softmax(scores, dim=-1)
    out, start = None, 0
    for vv in values:
        part = torch.matmul(probs[..., start:start + vv.shape[2]], vv.to(cd))
        out = part if out is None else out + part
        start += vv.shape[2]
    return out.to(q.dtype)


def _long_short_step(attn, q, k, v, proj_logits, cache: LongShortLayerCache, positions) -> torch.Tensor:
    t0, m = cache.length, q.shape[2]
    w, l, r = cache.window, cache.segment_len, cache.rank
    rotary = attn.rotary
    q_att = q if rotary is None else rotary.rotate(q, positions)
    if m == 1:  # a decode step
        if w > 0:
            k_new, v_new = _norm(attn.local_norm, k), _norm(attn.local_norm, v)
            if rotary is not None:
                k_new = rotary.rotate(k_new, positions)
            cache.write_window(k_new, v_new, t0)
        if r > 0:
            _absorb_into_chunks(attn, cache, k, v, proj_logits)
        cache.length = t0 + 1
        return _one_query_attention(q_att, cache, t0)
    k_local = v_local = k_new = v_new = None
    halo = 0
    if w > 0:
        k_new, v_new = _norm(attn.local_norm, k), _norm(attn.local_norm, v)
        if rotary is not None:
            k_new = rotary.rotate(k_new, positions)
        halo = min(t0, w - 1)
        if halo:
            hk, hv = cache.window_history(halo)
            k_local, v_local = torch.cat([hk, k_new], dim=2), torch.cat([hv, v_new], dim=2)
        else:
            k_local, v_local = k_new, v_new
    k_glob = v_glob = None
    if r > 0:
        _absorb_into_chunks(attn, cache, k, v, proj_logits)
        if cache.comp_k.length:
            k_glob, v_glob = cache.comp_k.view(), cache.comp_v.view()
    if w == 0 and k_glob is None:  # projection only, no finished chunk yet: no query sees any key
        ctx = torch.zeros_like(q)
    else:
        ctx = long_short_attention_shard(q_att, k_local, v_local, k_glob, v_glob, window=w, causal=True,
                                         segment_len=l if r > 0 else 0, projection_rank=r, q_offset=t0,
                                         halo_left=halo, backend=attn.config.attention_backend)
    if w > 0:
        cache.write_window(k_new, v_new, t0)
    cache.length = t0 + m
    return ctx


def _full_step(attn, q, k, v, cache: FullLayerCache, positions) -> torch.Tensor:
    t0, m = cache.length, q.shape[2]
    if attn.rotary is not None:
        q, k = attn.rotary.rotate(q, positions), attn.rotary.rotate(k, positions)
    cache.k.append(k)
    cache.v.append(v)
    cache.length = t0 + m
    if t0 == 0:  # the same call as the full forward (causal flash SDPA, no mask)
        return full_attention(q, k, v, causal=True)
    keys, values = cache.k.view(), cache.v.view()
    if m == 1:  # one query sees every cached key
        return F.scaled_dot_product_attention(q, keys, values)
    return full_attention_at(q, keys, values, query_positions=positions, causal=True)


def attention_step(attn, x: torch.Tensor, cache) -> torch.Tensor:
    """One layer's self-attention of new tokens ``x`` (B, m, hidden) against (and into) its cache."""
    b, m, _ = x.shape
    mixed = attn.qkvp(x).view(b, m, attn.num_heads, attn.per_head).transpose(1, 2)  # (B, H, m, 3D + r)
    d = attn.head_dim
    q, k, v = mixed[..., :d], mixed[..., d:2 * d], mixed[..., 2 * d:3 * d]
    positions = torch.arange(cache.length, cache.length + m, device=x.device)
    if isinstance(cache, FullLayerCache):
        ctx = _full_step(attn, q, k, v, cache, positions)
    else:
        proj = mixed[..., 3 * d:] if cache.rank > 0 else None
        ctx = _long_short_step(attn, q, k, v, proj, cache, positions)
    return attn.dense(ctx.transpose(1, 2).reshape(b, m, attn.num_heads * d))


def check_positions(model, first: int, count: int) -> None:
    """Refuse positions past a learned position table (RoPE and no positions have no limit)."""
    table = model.embedding.position_embeddings
    if table is not None and first + count > table.num_embeddings:
        raise ValueError(f"position {first + count - 1} is beyond the model's learned position table "
                         f"(--max-position-embeddings {table.num_embeddings}); generate fewer tokens or use a "
                         f"shorter prompt")


def check_single_process(model) -> None:
    """Generation runs on a whole (merged) model: every head in this process."""
    attn = model.layers[0].self_attention
    if attn.num_heads != model.config.num_attention_heads:
        raise ValueError(f"generation needs a single-process model with all {model.config.num_attention_heads} "
                         f"heads, this one holds {attn.num_heads} (tensor parallel shard); merge the checkpoint "
                         f"first (tools/convert_checkpoint.py --consolidated-dir)")


@torch.no_grad()
def forward_step(model, tokens: torch.Tensor, cache: DecodingCache, *, all_logits: bool = False) -> torch.Tensor:
    """Run ``tokens`` (B, m) at positions ``cache.length ..`` through ``model``, extending ``cache``.

    Returns logits (B, m, vocab) with ``all_logits``, else those of the last token only, (B, 1, vocab).
    Dropout is never applied (inference semantics whatever ``model.training`` says).
    """
    if tokens.dim() != 2 or tokens.shape[0] != cache.batch or tokens.shape[1] == 0:
        raise ValueError(f"tokens must be (batch={cache.batch}, m >= 1), got shape {tuple(tokens.shape)}")
    t0, m = cache.length, tokens.shape[1]
    check_positions(model, t0, m)
    emb = model.embedding
    h = emb.word_embeddings(tokens)
    if emb.position_embeddings is not None:
        h = h + emb.position_embeddings(torch.arange(t0, t0 + m, device=tokens.device)).unsqueeze(0)
    for layer, layer_cache in zip(model.layers, cache.layers):
        h = h + attention_step(layer.self_attention, layer.input_layernorm(h), layer_cache)
        h = h + layer.mlp(layer.post_attention_layernorm(h))
    if not all_logits:
        h = h[:, -1:]
    return model.lm_logits(model.final_layernorm(h))


def prefill(model, tokens: torch.Tensor, cache: DecodingCache, *, all_logits: bool = False,
            chunk_size: Optional[int] = None) -> torch.Tensor:
    """``forward_step`` over a prompt, in one pass or in pieces of ``chunk_size`` tokens (same cache after)."""
    if not chunk_size or chunk_size >= tokens.shape[1]:
        return forward_step(model, tokens, cache, all_logits=all_logits)
    outs = [forward_step(model, tokens[:, i:i + chunk_size], cache, all_logits=all_logits)
            for i in range(0, tokens.shape[1], chunk_size)]
    return torch.cat(outs, dim=1) if all_logits else outs[-1]
