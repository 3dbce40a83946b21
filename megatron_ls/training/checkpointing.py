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
import tempfile
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.distributed as dist

LATEST_FILE = "latest"
METADATA_FILE = "megatron_ls.json"
FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint directory that cannot be loaded; the message names the path and the problem."""


def checkpoint_tag(iteration: int) -> str:
    return f"iter_{iteration:07d}"


def atomic_write_text(path: str, text: str) -> None:
    """Write ``text`` to ``path`` so that readers see the old content or the new one, never a torn file."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-" + os.path.basename(path))
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_torch_save(obj: Any, path: str) -> None:
    """torch.save to a temporary name in the same directory, then rename."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-" + os.path.basename(path))
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _deepspeed_safe_globals() -> list:
    """DeepSpeed's own plain-data classes that appear inside its optimizer/scaler state dicts."""
    found = []
    candidates = [
        ("deepspeed.runtime.fp16.loss_scaler", ["LossScaler", "DynamicLossScaler"]),
        ("deepspeed.runtime.zero.config", ["ZeroStageEnum"]),
        ("deepspeed.utils.tensor_fragment", ["fragment_address"]),
        ("deepspeed.runtime.fp16.loss_scaler", ["LossScaleProfile"]),
    ]
    import importlib

    for module_name, names in candidates:
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        found.extend(getattr(module, n) for n in names if hasattr(module, n))
    import argparse
    import collections

    found.extend([argparse.Namespace, collections.OrderedDict, set, frozenset])
    return found


def safe_torch_load(path: str, map_location: Any = "cpu") -> Any:
    """``torch.load(weights_only=True)`` with DeepSpeed's data classes allow-listed; clear error on failure."""
    try:
        with torch.serialization.safe_globals(_deepspeed_safe_globals()):
            return torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError as exc:
        raise CheckpointError(f"checkpoint file {path} is missing") from exc
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means a corrupt or foreign file
        raise CheckpointError(f"checkpoint file {path} cannot be loaded safely: {type(exc).__name__}: {exc}") from exc


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


def read_latest_tag(load_dir: str) -> str:
    """The tag named by ``load_dir/latest``, checked to point at a complete checkpoint."""
    if not os.path.isdir(load_dir):
        raise CheckpointError(f"--load {load_dir}: no such directory")
    latest = os.path.join(load_dir, LATEST_FILE)
    if not os.path.isfile(latest):
        raise CheckpointError(f"--load {load_dir}: no '{LATEST_FILE}' marker, so no complete checkpoint to resume")
    tag = open(latest).read().strip()
    if not tag or os.sep in tag or not os.path.isdir(os.path.join(load_dir, tag)):
        raise CheckpointError(f"--load {load_dir}: '{LATEST_FILE}' names {tag!r}, which is not a checkpoint "
                              f"directory there")
    meta_path = os.path.join(load_dir, tag, METADATA_FILE)
    if not os.path.isfile(meta_path):
        raise CheckpointError(f"--load {load_dir}: {meta_path} is missing (incomplete checkpoint)")
    return tag


def read_metadata(load_dir: str, tag: str) -> dict:
    path = os.path.join(load_dir, tag, METADATA_FILE)
    try:
        with open(path) as fh:
            metadata = json.load(fh)
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"checkpoint metadata {path} is unreadable: {exc}") from exc
    for key in ("iteration", "consumed_samples"):
        if not isinstance(metadata.get(key), int):
            raise CheckpointError(f"checkpoint metadata {path} lacks an integer '{key}'")
    return metadata


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
