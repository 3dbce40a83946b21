"""Checkpoints: DeepSpeed's engine state plus our metadata, saved crash-safely, loaded with clear refusals.

Layout of ``--save DIR``::

    DIR/latest                         tag of the newest COMPLETE checkpoint (written last, atomically)
    DIR/iter_0000100/                  DeepSpeed files (model / optimizer / ZeRO partitions, per MP rank)
    DIR/iter_0000100/megatron_ls.json  iteration, consumed samples, args, layout (rank 0)
    DIR/iter_0000100/rng/rank_00003.pt RNG states of every rank (exact resume of dropout)

Saving (``checkpoint_save.py``) writes into a temporary directory and publishes it with one rename, so a crash
or a full disk never damages a complete checkpoint. Every file is loaded with ``torch.load(weights_only=True)``:
no pickled code runs on load. A checkpoint of another data x context parallel size or ZeRO stage is loaded
through ``elastic.py``; another tensor / pipeline layout, model shape or attention setting is refused in one line.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any, Optional

import torch.distributed as dist

from megatron_ls.checkpoint_files import (LATEST_FILE, METADATA_FILE, CheckpointError, atomic_torch_save,
                                          atomic_write_text, checkpoint_tag, read_latest_tag, read_metadata,
                                          safe_torch_load)
from megatron_ls.training.checkpoint_save import CheckpointSaveError, install_checkpoint_engine, save_checkpoint

__all__ = ["CheckpointError", "CheckpointSaveError", "LATEST_FILE", "METADATA_FILE", "atomic_torch_save",
           "atomic_write_text", "checkpoint_tag", "read_latest_tag", "read_metadata", "safe_torch_load",
           "save_checkpoint", "load_checkpoint", "check_compatible", "check_layout_change", "check_resume_position",
           "saved_layout", "install_safe_checkpoint_engine", "ATTENTION_SETTINGS"]

# Model settings whose change makes the saved weights the wrong shape: always refused.
SHAPE_SETTINGS = ("num_layers", "hidden_size", "num_attention_heads", "ffn_hidden_size", "projection_rank",
                  "dual_ln", "full_attention_layers", "normalization", "swiglu", "add_bias_linear",
                  "untie_embeddings_and_output_weights")
# Settings that change what attention computes with the same weights: refused on resume unless --finetune or
# --allow-attention-change (a silent change would continue training a different model).
ATTENTION_SETTINGS = ("window_size", "segment_length", "dual_ln_scope", "window_extension", "projection_input",
                      "position_embedding_type", "rotary_base", "rotary_percent")


def install_safe_checkpoint_engine(engine: Any) -> None:
    """Make the DeepSpeed engine load every checkpoint file with ``weights_only=True`` and save durably."""
    install_checkpoint_engine(engine)


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


def _flag(name: str) -> str:
    import dataclasses

    from megatron_ls.config import TransformerConfig

    for f in dataclasses.fields(TransformerConfig):
        if f.name == name:
            return f.metadata.get("flag", "--" + name.replace("_", "-"))
    return "--" + name.replace("_", "-")


def _same(saved: Any, current: Any) -> bool:
    if isinstance(saved, list) or isinstance(current, tuple):
        return list(saved) == list(current)
    return saved == current


def check_compatible(load_dir: str, model_config: Any, *, finetune: bool = False,
                     allow_attention_change: bool = False) -> None:
    """Fail early, naming the flags, when the checkpoint's model differs from this run's.

    A different shape (layers, widths, projection rank, DualLN, full-attention layers, padded vocab, learned
    position table) never loads. A different attention setting (``ATTENTION_SETTINGS``) would load and silently
    train another model: it is refused unless ``finetune`` or ``allow_attention_change``.
    """
    saved = read_metadata(load_dir, read_latest_tag(load_dir)).get("args", {}).get("model", {})

    def differs(name: str) -> bool:
        return name in saved and not _same(saved[name], getattr(model_config, name))

    def text(name: str) -> str:
        now = getattr(model_config, name)
        if isinstance(now, bool):  # a switch: say whether its flag was given (--disable-bias-linear means False)
            from megatron_ls.config import TransformerConfig

            default = next(f.default for f in dataclasses.fields(TransformerConfig) if f.name == name)
            given = "given" if now != default else "not given"
            return f"{_flag(name)} is {given} here but {'not given' if given == 'given' else 'given'} in the checkpoint"
        return f"{_flag(name)} is {now} here but {saved[name]} in the checkpoint"

    shape = [text(n) for n in SHAPE_SETTINGS if differs(n)]
    learned = "learned" in (saved.get("position_embedding_type"), model_config.position_embedding_type)
    if learned and differs("position_embedding_type"):
        shape.append(text("position_embedding_type") + " (the learned position table)")
    elif model_config.position_embedding_type == "learned" and differs("max_position_embeddings"):
        shape.append(text("max_position_embeddings"))
    if "vocab_size" in saved and saved["vocab_size"] != model_config.vocab_size:
        shape.append(f"padded vocab size is {model_config.vocab_size} here but {saved['vocab_size']} in the "
                     f"checkpoint (padding = multiple of --make-vocab-size-divisible-by x tensor parallel size)")
    if shape:
        raise CheckpointError(f"--load {load_dir}: " + "; ".join(shape))
    changed = [text(n) for n in ATTENTION_SETTINGS if differs(n) and not (learned and n == "position_embedding_type")]
    if changed and not (finetune or allow_attention_change):
        raise CheckpointError(f"--load {load_dir}: " + "; ".join(changed) + "; resuming would continue training "
                              f"with different attention: pass --finetune (weights only, a new run) or "
                              f"--allow-attention-change (resume as is), or use the checkpoint's settings")


def saved_layout(load_dir: str) -> dict:
    """TP, PP, DP, CP sizes (and ZeRO stage) of the checkpoint ``latest`` names; CP is 1 in older checkpoints."""
    metadata = read_metadata(load_dir, read_latest_tag(load_dir))
    layout = dict(metadata.get("layout", {}))
    parallel = metadata.get("args", {}).get("parallel", {})
    layout.setdefault("context_parallel_size", parallel.get("context_parallel_size", 1))
    layout.setdefault("data_parallel_size", 1)
    layout.setdefault("tensor_model_parallel_size", parallel.get("tensor_model_parallel_size", 1))
    layout.setdefault("pipeline_model_parallel_size", parallel.get("pipeline_model_parallel_size", 1))
    layout["zero_stage"] = int(parallel.get("zero_stage", 0))
    return layout


def check_layout_change(load_dir: str, parallel: Any, data_parallel_size: int, *,
                        load_optimizer: bool = True) -> None:
    """Refuse, in one line naming the converter, a checkpoint of another tensor or pipeline layout.

    Any data x context parallel size and ZeRO stage loads (``elastic.py``); ``load_optimizer`` is accepted for
    callers of the earlier interface and changes nothing.
    """
    del data_parallel_size, load_optimizer
    saved = saved_layout(load_dir)
    before = (int(saved["tensor_model_parallel_size"]), int(saved["pipeline_model_parallel_size"]))
    now = (parallel.tensor_model_parallel_size, parallel.pipeline_model_parallel_size)
    if before != now:
        raise CheckpointError(
            f"--load {load_dir}: saved with TP={before[0]} x PP={before[1]}, this run has TP={now[0]} x PP={now[1]}; "
            f"re-shard it first: python tools/convert_checkpoint.py --load {load_dir} --save NEW_DIR "
            f"--target-tensor-parallel-size {now[0]} --target-pipeline-model-parallel-size {now[1]}, then "
            f"--load NEW_DIR (keep the padded vocab equal: --make-vocab-size-divisible-by)")


def check_resume_position(load_dir: str, train_iters: int, *, finetune: bool = False) -> None:
    """Refuse to resume a checkpoint that is already past ``--train-iters``."""
    if finetune:
        return
    iteration = read_metadata(load_dir, read_latest_tag(load_dir))["iteration"]
    if iteration > train_iters:
        raise CheckpointError(f"--load {load_dir} is at iteration {iteration}, past --train-iters {train_iters}: "
                              f"nothing is left to train; pass --train-iters > {iteration} to continue, or "
                              f"--finetune to start a new run from its weights")


def _needs_elastic(engine: Any, metadata: dict, ckpt_dir: str, *, load_optimizer: bool) -> bool:
    """True when DeepSpeed's own loader cannot take this checkpoint: another DP x CP, ZeRO stage or precision."""
    from megatron_ls.parallel import state as ps
    from megatron_ls.training.elastic import engine_kind, saved_kind

    layout = metadata.get("layout", {})
    training = metadata.get("args", {}).get("training", {})
    saved_dp = int(layout.get("data_parallel_size", 1)) * int(layout.get("context_parallel_size", 1))
    kind_now = engine_kind(engine)
    kind_saved = saved_kind(ckpt_dir, engine.checkpoint_mp_rank)
    same_setup = (int(metadata.get("args", {}).get("parallel", {}).get("zero_stage", 0))
                  == engine.zero_optimization_stage() and bool(training.get("bf16")) == engine.bfloat16_enabled()
                  and bool(training.get("fp16")) == engine.fp16_enabled())
    if not same_setup or kind_now != kind_saved:
        return True
    if kind_now == "zero3" and not load_optimizer:
        return True  # DeepSpeed's weights-only ZeRO-3 path re-reads the files without weights_only
    partitioned = kind_now in ("flat", "zero3")  # plain / unfused state is whole on every rank: any DP loads
    return partitioned and saved_dp != ps.get_data_parallel_world_size_with_context_parallel()


