"""Learning-rate schedule with Megatron-LM's rules: linear warmup from ``--lr-warmup-init``, then constant /
linear / cosine / inverse-square-root / WSD decay to ``min_lr``, counted in iterations or (``--train-samples``)
in samples.

The formulas are those of Megatron-LM's ``OptimizerParamScheduler.get_lr`` evaluated at a position ``p`` in
schedule units (iterations, or samples with increment = global batch size). Optimizer step ``k`` (1-based) uses
``p = k x increment``; Megatron evaluates step ``k`` at ``(k - 1) x increment``, so its first warmup step runs
at ``--lr-warmup-init``, ours one increment further along.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from megatron_ls.config import TrainingConfig

DECAY_STYLES = ("constant", "linear", "cosine", "inverse-square-root", "WSD")
WSD_DECAY_STYLES = ("exponential", "linear", "cosine", "minus_sqrt")


def _wsd_coeff(style: str, ratio: float) -> float:
    if style == "linear":
        return 1.0 - ratio
    if style == "cosine":
        return 0.5 * (math.cos(math.pi * ratio) + 1.0)
    if style == "exponential":
        return 2.0 * math.pow(0.5, ratio) - 1.0
    if style == "minus_sqrt":
        return 1.0 - math.sqrt(ratio)
    raise ValueError(f"--lr-wsd-decay-style {style!r} must be one of {WSD_DECAY_STYLES}")


class OptimizerParamScheduler:
    """Sets ``lr`` on every param group each step; checkpointable (DeepSpeed saves it as the engine's scheduler).

    ``warmup_steps``, ``decay_steps`` and ``wsd_decay_steps`` are in schedule units; one optimizer step advances
    ``increment`` units (1 for iteration-based training, the global batch size for sample-based training).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, *, max_lr: float, min_lr: float, warmup_steps: float,
                 decay_steps: float, decay_style: str, init_lr: float = 0.0, increment: int = 1,
                 wsd_decay_steps: Optional[float] = None, wsd_decay_style: str = "exponential",
                 weight_decay: Optional[tuple[float, float, str, float]] = None) -> None:
        if decay_style not in DECAY_STYLES:
            raise ValueError(f"--lr-decay-style {decay_style!r} must be one of {DECAY_STYLES}")
        if decay_style == "WSD" and not wsd_decay_steps:
            raise ValueError("--lr-decay-style WSD needs --lr-wsd-decay-iters or --lr-wsd-decay-samples")
        self.optimizer = optimizer
        self.max_lr, self.min_lr, self.init_lr = max_lr, min_lr, init_lr
        self.warmup_steps = warmup_steps
        self.decay_steps = max(decay_steps, 1)
        self.decay_style = decay_style
        self.increment = increment
        self.wsd_decay_steps = wsd_decay_steps
        self.wsd_decay_style = wsd_decay_style
        # (start, end, style, length in schedule units); None leaves each group's weight decay as built
        self.weight_decay = weight_decay
        self.num_steps = 0
        self._apply(1)

    def lr_at(self, position: float) -> float:
        """Megatron-LM's ``get_lr`` at ``position`` schedule units."""
        if self.warmup_steps > 0 and position <= self.warmup_steps:
            return self.init_lr + (self.max_lr - self.init_lr) * position / self.warmup_steps
        if self.decay_style == "constant":
            return self.max_lr
        if position > self.decay_steps:
            return self.min_lr
        if self.decay_style == "inverse-square-root":
            lr = self.max_lr * max(self.warmup_steps, 1) ** 0.5 / max(position, 1) ** 0.5
            return max(self.min_lr, lr)
        if self.decay_style == "WSD":
            anneal_start = self.decay_steps - self.wsd_decay_steps
            coeff = 1.0 if position <= anneal_start else _wsd_coeff(
                self.wsd_decay_style, (position - anneal_start) / self.wsd_decay_steps)
        else:
            ratio = (position - self.warmup_steps) / max(self.decay_steps - self.warmup_steps, 1)
            ratio = min(max(ratio, 0.0), 1.0)
            coeff = 1.0 - ratio if self.decay_style == "linear" else 0.5 * (math.cos(math.pi * ratio) + 1.0)
        return self.min_lr + coeff * (self.max_lr - self.min_lr)

    def get_lr(self, step: int) -> float:
        """Learning rate used by optimizer step number ``step`` (1-based)."""
        return self.lr_at(step * self.increment)

    def wd_at(self, position: float) -> float:
        """Megatron-LM's ``get_wd``: from start to end over the schedule length, linear or cosine."""
        start, end, style, length = self.weight_decay
        if position > length:
            return end
        ratio = position / max(length, 1)
        coeff = ratio if style == "linear" else 0.5 * (math.cos(math.pi * (1.0 - ratio)) + 1.0)
        return start + coeff * (end - start)

    def _apply(self, step: int) -> None:
        """Set the learning rate (and a scheduled weight decay) of optimizer step ``step`` on every group."""
        lr = self.get_lr(step)
        wd = None if self.weight_decay is None else self.wd_at(step * self.increment)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
            if wd is not None:
                # checkpoints older than wd_mult: the decayed group is the one with a non-zero weight decay
                group["weight_decay"] = wd * group.get("wd_mult", 1.0 if group["weight_decay"] > 0 else 0.0)

    @property
    def current_lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def step(self) -> None:
        """Called by DeepSpeed after each optimizer step: set the lr for the next one."""
        self.num_steps += 1
        self._apply(self.num_steps + 1)

    def state_dict(self) -> dict:
        return {"num_steps": self.num_steps, "max_lr": self.max_lr, "min_lr": self.min_lr,
                "warmup_steps": self.warmup_steps, "decay_steps": self.decay_steps, "decay_style": self.decay_style,
                "increment": self.increment, "wsd_decay_steps": self.wsd_decay_steps}

    def load_state_dict(self, state: dict) -> None:
        # The schedule's shape comes from the current flags; only the position (optimizer steps) is restored.
        self.num_steps = int(state["num_steps"])
        self._apply(self.num_steps + 1)


def build_scheduler(optimizer: torch.optim.Optimizer, t: TrainingConfig) -> OptimizerParamScheduler:
    """The schedule the flags of ``t`` (a resolved ``TrainingConfig``) describe, as Megatron-LM builds it."""
    if t.train_samples is not None:  # sample-based: every unit is a sample
        increment = t.global_batch_size
        decay = t.lr_decay_samples or t.train_samples
        warmup, wsd = t.lr_warmup_samples, t.lr_wsd_decay_samples
    else:
        increment = 1
        decay = t.lr_decay_iters or t.train_iters
        warmup, wsd = t.lr_warmup_iters, t.lr_wsd_decay_iters
    if t.lr_warmup_fraction is not None:
        warmup = t.lr_warmup_fraction * decay
    weight_decay = None
    if t.weight_decay_incr_style != "constant":  # Megatron: over all of training, in the schedule's units
        length = t.train_samples if t.train_samples is not None else t.train_iters
        weight_decay = (t.start_weight_decay, t.end_weight_decay, t.weight_decay_incr_style, length)
    return OptimizerParamScheduler(optimizer, max_lr=t.lr, min_lr=t.min_lr, warmup_steps=warmup,
                                   decay_steps=decay, decay_style=t.lr_decay_style, init_lr=t.lr_warmup_init,
                                   increment=increment, wsd_decay_steps=wsd, wsd_decay_style=t.lr_wsd_decay_style,
                                   weight_decay=weight_decay)
