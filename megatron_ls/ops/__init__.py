"""Pure attention math (no process groups, never imports torch.distributed).

Public API: :func:`long_short_attention`, :func:`long_short_attention_2d`, :func:`full_attention`.
"""
from .full import full_attention
from .long_short import long_short_attention, select_backend

__all__ = ["long_short_attention", "full_attention", "select_backend"]
