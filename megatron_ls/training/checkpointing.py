"""Checkpoints: DeepSpeed's engine state plus our metadata, a `latest` marker written last and atomically.

Layout of ``--save DIR``::

    DIR/latest                         tag of the newest COMPLETE checkpoint (written last, atomically)
    DIR/iter_0000100/                  DeepSpeed files (model / optimizer / ZeRO partitions, per MP rank)
    DIR/iter_0000100/megatron_ls.json  iteration, consumed samples, args, layout (rank 0)
    DIR/iter_0000100/rng/rank_00003.pt RNG states of every rank (exact resume of dropout)

A crash mid-save leaves ``latest`` pointing at the previous checkpoint. Every file is loaded with
``torch.load(weights_only=True)``: no pickled code runs on load.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Optional

import torch.distributed as dist

from megatron_ls.checkpoint_files import (FORMAT_VERSION, LATEST_FILE, METADATA_FILE, CheckpointError,
                                          atomic_torch_save, atomic_write_text, checkpoint_tag, read_latest_tag,
                                          read_metadata, safe_torch_load)

__all__ = ["CheckpointError", "LATEST_FILE", "METADATA_FILE", "atomic_torch_save", "atomic_write_text",
           "checkpoint_tag", "read_latest_tag", "read_metadata", "safe_torch_load", "save_checkpoint",
           "load_checkpoint", "check_compatible", "check_layout_change", "saved_layout",
           "install_safe_checkpoint_engine"]

def install_safe_checkpoint_engine(engine: Any) -> None:
    """Make the DeepSpeed engine load every checkpoint file with ``weights_only=True``."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    class WeightsOnlyCheckpointEngine(TorchCheckpointEngine):
        def load(self, path: str, map_location=None):  # noqa: D401 - DeepSpeed's interface
            return safe_torch_load(path, map_location=map_location)

    current = getattr(engine, "checkpoint_engine", None)
    if current is None or type(current) is TorchCheckpointEngine:
        engine.checkpoint_engine = WeightsOnlyCheckpointEngine(engine._config)


@dataclass
class LoadedState:
    iteration: int
    consumed_samples: int
    metadata: dict


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def save_checkpoint(engine: Any, save_dir: str, iteration: int, consumed_samples: int, args_dict: dict,
                    rng_state: dict, extra_metadata: Optional[dict] = None) -> str:
    """Save engine + metadata + this rank's RNG state; move ``latest`` to it only when every rank is done."""
    tag = checkpoint_tag(iteration)
    ckpt_dir = os.path.join(save_dir, tag)
    if _rank() == 0:
        os.makedirs(os.path.join(ckpt_dir, "rng"), exist_ok=True)
    _barrier()
    # DeepSpeed writes its own files; we never let it touch `latest` (it writes that non-atomically).
    engine.save_checkpoint(save_dir, tag=tag, client_state={"iteration": iteration,
                                                            "consumed_samples": consumed_samples},
                           save_latest=False)
    atomic_torch_save(rng_state, os.path.join(ckpt_dir, "rng", f"rank_{_rank():05d}.pt"))
    if _rank() == 0:
        metadata = {"format_version": FORMAT_VERSION, "iteration": iteration, "consumed_samples": consumed_samples,
                    "world_size": dist.get_world_size() if dist.is_initialized() else 1, "args": args_dict}
        metadata.update(extra_metadata or {})
        atomic_write_text(os.path.join(ckpt_dir, METADATA_FILE), json.dumps(metadata, indent=2, default=str))
    _barrier()
    if _rank() == 0:
        atomic_write_text(os.path.join(save_dir, LATEST_FILE), tag + "\n")
    _barrier()
    return ckpt_dir


def check_compatible(load_dir: str, model_config: Any) -> None:
    """Fail early, naming the flag, when the checkpoint's model shape differs from this run's."""
    saved = read_metadata(load_dir, read_latest_tag(load_dir)).get("args", {}).get("model", {})
    problems = []
    for name in ("num_layers", "hidden_size", "num_attention_heads", "ffn_hidden_size", "projection_rank",
                 "position_embedding_type", "dual_ln"):
        if name in saved and saved[name] != getattr(model_config, name):
            problems.append(f"--{name.replace('_', '-')} is {getattr(model_config, name)} here but "
                            f"{saved[name]} in the checkpoint")
    if "vocab_size" in saved and saved["vocab_size"] != model_config.vocab_size:
        problems.append(f"padded vocab size is {model_config.vocab_size} here but {saved['vocab_size']} in the "
                        f"checkpoint (padding = multiple of --make-vocab-size-divisible-by x tensor parallel size)")
    if problems:
        raise CheckpointError(f"--load {load_dir}: " + "; ".join(problems))


