"""What a training task changes in the generic ``pretrain()`` loop (the defaults are language modelling).

A task keeps the engine, layouts, checkpoints, schedule and logging of ``pretrain()`` and swaps only: how samples
are collated, the loss name in the log line, the evaluation (e.g. accuracy instead of perplexity), the FLOP count
per token and extra checkpoint metadata (what a converter needs to rebuild the model).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional


@dataclass
class Task:
    """Hooks for ``pretrain(..., task=Task(...))``; every field is optional."""

    loss_name: str = "lm loss"
    # samples -> batch dict with "tokens", "labels", "loss_mask" (the keys the training steps read)
    collate_fn: Optional[Callable[[list], dict]] = None
    # (steps, dataset, eval_iters) -> {"loss": float, "line": str to print, ...metrics}
    evaluate: Optional[Callable[[Any, Any, int], dict]] = None
    flops_per_token: Optional[float] = None
    metadata: dict = field(default_factory=dict)
