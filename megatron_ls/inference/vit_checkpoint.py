"""ViT-LS / ViL-LS checkpoints: merge any TP x PP training checkpoint, consolidate it, load it for evaluation.

A vision training checkpoint's metadata holds ``vision`` (the ``VisionConfig``). Pipeline files are
``layer_00`` = ``embedding``, ``layer_01..L`` = ``layers.i``, ``layer_{L+1}`` = ``head`` (``vit_pipeline.py``).
Which dimension a parameter is split along under TP comes from the model's own ``partition_dim`` tags, as in
the GPT converter, whose shard reading and merge code this reuses. A consolidated directory is the GPT one
(``model.safetensors`` + ``config.json``) with the vision settings in its metadata.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
from torch import nn

from megatron_ls.config import TransformerConfig, transformer_config_from_dict
from megatron_ls.inference.checkpoint_io import InferenceCheckpointError, load_consolidated, save_consolidated
from megatron_ls.model.vit_config import VisionConfig, vision_config_from_dict


def build_vision_model(config: TransformerConfig, vision: VisionConfig) -> nn.Module:
    """The single-process ViT-LS or ViL-LS for these settings."""
    if vision.vil_stages:
        from megatron_ls.model.vil import ViLModel

        return ViLModel(config, vision)
    from megatron_ls.model.vit import ViTModel

    return ViTModel(config, vision)


def vision_partition_dims(config: TransformerConfig, vision: VisionConfig) -> dict[str, Optional[int]]:
    """``{parameter name: TP partition dim or None}`` for the vision model of these settings."""
    from megatron_ls.inference.convert import model_partition_dims

    return model_partition_dims(build_vision_model(config, vision))


def _pipeline_prefix(index: int, num_layers: int) -> str:
    if index == 0:
        return "embedding."
    return f"layers.{index - 1}." if index <= num_layers else "head."


def is_vision_checkpoint(path: str) -> bool:
    """True for a vision training checkpoint (``latest`` + metadata with vision settings) or consolidated dir."""
    from megatron_ls.checkpoint_files import CheckpointError, read_latest_tag, read_metadata
    from megatron_ls.inference.checkpoint_io import CONFIG_FILE

    if os.path.isfile(os.path.join(path, CONFIG_FILE)):
        import json

        with open(os.path.join(path, CONFIG_FILE)) as fh:
            return "vision" in json.load(fh).get("metadata", {})
    try:
        return "vision" in read_metadata(path, read_latest_tag(path))
    except (CheckpointError, OSError, ValueError):
        return False


def read_vision_checkpoint(load_dir: str) -> tuple[TransformerConfig, VisionConfig, dict, dict]:
    """``(config, vision, full weights, metadata)`` of a vision training checkpoint saved at any TP x PP."""
    from megatron_ls.checkpoint_files import read_latest_tag, read_metadata
    from megatron_ls.inference.convert import merge_tp_shards, read_layout_shards

    tag = read_latest_tag(load_dir)
    metadata = read_metadata(load_dir, tag)
    if "vision" not in metadata:
        raise InferenceCheckpointError(f"{load_dir}: not a vision checkpoint (its metadata has no vision settings)")
    config = transformer_config_from_dict(metadata["args"]["model"])
    vision = vision_config_from_dict(metadata["vision"])
    shards = read_layout_shards(load_dir, tag, metadata, config.num_layers, _pipeline_prefix)
    full = merge_tp_shards(shards, vision_partition_dims(config, vision))
    return config, vision, full, metadata


def consolidate_vision_checkpoint(load_dir: str, out_dir: str) -> str:
    """Write ``model.safetensors`` + ``config.json`` (vision settings in its metadata) from any layout."""
    config, vision, full, metadata = read_vision_checkpoint(load_dir)
    save_consolidated(out_dir, config, full, {"iteration": metadata.get("iteration"), "vision": metadata["vision"],
                                              "image_data": metadata.get("image_data", {}),
                                              "source": os.path.abspath(load_dir)})
    return out_dir


def load_vision_model(path: str, device: str | torch.device = "cpu") -> tuple[nn.Module, VisionConfig, dict]:
    """``(model in eval mode, vision settings, metadata)`` from a consolidated or any-layout training checkpoint."""
    from megatron_ls.inference.checkpoint_io import CONFIG_FILE

    if os.path.isfile(os.path.join(path, CONFIG_FILE)):
        config, state, metadata = load_consolidated(path)
        if "vision" not in metadata:
            raise InferenceCheckpointError(f"{path}: a consolidated checkpoint without vision settings")
        vision = vision_config_from_dict(metadata["vision"])
    else:
        config, vision, state, metadata = read_vision_checkpoint(path)
    config.hidden_dropout = config.attention_dropout = 0.0
    model = build_vision_model(config, vision)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise InferenceCheckpointError(f"{path}: weights do not match the model (missing {missing[:5]}, "
                                       f"unexpected {unexpected[:5]})")
    return model.to(device).eval(), vision, metadata
