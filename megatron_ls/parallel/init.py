"""Weight initialisers (applied to the FULL weight, before sharding; see layers.py)."""
from __future__ import annotations

import math
from typing import Callable

import torch

InitMethod = Callable[[torch.Tensor], torch.Tensor]


def init_method_normal(std: float) -> InitMethod:
    """Return an in-place initialiser drawing from N(0, std^2) with torch's default generator."""
    if std < 0:
        raise ValueError(f"init std must be >= 0, got {std}")

    def init_(tensor: torch.Tensor) -> torch.Tensor:
        return torch.nn.init.normal_(tensor, mean=0.0, std=std)

    return init_


def scaled_init_method_normal(std: float, num_layers: int) -> InitMethod:
    """N(0, (std / sqrt(2*num_layers))^2): GPT-2/Megatron scaling for the residual output projections."""
    if num_layers < 1:
        raise ValueError(f"num_layers must be >= 1 for the scaled init, got {num_layers}")
    return init_method_normal(std / math.sqrt(2.0 * num_layers))


DEFAULT_INIT_STD = 0.02


def default_init_method() -> InitMethod:
    """normal(0, 0.02), the layers' default."""
    return init_method_normal(DEFAULT_INIT_STD)
