"""Leaving a run early and cleanly: Megatron-LM's ``--exit-duration-in-mins`` and ``--exit-signal-handler``.

A batch scheduler ends a job with a signal (SLURM: SIGTERM, ``--signal=TERM@120`` sends it ahead of the time
limit) or at a wall-clock limit; either should cost the work since the last checkpoint, not the run. The handler
only records the signal, so the iteration in flight finishes. After every iteration all ranks agree (one small
all-reduce) whether any rank got the signal or is past the duration, then all save (with ``--save``) and leave
with exit status 0, so ``--load`` resumes exactly where they stopped. The signal may reach only some ranks (a
launcher, ``kill`` on one process): the agreement makes every rank stop at the same iteration.
"""
from __future__ import annotations

import signal
import time
from typing import Optional, Sequence

import torch
import torch.distributed as dist

__all__ = ["ExitConditions", "any_rank", "EXIT_SIGNALS"]

EXIT_SIGNALS = ("SIGTERM", "SIGINT", "SIGUSR1", "SIGUSR2")
# The duration counts from here: the training modules import this one at process start (Megatron-LM also
# measures from process start, since a scheduler's limit is on the whole job).
_PROCESS_START = time.time()


def any_rank(flags: Sequence[bool]) -> list[bool]:
    """Element-wise OR of ``flags`` over all ranks, known to every rank (one all-reduce; local without a group)."""
    if not dist.is_initialized():
        return [bool(f) for f in flags]
    value = torch.tensor([1.0 if f else 0.0 for f in flags])
    if dist.get_backend() == "nccl":
        value = value.cuda()
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return [bool(v > 0) for v in value.tolist()]


class ExitConditions:
    """The early-exit decision of one run. ``check()`` is a collective when any condition is on."""

    def __init__(self, duration_mins: Optional[float], signal_handler: bool, signal_name: str = "SIGTERM",
                 start_time: Optional[float] = None) -> None:
        if signal_name not in EXIT_SIGNALS:
            raise ValueError(f"--exit-signal must be one of {', '.join(EXIT_SIGNALS)}, got {signal_name!r}")
        self.duration_mins = duration_mins
        self.signal_name = signal_name if signal_handler else None
        self.start_time = _PROCESS_START if start_time is None else start_time
        self.received = False
        self._previous = None

    @property
    def active(self) -> bool:
        return self.duration_mins is not None or self.signal_name is not None

    def install(self) -> None:
        """Record ``--exit-signal`` from now on (instead of its default action of ending the process)."""
        if self.signal_name is not None and self._previous is None:
            self._previous = signal.signal(getattr(signal, self.signal_name), self._record)

    def restore(self) -> None:
        """Put the signal's previous handler back."""
        if self._previous is not None:
            signal.signal(getattr(signal, self.signal_name), self._previous)
            self._previous = None

    def _record(self, signum, frame) -> None:  # noqa: ARG002 - the signal module's signature
        self.received = True

    def check(self) -> Optional[str]:
        """Why every rank stops after this iteration, or None to go on (the same decision on every rank)."""
        if not self.active:
            return None
        minutes = (time.time() - self.start_time) / 60.0
        over_time = self.duration_mins is not None and minutes > self.duration_mins
        over_time, signalled = any_rank([over_time, self.received])
        if signalled:
            return f"after receiving {self.signal_name} (--exit-signal-handler)"
        if over_time:
            return f"after {minutes:.1f} minutes (--exit-duration-in-mins {self.duration_mins:g})"
        return None
