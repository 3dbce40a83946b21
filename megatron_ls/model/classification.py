"""Sequence classification with a bidirectional Long-Short encoder (LRA-style), and the released "post-CLS".

``ClassificationModel``: token + learned position embeddings, ``num_layers`` bidirectional pre-LN
``TransformerLayer``s (LS or full attention per layer, padding masked everywhere), a final LayerNorm, a pooled
vector and a two-layer ReLU head (``hidden -> ffn -> classes``, the released LRA head). Pooling:

* ``mean``: the mean of the final-LN outputs over the unpadded tokens;
* ``cls``: a CLS token (id ``cls_id``) is put in front of the tokens and treated as an ordinary token; its
  output is pooled;
* ``cls_last_layer=True`` (the released code's ``--cls_last_layer``): a learned CLS vector (zeros at init, or
  normal with ``cls_init_std``) joins only in the last layer, by the rule of :func:`post_cls_layer`; its output
  is pooled.

Tensor parallel like GPT-LS (heads and MLP columns sharded; embedding vocab-parallel); the CLS vector and the
head are replicated. No context parallelism (the pooled vector needs the whole sequence).
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from megatron_ls.config import TransformerConfig
from megatron_ls.model.gpt import GPTEmbedding
from megatron_ls.model.init_rng import seeded_init
from megatron_ls.model.norms import block_norm
from megatron_ls.model.transformer import TransformerLayer
from megatron_ls.ops import long_short_attention_shard
from megatron_ls.ops.projection import project_bidirectional
from megatron_ls.parallel import state as ps
from megatron_ls.parallel.random import checkpoint as rng_checkpoint
from megatron_ls.parallel.random import get_rng_tracker

__all__ = ["ClassificationModel", "post_cls_layer", "post_cls_attention", "POOLINGS"]

POOLINGS = ("mean", "cls")
HEAD_SALT = 900  # init stream of the head and the CLS vector (layers use 1000 + i, the embedding 0)


def _model_parallel_rng():
    tracker = get_rng_tracker()
    if ps.get_tensor_model_parallel_world_size() > 1 and "model-parallel-rng" in tracker:
        return tracker.fork("model-parallel-rng")
    return contextlib.nullcontext()


def _split_heads(attn: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``x (B, N, hidden)`` through the layer's fused projection: q, k, v ``(B, H, N, D)`` and the logits."""
    b, n, _ = x.shape
    d = attn.head_dim
    mixed = attn.qkvp(x).view(b, n, attn.num_heads, attn.per_head).transpose(1, 2)
    return mixed[..., :d], mixed[..., d:2 * d], mixed[..., 2 * d:3 * d], mixed[..., 3 * d:]


