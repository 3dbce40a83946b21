"""Pure attention math (no process groups, never imports torch.distributed).

Public API: :func:`long_short_attention`, :func:`long_short_attention_2d`, :func:`full_attention`.
"""
from .full import full_attention
from .long_short import long_short_attention, select_backend
from .long_short_2d import long_short_attention_2d

__all__ = ["long_short_attention", "long_short_attention_2d", "full_attention", "select_backend"]
