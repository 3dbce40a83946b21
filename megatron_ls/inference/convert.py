"""Re-shard GPT-LS training checkpoints between TP/PP layouts, or merge them into one consolidated file.

Model weights only: optimizer states are layout-specific (and ZeRO-partitioned), so a re-sharded checkpoint is
loaded with ``--load DIR --finetune`` (weights, fresh optimizer). Which dimension a parameter is split along comes
from the model itself (``tensor_model_parallel`` / ``partition_dim`` attributes on a TP=1 ``GPTModel``), so new
layers need no table here.
"""
from __future__ import annotations

import json
import os
from typing import Callable, Optional

import torch

from megatron_ls.config import TransformerConfig, config_to_dict, transformer_config_from_dict
from megatron_ls.inference.checkpoint_io import InferenceCheckpointError, save_consolidated

# In a PipelineModule checkpoint, layer file 0 is the embedding, 1..L the transformer layers, L+1 the final norm,
# L+2 the untied output layer if there is one (the tied LM head is not written: it shares the embedding's weight).


def _layer_prefix(layer_index: int, num_layers: int) -> Optional[str]:
    if layer_index == 0:
        return "embedding."
    if 1 <= layer_index <= num_layers:
        return f"layers.{layer_index - 1}."
    if layer_index == num_layers + 1:
        return "final_layernorm."
    if layer_index == num_layers + 2:  # --untie-embeddings-and-output-weights
        return "output_layer."
    return None


def pipeline_layer_files(config: TransformerConfig) -> int:
    """How many ``layer_LL`` files a GPT pipeline checkpoint has (the tied head is not written; an untied one is)."""
    return config.num_layers + (3 if config.untie_embeddings_and_output_weights else 2)


def partition_dims(config: TransformerConfig) -> dict[str, Optional[int]]:
    """``{parameter name: TP partition dim or None}`` for a GPTModel of this config."""
    from megatron_ls.model import GPTModel

    return model_partition_dims(GPTModel(config))


def model_partition_dims(model: torch.nn.Module) -> dict[str, Optional[int]]:
    """``{parameter name: TP partition dim or None}`` from the TP layers' own tags on a single-process model."""
    return {name: (int(p.partition_dim) if getattr(p, "tensor_model_parallel", False) else None)
            for name, p in model.named_parameters()}


def _load(path: str) -> dict:
    from megatron_ls.checkpoint_files import safe_torch_load

    return safe_torch_load(path)


def read_layout_shards(load_dir: str, tag: str, metadata: dict, num_layers: int,
                       layer_prefix: Callable[[int, int], Optional[str]], num_files: Optional[int] = None
                       ) -> list[dict]:
    """One model-named state dict per TP rank of the checkpoint ``tag``, at the TP x PP layout its metadata names.

    A pipeline checkpoint has one file per layer and TP rank; ``layer_prefix(index, num_layers)`` names where
    layer file ``index`` sits in the single-process model (``"embedding."``, ``"layers.3."``, ...); there are
    ``num_files`` of them (default ``num_layers + 2``).
    """
    layout = metadata.get("layout", {})
    tp = int(layout.get("tensor_model_parallel_size", 1))
    pp = int(layout.get("pipeline_model_parallel_size", 1))
    if int(metadata["args"]["parallel"].get("zero_stage", 0)) == 3:
        raise InferenceCheckpointError(f"{load_dir}: ZeRO-3 partitions the weights themselves; re-save without "
                                       f"ZeRO-3 (or use DeepSpeed's zero_to_fp32) before converting")
    ckpt = os.path.join(load_dir, tag)
    shards = []
    for t in range(tp):
        if pp == 1:
            shards.append(dict(_load(os.path.join(ckpt, f"mp_rank_{t:02d}_model_states.pt"))["module"]))
            continue
        merged: dict = {}
        for layer_index in range(num_files or num_layers + 2):
            path = os.path.join(ckpt, f"layer_{layer_index:02d}-model_{t:02d}-model_states.pt")
            prefix = layer_prefix(layer_index, num_layers)
            merged.update({prefix + name: tensor for name, tensor in _load(path).items()})
        shards.append(merged)
    return shards


def read_tp_shards(load_dir: str) -> tuple[TransformerConfig, list[dict], dict]:
    """(config, one GPTModel-named state dict per TP rank, metadata) of the checkpoint ``latest`` points at."""
    from megatron_ls.checkpoint_files import read_latest_tag, read_metadata

    tag = read_latest_tag(load_dir)
    metadata = read_metadata(load_dir, tag)
    config = transformer_config_from_dict(metadata["args"]["model"])
    shards = read_layout_shards(load_dir, tag, metadata, config.num_layers, _layer_prefix, pipeline_layer_files(config))
    return config, shards, metadata


def merge_tp_shards(shards: list[dict], dims: dict[str, Optional[int]]) -> dict:
    """Full weights from per-TP-rank state dicts (concatenate split parameters, take rank 0's replicated ones)."""
    missing = set(dims) - set(shards[0])
    if missing:
        raise InferenceCheckpointError(f"checkpoint lacks parameters {sorted(missing)[:5]}")
    full = {}
    for name, dim in dims.items():
        parts = [s[name] for s in shards]
        full[name] = torch.cat(parts, dim=dim) if dim is not None and len(parts) > 1 else parts[0]
    return full


