"""Optimizer state through a tensor / pipeline re-shard (``tools/convert_checkpoint.py --save``).

The converter re-shards the weights; this module carries the fp32 master weights and Adam moments along, so a
re-sharded checkpoint resumes with its optimizer, LR schedule and counters instead of only ``--finetune``. Each
source model shard's state is read with :func:`elastic.read_states` (any ZeRO stage, DP size, precision), keyed by
the full model's parameter names, merged over the source TP ranks along each parameter's partition dimension
(Adam moments shard exactly like their weights), split for the target TP size and written as one file per target
TP rank holding every layer, named as the target engine names them (``PipelineModule`` names under PP):

    DIR/iter_N/optimizer_states_tp_TT.pt   {"fp32": {name: flat}, "moments": {name: {exp_avg, exp_avg_sq}},
                                            "step": tensor, "group_settings": [...]}
    DIR/iter_N/training_state.pt           LR schedule and DeepSpeed's step counters of the source

A resume then goes through the elastic path (``elastic.read_states`` finds these files).
"""
from __future__ import annotations

import json
import os
import re
from typing import Optional

import torch

from megatron_ls.checkpoint_files import (CheckpointError, METADATA_FILE, atomic_torch_save, atomic_write_text,
                                          read_latest_tag, read_metadata)
from megatron_ls.training.elastic import (MOMENTS, STATES_FILE, TRAINING_STATE_FILE, ParamStates, model_states,
                                          read_states, saved_kind)

_LAYER = re.compile(r"^(\d+)\.(.*)$")


def pipeline_name(name: str, num_layers: int) -> str:
    """``GPTModel`` parameter name -> the name it has inside the GPT ``PipelineModule``."""
    if name.startswith("embedding."):
        return "tied_modules.embed." + name[len("embedding."):]
    if name.startswith("final_layernorm."):
        return f"{num_layers + 1}." + name[len("final_layernorm."):]
    if name.startswith("output_layer."):
        return f"{num_layers + 2}." + name[len("output_layer."):]
    match = re.match(r"^layers\.(\d+)\.(.*)$", name)
    if match:
        return f"{int(match.group(1)) + 1}.{match.group(2)}"
    return name


def model_name(name: str, num_layers: int) -> str:
    """Inverse of :func:`pipeline_name` (GPTModel names pass through)."""
    if name.startswith("tied_modules.embed."):
        return "embedding." + name[len("tied_modules.embed."):]
    match = _LAYER.match(name)
    if match:
        index = int(match.group(1))
        if index > num_layers:
            return f"{'final_layernorm' if index == num_layers + 1 else 'output_layer'}.{match.group(2)}"
        return f"layers.{index - 1}.{match.group(2)}"
    return name


def _merge(per_rank: list[dict], key: str, name: str, shape: torch.Size, dim: Optional[int]) -> torch.Tensor:
    tp = len(per_rank)
    shard = list(shape)
    if dim is not None:
        shard[dim] //= tp
    parts = [rank[name][key].view(shard) for rank in per_rank]
    return torch.cat(parts, dim=dim) if dim is not None and tp > 1 else parts[0]


def _split(full: torch.Tensor, dim: Optional[int], tp: int, rank: int) -> torch.Tensor:
    if dim is None or tp == 1:
        return full.flatten().clone()
    per = full.shape[dim] // tp
    return full.narrow(dim, rank * per, per).flatten().clone()


def reshard_optimizer_states(load_dir: str, save_dir: str, shapes: dict[str, torch.Size],
                             dims: dict[str, Optional[int]], plain_order_module: torch.nn.Module,
                             target_tp: int, target_pp: int) -> bool:
    """Write the optimizer state of ``load_dir`` re-sharded for ``target_tp`` x ``target_pp`` next to the weights
    the converter wrote in ``save_dir``; returns False (writing nothing) when the source holds no optimizer state.

    ``shapes``/``dims``: full shape and TP partition dim of every ``GPTModel`` parameter; ``plain_order_module``:
    a ``GPTModel`` of the same config (the parameter order of a checkpoint saved without ZeRO).
    """
    tag = read_latest_tag(load_dir)
    metadata = read_metadata(load_dir, tag)
    layout = metadata.get("layout", {})
    tp, pp = int(layout.get("tensor_model_parallel_size", 1)), int(layout.get("pipeline_model_parallel_size", 1))
    num_layers = int(metadata["args"]["model"]["num_layers"])
    ckpt = os.path.join(load_dir, tag)
    if saved_kind(ckpt, 0) == "plain" and "optimizer" not in model_states(ckpt, 0):
        return False  # weights only (e.g. itself converted without optimizer state)
    per_rank: list[dict] = [{} for _ in range(tp)]
    step, settings = None, []
    for stage in range(pp):
        for t in range(tp):
            states: ParamStates = read_states(ckpt, stage * tp + t, plain_order_module, t)
            step = step if step is not None else states.step
            settings = settings or states.group_settings
            for name, fp32 in states.fp32.items():
                full_name = model_name(name, num_layers) if pp > 1 else name
                per_rank[t].setdefault(full_name, {"fp32": fp32, **states.moments.get(name, {})})
    missing = sorted(n for n in shapes if n not in per_rank[0] or set(MOMENTS) - set(per_rank[0][n]))
    if missing or step is None:
        raise CheckpointError(f"--load {load_dir}: no complete optimizer state for {missing[:3] or 'the step'}; "
                              f"convert without it and continue with --finetune")
    out_tag = read_latest_tag(save_dir)
    out_dir = os.path.join(save_dir, out_tag)
    for t in range(target_tp):
        fp32, moments = {}, {}
        for name, shape in shapes.items():
            key = pipeline_name(name, num_layers) if target_pp > 1 else name
            fp32[key] = _split(_merge(per_rank, "fp32", name, shape, dims[name]), dims[name], target_tp, t)
            moments[key] = {m: _split(_merge(per_rank, m, name, shape, dims[name]), dims[name], target_tp, t)
                            for m in MOMENTS}
        atomic_torch_save({"fp32": fp32, "moments": moments, "step": step, "group_settings": settings},
                          os.path.join(out_dir, STATES_FILE.format(t)))
    source = model_states(ckpt, 0)
    if os.path.isfile(os.path.join(ckpt, TRAINING_STATE_FILE)):
        from megatron_ls.checkpoint_files import safe_torch_load

        source = safe_torch_load(os.path.join(ckpt, TRAINING_STATE_FILE))
    atomic_torch_save({k: source[k] for k in ("lr_scheduler", "global_steps", "global_samples", "skipped_steps")
                       if k in source}, os.path.join(out_dir, TRAINING_STATE_FILE))
    meta_path = os.path.join(out_dir, METADATA_FILE)
    with open(meta_path) as fh:
        new_meta = json.load(fh)
    new_meta["weights_only"] = False
    new_meta["optimizer_states"] = "re-sharded"
    atomic_write_text(meta_path, json.dumps(new_meta, indent=2))
    return True
