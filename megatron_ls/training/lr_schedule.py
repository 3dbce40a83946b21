"""Learning-rate schedule: linear warmup, then constant / linear / cosine decay to ``min_lr`` (Megatron's shape)."""
from __future__ import annotations

import math

import torch


class OptimizerParamScheduler:
    """Sets ``lr`` on every param group each step; checkpointable (DeepSpeed saves it as the engine's scheduler)."""

    def __init__(self, optimizer: torch.optim.Optimizer, *, max_lr: float, min_lr: float, warmup_iters: int,
                 decay_iters: int, decay_style: str) -> None:
        if decay_style not in ("constant", "linear", "cosine"):
            raise ValueError(f"--lr-decay-style {decay_style!r} must be constant, linear or cosine")
        self.optimizer = optimizer
        self.max_lr = max_lr
        self.min_lr = min_lr
        self.warmup_iters = warmup_iters
        self.decay_iters = max(decay_iters, 1)
        self.decay_style = decay_style
        self.num_steps = 0
        self._apply(self.get_lr(1))

    def get_lr(self, step: int) -> float:
        """Learning rate used by optimizer step number ``step`` (1-based)."""
        if self.warmup_iters > 0 and step <= self.warmup_iters:
            return self.max_lr * step / self.warmup_iters
        if self.decay_style == "constant":
            return self.max_lr
        progress = min(max(step - self.warmup_iters, 0) / max(self.decay_iters - self.warmup_iters, 1), 1.0)
        if self.decay_style == "linear":
            coeff = 1.0 - progress
        else:
            coeff = 0.5 * (math.cos(math.pi * progress) + 1.0)
        return self.min_lr + coeff * (self.max_lr - self.min_lr)

    def _apply(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    @property
    def current_lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def step(self) -> None:
        """Called by DeepSpeed after each optimizer step: set the lr for the next one."""
        self.num_steps += 1
        self._apply(self.get_lr(self.num_steps + 1))

    def state_dict(self) -> dict:
        return {"num_steps": self.num_steps, "max_lr": self.max_lr, "min_lr": self.min_lr,
                "warmup_iters": self.warmup_iters, "decay_iters": self.decay_iters,
                "decay_style": self.decay_style}

    def load_state_dict(self, state: dict) -> None:
        # The schedule's shape comes from the current flags; only the position is restored.
        self.num_steps = int(state["num_steps"])
        self._apply(self.get_lr(self.num_steps + 1))
