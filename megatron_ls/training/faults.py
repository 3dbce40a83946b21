"""Faults as the user sees them: one line naming the step and the rank, a non-zero exit, never a hang.

* :func:`set_phase` records what this process is doing ("training iteration 12", "saving checkpoint ..."), so an
  error raised deep inside a collective can be reported with the step it interrupted.
* :func:`bound_collective_timeouts` gives every process group this rank belongs to the
  ``--distributed-timeout-minutes`` timeout, including groups made without it (DeepSpeed's pipeline groups;
  ours get it when they are made, ``parallel/timeouts.py``). gloo then raises from the stuck collective; NCCL's
  watchdog (``TORCH_NCCL_ASYNC_ERROR_HANDLING``, set to 3 unless the user chose a mode) aborts the process after
  the same time.
* :class:`NonFiniteTracker` turns a run of skipped non-finite steps into one :class:`NumericsError`.
* :func:`describe_failure` maps the failure classes users meet to one line, :func:`error_line` adds the user's
  own mistakes (flags, files, data); anything else is a bug and keeps its traceback. :func:`run_tool` applies
  this to the one-process tools (``tools/*.py``); ``training/pretrain.run_main`` to the training entry points.
"""
from __future__ import annotations

import datetime
import math
import os
import sys
from typing import Callable, Optional, TypeVar

import torch.distributed as dist

T = TypeVar("T")

_PHASE = "start-up"
_TIMEOUT_MINUTES: Optional[float] = None

# Substrings of the errors torch's backends raise when a peer is stuck (timeout) or gone (connection lost).
_TIMEOUT_MARKS = ("timed out", "timeout", "watchdog")
_PEER_MARKS = ("connection closed by peer", "connection reset by peer", "broken pipe", "connection refused")


class NumericsError(RuntimeError):
    """Training stopped because the loss or the gradient norm stayed non-finite."""


def set_phase(text: str) -> None:
    """Record the step this process is in (used in error messages)."""
    global _PHASE
    _PHASE = text


def phase() -> str:
    return _PHASE


def bound_collective_timeouts(minutes: float) -> int:
    """Set ``minutes`` as the timeout of every process group this rank is in; returns how many were set."""
    global _TIMEOUT_MINUTES
    _TIMEOUT_MINUTES = minutes
    if not dist.is_initialized():
        return 0
    from torch.distributed import distributed_c10d as c10d

    timeout = datetime.timedelta(seconds=minutes * 60)
    count = 0
    for group in list(getattr(c10d._world, "pg_map", {}).keys()):
        try:
            if c10d._rank_not_in_group(group):
                continue
            c10d._set_pg_timeout(timeout, group)
            count += 1
        except (RuntimeError, ValueError, AttributeError):
            continue  # a backend that cannot change its timeout keeps the one it was made with
    return count


class NonFiniteTracker:
    """Counts consecutive skipped non-finite steps; raises :class:`NumericsError` at ``limit``.

    With fp16 loss scaling an overflow is routine (the scaler lowers the scale and the step is skipped), so those
    steps are not counted. Otherwise (fp32, bf16) a step whose loss or gradient norm is not finite is skipped by
    the optimizer (weights and LR schedule unchanged) and counted here.
    """

    def __init__(self, limit: int, loss_scaling: bool, loss_name: str = "lm loss") -> None:
        self.limit = max(1, int(limit))
        self.loss_scaling = loss_scaling
        self.loss_name = loss_name
        self.consecutive = 0

    def update(self, iteration: int, loss: float, grad_norm: Optional[float], skipped: bool) -> None:
        """Account for one finished iteration; raises :class:`NumericsError` when training must stop."""
        bad = not math.isfinite(loss) or (grad_norm is not None and not math.isfinite(grad_norm))
        values = f"{self.loss_name} {loss:.6E}, grad norm {grad_norm if grad_norm is not None else 'n/a'}"
        if bad and not skipped:
            raise NumericsError(f"iteration {iteration}: {values} is not finite and the optimizer step was not "
                                f"skipped; the weights are no longer usable: lower --lr or check the data, and "
                                f"resume from the last checkpoint")
        if not skipped or self.loss_scaling:
            self.consecutive = 0
            return
        self.consecutive += 1
        if self.consecutive >= self.limit:
            raise NumericsError(f"iteration {iteration}: {self.consecutive} consecutive iteration(s) with a "
                                f"non-finite loss or gradient norm ({values}); each was skipped (weights "
                                f"unchanged); stopping (--nonfinite-steps-limit {self.limit}): lower --lr, check "
                                f"the data, or resume from the last checkpoint")


def one_line(text: str, limit: int = 1200) -> str:
    """``text`` with its line breaks and runs of blanks collapsed, cut at ``limit`` characters."""
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[:limit - 3] + "..."


def _rank_text() -> str:
    return f"rank {dist.get_rank()}" if dist.is_available() and dist.is_initialized() else "rank 0"


def error_line(exc: BaseException) -> Optional[str]:
    """One line for a failure the user can act on (a bad flag value, file, data set or checkpoint: ValueError,
    CheckpointError, a missing file) or a known fault (:func:`describe_failure`); None for a bug."""
    from megatron_ls.checkpoint_files import CheckpointError

    if isinstance(exc, (ValueError, CheckpointError, FileNotFoundError)):
        return one_line(str(exc))
    return describe_failure(exc)


def run_tool(main: Callable[[], T]) -> T:
    """Run a one-process tool: a failure :func:`error_line` knows ends in one line ``error: ...`` on stderr and exit
    status 1; anything else keeps its traceback (a bug)."""
    try:
        return main()
    except Exception as exc:  # noqa: BLE001 - sorted by error_line; SystemExit and KeyboardInterrupt pass
        if isinstance(exc, OSError) and exc.errno is not None:  # one process: no rank or phase to name
            line = f"{os.strerror(exc.errno)}: {exc.filename or one_line(str(exc))}"
        else:
            line = error_line(exc)
        if line is None:
            raise
        print(f"error: {line}", file=sys.stderr, flush=True)
        sys.exit(1)


def describe_failure(exc: BaseException) -> Optional[str]:
    """One line for a known failure class (distributed timeout or lost peer, numerics, disk), else None."""
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if isinstance(exc, NumericsError):
        return f"{_rank_text()}: {first}"
    if "loss scale already at minimum" in first:
        return (f"{_rank_text()}: {_PHASE}: the fp16 loss scale reached its minimum and the step still overflows "
                f"(the loss or gradients are not finite); lower --lr or use --bf16")
    lowered = first.lower()
    if "rendezvous" in lowered:
        return first  # initialize_distributed's own message names the address, port, rank and world size
    distributed = isinstance(exc, RuntimeError) and (
        any(mark in lowered for mark in _TIMEOUT_MARKS + _PEER_MARKS)
        or type(exc).__name__ in ("DistBackendError", "DistNetworkError", "DistStoreError"))
    if distributed:
        limit = (f"--distributed-timeout-minutes {_TIMEOUT_MINUTES:g}" if _TIMEOUT_MINUTES is not None
                 else "the distributed timeout")
        if any(mark in lowered for mark in _PEER_MARKS):
            what = "a peer rank exited or lost its connection"
        else:
            what = f"a collective did not complete within {limit}: a peer rank is stuck or dead"
        return f"{_rank_text()}: {_PHASE}: {what} ({type(exc).__name__}: {first})"
    if isinstance(exc, OSError) and exc.errno is not None:
        return f"{_rank_text()}: {_PHASE}: {os.strerror(exc.errno)}: {exc.filename or first}"
    return None
