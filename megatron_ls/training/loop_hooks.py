"""What every training loop (``pretrain``, ``tasks/main.py``) does around its iterations: Megatron's early exits
(``--exit-interval``, ``--exit-duration-in-mins``, ``--exit-signal-handler``), ``--manual-gc`` and ``--profile``."""
from __future__ import annotations

from typing import Callable, Optional, TypeVar

import torch.distributed as dist

from megatron_ls.arguments import Arguments
from megatron_ls.training.exit_conditions import ExitConditions, worker_signal_init
from megatron_ls.training.manual_gc import ManualGC
from megatron_ls.training.profiling import StepProfiler

T = TypeVar("T")

__all__ = ["LoopHooks"]


def _print_rank_0(message: str) -> None:
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(message, flush=True)


class LoopHooks:
    """``start()`` before the first iteration, ``after_iteration(i)`` after each (it says why to stop, the same on
    every rank, or None), ``finish()`` once training and the final evaluations are done."""

    def __init__(self, args: Arguments) -> None:
        t, lg = args.training, args.logging
        self.exit_interval = lg.exit_interval
        self.exits = ExitConditions(lg.exit_duration_in_mins, lg.exit_signal_handler, lg.exit_signal)
        if self.exits.active and not args.checkpoint.save:
            _print_rank_0(" warning: --exit-duration-in-mins / --exit-signal-handler without --save: an early exit "
                          "keeps nothing to resume from")
        # DataLoader workers outlive --exit-signal so the last iteration still gets its batches
        self.worker_init_fn = worker_signal_init(self.exits.signal_name)
        self.collector = ManualGC(t.manual_gc, t.manual_gc_interval, t.manual_gc_eval)
        self._profile = (lg.profile, lg.profile_step_start, lg.profile_step_end, lg.profile_ranks,
                         lg.use_pytorch_profiler, lg.tensorboard_dir)
        self.profiler: Optional[StepProfiler] = None

    def wrap_evaluation(self, evaluate: Callable[..., T]) -> Callable[..., T]:
        """``evaluate`` with ``--manual-gc``'s collections around it."""
        return self.collector.wrap_evaluation(evaluate)

    def start(self) -> None:
        self.exits.install()
        self.collector.start()
        enabled, start, end, ranks, use_torch, trace_dir = self._profile
        rank = dist.get_rank() if dist.is_initialized() else 0
        self.profiler = StepProfiler(enabled, start, end, ranks, rank, use_torch, trace_dir)

    def after_iteration(self, iteration: int) -> Optional[str]:
        """Collect garbage / profile as scheduled; why every rank stops after ``iteration``, or None."""
        self.collector.after_iteration(iteration)
        if self.profiler is not None:
            self.profiler.step(iteration)
        if self.exit_interval and iteration % self.exit_interval == 0:
            return f"(--exit-interval {self.exit_interval})"
        return self.exits.check()  # a collective when an exit condition is on

    def finish(self) -> None:
        self.exits.restore()
        if self.profiler is not None:
            self.profiler.stop()
        self.collector.stop()
