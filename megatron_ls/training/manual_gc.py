"""Megatron-LM's ``--manual-gc``: Python's garbage collector off during training, run at chosen points instead.

The automatic collector starts whenever allocation counts cross its thresholds, at a different moment on every
rank; a collection of a large heap takes long enough that the other ranks wait for that one in the next
collective. With ``--manual-gc`` every rank collects at the same iterations (``--manual-gc-interval``) and around
evaluation (unless ``--no-manual-gc-eval``), and the collector is switched back on when training ends.
"""
from __future__ import annotations

import functools
import gc
from typing import Callable, TypeVar

T = TypeVar("T")

__all__ = ["ManualGC"]


class ManualGC:
    """The collection schedule of one run; every method is a no-op without ``--manual-gc``."""

    def __init__(self, enabled: bool, interval: int = 0, around_eval: bool = True) -> None:
        if interval < 0:
            raise ValueError(f"--manual-gc-interval must be >= 0, got {interval}")
        self.enabled, self.interval, self.around_eval = enabled, interval, around_eval
        self._was_enabled = gc.isenabled()

    def start(self) -> None:
        """Collect once and switch the automatic collector off."""
        if self.enabled:
            self._was_enabled = gc.isenabled()
            gc.collect()
            gc.disable()

    def after_iteration(self, iteration: int) -> None:
        if self.enabled and self.interval and iteration % self.interval == 0:
            gc.collect()

    def wrap_evaluation(self, evaluate: Callable[..., T]) -> Callable[..., T]:
        """``evaluate`` with a collection before and after it (unchanged without --manual-gc or with
        --no-manual-gc-eval)."""
        if not (self.enabled and self.around_eval):
            return evaluate

        @functools.wraps(evaluate)
        def wrapped(*args, **kwargs) -> T:
            gc.collect()
            try:
                return evaluate(*args, **kwargs)
            finally:
                gc.collect()
        return wrapped

    def stop(self) -> None:
        """Give the collector back its automatic schedule (as it was before ``start``)."""
        if self.enabled and self._was_enabled:
            gc.enable()
