"""Hugging Face model of an exported megatron_ls GPT-LS: ``AutoModelForCausalLM`` with ``trust_remote_code=True``.

Self-contained: imports only ``torch`` and ``transformers``. The maths is megatron_ls' (docs/attention.md there):
pre-LN layers; a Long-Short layer lets query ``t`` attend, in one softmax, to the window keys ``t-w+1 .. t``
(after LN_L) and to the ``r`` compressed keys of every chunk ``c < t // l`` (per-chunk softmax of the projection
logits over the chunk's raw keys/values, then LN_G); a full-attention layer is ordinary causal attention.

Queries are processed in blocks of ``config.attention_block_size``, each scoring only the keys it can see, so a
prompt is prefilled in memory linear in its length. ``generate()`` keeps a :class:`LongShortCache` (window ring +
compressed chunks + partial chunk), never a full KV cache, for Long-Short layers. A 0 in ``attention_mask``
removes that token altogether (no position, never attended), so left- or right-padded rows give exactly the
logits of the unpadded row at their real tokens (padding slots get the logits of a zero attention output).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from .cache_megatron_ls import LongShortCache, LongShortKeys, TokenLayout
from .configuration_megatron_ls import MegatronLSConfig

Tensor = torch.Tensor


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Softmaxes and norms run in fp32 for half inputs, in the input dtype otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def masked_softmax(scores: Tensor, visible: Tensor, dim: int = -1) -> Tensor:
    """Softmax over ``dim`` of the visible entries; a slice with nothing visible gives zeros (never NaN)."""
    scores = scores.masked_fill(~visible, float("-inf"))
    top = scores.amax(dim=dim, keepdim=True)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    e = torch.exp(scores - top)
    den = e.sum(dim=dim, keepdim=True)
    return e / torch.where(den > 0, den, torch.ones_like(den))


def rotate(x: Tensor, positions: Tensor, dim: int, base: float) -> Tensor:
    """RoPE (Megatron's half-split convention) on the first ``dim`` channels of ``x`` (B, H, N, D); token ``i``
    of row ``b`` sits at ``positions[b, i]``."""
    half = dim // 2
    inv_freq = base ** (-torch.arange(half, dtype=torch.float64, device=x.device) * 2.0 / dim)
    angles = positions.to(device=x.device, dtype=torch.float64)[:, None, :, None] * inv_freq
    cd = compute_dtype(x.dtype)
    cos, sin, xc = angles.cos().to(cd), angles.sin().to(cd), x.to(cd)
    x1, x2, rest = xc[..., :half], xc[..., half:dim], xc[..., dim:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest], dim=-1).to(x.dtype)


class DualLayerNorm(nn.Module):
    """DualLN LayerNorm on (B, H, N, D) keys/values: statistics over all heads' width of a key (``full``, the
    released code) or per head; affine parameters (H, D)."""

    def __init__(self, heads: int, head_dim: int, eps: float, full_width: bool) -> None:
        super().__init__()
        self.eps, self.full_width = eps, full_width
        self.weight = nn.Parameter(torch.ones(heads, head_dim))
        self.bias = nn.Parameter(torch.zeros(heads, head_dim))

    def forward(self, x: Tensor) -> Tensor:
        b, h, n, d = x.shape
        cd = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
        xc = x.to(cd)
        if self.full_width:
            y = F.layer_norm(xc.transpose(1, 2).reshape(b, n, h * d), (h * d,), eps=self.eps)
            y = y.view(b, n, h, d).transpose(1, 2)
        else:
            y = F.layer_norm(xc, (d,), eps=self.eps)
        return (y * self.weight.to(cd)[None, :, None, :] + self.bias.to(cd)[None, :, None, :]).to(x.dtype)


def attend_blocks(q: Tensor, layout: TokenLayout, block: int, keys_for_block) -> Tensor:
    """Blockwise attention: ``keys_for_block(j0, j1, tpos)`` gives (keys, values, visible (B, 1|H, T, K)) for
    the aligned queries ``j0 .. j1`` at positions ``tpos`` (B, T); one softmax per query over them."""
    cd = compute_dtype(q.dtype)
    scale = q.shape[-1] ** -0.5
    out = []
    positions = layout.positions
    for j0 in range(0, q.shape[2], block):
        j1 = min(q.shape[2], j0 + block)
        k, v, visible = keys_for_block(j0, j1, positions[:, j0:j1])
        if k.shape[2] == 0:  # nothing visible yet (projection only, before the first chunk ends)
            out.append(q.new_zeros(q.shape[0], q.shape[1], j1 - j0, v.shape[-1], dtype=cd))
            continue
        scores = torch.matmul(q[:, :, j0:j1].to(cd), (k.to(cd) * scale).transpose(-1, -2))
        out.append(torch.matmul(masked_softmax(scores, visible), v.to(cd)))
    if not out:
        return q.new_zeros(q.shape)
    return torch.cat(out, dim=2).to(q.dtype)


class MegatronLSAttention(nn.Module):
    """Long-Short or (``config.full_attention_layers``) full causal self-attention of one layer.

    One fused linear gives per head ``[q | k | v | r projection logits]`` (heads contiguous), as megatron_ls' TP
    layer does; the output projection is ``dense``.
    """

    def __init__(self, config: MegatronLSConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.full = config.is_full_attention(layer_idx)
        self.heads, self.head_dim = config.num_attention_heads, config.head_dim
        self.rank = 0 if self.full else config.projection_rank
        self.window = 0 if self.full else config.window_size
        self.segment_length = config.segment_length
        self.block = config.attention_block_size
        self.per_head = 3 * self.head_dim + self.rank
        self.qkvp = nn.Linear(config.hidden_size, self.heads * self.per_head, bias=config.add_bias_linear)
        self.dense = nn.Linear(self.heads * self.head_dim, config.hidden_size, bias=config.add_bias_linear)
        self.rotary_dim = 0
        if config.position_embedding_type == "rope":
            self.rotary_dim = int(self.head_dim * config.rotary_percent) // 2 * 2
        self.rotary_base = config.rotary_base
        ls = not self.full and config.dual_ln
        norm_args = (self.heads, self.head_dim, config.layer_norm_epsilon, config.dual_ln_scope == "full")
        self.local_norm = DualLayerNorm(*norm_args) if ls and self.window else None
        self.global_norm = DualLayerNorm(*norm_args) if ls and self.rank else None

    def _rope(self, x: Tensor, positions: Tensor) -> Tensor:
        return rotate(x, positions, self.rotary_dim, self.rotary_base) if self.rotary_dim else x

    def forward(self, x: Tensor, layout: TokenLayout, cache_layer) -> Tensor:
        b, n, _ = x.shape
        d = self.head_dim
        mixed = layout.to_aligned(self.qkvp(x).view(b, n, self.heads, self.per_head).transpose(1, 2))
        q, k, v = mixed[..., :d], mixed[..., d:2 * d], mixed[..., 2 * d:3 * d]
        positions = layout.positions
        q = self._rope(q, positions)
        if self.full:
            keys, values = cache_layer.update(self._rope(k, positions), v, layout=layout)
            ctx = attend_blocks(q, layout, self.block, lambda j0, j1, tpos: self._full_keys(keys, values, tpos))
        else:
            kn = vn = None
            if self.window:
                kn = self._rope(self.local_norm(k) if self.local_norm else k, positions)
                vn = self.local_norm(v) if self.local_norm else v
            held = cache_layer.update(kn, vn, raw_keys=k, raw_values=v, logits=mixed[..., 3 * d:] if self.rank
                                      else None, layout=layout, compress=self._compress)
            ctx = attend_blocks(q, layout, self.block,
                                lambda j0, j1, tpos: self._long_short_keys(kn, vn, held, j0, j1, tpos))
        ctx = layout.to_slots(ctx)
        return self.dense(ctx.transpose(1, 2).reshape(b, n, self.heads * d))

    @staticmethod
    def _full_keys(keys: Tensor, values: Tensor, tpos: Tensor):
        """Every cached position up to the block's last query; key ``p`` visible from ``t`` when ``p <= t``."""
        upto = int(tpos.max()) + 1 if tpos.numel() else 0
        p = torch.arange(upto, device=keys.device)
        return keys[:, :, :upto], values[:, :, :upto], (p[None, None, :] <= tpos[:, :, None])[:, None]

    def _long_short_keys(self, kn: Optional[Tensor], vn: Optional[Tensor], held: LongShortKeys, j0: int, j1: int,
                         tpos: Tensor):
        """[earlier ring | this call's window slab | visible compressed keys] for aligned queries j0 .. j1."""
        w, l, r = self.window, self.segment_length, self.rank
        b, t = tpos.shape
        ks, vs, masks = [], [], []
        if w:
            if j0 < w - 1:  # only the first w-1 queries of a call can see earlier calls' window keys
                rp = held.ring_pos[:, None, :]
                ks.append(held.ring_k)
                vs.append(held.ring_v)
                masks.append((rp >= 0) & (rp > tpos[:, :, None] - w))
            s0 = max(0, j0 - w + 1)
            q_idx = torch.arange(j0, j1, device=tpos.device)[:, None]
            k_idx = torch.arange(s0, j1, device=tpos.device)[None, :]
            ks.append(kn[:, :, s0:j1])
            vs.append(vn[:, :, s0:j1])
            masks.append(((k_idx <= q_idx) & (k_idx > q_idx - w)).expand(b, t, j1 - s0))
        if r and held.comp_k.shape[2]:
            visible_chunks = int((tpos[:, -1] // l).max())  # chunks the block's last queries may see
            g = min(held.comp_k.shape[2], visible_chunks * r)
            chunk_of = torch.arange(g, device=tpos.device) // r
            ks.append(held.comp_k[:, :, :g])
            vs.append(held.comp_v[:, :, :g])
            masks.append(chunk_of[None, None, :] < (tpos // l)[:, :, None])
        if not ks:  # projection only, no chunk finished yet: nothing to see
            empty = held.comp_k[:, :, :0]
            return empty, empty, torch.zeros(b, 1, t, 0, dtype=torch.bool, device=tpos.device)
        return torch.cat(ks, dim=2), torch.cat(vs, dim=2), torch.cat(masks, dim=2)[:, None]

    def _compress(self, k: Tensor, v: Tensor, logits: Tensor, keep: Tensor, chunk_ids: Tensor):
        """``r`` keys/values per chunk (B, H, K·r, D): per-chunk softmax of the logits over its raw keys/values,
        then LN_G, then (RoPE) rotation by the chunk's last position."""
        b, h, c, l, d = k.shape
        cd = compute_dtype(k.dtype)
        p = masked_softmax(logits.to(cd), keep[:, None, :, :, None], dim=3)  # (B, H, K, l, r)
        kbar = torch.einsum("bhclr,bhcld->bhcrd", p, k.to(cd)).reshape(b, h, c * self.rank, d).to(k.dtype)
        vbar = torch.einsum("bhclr,bhcld->bhcrd", p, v.to(cd)).reshape(b, h, c * self.rank, d).to(v.dtype)
        if self.global_norm is not None:
            kbar, vbar = self.global_norm(kbar), self.global_norm(vbar)
        last = ((chunk_ids + 1) * l - 1).repeat_interleave(self.rank, dim=1)
        return self._rope(kbar, last), vbar


class MegatronLSMLP(nn.Module):
    """hidden -> intermediate -> GELU (erf) -> hidden; with ``swiglu``: silu(gate(x)) * up(x) -> hidden."""

    def __init__(self, config: MegatronLSConfig) -> None:
        super().__init__()
        bias = config.add_bias_linear
        self.dense_h_to_4h = nn.Linear(config.hidden_size, config.intermediate_size, bias=bias)
        self.dense_h_to_4h_gate = (nn.Linear(config.hidden_size, config.intermediate_size, bias=bias)
                                   if config.swiglu else None)
        self.dense_4h_to_h = nn.Linear(config.intermediate_size, config.hidden_size, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        if self.dense_h_to_4h_gate is not None:
            return self.dense_4h_to_h(F.silu(self.dense_h_to_4h_gate(x)) * self.dense_h_to_4h(x))
        return self.dense_4h_to_h(F.gelu(self.dense_h_to_4h(x)))


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight, normalised in fp32 for half inputs (as megatron_ls trains it)."""

    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(size))

    def forward(self, x: Tensor) -> Tensor:
        compute = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
        return F.rms_norm(x.to(compute), (x.shape[-1],), eps=self.eps).to(x.dtype) * self.weight.to(x.dtype)


def block_norm(config: MegatronLSConfig) -> nn.Module:
    """The pre-attention / pre-MLP / final norm: LayerNorm or RMSNorm (``normalization``)."""
    if config.normalization == "RMSNorm":
        return RMSNorm(config.hidden_size, config.layer_norm_epsilon)
    return nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon)


class MegatronLSLayer(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then x + MLP(norm(x))."""

    def __init__(self, config: MegatronLSConfig, layer_idx: int) -> None:
        super().__init__()
        self.input_layernorm = block_norm(config)
        self.self_attn = MegatronLSAttention(config, layer_idx)
        self.post_attention_layernorm = block_norm(config)
        self.mlp = MegatronLSMLP(config)

    def forward(self, x: Tensor, layout: TokenLayout, cache_layer) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), layout, cache_layer)
        return x + self.mlp(self.post_attention_layernorm(x))


class MegatronLSPreTrainedModel(PreTrainedModel):
    config_class = MegatronLSConfig
    base_model_prefix = "model"
    _no_split_modules = ["MegatronLSLayer"]
    supports_gradient_checkpointing = False


class MegatronLSModel(MegatronLSPreTrainedModel):
    """Embeddings (token + learned absolute positions unless ``rope``/``none``), layers, final norm."""

    def __init__(self, config: MegatronLSConfig) -> None:
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.embed_positions = None
        if config.position_embedding_type == "learned":
            self.embed_positions = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.layers = nn.ModuleList(MegatronLSLayer(config, i) for i in range(config.num_hidden_layers))
        self.final_layernorm = block_norm(config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    def _resolve_cache(self, past_key_values: Optional[Cache], use_cache: bool) -> Optional[LongShortCache]:
        if isinstance(past_key_values, LongShortCache):
            return past_key_values
        if past_key_values is not None and not (type(past_key_values) is DynamicCache
                                                and past_key_values.get_seq_length() == 0):
            raise TypeError(f"{type(past_key_values).__name__} cannot hold Long-Short attention state: pass a "
                            "LongShortCache or nothing (and leave generate's cache_implementation unset)")
        return LongShortCache(self.config) if use_cache else None

    def forward(self, input_ids: Optional[torch.LongTensor] = None, attention_mask: Optional[Tensor] = None,
                past_key_values: Optional[Cache] = None, inputs_embeds: Optional[Tensor] = None,
                use_cache: Optional[bool] = None, output_hidden_states: Optional[bool] = None,
                return_dict: Optional[bool] = None, **kwargs) -> BaseModelOutputWithPast:
        """``position_ids`` are ignored: positions count each row's real (mask 1) tokens, cache included."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if kwargs.get("output_attentions"):
            raise ValueError("output_attentions is not supported by Long-Short attention")
        use_cache = self.config.use_cache if use_cache is None else use_cache
        h = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        b, n = h.shape[:2]
        cache = self._resolve_cache(past_key_values, use_cache)
        work = cache if cache is not None else LongShortCache(self.config)
        layout = work.start_call(attention_mask, b, n, h.device)
        if self.embed_positions is not None:
            positions = layout.slot_positions()
            top = int(positions.masked_fill(~layout.real, 0).max()) if n else 0
            if top >= self.config.max_position_embeddings:
                raise ValueError(f"position {top} exceeds the learned position table (max_position_embeddings "
                                 f"{self.config.max_position_embeddings})")
            h = h + self.embed_positions(positions.clamp(max=self.config.max_position_embeddings - 1))
        hidden_states = [h] if output_hidden_states else None
        for layer, layer_cache in zip(self.layers, work.layers):
            h = layer(h, layout, layer_cache)
            if hidden_states is not None:
                hidden_states.append(h)
        work.end_call(layout)
        h = self.final_layernorm(h)
        if hidden_states is not None:
            hidden_states[-1] = h
        return BaseModelOutputWithPast(last_hidden_state=h, past_key_values=cache,
                                       hidden_states=tuple(hidden_states) if hidden_states else None)


class MegatronLSForCausalLM(MegatronLSPreTrainedModel, GenerationMixin):
    """GPT-LS language model; the LM head is tied to the token embedding unless ``tie_word_embeddings`` is False
    (``--untie-embeddings-and-output-weights``)."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: MegatronLSConfig) -> None:
        super().__init__(config)
        self.model = MegatronLSModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def forward(self, input_ids: Optional[torch.LongTensor] = None, attention_mask: Optional[Tensor] = None,
                past_key_values: Optional[Cache] = None, inputs_embeds: Optional[Tensor] = None,
                labels: Optional[torch.LongTensor] = None, use_cache: Optional[bool] = None,
                output_hidden_states: Optional[bool] = None, return_dict: Optional[bool] = None,
                logits_to_keep: int = 0, **kwargs) -> CausalLMOutputWithPast:
        """Logits (B, N, vocab); ``labels`` (-100 = ignored) give the mean next-token cross entropy."""
        kwargs.pop("position_ids", None)
        kwargs.pop("cache_position", None)
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, past_key_values=past_key_values,
                         inputs_embeds=inputs_embeds, use_cache=use_cache,
                         output_hidden_states=output_hidden_states, **kwargs)
        h = out.last_hidden_state
        if logits_to_keep:
            h = h[:, -logits_to_keep:]
        logits = self.lm_head(h)
        loss = None
        if labels is not None:
            shift = logits[:, :-1].float().reshape(-1, logits.shape[-1])
            loss = F.cross_entropy(shift, labels[:, 1:].reshape(-1).to(logits.device), ignore_index=-100)
        result = CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=out.past_key_values,
                                        hidden_states=out.hidden_states)
        return result if return_dict is not False else result.to_tuple()