def shard_for_rank(full: dict, dims: dict[str, Optional[int]], tp: int, rank: int) -> dict:
    """This TP rank's slice of every split parameter (contiguous, as the TP layers keep them)."""
    out = {}
    for name, tensor in full.items():
        dim = dims.get(name)
        if dim is None or tp == 1:
            out[name] = tensor.clone()
        else:
            if tensor.shape[dim] % tp:
                raise InferenceCheckpointError(f"{name}: dimension {dim} of size {tensor.shape[dim]} is not "
                                               f"divisible by target TP {tp} (pad the vocab with "
                                               f"--make-vocab-size-divisible-by)")
            per = tensor.shape[dim] // tp
            out[name] = tensor.narrow(dim, rank * per, per).clone()
    return out


def write_training_checkpoint(save_dir: str, config: TransformerConfig, full: dict,
                              dims: dict[str, Optional[int]], tp: int, pp: int, metadata: dict) -> str:
    """Model-only checkpoint in DeepSpeed's file layout for TP x PP (load it with ``--load --finetune``)."""
    from megatron_ls.checkpoint_files import (LATEST_FILE, METADATA_FILE, atomic_torch_save,
                                                    atomic_write_text, checkpoint_tag)

    if config.num_layers % pp:
        raise InferenceCheckpointError(f"--num-layers {config.num_layers} is not divisible by target PP {pp}")
    iteration = int(metadata.get("iteration", 0))
    tag = checkpoint_tag(iteration)
    ckpt = os.path.join(save_dir, tag)
    os.makedirs(ckpt, exist_ok=True)
    for t in range(tp):
        shard = shard_for_rank(full, dims, tp, t)
        if pp == 1:
            atomic_torch_save({"module": shard, "dp_world_size": 1, "mp_world_size": tp},
                              os.path.join(ckpt, f"mp_rank_{t:02d}_model_states.pt"))
            continue
        for layer_index in range(pipeline_layer_files(config)):
            prefix = _layer_prefix(layer_index, config.num_layers)
            layer = {k[len(prefix):]: v for k, v in shard.items() if k.startswith(prefix)}
            atomic_torch_save(layer, os.path.join(ckpt, f"layer_{layer_index:02d}-model_{t:02d}-model_states.pt"))
        for stage in range(pp):
            atomic_torch_save({"module": None, "dp_world_size": 1, "mp_world_size": tp * pp},
                              os.path.join(ckpt, f"mp_rank_{stage * tp + t:02d}_model_states.pt"))
    args = json.loads(json.dumps(metadata.get("args", {})))
    args.setdefault("parallel", {}).update(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                           context_parallel_size=1, zero_stage=0)
    args["model"] = config_to_dict(config)
    new_meta = {"format_version": 1, "iteration": iteration, "consumed_samples": int(metadata.get(
        "consumed_samples", 0)), "args": args, "weights_only": True,
        "layout": {"tensor_model_parallel_size": tp, "pipeline_model_parallel_size": pp, "data_parallel_size": 1,
                   "context_parallel_size": 1},
        "converted_from": metadata.get("layout", {})}
    atomic_write_text(os.path.join(ckpt, METADATA_FILE), json.dumps(new_meta, indent=2))
    atomic_write_text(os.path.join(save_dir, LATEST_FILE), tag + "\n")
    return ckpt


def read_full_checkpoint(load_dir: str) -> tuple[TransformerConfig, dict, dict, bool]:
    """(config, full weights, metadata, is_consolidated) of a consolidated or any-layout training checkpoint."""
    from megatron_ls.inference.checkpoint_io import CONFIG_FILE, WEIGHTS_FILE, load_consolidated

    if os.path.isfile(os.path.join(load_dir, CONFIG_FILE)) and os.path.isfile(os.path.join(load_dir, WEIGHTS_FILE)):
        config, full, metadata = load_consolidated(load_dir)
        return config, full, metadata, True
    config, shards, metadata = read_tp_shards(load_dir)
    return config, merge_tp_shards(shards, partition_dims(config)), metadata, False


def convert(load_dir: str, *, save_dir: Optional[str] = None, target_tp: int = 1, target_pp: int = 1,
            consolidated_dir: Optional[str] = None, hf_dir: Optional[str] = None,
            hf_tokenizer: Optional[dict] = None, hf_dtype: Optional[str] = None) -> dict:
    """Read a training checkpoint of any layout (or, for ``consolidated_dir``/``hf_dir``, a consolidated one);
    write a re-sharded one, a consolidated (safetensors) one and/or a Hugging Face export.

    Returns ``{kind: path}`` for what was written, plus ``"notes"`` (lines to show) for an HF export.
    """
    config, full, metadata, consolidated = read_full_checkpoint(load_dir)
    if consolidated and save_dir:
        raise InferenceCheckpointError(f"{load_dir} is a consolidated checkpoint: re-sharding (--save) needs the "
                                       f"training checkpoint it came from")
    written: dict = {}
    if save_dir:
        written["checkpoint"] = write_training_checkpoint(save_dir, config, full, partition_dims(config), target_tp,
                                                          target_pp, metadata)
    from megatron_ls.inference.loading import tokenizer_settings

    tokenizer = tokenizer_settings(metadata)  # recorded in consolidated checkpoints, for generate and --to-hf
    if consolidated_dir:
        save_consolidated(consolidated_dir, config, full, {"iteration": metadata.get("iteration"),
                                                           "source": os.path.abspath(load_dir),
                                                           "tokenizer": tokenizer})
        written["consolidated"] = consolidated_dir
    if hf_dir:
        from megatron_ls.inference.hf_export import export_hf

        tokenizer.update({k: v for k, v in (hf_tokenizer or {}).items() if v is not None})
        written["notes"] = export_hf(hf_dir, config, full, tokenizer=tokenizer, dtype=hf_dtype,
                                     metadata={"iteration": metadata.get("iteration"),
                                               "source": os.path.abspath(load_dir)})
        written["hugging face"] = hf_dir
    return written
