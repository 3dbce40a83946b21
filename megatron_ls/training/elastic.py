"""Elastic resume: a checkpoint saved at one data x context parallel size or ZeRO stage, loaded at another.

DeepSpeed keeps the fp32 master weights and the Adam moments partitioned over the data-parallel ranks, in a layout
that depends on the DP size and the ZeRO stage, and refuses to load them into another layout. Here each rank reads
the saved partitions of its own model shard (the same TP x PP rank) into whole per-parameter tensors (``fp32``,
``exp_avg``, ``exp_avg_sq``, and the step) -- the idea of DeepSpeed's universal checkpoints, done in memory and
with ``weights_only=True`` loads -- and writes them into the running engine's partitions. Three layouts:

* ``flat``: ZeRO-1/2 and DeepSpeed's bf16 optimizer. ``[bf16_]zero_pp_rank_D_mp_rank_MM_optim_states.pt`` per DP
  rank ``D``: one flat fp32 partition and its moments per parameter group, and where each parameter's fragment
  starts in it (``param_slice_mappings``).
* ``zero3``: ZeRO-3. The same file names, one flat partition per sub-group; every parameter is split into DP equal
  pieces (the last padded), in the order of ``param_shapes`` (``zero_pp_rank_D_mp_rank_MM_model_states.pt``).
* ``plain``: fp32 without ZeRO (torch AdamW). ``mp_rank_MM_model_states.pt`` holds the module and the torch
  optimizer state, whose parameters are numbered in the optimizer's group order.
* ``unfused``: bf16/fp16 without ZeRO (DeepSpeed's ``FP16_UnfusedOptimizer``): the same file, with one fp32
  master copy per parameter (``fp32_groups``) next to the torch optimizer state.
* ``converted``: whole per-parameter state per TP rank, written by ``optimizer_reshard.py`` when
  ``tools/convert_checkpoint.py`` re-shards a checkpoint to another TP x PP layout.
"""
from __future__ import annotations

import glob
import os
import re
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.distributed as dist

from megatron_ls.checkpoint_files import CheckpointError, safe_torch_load

MOMENTS = ("exp_avg", "exp_avg_sq")
# Written by optimizer_reshard.py next to re-sharded weights: whole per-parameter state per TP rank, and the
# LR schedule / step counters of the source.
STATES_FILE = "optimizer_states_tp_{:02d}.pt"
TRAINING_STATE_FILE = "training_state.pt"


@dataclass
class ParamStates:
    """Whole (flattened) per-parameter state of one model shard, independent of any partitioning."""

    fp32: dict[str, torch.Tensor] = field(default_factory=dict)
    moments: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # name -> {exp_avg, exp_avg_sq}
    step: Optional[torch.Tensor] = None
    group_settings: list[dict] = field(default_factory=list)  # saved param-group hyperparameters


def engine_kind(engine: Any) -> str:
    """``flat``, ``zero3``, ``plain`` or ``unfused`` for a DeepSpeed engine's optimizer; ``other`` otherwise."""
    optimizer = engine.optimizer
    if engine.zero_optimization_stage() == 3:
        return "zero3"
    if hasattr(optimizer, "bf16_groups") or (engine.zero_optimization_stage() in (1, 2)
                                             and hasattr(optimizer, "bit16_groups")):
        return "flat"
    if isinstance(optimizer, torch.optim.Optimizer) and not (engine.fp16_enabled() or engine.bfloat16_enabled()):
        return "plain"
    if isinstance(getattr(optimizer, "fp32_groups", None), list) and hasattr(optimizer, "fp16_groups"):
        return "unfused"
    return "other"


def _optim_files(ckpt_dir: str, mp_rank: int) -> list[str]:
    """Saved ZeRO optimizer files of model-parallel rank ``mp_rank``, in data-parallel rank order."""
    pattern = re.compile(rf"^(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_{mp_rank:02d}_optim_states\.pt$")
    found = {}
    for path in glob.glob(os.path.join(ckpt_dir, f"*zero_pp_rank_*_mp_rank_{mp_rank:02d}_optim_states.pt")):
        match = pattern.match(os.path.basename(path))
        if match:
            found[int(match.group(1))] = path
    if found and sorted(found) != list(range(len(found))):
        raise CheckpointError(f"{ckpt_dir}: ZeRO optimizer files of data-parallel ranks {sorted(found)} are not "
                              f"0..{len(found) - 1} (incomplete checkpoint)")
    return [found[i] for i in range(len(found))]