def saved_layout(load_dir: str) -> dict:
    """TP, PP, DP, CP sizes (and ZeRO stage) of the checkpoint ``latest`` names; CP is 1 in older checkpoints."""
    metadata = read_metadata(load_dir, read_latest_tag(load_dir))
    layout = dict(metadata.get("layout", {}))
    parallel = metadata.get("args", {}).get("parallel", {})
    layout.setdefault("context_parallel_size", parallel.get("context_parallel_size", 1))
    layout.setdefault("data_parallel_size", 1)
    layout["zero_stage"] = int(parallel.get("zero_stage", 0))
    return layout


def check_layout_change(load_dir: str, parallel: Any, data_parallel_size: int, *, load_optimizer: bool) -> None:
    """Refuse, naming the flags, a change of DP x CP that DeepSpeed cannot load.

    Context parallelism does not change weight shapes, so weights load at any CP (and DP). DeepSpeed's ZeRO
    optimizer state is partitioned over the DP x CP ranks and is not re-partitioned on load; ZeRO-3 partitions
    the weights too. Without ZeRO (stage 0) the whole optimizer state sits in the model file: any change works.
    """
    saved = saved_layout(load_dir)
    before = int(saved["data_parallel_size"]) * int(saved["context_parallel_size"])
    now = data_parallel_size * parallel.context_parallel_size
    if before == now:
        return
    what = (f"--load {load_dir}: saved with DP={saved['data_parallel_size']} x CP={saved['context_parallel_size']}"
            f" = {before} replicas of each model shard, this run has DP={data_parallel_size} x "
            f"CP={parallel.context_parallel_size} = {now}")
    if 3 in (saved["zero_stage"], parallel.zero_stage):
        raise CheckpointError(f"{what}; ZeRO-3 partitions the weights themselves over those ranks and DeepSpeed "
                              f"cannot re-partition them: resume with the same data x context parallel size")
    if load_optimizer and parallel.zero_stage > 0:
        raise CheckpointError(f"{what}; ZeRO-{parallel.zero_stage} optimizer state is partitioned over them and "
                              f"DeepSpeed cannot re-partition it: resume with the same data x context parallel "
                              f"size, or pass --no-load-optim (weights, iteration and data position kept, fresh "
                              f"optimizer) or --finetune")


def load_checkpoint(engine: Any, load_dir: str, *, load_optimizer: bool = True, load_rng: bool = True,
                    finetune: bool = False) -> tuple[LoadedState, Optional[dict]]:
    """Load the checkpoint named by ``latest``; returns the restored counters and this rank's RNG state."""
    tag = read_latest_tag(load_dir)
    metadata = read_metadata(load_dir, tag)
    install_safe_checkpoint_engine(engine)
    try:
        load_path, _ = engine.load_checkpoint(load_dir, tag=tag, load_optimizer_states=load_optimizer and not finetune,
                                              load_lr_scheduler_states=not finetune,
                                              load_module_only=finetune)
    except CheckpointError:
        raise
    except Exception as exc:  # noqa: BLE001 - DeepSpeed raises many kinds for damaged files
        raise CheckpointError(f"--load {load_dir}: checkpoint {tag} is corrupt or incompatible: "
                              f"{type(exc).__name__}: {exc}") from exc
    if load_path is None:
        raise CheckpointError(f"--load {load_dir}: DeepSpeed found no model files for checkpoint {tag}")
    rng_state = None
    if load_rng and not finetune:
        rng_path = os.path.join(load_dir, tag, "rng", f"rank_{_rank():05d}.pt")
        if os.path.isfile(rng_path):
            rng_state = safe_torch_load(rng_path)
    if finetune:
        return LoadedState(0, 0, metadata), None
    return LoadedState(metadata["iteration"], metadata["consumed_samples"], metadata), rng_state
