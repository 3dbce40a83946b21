"""ViT-LS: patch embedding, CLS token, bidirectional 2D Long-Short layers, classifier head.

``ViTModel(config, vision)``: ``model(images (B, C, H, W)) -> logits (B, classes)``; ``model(images, labels)``
-> per-image losses ``(B,)`` (integer labels, ``-1`` = padding with loss 0, or soft ``(B, classes)`` targets
from mixup / cutmix / label smoothing). Its modules ``embedding``, ``layers.i``, ``head`` are exactly the
pipeline stages' layers (``vit_pipeline.py``). The pieces (``PatchEmbedding``, ``VisionTransformerLayer``,
``ClassifierHead``) are reused by the multi-scale ViL-LS (``vil.py``).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from megatron_ls.config import TransformerConfig
from megatron_ls.model.init_rng import EMBEDDING_SALT, LAYER_SALT, seeded_init
from megatron_ls.model.transformer import MLP
from megatron_ls.model.vit_attention import VisionSelfAttention
from megatron_ls.model.vit_config import VisionConfig
from megatron_ls.parallel.random import checkpoint as rng_checkpoint

HEAD_SALT = 950
EMBED_STD = 0.02


class LearnedVector(nn.Module):
    """An additive learned tensor held as ``.bias`` (AdamW does not decay it: CLS tokens, position tables)."""

    def __init__(self, *shape: int) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.empty(*shape))
        nn.init.trunc_normal_(self.bias, std=EMBED_STD, a=-2 * EMBED_STD, b=2 * EMBED_STD)


class ChannelLayerNorm(nn.LayerNorm):
    """LayerNorm over the channels of every pixel of a (B, C, H, W) feature map (no batch statistics)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class PatchEmbedding(nn.Module):
    """Conv patches (stride ``patch``) -> LayerNorm -> [CLS tokens; patches] (+ absolute positions).

    The kernel is ``patch`` (non-overlapping, as released) unless ``kernel`` is larger: CvT's overlapping
    convolutional token embedding, padded by ``(kernel - patch + 1) // 2`` so the grid stays ``H / patch``.
    ``stem`` channels put 3x3 stride-2 convs (each + channel LayerNorm + GELU) first, Xiao et al.'s early
    convolutions; the last conv then has kernel = stride = ``patch / 2^len(stem)``.

    Input: images ``(B, C, H, W)``, or the previous stage's tokens ``(B, E' + h*w, C)`` with ``in_grid=(h, w)``
    and ``in_cls`` CLS tokens (dropped, as in the released ViL: each stage has its own CLS token) — patch merging.
    The absolute position embedding is the released one: a row table and a column table of half the width each,
    concatenated, plus one vector per CLS token.
    """

    def __init__(self, in_channels: int, width: int, patch: int, grid: tuple[int, int], cls_tokens: int,
                 absolute_position: bool, eps: float, dropout: float,
                 in_grid: Optional[tuple[int, int]] = None, in_cls: int = 0, kernel: int = 0,
                 stem: Sequence[int] = ()) -> None:
        super().__init__()
        self.patch, self.grid, self.cls_tokens = patch, tuple(grid), cls_tokens
        self.in_grid, self.in_cls = in_grid, in_cls
        self.stem = None
        if stem:
            layers: list[nn.Module] = []
            for channels in stem:
                layers += [nn.Conv2d(in_channels, channels, kernel_size=3, stride=2, padding=1),
                           ChannelLayerNorm(channels, eps=eps), nn.GELU()]
                in_channels = channels
            self.stem = nn.Sequential(*layers)
            patch //= 2 ** len(stem)
        kernel = kernel or patch
        self.proj = nn.Conv2d(in_channels, width, kernel_size=kernel, stride=patch, padding=(kernel - patch + 1) // 2)
        self.norm = nn.LayerNorm(width, eps=eps)
        self.cls_token = LearnedVector(1, cls_tokens, width) if cls_tokens else None
        self.position = None
        if absolute_position:
            if width % 2:
                raise ValueError(f"the absolute position embedding needs an even width, got {width}")
            self.position = nn.Module()
            self.position.rows = LearnedVector(grid[0], width // 2)
            self.position.cols = LearnedVector(grid[1], width // 2)
            self.position.cls = LearnedVector(cls_tokens, width) if cls_tokens else None
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.in_grid is not None:  # tokens of the previous stage -> feature map
            h, w = self.in_grid
            x = x[:, self.in_cls:].transpose(1, 2).reshape(x.shape[0], -1, h, w)
        if self.stem is not None:
            x = self.stem(x)
        x = self.proj(x)
        if tuple(x.shape[-2:]) != self.grid:
            raise ValueError(f"patch grid {tuple(x.shape[-2:])} differs from the configured {self.grid}: "
                             f"check --img-h/--img-w/--patch-dim against the images")
        x = self.norm(x.flatten(2).transpose(1, 2))
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.bias.to(x.dtype).expand(x.shape[0], -1, -1), x], dim=1)
        if self.position is not None:
            gh, gw = self.grid
            rows = self.position.rows.bias[:, None, :].expand(gh, gw, -1)
            cols = self.position.cols.bias[None, :, :].expand(gh, gw, -1)
            pos = torch.cat([rows, cols], dim=-1).reshape(gh * gw, -1)
            if self.position.cls is not None:
                pos = torch.cat([self.position.cls.bias, pos], dim=0)
            x = x + pos.to(x.dtype)
        return self.dropout(x)


def drop_path(x: torch.Tensor, rate: float, training: bool) -> torch.Tensor:
    """Stochastic depth: zero a whole residual branch per sample with probability ``rate`` (rescaled)."""
    if rate <= 0.0 or not training:
        return x
    keep = torch.empty((x.shape[0],) + (1,) * (x.dim() - 1), dtype=x.dtype).bernoulli_(1.0 - rate)
    return x * keep.to(x.device) / (1.0 - rate)


class VisionTransformerLayer(nn.Module):
    """Pre-LN block: ``x + dp(drop(attn(LN x)))``, then ``x + dp(drop(MLP(LN x)))``; drop-path ``dp``."""

    def __init__(self, config: TransformerConfig, layer_index: int, grid: tuple[int, int], cls_tokens: int,
                 relative_position_bias: bool, cls_attention: str, drop_path_rate: float = 0.0,
                 salt: Optional[int] = None) -> None:
        super().__init__()
        self.drop_path_rate = drop_path_rate
        with seeded_init(config.seed, LAYER_SALT + layer_index if salt is None else salt):
            self.input_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layernorm_epsilon)
            self.self_attention = VisionSelfAttention(config, layer_index, grid, cls_tokens,
                                                      relative_position_bias, cls_attention)
            self.post_attention_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layernorm_epsilon)
            self.mlp = MLP(config)
        self.hidden_dropout = nn.Dropout(config.hidden_dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branch = self.hidden_dropout(self.self_attention(self.input_layernorm(x)))
        x = x + drop_path(branch, self.drop_path_rate, self.training)
        branch = self.hidden_dropout(self.mlp(self.post_attention_layernorm(x)))
        return x + drop_path(branch, self.drop_path_rate, self.training)


class ClassifierHead(nn.Module):
    """Final LayerNorm, pooling (the CLS token, or the mean of all tokens), linear classifier (replicated)."""

    def __init__(self, width: int, num_classes: int, cls_tokens: int, eps: float, seed: int) -> None:
        super().__init__()
        self.cls_tokens = cls_tokens
        with seeded_init(seed, HEAD_SALT):
            self.norm = nn.LayerNorm(width, eps=eps)
            self.dense = nn.Linear(width, num_classes)
            nn.init.trunc_normal_(self.dense.weight, std=EMBED_STD, a=-2 * EMBED_STD, b=2 * EMBED_STD)
            nn.init.zeros_(self.dense.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        h = self.norm(h)
        pooled = h[:, 0] if self.cls_tokens else h.mean(dim=1)
        return self.dense(pooled)


def classification_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-image cross entropy ``(B,)``: integer labels (``-1`` -> 0) or soft targets ``(B, classes)``."""
    logits = logits.float()
    if labels.is_floating_point():
        return -(labels.float() * F.log_softmax(logits, dim=-1)).sum(dim=-1)
    return F.cross_entropy(logits, labels.long(), ignore_index=-1, reduction="none")


def vit_layer_kwargs(vision: VisionConfig) -> dict:
    return dict(grid=vision.grid, cls_tokens=vision.cls_tokens, relative_position_bias=vision.relative_position_bias,
                cls_attention=vision.cls_attention)


def drop_path_rates(rate: float, blocks: int) -> list[float]:
    """Linear from 0 to ``rate`` over the blocks (the released rule)."""
    return torch.linspace(0, rate, blocks).tolist() if blocks > 1 else [0.0] * blocks


class ViTPatchEmbedding(PatchEmbedding):
    """The single-scale model's embedding (its own seeded init stream; the first pipeline stage's first layer)."""

    def __init__(self, config: TransformerConfig, vision: VisionConfig) -> None:
        with seeded_init(config.seed, EMBEDDING_SALT):
            super().__init__(vision.num_channels, config.hidden_size, vision.patch_dim, vision.grid,
                             vision.cls_tokens, config.position_embedding_type == "learned",
                             config.layernorm_epsilon, config.hidden_dropout, kernel=vision.patch_embed_kernel,
                             stem=vision.conv_stem_channels)


def build_vit_layer(config: TransformerConfig, vision: VisionConfig, index: int) -> VisionTransformerLayer:
    rate = drop_path_rates(vision.drop_path_rate, config.num_layers)[index]
    return VisionTransformerLayer(config, index, drop_path_rate=rate, **vit_layer_kwargs(vision))


def check_vit_config(config: TransformerConfig, vision: VisionConfig) -> None:
    """Errors a ViT-LS cannot run with (besides each config's own validation)."""
    from megatron_ls.config import ConfigError
    from megatron_ls.parallel import state as ps

    if config.causal:
        raise ConfigError("ViT-LS is bidirectional: config.causal must be False")
    if config.position_embedding_type == "rope":
        raise ConfigError("--position-embedding-type rope is not supported for ViT-LS (use learned or none)")
    tp = ps.get_tensor_model_parallel_world_size() if ps.model_parallel_is_initialized() else 1
    config.validate(tp)
    vision.validate()


def run_layers(layers: nn.ModuleList, h: torch.Tensor, recompute: bool) -> torch.Tensor:
    """Apply ``layers`` in turn, recomputing each in the backward pass when ``recompute`` (and grad is on)."""
    recompute = recompute and torch.is_grad_enabled()
    for layer in layers:
        h = rng_checkpoint(layer, h) if recompute else layer(h)
    return h


class ViTModel(nn.Module):
    """Single-scale ViT-LS; an ordinary single-process module when no parallel state is initialised."""

    def __init__(self, config: TransformerConfig, vision: VisionConfig) -> None:
        super().__init__()
        check_vit_config(config, vision)
        self.config, self.vision = config, vision
        self.embedding = ViTPatchEmbedding(config, vision)
        self.layers = nn.ModuleList(build_vit_layer(config, vision, i) for i in range(config.num_layers))
        self.head = ClassifierHead(config.hidden_size, vision.num_classes, vision.cls_tokens,
                                   config.layernorm_epsilon, config.seed)

    def forward(self, images: torch.Tensor, labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        h = run_layers(self.layers, self.embedding(images), self.config.recompute_activations and self.training)
        logits = self.head(h)
        return logits if labels is None else classification_loss(logits, labels)