def saved_kind(ckpt_dir: str, mp_rank: int) -> str:
    """The layout a checkpoint's optimizer state was saved in (see the module docstring)."""
    if os.path.isfile(os.path.join(ckpt_dir, STATES_FILE.format(0))):
        return "converted"
    files = _optim_files(ckpt_dir, mp_rank)
    if not files:
        optimizer = model_states(ckpt_dir, mp_rank).get("optimizer")
        return "unfused" if isinstance(optimizer, dict) and "fp32_groups" in optimizer else "plain"
    state = safe_torch_load(files[0])["optimizer_state_dict"]
    return "zero3" if "fp32_flat_groups" in state else "flat"


def model_states(ckpt_dir: str, mp_rank: int) -> dict:
    """DeepSpeed's model states file of model-parallel rank ``mp_rank`` (the one of DP rank 0 under ZeRO-3)."""
    for name in (f"mp_rank_{mp_rank:02d}_model_states.pt", f"zero_pp_rank_0_mp_rank_{mp_rank:02d}_model_states.pt"):
        path = os.path.join(ckpt_dir, name)
        if os.path.isfile(path):
            return safe_torch_load(path)
    raise CheckpointError(f"{ckpt_dir}: no model states file for model-parallel rank {mp_rank}")


def _step_of(states: list[dict]) -> Optional[torch.Tensor]:
    steps = [s["step"] for s in states if isinstance(s, dict) and "step" in s]
    return torch.as_tensor(steps[0], dtype=torch.float32).clone() if steps else None


def _group_settings(optimizer_state: dict) -> list[dict]:
    return [{k: v for k, v in group.items() if k != "params"} for group in optimizer_state.get("param_groups", [])]


def _read_flat(files: list[str]) -> ParamStates:
    """Concatenate every parameter's fragments over the saved data-parallel partitions."""
    pieces: dict[str, dict[str, list[torch.Tensor]]] = {}
    out = ParamStates()
    for path in files:
        sd = safe_torch_load(path)["optimizer_state_dict"]
        base = sd["base_optimizer_state"]
        group_states = [base["state"].get(g, {}) for g in range(len(sd["single_partition_of_fp32_groups"]))]
        out.step = out.step if out.step is not None else _step_of(group_states)
        out.group_settings = out.group_settings or _group_settings(base)
        for g, mapping in enumerate(sd["param_slice_mappings"]):
            flat = {"fp32": sd["single_partition_of_fp32_groups"][g],
                    **{k: group_states[g][k] for k in MOMENTS if k in group_states[g]}}
            for name, address in mapping.items():
                slot = pieces.setdefault(name, {})
                for key, tensor in flat.items():
                    slot.setdefault(key, []).append(tensor.narrow(0, address.start, address.numel))
    for name, slot in pieces.items():
        out.fp32[name] = torch.cat(slot.pop("fp32")).float()
        out.moments[name] = {key: torch.cat(parts).float() for key, parts in slot.items()}
    return out


