"""Megatron-LM's ``--profile``: profile the iterations that run after ``--profile-step-start`` have completed until
``--profile-step-end`` have (1-based: ``start + 1 .. end``, Megatron's counting) on ``--profile-ranks``.

With ``--use-pytorch-profiler`` the torch profiler records CPU and CUDA activity, shapes and stacks and writes a
trace (``*.pt.trace.json``) into ``--tensorboard-dir`` (open it with TensorBoard's profiler plugin or
chrome://tracing). Without it the run brackets the same iterations with CUDA's profiler API and NVTX ranges, for
``nsys profile --capture-range=cudaProfilerApi --capture-range-end=stop``: that needs a GPU.
"""
from __future__ import annotations

import contextlib
from typing import Optional, Sequence

import torch

__all__ = ["StepProfiler"]


class StepProfiler:
    """Call ``step(iteration)`` after every training iteration and ``stop()`` when training ends."""

    def __init__(self, enabled: bool, start: int, end: int, ranks: Sequence[int], rank: int,
                 use_pytorch_profiler: bool, trace_dir: Optional[str]) -> None:
        self.active = enabled and rank in set(ranks)
        self.start, self.end = start, end
        self.torch_profiler: Optional[torch.profiler.profile] = None
        self._nvtx: Optional[contextlib.AbstractContextManager] = None
        self._nsys = self.active and not use_pytorch_profiler
        if self.active and use_pytorch_profiler:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if torch.cuda.is_available():
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            # step() follows each iteration, so the profiler's step k covers iteration k + 1: Megatron's schedule
            # idles through iteration start - 1, warms up on iteration start, records start + 1 .. end.
            schedule = torch.profiler.schedule(wait=max(start - 1, 0), warmup=1 if start > 0 else 0,
                                               active=end - start, repeat=1)
            self.torch_profiler = torch.profiler.profile(
                activities=activities, schedule=schedule, record_shapes=True, with_stack=True,
                on_trace_ready=torch.profiler.tensorboard_trace_handler(trace_dir))
            self.torch_profiler.start()
        elif self._nsys and start == 0:
            self._start_nsys()

    def _start_nsys(self) -> None:
        torch.cuda.cudart().cudaProfilerStart()
        self._nvtx = torch.autograd.profiler.emit_nvtx(record_shapes=True)
        self._nvtx.__enter__()

    def _stop_nsys(self) -> None:
        if self._nvtx is not None:
            self._nvtx.__exit__(None, None, None)
            self._nvtx = None
            torch.cuda.cudart().cudaProfilerStop()

    def step(self, iteration: int) -> None:
        """After iteration ``iteration`` (counted from 1)."""
        if not self.active:
            return
        if self.torch_profiler is not None:
            self.torch_profiler.step()
        elif self._nsys:
            if iteration == self.start:
                self._start_nsys()
            elif iteration == self.end:
                self._stop_nsys()

    def stop(self) -> None:
        if self.torch_profiler is not None:
            self.torch_profiler.stop()
            self.torch_profiler = None
        self._stop_nsys()
