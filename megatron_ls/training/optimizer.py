"""AdamW with Megatron's parameter groups (no weight decay on biases and norms), fused where torch has it."""
from __future__ import annotations

import torch
from torch import nn

from megatron_ls.config import TrainingConfig


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: matrices (decayed) and biases / norm parameters (not decayed).

    Shapes are the full ones (``ds_shape``) under ZeRO-3, whose parameters are empty placeholders once partitioned:
    elastic resume re-derives this order from a ZeRO-3 engine's module.
    """
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if len(getattr(param, "ds_shape", param.shape)) < 2 or name.endswith(".bias") or "norm" in name:
            no_decay.append(param)
        else:
            decay.append(param)
    groups = []  # wd_mult: what a weight-decay schedule multiplies (Megatron's name)
    if decay:
        groups.append({"params": decay, "weight_decay": weight_decay, "wd_mult": 1.0})
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0, "wd_mult": 0.0})
    return groups


def build_optimizer(model: nn.Module, config: TrainingConfig) -> torch.optim.Optimizer:
    """torch AdamW: the fused kernel when every parameter lives on a device that supports it, else foreach."""
    groups = parameter_groups(model, config.weight_decay)
    kwargs = dict(lr=config.lr, betas=(config.adam_beta1, config.adam_beta2), eps=config.adam_eps)
    try:
        return torch.optim.AdamW(groups, fused=True, **kwargs)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.AdamW(groups, foreach=True, **kwargs)
