"""Consolidated (inference) checkpoints: ``model.safetensors`` + ``config.json``, and loading a GPT-LS for inference.

A consolidated directory holds the FULL (unsharded) weights under ``GPTModel``'s parameter names, in safetensors
(no pickle at all), plus the ``TransformerConfig`` as JSON. ``tools/convert_checkpoint.py`` writes it from any
TP/PP training checkpoint; ``load_gpt_model`` also reads a training checkpoint saved with TP=1, PP=1 directly.
"""
from __future__ import annotations

import json
import os
from typing import Optional

import torch

from megatron_ls.config import TransformerConfig, config_to_dict, transformer_config_from_dict

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


class InferenceCheckpointError(ValueError):
    """A checkpoint that cannot be used for inference; the message names the path."""


def _atomic_replace(tmp: str, path: str) -> None:
    os.replace(tmp, path)


def save_consolidated(directory: str, config: TransformerConfig, state_dict: dict,
                      metadata: Optional[dict] = None) -> None:
    """Write full weights + config; files appear under their final names only when complete."""
    from safetensors.torch import save_file

    os.makedirs(directory, exist_ok=True)
    tensors = {name: t.detach().to("cpu").contiguous() for name, t in state_dict.items()}
    tmp_weights = os.path.join(directory, "." + WEIGHTS_FILE + ".tmp")
    save_file(tensors, tmp_weights, metadata={"format": "megatron_ls-consolidated-v1"})
    _atomic_replace(tmp_weights, os.path.join(directory, WEIGHTS_FILE))
    payload = {"transformer_config": config_to_dict(config), "metadata": metadata or {}}
    tmp_config = os.path.join(directory, "." + CONFIG_FILE + ".tmp")
    with open(tmp_config, "w") as fh:
        json.dump(payload, fh, indent=2)
    _atomic_replace(tmp_config, os.path.join(directory, CONFIG_FILE))


def load_consolidated(directory: str) -> tuple[TransformerConfig, dict, dict]:
    """(config, full state dict, metadata) from a consolidated directory."""
    from safetensors.torch import load_file

    config_path = os.path.join(directory, CONFIG_FILE)
    weights_path = os.path.join(directory, WEIGHTS_FILE)
    for path in (config_path, weights_path):
        if not os.path.isfile(path):
            raise InferenceCheckpointError(f"{directory}: {os.path.basename(path)} is missing "
                                           f"(not a consolidated checkpoint; see tools/convert_checkpoint.py)")
    try:
        with open(config_path) as fh:
            payload = json.load(fh)
        config = transformer_config_from_dict(payload["transformer_config"])
        state = load_file(weights_path)
    except Exception as exc:  # noqa: BLE001 - corrupt JSON / safetensors header
        raise InferenceCheckpointError(f"{directory}: cannot read consolidated checkpoint: {exc}") from exc
    return config, state, payload.get("metadata", {})


def load_training_checkpoint_tp1(load_dir: str) -> tuple[TransformerConfig, dict, dict]:
    """(config, state dict, metadata) from a training checkpoint saved with TP=1 and PP=1 (any ZeRO stage < 3)."""
    from megatron_ls.checkpoint_files import read_latest_tag, read_metadata, safe_torch_load

    tag = read_latest_tag(load_dir)
    metadata = read_metadata(load_dir, tag)
    layout = metadata.get("layout", {})
    if layout.get("tensor_model_parallel_size", 1) != 1 or layout.get("pipeline_model_parallel_size", 1) != 1:
        raise InferenceCheckpointError(f"{load_dir}: saved with TP={layout.get('tensor_model_parallel_size')} "
                                       f"PP={layout.get('pipeline_model_parallel_size')}; merge it first with "
                                       f"tools/convert_checkpoint.py --target-tensor-parallel-size 1 ...")
    if metadata["args"]["parallel"].get("zero_stage", 0) == 3:
        raise InferenceCheckpointError(f"{load_dir}: ZeRO-3 checkpoints hold partitioned weights; convert them "
                                       f"with tools/convert_checkpoint.py first")
    path = os.path.join(load_dir, tag, "mp_rank_00_model_states.pt")
    state = safe_torch_load(path)["module"]
    config = transformer_config_from_dict(metadata["args"]["model"])
    return config, state, metadata


def load_gpt_model(path: str, device: str | torch.device = "cpu", dtype: Optional[torch.dtype] = None):
    """A single-process ``GPTModel`` in eval mode from a consolidated or a TP1/PP1 training checkpoint."""
    if os.path.isfile(os.path.join(path, CONFIG_FILE)):
        config, state, metadata = load_consolidated(path)
    else:
        config, state, metadata = load_training_checkpoint_tp1(path)
    return build_gpt_model(config, state, path, device, dtype), config, metadata


def build_gpt_model(config: TransformerConfig, state: dict, path: str, device: str | torch.device = "cpu",
                    dtype: Optional[torch.dtype] = None):
    """A single-process ``GPTModel`` in eval mode, without dropout, holding the full weights ``state``."""
    from megatron_ls.model import GPTModel

    config.hidden_dropout = config.attention_dropout = 0.0
    config.recompute_activations = False
    model = GPTModel(config)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise InferenceCheckpointError(f"{path}: weights do not match the model (missing {list(missing)[:5]}, "
                                       f"unexpected {list(unexpected)[:5]})")
    return model.to(device=device, dtype=dtype).eval()
