"""Pure attention math (no process groups, never imports torch.distributed).

Public API: :func:`long_short_attention`, :func:`long_short_attention_2d`, :func:`full_attention`, and the
pieces context parallelism calls on local + received tensors: :func:`long_short_attention_shard`,
:func:`full_attention_at`.
"""
from .full import full_attention, full_attention_at
from .long_short import long_short_attention, long_short_attention_shard, select_backend
from .long_short_2d import long_short_attention_2d
from .rotary import Rotary

__all__ = ["long_short_attention", "long_short_attention_2d", "full_attention", "select_backend",
           "long_short_attention_shard", "full_attention_at", "Rotary"]