def load_checkpoint(engine: Any, load_dir: str, *, load_optimizer: bool = True, load_rng: bool = True,
                    finetune: bool = False) -> tuple[LoadedState, Optional[dict]]:
    """Load the checkpoint named by ``latest``; returns the restored counters and this rank's RNG state.

    RNG states are restored only when the world size is the one saved (they are per rank).
    """
    from megatron_ls.training.elastic import load_elastic

    tag = read_latest_tag(load_dir)
    metadata = read_metadata(load_dir, tag)
    if metadata.get("weights_only") and not finetune:
        raise CheckpointError(f"--load {load_dir} holds re-sharded weights only (tools/convert_checkpoint.py found "
                              f"no optimizer state to carry over): continue from it with --finetune")
    if metadata.get("optimizer_saved") is False and load_optimizer and not finetune:
        raise CheckpointError(f"--load {load_dir} was saved with --no-save-optim (no optimizer state): resume with "
                              f"--no-load-optim (weights, counters and schedule; a fresh optimizer) or --finetune")
    install_safe_checkpoint_engine(engine)
    load_optimizer = load_optimizer and not finetune
    try:
        if _needs_elastic(engine, metadata, os.path.join(load_dir, tag), load_optimizer=load_optimizer):
            load_elastic(engine, load_dir, tag, load_optimizer=load_optimizer, load_training_state=not finetune)
            load_path = os.path.join(load_dir, tag)
        else:
            load_path, _ = engine.load_checkpoint(load_dir, tag=tag, load_optimizer_states=load_optimizer,
                                                  load_lr_scheduler_states=not finetune, load_module_only=finetune)
    except CheckpointError:
        raise
    except Exception as exc:  # noqa: BLE001 - DeepSpeed raises many kinds for damaged files
        raise CheckpointError(f"--load {load_dir}: checkpoint {tag} is corrupt or incompatible: "
                              f"{type(exc).__name__}: {exc}") from exc
    if load_path is None:
        raise CheckpointError(f"--load {load_dir}: DeepSpeed found no model files for checkpoint {tag}")
    rng_state = None
    world = dist.get_world_size() if dist.is_initialized() else 1
    if load_rng and not finetune and int(metadata.get("world_size", world)) == world:
        rng_path = os.path.join(load_dir, tag, "rng", f"rank_{_rank():05d}.pt")
        if os.path.isfile(rng_path):
            rng_state = safe_torch_load(rng_path)
    if finetune:
        return LoadedState(0, 0, metadata), None
    return LoadedState(metadata["iteration"], metadata["consumed_samples"], metadata), rng_state
