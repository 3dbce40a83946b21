"""Checkpoint files shared by training and inference: the `latest` marker, metadata, atomic writes, safe loads.

Training (``megatron_ls.training.checkpointing``) writes checkpoints; inference and conversion
(``megatron_ls.inference``) read them. Both use these helpers, so neither depends on the other.
"""
from __future__ import annotations

import json
import os
import tempfile
from typing import Any, Optional

import torch

LATEST_FILE = "latest"
METADATA_FILE = "megatron_ls.json"
FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint directory that cannot be loaded; the message names the path and the problem."""


def checkpoint_tag(iteration: int) -> str:
    return f"iter_{iteration:07d}"


def fsync_dir(path: str) -> None:
    """Make a directory's entries (new names, renames) durable; a no-op where directories cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class _RecordingWriter:
    """A file wrapper that remembers the ``OSError`` of a failed write (torch's zip writer replaces it with
    "unexpected pos ..."); it has no ``fileno``, so torch writes every byte through it."""

    def __init__(self, fh: Any) -> None:
        self.fh = fh
        self.error: Optional[OSError] = None

    def write(self, data: Any) -> int:
        try:
            return self.fh.write(data)
        except OSError as exc:
            self.error = self.error or exc
            raise

    def flush(self) -> None:
        self.fh.flush()


def durable_torch_save(obj: Any, path: str, zipfile: bool = True) -> None:
    """``torch.save`` through a Python file, flushed and fsynced; a full disk or a permission problem raises
    the ``OSError`` with its errno (torch alone reports "unexpected pos ..." or "write(): fd N failed")."""
    with open(path, "wb") as fh:
        writer = _RecordingWriter(fh)
        try:
            torch.save(obj, writer, _use_new_zipfile_serialization=zipfile)
        except Exception as exc:
            if writer.error is not None:
                raise writer.error from exc
            raise
        fh.flush()
        os.fsync(fh.fileno())


def atomic_write_text(path: str, text: str) -> None:
    """Write ``text`` to ``path`` so that readers see the old content or the new one, never a torn file."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-" + os.path.basename(path))
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
        fsync_dir(directory)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_torch_save(obj: Any, path: str) -> None:
    """torch.save to a temporary name in the same directory (fsynced), then rename."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-" + os.path.basename(path))
    os.close(fd)
    try:
        durable_torch_save(obj, tmp)
        os.replace(tmp, path)
        fsync_dir(directory)
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


def displaced_tag(tag: str) -> str:
    """Where a live checkpoint directory waits while a re-save of the same iteration takes its name."""
    return ".old-" + tag


def read_latest_tag(load_dir: str) -> str:
    """The tag named by ``load_dir/latest``, checked to point at a complete checkpoint.

    Re-saving the iteration ``latest`` names swaps the new directory in with one atomic exchange; where the file
    system cannot exchange, the old directory is first renamed to ``.old-TAG``, and a crash right then leaves it
    there: it is returned instead (a complete checkpoint, loadable like any other tag).
    """
    if not os.path.isdir(load_dir):
        raise CheckpointError(f"--load {load_dir}: no such directory")
    latest = os.path.join(load_dir, LATEST_FILE)
    if not os.path.isfile(latest):
        raise CheckpointError(f"--load {load_dir}: no '{LATEST_FILE}' marker, so no complete checkpoint to resume")
    tag = open(latest).read().strip()
    if tag and os.sep not in tag and not os.path.isdir(os.path.join(load_dir, tag)):
        if os.path.isfile(os.path.join(load_dir, displaced_tag(tag), METADATA_FILE)):
            tag = displaced_tag(tag)
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
