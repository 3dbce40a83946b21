"""Crash-safe checkpoint saves: a temporary directory, fsync, one atomic publish, then ``latest``.

A save never writes into a complete checkpoint. Every rank writes into ``SAVE/.tmp-iter_N`` (DeepSpeed's files
through :class:`DurableCheckpointEngine`, our RNG and metadata files), each file is fsynced by the rank that wrote
it, the ranks agree that every write succeeded, and only then rank 0 publishes:

* a new iteration: ``rename(.tmp-iter_N, iter_N)``;
* an iteration that already exists (a re-save): an atomic exchange of the two directory names
  (``renameat2(RENAME_EXCHANGE)``), then the old files are deleted. Where the file system cannot exchange, the
  old directory is renamed to ``.old-iter_N`` first; ``read_latest_tag`` falls back to it if a crash lands
  between the two renames;

then the directory is fsynced and ``latest`` is replaced atomically. A failed write (disk full, permission) is
recorded instead of raised, so DeepSpeed's collectives inside the save still meet; the ranks then agree on the
failure, rank 0 removes the temporary directory, and every rank raises one :class:`CheckpointSaveError`.
"""
from __future__ import annotations

import ctypes
import errno
import json
import os
import re
import shutil
from typing import Any, Optional

import torch.distributed as dist

from megatron_ls.checkpoint_files import (FORMAT_VERSION, LATEST_FILE, METADATA_FILE, CheckpointError,
                                          atomic_write_text, checkpoint_tag, displaced_tag, durable_torch_save,
                                          fsync_dir, safe_torch_load)
from megatron_ls.parallel.utils import any_rank

TMP_PREFIX = ".tmp-"


