"""ViL-LS: the paper's multi-scale Long-Short vision transformer (stages with patch merging between them).

Each stage (``vit_config.StageSpec``) is a ``PatchEmbedding`` — the first on the image, later ones a strided
convolution over the previous stage's patch map (patch merging; the previous CLS token is dropped and the stage
gets its own) — followed by ``blocks`` pre-LN layers with the stage's width, heads, window, projection rank and
attention kind (``s0`` stages use full attention, as the released medium/base configs do in stages 3-4).
Drop-path grows linearly over all blocks. The head classifies the last stage's CLS token, or the mean of its
tokens when that stage has none (the released medium layout). Runs with DP and ZeRO 0-3.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch
from torch import nn

from megatron_ls.config import ConfigError, TransformerConfig
from megatron_ls.model.init_rng import LAYER_SALT, seeded_init
from megatron_ls.model.vit import (ClassifierHead, PatchEmbedding, VisionTransformerLayer, classification_loss,
                                  drop_path_rates, run_layers)
from megatron_ls.model.vit_config import StageSpec, VisionConfig

STAGE_EMBED_SALT = 500


def stage_config(config: TransformerConfig, stage: StageSpec, first_block: int, grid: tuple[int, int]
                 ) -> TransformerConfig:
    """The ``TransformerConfig`` of one stage; ``--full-attention-layers`` counts blocks over all stages."""
    full = tuple(range(stage.blocks)) if not stage.long_short else tuple(
        i - first_block for i in config.full_attention_layers if first_block <= i < first_block + stage.blocks)
    return dataclasses.replace(config, hidden_size=stage.width, num_attention_heads=stage.heads,
                               ffn_hidden_size=4 * stage.width, num_layers=stage.blocks,
                               window_size=stage.window, projection_rank=stage.rank, full_attention_layers=full,
                               seq_length=stage.cls_tokens + grid[0] * grid[1], max_position_embeddings=None)


def stage_grids(vision: VisionConfig) -> list[tuple[int, int]]:
    h, w = vision.img_h, vision.img_w
    grids = []
    for st in vision.stages():
        h, w = h // st.patch, w // st.patch
        grids.append((h, w))
    return grids


class ViLModel(nn.Module):
    """Multi-scale ViL-LS. ``model(images) -> logits``; ``model(images, labels) -> per-image losses``."""

    def __init__(self, config: TransformerConfig, vision: VisionConfig) -> None:
        super().__init__()
        if not vision.vil_stages:
            raise ConfigError("ViLModel needs --vil-stages (a preset name or an architecture string)")
        vision.validate()
        if config.causal:
            raise ConfigError("ViL-LS is bidirectional: config.causal must be False")
        self.config, self.vision = config, vision
        stages, grids = vision.stages(), stage_grids(vision)
        total = sum(st.blocks for st in stages)
        bad = [i for i in config.full_attention_layers if not 0 <= i < total]
        if bad:
            raise ConfigError(f"--full-attention-layers {bad} out of range for the {total} ViL blocks")
        rates = drop_path_rates(vision.drop_path_rate, total)
        self.stage_configs: list[TransformerConfig] = []
        self.embeddings, self.stages = nn.ModuleList(), nn.ModuleList()
        in_channels, in_grid, in_cls, block = vision.num_channels, None, 0, 0
        for s, (st, grid) in enumerate(zip(stages, grids)):
            cfg = stage_config(config, st, block, grid)
            cfg.validate()
            self.stage_configs.append(cfg)
            with seeded_init(config.seed, STAGE_EMBED_SALT + s):
                self.embeddings.append(PatchEmbedding(in_channels, st.width, st.patch, grid, st.cls_tokens,
                                                      st.absolute_position, cfg.layernorm_epsilon,
                                                      cfg.hidden_dropout, in_grid, in_cls))
            rpe = vision.relative_position_bias and not st.absolute_position
            self.stages.append(nn.ModuleList(
                VisionTransformerLayer(cfg, i, grid, st.cls_tokens, rpe, vision.cls_attention,
                                       rates[block + i], salt=LAYER_SALT + block + i) for i in range(st.blocks)))
            in_channels, in_grid, in_cls, block = st.width, grid, st.cls_tokens, block + st.blocks
        self.head = ClassifierHead(stages[-1].width, vision.num_classes, stages[-1].cls_tokens,
                                   config.layernorm_epsilon, config.seed)

    def forward(self, images: torch.Tensor, labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        h = images
        for embedding, layers in zip(self.embeddings, self.stages):
            h = run_layers(layers, embedding(h), self.config.recompute_activations and self.training)
        logits = self.head(h)
        return logits if labels is None else classification_loss(logits, labels)


def _layer_flops(cfg: TransformerConfig, layer: int, tokens: int, cls_tokens: int) -> float:
    """Forward FLOPs of one block over ``tokens`` tokens (matmuls; attention by the keys each query sees)."""
    from megatron_ls.ops.checks import window_extension

    h, heads = cfg.hidden_size, cfg.num_attention_heads
    full = cfg.layer_uses_full_attention(layer)
    r = 0 if full else cfg.projection_rank
    if full:
        keys = tokens
    else:
        w = cfg.window_size
        keys = (w + 2 * window_extension(w, cfg.window_extension)) ** 2 if w else 0
        keys += cls_tokens + r
    per_token = 2 * h * (3 * h + heads * r) + 2 * h * h + 4 * h * cfg.ffn_hidden_size + 4 * keys * h + 4 * r * h
    return float(per_token * tokens)


def training_flops_per_image(config: TransformerConfig, vision: VisionConfig) -> float:
    """Training FLOPs (3 x forward) of one image, single- or multi-scale, embeddings and head included."""
    if not vision.vil_stages:
        kernel = vision.patch_embed_kernel or vision.patch_dim
        stages = [(config, vision.grid, vision.cls_tokens, vision.num_channels * kernel ** 2)]
        width = config.hidden_size
    else:
        stages, block, in_ch = [], 0, vision.num_channels
        for st, grid in zip(vision.stages(), stage_grids(vision)):
            stages.append((stage_config(config, st, block, grid), grid, st.cls_tokens, in_ch * st.patch ** 2))
            block, in_ch = block + st.blocks, st.width
        width = stages[-1][0].hidden_size
    forward = 2.0 * width * vision.num_classes
    for cfg, (gh, gw), cls, patch_in in stages:
        forward += 2.0 * patch_in * cfg.hidden_size * gh * gw
        forward += sum(_layer_flops(cfg, i, cls + gh * gw, cls) for i in range(cfg.num_layers))
    return 3.0 * forward
