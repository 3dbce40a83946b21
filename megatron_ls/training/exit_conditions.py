"""Leaving a run early and cleanly: Megatron-LM's ``--exit-duration-in-mins`` and ``--exit-signal-handler``.

A batch scheduler ends a job with a signal (SLURM: SIGTERM, ``--signal=TERM@120`` sends it ahead of the time
limit) or at a wall-clock limit; either should cost the work since the last checkpoint, not the run. The handler
only records the signal, so the iteration in flight finishes. After every iteration all ranks agree (one small
all-reduce) whether any rank got the signal or is past the duration, then all save (with ``--save``) and leave
with exit status 0, so ``--load`` resumes exactly where they stopped. The signal may reach only some ranks (a
launcher, ``kill`` on one process): the agreement makes every rank stop at the same iteration.
"""
from __future__ import annotations

import functools
import os
import signal
import threading
import time
from typing import Callable, Optional

from megatron_ls.parallel.utils import any_rank

__all__ = ["ExitConditions", "EXIT_SIGNALS", "worker_signal_init"]

EXIT_SIGNALS = ("SIGTERM", "SIGINT", "SIGUSR1", "SIGUSR2")
# The duration counts from here: the training modules import this one at process start (Megatron-LM also
# measures from process start, since a scheduler's limit is on the whole job).
_PROCESS_START = time.time()


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


def _outlive_signal(signal_name: str, grace_s: float, worker_id: int) -> None:  # noqa: ARG001 - DataLoader's call
    def deferred_exit(signum, frame) -> None:  # noqa: ARG001 - the signal module's signature
        timer = threading.Timer(grace_s, os._exit, args=(0,))
        timer.daemon = True
        timer.start()

    signal.signal(getattr(signal, signal_name), deferred_exit)


def worker_signal_init(signal_name: Optional[str], grace_s: float = 60.0) -> Optional[Callable[[int], None]]:
    """A DataLoader ``worker_init_fn`` for runs with ``--exit-signal-handler``, else None.

    Launchers and schedulers signal whole process groups (torchrun's ``killpg``, SLURM's job step), so the
    DataLoader workers get the signal too; by default they die of it, and the training process then fails on its
    next batch instead of saving. With this, a worker keeps serving batches for the last iteration and leaves
    ``grace_s`` seconds later (sooner when the training process shuts it down or exits).
    """
    if signal_name is None:
        return None
    return functools.partial(_outlive_signal, signal_name, grace_s)