class CheckpointSaveError(CheckpointError):
    """A save that failed; the partial files are gone and ``latest`` still names the previous checkpoint."""

    all_ranks = True  # every rank raises the same message: print it once


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _describe(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.errno is not None:
        where = f": {exc.filename}" if exc.filename else ""
        reason = {errno.ENOSPC: "disk full", errno.EDQUOT: "disk quota exceeded", errno.EACCES: "permission denied",
                  errno.EROFS: "read-only file system"}.get(exc.errno, os.strerror(exc.errno))
        return f"{reason} ({errno.errorcode.get(exc.errno, exc.errno)}){where}"
    return f"{type(exc).__name__}: {exc}"


_ENGINE_CLASS: Any = None


def durable_checkpoint_engine(config: Any = None) -> Any:
    """A DeepSpeed checkpoint engine that loads with ``weights_only=True``, saves durably and records failures.

    Built on DeepSpeed's ``TorchCheckpointEngine`` when first needed (importing this module needs no DeepSpeed).
    """
    global _ENGINE_CLASS
    if _ENGINE_CLASS is None:
        from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

        class DurableCheckpointEngine(TorchCheckpointEngine):
            def __init__(self, config_params: Any = None) -> None:
                super().__init__(config_params)
                self.failure: Optional[str] = None

            def load(self, path: str, map_location: Any = None) -> Any:  # noqa: D401 - DeepSpeed's interface
                return safe_torch_load(path, map_location=map_location)

            def makedirs(self, path: str, exist_ok: bool = False) -> None:
                try:
                    os.makedirs(path, exist_ok=exist_ok)
                except OSError as exc:
                    self.record(exc)

            def save(self, state_dict: Any, path: str) -> None:
                if self.failure is not None:
                    return  # the save has failed already; do not fill the disk further
                try:
                    durable_torch_save(state_dict, path, zipfile=bool(self.zipfile_serialization))
                except OSError as exc:
                    exc.filename = exc.filename or path
                    self.record(exc)
                except Exception as exc:  # noqa: BLE001 - recorded, raised once the ranks agree
                    self.record(RuntimeError(f"{path}: {type(exc).__name__}: {exc}"))

            def record(self, exc: BaseException) -> None:
                if self.failure is None:
                    self.failure = _describe(exc)

        _ENGINE_CLASS = DurableCheckpointEngine
    return _ENGINE_CLASS(config)


def install_checkpoint_engine(engine: Any) -> Any:
    """Give ``engine`` a :func:`durable_checkpoint_engine` (unless a non-default engine was configured)."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    current = getattr(engine, "checkpoint_engine", None)
    if current is None or type(current) is TorchCheckpointEngine:
        engine.checkpoint_engine = durable_checkpoint_engine(engine._config)
        # DeepSpeed copies its zero_to_fp32.py helpers next to the checkpoints; a failure there is recorded too.
        original = engine._copy_recovery_script

        def copy_recovery_script(save_path: str) -> None:
            try:
                original(save_path)
            except OSError as exc:
                engine.checkpoint_engine.record(exc)

        engine._copy_recovery_script = copy_recovery_script
    return engine.checkpoint_engine


def _any_rank(flag: bool) -> bool:
    """True on every rank when ``flag`` is True on at least one (a collective)."""
    return any_rank([flag])[0]


def _first_failure(failure: Optional[str]) -> str:
    """The lowest failing rank's description, known to every rank (a collective)."""
    if not dist.is_initialized():
        return failure or "unknown failure"
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, failure)
    for rank, text in enumerate(gathered):
        if text:
            return f"{text} (rank {rank})"
    return "unknown failure"


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def exchange_paths(a: str, b: str) -> bool:
    """Atomically swap two existing paths (Linux ``renameat2``); False where the system cannot."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
        return False
    raise OSError(code, os.strerror(code), a)


def _fsync_tree(path: str) -> None:
    for root, _, _ in os.walk(path):
        fsync_dir(root)


def publish(save_dir: str, tmp_dir: str, tag: str) -> None:
    """Move a complete ``tmp_dir`` to ``save_dir/tag`` (replacing an existing one atomically); then ``latest``."""
    final = os.path.join(save_dir, tag)
    _fsync_tree(tmp_dir)
    if not os.path.exists(final):
        os.rename(tmp_dir, final)
    elif exchange_paths(tmp_dir, final):
        fsync_dir(save_dir)
        shutil.rmtree(tmp_dir, ignore_errors=True)  # now holds the replaced files
    else:
        old = os.path.join(save_dir, displaced_tag(tag))
        shutil.rmtree(old, ignore_errors=True)
        os.rename(final, old)
        os.rename(tmp_dir, final)
        fsync_dir(save_dir)
        shutil.rmtree(old, ignore_errors=True)
    fsync_dir(save_dir)
    atomic_write_text(os.path.join(save_dir, LATEST_FILE), tag + "\n")
    shutil.rmtree(os.path.join(save_dir, displaced_tag(tag)), ignore_errors=True)  # left by an earlier crash


def remove_stale(save_dir: str) -> None:
    """Delete leftovers of interrupted saves: temporary directories, and displaced ones whose tag is back."""
    for name in os.listdir(save_dir):
        path = os.path.join(save_dir, name)
        if name.startswith(TMP_PREFIX) and os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)
        elif name.startswith(".old-") and os.path.isfile(os.path.join(save_dir, name[5:], METADATA_FILE)):
            shutil.rmtree(path, ignore_errors=True)


def prune_checkpoints(save_dir: str, newest: int, retain_interval: int) -> list[str]:
    """``--save-retain-interval``: delete the ``iter_N`` directories whose ``N`` is not a multiple of
    ``retain_interval``, except ``newest`` (the one ``latest`` names). Returns the removed names."""
    removed = []
    for name in sorted(os.listdir(save_dir)):
        match = re.fullmatch(r"iter_(\d+)", name)
        if match and int(match.group(1)) != newest and int(match.group(1)) % retain_interval:
            shutil.rmtree(os.path.join(save_dir, name), ignore_errors=True)
            removed.append(name)
    return removed


def strip_optimizer_state(ckpt_dir: str) -> None:
    """``--no-save-optim``: remove DeepSpeed's optimizer files (ZeRO / bf16 partitions) and the optimizer state
    the plain engine keeps inside ``mp_rank_XX_model_states.pt``; weights, counters and schedule stay."""
    for name in sorted(os.listdir(ckpt_dir)):
        path = os.path.join(ckpt_dir, name)
        if name.endswith("optim_states.pt"):
            os.remove(path)
        elif name.startswith("mp_rank_") and name.endswith("_model_states.pt"):
            states = safe_torch_load(path)
            if states.get("optimizer") is not None:
                states["optimizer"] = None
                durable_torch_save(states, path)


def save_checkpoint(engine: Any, save_dir: str, iteration: int, consumed_samples: int, args_dict: dict,
                    rng_state: Optional[dict], extra_metadata: Optional[dict] = None,
                    retain_interval: Optional[int] = None, save_optimizer: bool = True) -> str:
    """Save engine + metadata + every rank's RNG state as ``save_dir/iter_N``, crash-safely (module docstring).

    Collective. Raises :class:`CheckpointSaveError` on every rank when any rank's write failed. With
    ``retain_interval``, once the new checkpoint is published rank 0 deletes the earlier ones that are not kept.
    ``rng_state=None`` saves no RNG states (``--no-save-rng``); ``save_optimizer=False`` drops the optimizer
    state before the checkpoint is published (``--no-save-optim``).
    """
    tag = checkpoint_tag(iteration)
    tmp_tag = TMP_PREFIX + tag
    tmp_dir = os.path.join(save_dir, tmp_tag)
    ckpt_engine = install_checkpoint_engine(engine)
    ckpt_engine.failure = None
    failure: Optional[str] = None
    if _rank() == 0:
        try:
            os.makedirs(save_dir, exist_ok=True)
            remove_stale(save_dir)
            os.makedirs(os.path.join(tmp_dir, "rng"))
        except OSError as exc:
            failure = _describe(exc)
    if not _any_rank(failure is not None):
        # DeepSpeed never writes `latest` here (its version is not atomic).
        try:
            engine.save_checkpoint(save_dir, tag=tmp_tag, client_state={"iteration": iteration,
                                                                       "consumed_samples": consumed_samples},
                                   save_latest=False)
        except Exception as exc:  # noqa: BLE001 - anything DeepSpeed raises while writing fails the save
            ckpt_engine.record(exc)
        failure = ckpt_engine.failure
        try:
            if failure is None and rng_state is not None:
                durable_torch_save(rng_state, os.path.join(tmp_dir, "rng", f"rank_{_rank():05d}.pt"))
        except OSError as exc:
            failure = _describe(exc)
        # every rank's files are written before rank 0 strips optimizer state or writes the metadata
        failed_before = _any_rank(failure is not None)
        try:
            if not failed_before and _rank() == 0:
                if not save_optimizer:
                    strip_optimizer_state(tmp_dir)
                metadata = {"format_version": FORMAT_VERSION, "iteration": iteration,
                            "consumed_samples": consumed_samples,
                            "world_size": dist.get_world_size() if dist.is_initialized() else 1, "args": args_dict,
                            "optimizer_saved": save_optimizer, "rng_saved": rng_state is not None}
                metadata.update(extra_metadata or {})
                atomic_write_text(os.path.join(tmp_dir, METADATA_FILE),
                                  json.dumps(metadata, indent=2, default=str))
        except OSError as exc:
            failure = _describe(exc)
        if not _any_rank(failure is not None) and _rank() == 0:
            try:
                publish(save_dir, tmp_dir, tag)
            except OSError as exc:
                failure = _describe(exc)
            if failure is None and retain_interval:
                prune_checkpoints(save_dir, iteration, retain_interval)
    if _any_rank(failure is not None):
        reason = _first_failure(failure)
        if _rank() == 0:
            shutil.rmtree(tmp_dir, ignore_errors=True)
        if dist.is_initialized():
            dist.barrier()
        latest = os.path.join(save_dir, LATEST_FILE)
        kept = open(latest).read().strip() if os.path.isfile(latest) else None
        raise CheckpointSaveError(f"--save {save_dir}: saving iteration {iteration} failed: {reason}; its partial "
                                  f"files were removed and " + (f"'{LATEST_FILE}' still names {kept}" if kept else
                                                                "no earlier checkpoint exists there"))
    return os.path.join(save_dir, tag)