def post_cls_attention(attn: nn.Module, x: torch.Tensor, cls: torch.Tensor,
                       key_padding_mask: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-head contexts ``(tokens (B, H, N, D), cls (B, H, 1, D))`` of a ``SelfAttention`` with a CLS vector.

    The released LRA rule (``attention_transformer_ls.py`` with ``cls_embed``):

    * every token query attends, in one softmax, to its window keys (LN_L-normed), the ``r`` projected keys and
      the CLS key, the last two LN_G-normed (the CLS key is one more global key; a full-attention layer adds it
      to all the token keys, raw);
    * the CLS query attends, in one softmax with scale ``1/sqrt(D)``, to its own raw key (value: its raw value)
      and to the token contexts ``C`` just computed, used as both keys and values (padding excluded):
      ``cls_ctx = p_0 v_cls + sum_j p_j C_j``.
    """
    cfg = attn.config
    pad = key_padding_mask
    d = attn.head_dim
    q, k, v, logits = _split_heads(attn, x)
    qc, kc, vc, _ = _split_heads(attn, cls)
    dropout_p = cfg.attention_dropout if attn.training else 0.0
    with _model_parallel_rng():
        if attn.full:
            keys, values = torch.cat([kc, k], dim=2), torch.cat([vc, v], dim=2)
            mask = None
            if pad is not None:
                keep = torch.cat([torch.ones_like(pad[:, :1]), ~pad], dim=1)
                mask = keep[:, None, None, :]
            ctx = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, dropout_p=dropout_p)
        else:
            k_loc = v_loc = None
            norm_l, norm_g = attn.local_norm, attn.global_norm
            if attn.window > 0 or attn.project_normed:
                k_loc = norm_l(k) if norm_l is not None else k
                v_loc = norm_l(v) if norm_l is not None else v
            k_glob, v_glob = kc, vc
            if attn.rank > 0:
                src_k, src_v = (k_loc, v_loc) if attn.project_normed else (k, v)
                kbar, vbar = project_bidirectional(src_k, src_v, logits, pad)
                k_glob, v_glob = torch.cat([kc, kbar], dim=2), torch.cat([vc, vbar], dim=2)
            if norm_g is not None:
                k_glob, v_glob = norm_g(k_glob), norm_g(v_glob)
            ctx = long_short_attention_shard(
                q, k_loc if attn.window > 0 else None, v_loc if attn.window > 0 else None, k_glob, v_glob,
                window=attn.window, causal=False, segment_len=0, projection_rank=k_glob.shape[2],
                key_padding_mask=pad, query_padding_mask=pad, dropout_p=dropout_p,
                backend=cfg.attention_backend, window_extension=cfg.window_extension)
    if pad is not None:
        ctx = ctx.masked_fill(pad[:, None, :, None], 0.0)
    scale = d ** -0.5
    own = (qc * kc).sum(dim=-1, keepdim=True) * scale  # (B, H, 1, 1)
    to_tokens = torch.matmul(qc, ctx.transpose(-1, -2)) * scale  # (B, H, 1, N)
    if pad is not None:
        to_tokens = to_tokens.masked_fill(pad[:, None, None, :], float("-inf"))
    scores = torch.cat([own, to_tokens], dim=-1)
    compute = torch.float32 if scores.dtype in (torch.float16, torch.bfloat16) else scores.dtype
    probs = torch.softmax(scores.to(compute), dim=-1).to(ctx.dtype)
    cls_ctx = probs[..., :1] * vc + torch.matmul(probs[..., 1:], ctx)
    return ctx, cls_ctx


def post_cls_layer(layer: TransformerLayer, x: torch.Tensor, cls: torch.Tensor,
                   key_padding_mask: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """One ``TransformerLayer`` with a CLS vector ``(B, 1, hidden)``; returns (tokens, cls) outputs.

    As released: the tokens go through ``input_layernorm``, the CLS vector does not; ``[cls; tokens]`` contexts
    share the output projection, the residual and the MLP.
    """
    attn = layer.self_attention
    ctx, cls_ctx = post_cls_attention(attn, layer.input_layernorm(x), cls, key_padding_mask)
    both = torch.cat([cls_ctx, ctx], dim=2)  # (B, H, 1 + N, D)
    b, h, n1, d = both.shape
    out = attn.dense(both.transpose(1, 2).reshape(b, n1, h * d))
    y = torch.cat([cls, x], dim=1) + layer.hidden_dropout(out)
    y = y + layer.hidden_dropout(layer.mlp(layer.post_attention_layernorm(y)))
    return y[:, 1:], y[:, :1]


class ClassificationModel(nn.Module):
    """Bidirectional LS encoder + pooling + head. ``model(tokens) -> logits (B, classes)``;
    ``model(tokens, labels) -> per-example cross entropy (B,)``. Padding is ``tokens == pad_id``."""

    def __init__(self, config: TransformerConfig, num_classes: int, *, pooling: str = "mean",
                 cls_last_layer: bool = False, pad_id: int = 0, cls_id: int = 1, cls_init_std: float = 0.0) -> None:
        super().__init__()
        if config.causal:
            raise ValueError("ClassificationModel is bidirectional: config.causal must be False")
        if pooling not in POOLINGS:
            raise ValueError(f"--pooling must be one of {POOLINGS}, got {pooling!r}")
        if pooling == "cls" and cls_last_layer:
            raise ValueError("--pooling cls and --cls-last-layer are two different CLS schemes: pick one")
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        if ps.model_parallel_is_initialized() and ps.get_context_parallel_world_size() > 1:
            raise ValueError("sequence classification does not support --context-parallel-size > 1")
        config.validate(ps.get_tensor_model_parallel_world_size() if ps.model_parallel_is_initialized() else 1)
        self.config = config
        self.pooling = pooling
        self.cls_last_layer = cls_last_layer
        self.pad_id, self.cls_id = pad_id, cls_id
        self.embedding = GPTEmbedding(config)
        self.layers = nn.ModuleList(TransformerLayer(config, i) for i in range(config.num_layers))
        self.final_layernorm = block_norm(config)
        with seeded_init(config.seed, HEAD_SALT):
            self.cls_embed = nn.Parameter(torch.zeros(1, 1, config.hidden_size)) if cls_last_layer else None
            if self.cls_embed is not None and cls_init_std > 0:
                # zeros (the released code) + zero biases make the CLS query, key and value exactly 0 at init
                nn.init.normal_(self.cls_embed, std=cls_init_std)
            self.head = nn.Sequential(nn.Linear(config.hidden_size, config.ffn_hidden_size), nn.ReLU(),
                                      nn.Linear(config.ffn_hidden_size, num_classes))
            for module in (self.head[0], self.head[2]):
                nn.init.normal_(module.weight, std=config.init_method_std)
                nn.init.zeros_(module.bias)

    @property
    def max_tokens(self) -> int:
        """Longest input (without the CLS token the model adds for ``cls`` pooling)."""
        return self.config.seq_length - (1 if self.pooling == "cls" else 0)

    def _layer(self, layer: nn.Module, h: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        if self.config.recompute_granularity == "full" and self.training and torch.is_grad_enabled():
            return rng_checkpoint(layer, h, mask)
        return layer(h, mask)

    def pooled(self, tokens: torch.Tensor) -> torch.Tensor:
        """The vector the head classifies, ``(B, hidden)``."""
        if tokens.dim() != 2:
            raise ValueError(f"tokens must be (batch, length), got {tuple(tokens.shape)}")
        if tokens.shape[1] > self.max_tokens:
            raise ValueError(f"{tokens.shape[1]} tokens exceed the {self.max_tokens} that --seq-length "
                             f"{self.config.seq_length} allows")
        pad = tokens == self.pad_id
        if self.pooling == "cls":
            cls_col = torch.full_like(tokens[:, :1], self.cls_id)
            tokens = torch.cat([cls_col, tokens], dim=1)
            pad = torch.cat([torch.zeros_like(pad[:, :1]), pad], dim=1)
        mask = pad if bool(pad.any()) else None
        h = self.embedding(tokens)
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            if self.cls_last_layer and i == last:
                cls = self.cls_embed.to(h.dtype).expand(h.shape[0], 1, h.shape[2])
                h, cls_out = post_cls_layer(layer, h, cls, mask)
                return self.final_layernorm(cls_out)[:, 0]
            h = self._layer(layer, h, mask)
        h = self.final_layernorm(h)
        if self.pooling == "cls":
            return h[:, 0]
        keep = (~pad).to(h.dtype)[:, :, None]
        return (h * keep).sum(dim=1) / keep.sum(dim=1).clamp(min=1.0)

    def forward(self, tokens: torch.Tensor, labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        logits = self.head(self.pooled(tokens))
        if labels is None:
            return logits
        return F.cross_entropy(logits.float(), labels, reduction="none")