def _read_zero3(files: list[str], ckpt_dir: str, mp_rank: int) -> ParamStates:
    """Whole parameters from ZeRO-3's equal pieces (each padded to ``ceil(numel / DP)``)."""
    shapes = model_states(ckpt_dir, mp_rank)["param_shapes"]
    world = len(files)
    pieces: dict[str, dict[str, list[torch.Tensor]]] = {}
    out = ParamStates()
    for rank, path in enumerate(files):
        sd = safe_torch_load(path)["optimizer_state_dict"]
        inner = sd["optimizer_state_dict"]
        out.group_settings = out.group_settings or _group_settings(inner)
        for g, group_shapes in enumerate(shapes):
            state = inner["state"].get(g, {})
            out.step = out.step if out.step is not None else _step_of([state])
            flat = {"fp32": sd["fp32_flat_groups"][g], **{k: state[k] for k in MOMENTS if k in state}}
            offset = 0
            for name, shape in group_shapes.items():
                numel = int(torch.Size(shape).numel())
                part = -(-numel // world)
                keep = max(0, min(part, numel - rank * part))
                slot = pieces.setdefault(name, {})
                for key, tensor in flat.items():
                    slot.setdefault(key, []).append(tensor.narrow(0, offset, keep))
                offset += part
    for name, slot in pieces.items():
        out.fp32[name] = torch.cat(slot.pop("fp32")).float()
        out.moments[name] = {key: torch.cat(parts).float() for key, parts in slot.items()}
    return out


def _full_shape(param: torch.nn.Parameter) -> torch.Size:
    return torch.Size(getattr(param, "ds_shape", param.shape))


def plain_parameter_order(module: torch.nn.Module) -> list[str]:
    """Parameter names in the order torch AdamW numbers them (``optimizer.parameter_groups``' order)."""
    from megatron_ls.training.optimizer import parameter_groups

    names = {id(p): n for n, p in module.named_parameters()}
    return [names[id(p)] for group in parameter_groups(module, 0.0) for p in group["params"]]


def _read_plain(ckpt_dir: str, mp_rank: int, module: torch.nn.Module) -> ParamStates:
    """fp32 weights and torch AdamW state (numbered in group order) of a checkpoint without ZeRO."""
    sd = model_states(ckpt_dir, mp_rank)
    if not isinstance(sd.get("module"), dict):
        raise CheckpointError(f"{ckpt_dir}: a pipeline checkpoint without ZeRO keeps its weights per layer; "
                              f"resume it with the ZeRO stage and precision it was saved with")
    saved = sd.get("optimizer") or {}
    order = plain_parameter_order(module)
    if "fp32_groups" in saved:  # bf16/fp16 without ZeRO: fp32 masters next to the torch state
        masters = [t for group in saved["fp32_groups"] for t in group]
        out = ParamStates(fp32={n: t.float().flatten() for n, t in zip(order, masters)})
        saved = saved.get("optimizer_state_dict") or {}
    else:
        out = ParamStates(fp32={n: t.float().flatten() for n, t in sd["module"].items()})
    states = saved.get("state", {})
    out.step = _step_of(list(states.values()))
    out.group_settings = _group_settings(saved)
    for index, name in enumerate(order):
        if index in states:
            out.moments[name] = {k: states[index][k].float().flatten() for k in MOMENTS if k in states[index]}
    return out


def _read_converted(ckpt_dir: str, tp_rank: int) -> ParamStates:
    sd = safe_torch_load(os.path.join(ckpt_dir, STATES_FILE.format(tp_rank)))
    return ParamStates(fp32=sd["fp32"], moments=sd["moments"], step=sd["step"], group_settings=sd["group_settings"])


def read_states(ckpt_dir: str, mp_rank: int, module: torch.nn.Module, tp_rank: int = 0) -> ParamStates:
    """This model shard's per-parameter state from whichever layout ``ckpt_dir`` was saved in (``tp_rank``: the
    shard's tensor-parallel rank, for re-sharded checkpoints)."""
    files = _optim_files(ckpt_dir, mp_rank)
    kind = saved_kind(ckpt_dir, mp_rank)
    if kind == "converted":
        return _read_converted(ckpt_dir, tp_rank)
    if kind == "flat":
        return _read_flat(files)
    if kind == "zero3":
        return _read_zero3(files, ckpt_dir, mp_rank)
    return _read_plain(ckpt_dir, mp_rank, module)


def _whole(states: ParamStates, name: str, key: str, numel: int) -> torch.Tensor:
    source = states.fp32 if key == "fp32" else states.moments.get(name, {})
    tensor = source.get(name) if key == "fp32" else source.get(key)
    if tensor is None:
        raise CheckpointError(f"the checkpoint has no {key} for parameter {name}")
    if tensor.numel() != numel:
        raise CheckpointError(f"parameter {name} has {tensor.numel()} elements in the checkpoint, {numel} here")
    return tensor


def _apply_group_settings(param_groups: list[dict], settings: list[dict]) -> None:
    for group, saved in zip(param_groups, settings):
        group.update({k: v for k, v in saved.items() if k in group})


def _write_flat(optimizer: Any, states: ParamStates, load_optimizer: bool) -> None:
    """Fill ZeRO-1/2 / bf16-optimizer partitions from whole tensors, then re-gather the model weights."""
    from deepspeed.utils.tensor_fragment import map_to_flat_opt_states

    lp_groups = optimizer.bf16_groups if hasattr(optimizer, "bf16_groups") else optimizer.bit16_groups
    has_moments = load_optimizer and bool(states.moments) and states.step is not None
    for g, lp_group in enumerate(lp_groups):
        for lp in lp_group:
            mapping = getattr(lp, "_hp_mapping", None)
            if mapping is None:
                continue
            name = optimizer.param_names[lp]
            address = mapping.lp_fragment_address
            piece = _whole(states, name, "fp32", lp.numel()).narrow(0, address.start, address.numel)
            mapping.get_hp_fragment().data.copy_(piece)
            if has_moments:
                mapping.optim_fragment = {key: _whole(states, name, key, lp.numel())
                                          .narrow(0, address.start, address.numel).clone() for key in MOMENTS}
        if has_moments:
            hp_param = optimizer.optimizer.param_groups[g]["params"][0]
            map_to_flat_opt_states(hp_param, lp_group, optimizer.optimizer.state, list(MOMENTS))
            optimizer.optimizer.state[hp_param]["step"] = states.step.clone()
    if has_moments:
        _apply_group_settings(optimizer.optimizer.param_groups, states.group_settings)
    optimizer.update_lp_params()


def _write_zero3(optimizer: Any, states: ParamStates, load_optimizer: bool) -> None:
    """Fill ZeRO-3's fp32 partitions (and moments), then the partitioned low-precision weights."""
    has_moments = load_optimizer and bool(states.moments) and states.step is not None
    for g, group in enumerate(optimizer.fp16_groups):
        fp32_flat = optimizer.fp32_partitioned_groups_flat[g]
        buffers = {key: torch.zeros_like(fp32_flat) for key in (("fp32",) + (MOMENTS if has_moments else ()))}
        offset = 0
        for param in group:
            rank = dist.get_rank(group=optimizer._get_param_partition_group(param))
            part = param.partition_numel()
            name = optimizer.param_names[param]
            for key, buffer in buffers.items():
                whole = _whole(states, name, key, param.ds_numel)
                padded = torch.cat([whole, whole.new_zeros(part * (rank + 1) - whole.numel())]) \
                    if whole.numel() < part * (rank + 1) else whole
                buffer.narrow(0, offset, part).copy_(padded.narrow(0, rank * part, part))
            offset += part
        fp32_flat.data.copy_(buffers.pop("fp32"))
        if has_moments:
            optimizer.optimizer.state[fp32_flat].update(buffers)
            optimizer.optimizer.state[fp32_flat]["step"] = states.step.clone()
        optimizer.fp16_partitioned_groups_flat[g].data.copy_(fp32_flat.data)
        views = optimizer.unflatten(optimizer.fp16_partitioned_groups_flat[g], optimizer.fp16_partitioned_groups[g])
        for partitioned, view in zip(optimizer.fp16_partitioned_groups[g], views):
            partitioned.data = view.data
    if has_moments:
        _apply_group_settings(optimizer.optimizer.param_groups, states.group_settings)


def _write_plain(engine: Any, states: ParamStates, load_optimizer: bool) -> None:
    """No ZeRO: module weights (and the fp32 masters of bf16/fp16), torch optimizer state in group order."""
    params = dict(engine.module.named_parameters())
    order = plain_parameter_order(engine.module)
    wrapper = engine.optimizer if engine_kind(engine) == "unfused" else None
    masters = [t for group in wrapper.fp32_groups for t in group] if wrapper is not None else []
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(_whole(states, name, "fp32", param.numel()).view_as(param))
        for name, master in zip(order, masters):
            master.copy_(_whole(states, name, "fp32", master.numel()).view_as(master))
    if not (load_optimizer and states.moments and states.step is not None):
        return
    optimizer = wrapper.optimizer if wrapper is not None else engine.optimizer
    state = {i: {"step": states.step.clone(), **{k: _whole(states, n, k, params[n].numel()).view_as(params[n])
                                                   for k in MOMENTS}} for i, n in enumerate(order)}
    groups, start = [], 0
    for group in optimizer.state_dict()["param_groups"]:
        groups.append(dict(group, params=list(range(start, start + len(group["params"])))))
        start += len(group["params"])
    _apply_group_settings(groups, states.group_settings)
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def load_elastic(engine: Any, load_dir: str, tag: str, *, load_optimizer: bool,
                 load_training_state: bool) -> None:
    """Load ``load_dir/tag`` into ``engine`` whatever DP x CP size and ZeRO stage it was saved with.

    Weights always; Adam moments with ``load_optimizer``; the LR schedule and DeepSpeed's step counters with
    ``load_training_state``. Collective (the ZeRO-1/2 weights are re-gathered).
    """
    kind = engine_kind(engine)
    if kind == "other":
        raise CheckpointError(f"--load {load_dir}: this optimizer setup ({type(engine.optimizer).__name__}) cannot "
                              f"take a checkpoint of another ZeRO stage or precision; resume with the saved "
                              f"settings, or pass --finetune")
    from megatron_ls.parallel import state as ps

    ckpt_dir = os.path.join(load_dir, tag)
    mp_rank = engine.checkpoint_mp_rank
    states = read_states(ckpt_dir, mp_rank, engine.module, ps.get_tensor_model_parallel_rank())
    if kind == "flat":
        _write_flat(engine.optimizer, states, load_optimizer)
    elif kind == "zero3":
        _write_zero3(engine.optimizer, states, load_optimizer)
    else:
        _write_plain(engine, states, load_optimizer)
    if not load_training_state:
        return
    converted = os.path.join(ckpt_dir, TRAINING_STATE_FILE)
    saved = safe_torch_load(converted) if os.path.isfile(converted) else model_states(ckpt_dir, mp_rank)
    if engine.lr_scheduler is not None and "lr_scheduler" in saved:
        engine.lr_scheduler.load_state_dict(saved["lr_scheduler"])
    engine.global_steps = saved.get("global_steps", engine.global_steps)
    engine.global_samples = saved.get("global_samples", engine.global_samples)
    engine.skipped_steps = saved.get("skipped_steps", engine.skipped_steps)
