"""Decoding caches: what a GPT-LS layer keeps between generation steps.

A Long-Short layer keeps, per batch row and head (docs/inference.md, "Cache layout"):

* a **ring** of the last ``w`` window keys/values, already through LN_L (DualLN) and, with RoPE, rotated; the
  key of position ``p`` sits in slot ``p % w``. Its size is fixed: it never grows with the context;
* the **compressed** keys/values of every finished chunk, ``r`` per ``l`` tokens, already through LN_G (and
  rotated by the chunk's last position); entry ``c·r + j`` is the j-th key of chunk ``c``;
* the **partial chunk**: the raw keys/values and projection logits of the chunk being filled (fewer than ``l``
  tokens); when it completes it is projected into ``r`` compressed entries and emptied.

A full-attention (MASFormer) layer keeps an ordinary KV cache of every position. All rows of a batch are at the
same position (the generation loop feeds the rows in lockstep, see ``generation.py``), so no cache holds padding.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Union

import torch


class GrowableSequence:
    """A (B, H, n, D) tensor that grows along dim 2, with capacity doubling (or an exact ``reserve``)."""

    def __init__(self, batch: int, heads: int, dim: int, dtype: torch.dtype, device: torch.device,
                 capacity: int = 0) -> None:
        self.shape = (batch, heads, dim)
        self.dtype, self.device = dtype, device
        self.length = 0
        self.buffer = torch.empty(batch, heads, capacity, dim, dtype=dtype, device=device)

    @property
    def capacity(self) -> int:
        return self.buffer.shape[2]

    def reserve(self, capacity: int) -> None:
        """Make room for ``capacity`` entries in total (no-op when there already is)."""
        if capacity > self.capacity:
            b, h, d = self.shape
            grown = torch.empty(b, h, capacity, d, dtype=self.dtype, device=self.device)
            grown[:, :, :self.length] = self.buffer[:, :, :self.length]
            self.buffer = grown

    def append(self, x: torch.Tensor) -> None:
        """Append ``x`` (B, H, m, D)."""
        m = x.shape[2]
        if self.length + m > self.capacity:
            self.reserve(max(2 * self.capacity, self.length + m, 16))
        self.buffer[:, :, self.length:self.length + m] = x
        self.length += m

    def view(self) -> torch.Tensor:
        """The filled part, (B, H, length, D) (a view, valid until the next append)."""
        return self.buffer[:, :, :self.length]

    def used_bytes(self) -> int:
        return self.length * self.buffer[:, :, :1].numel() * self.buffer.element_size()

    def allocated_bytes(self) -> int:
        return self.buffer.numel() * self.buffer.element_size()


@dataclass(frozen=True)
class LayerCacheSize:
    """Entries (per batch row and head) held by one layer's cache; each entry is a key and a value vector."""

    kind: str  # "long_short" or "full"
    ring_capacity: int = 0  # w (fixed)
    ring_filled: int = 0  # min(t, w)
    compressed: int = 0  # r · floor(t / l)
    partial: int = 0  # t mod l (raw keys/values + r logits each), 0 without a projection
    full: int = 0  # t, full-attention layers only
    used_bytes: int = 0
    allocated_bytes: int = 0


class LongShortLayerCache:
    """Ring of window keys, compressed chunk keys and the partial chunk of one Long-Short layer."""

    kind = "long_short"

    def __init__(self, batch: int, heads: int, head_dim: int, *, window: int, segment_len: int, rank: int,
                 dtype: torch.dtype, device: torch.device, max_length: int = 0) -> None:
        self.window, self.segment_len, self.rank = window, segment_len, rank
        self.length = 0  # tokens seen so far
        self.ring_k = self.ring_v = None
        if window > 0:
            self.ring_k = torch.zeros(batch, heads, window, head_dim, dtype=dtype, device=device)
            self.ring_v = torch.zeros_like(self.ring_k)
        self.comp_k = self.comp_v = None
        self.part_k = self.part_v = self.part_logits = None
        self.part_len = 0
        if rank > 0:
            chunks = max_length // segment_len if max_length else 0
            self.comp_k = GrowableSequence(batch, heads, head_dim, dtype, device, chunks * rank)
            self.comp_v = GrowableSequence(batch, heads, head_dim, dtype, device, chunks * rank)
            self.part_k = torch.zeros(batch, heads, segment_len, head_dim, dtype=dtype, device=device)
            self.part_v = torch.zeros_like(self.part_k)
            self.part_logits = torch.zeros(batch, heads, segment_len, rank, dtype=dtype, device=device)

    # ---- window ring ---------------------------------------------------------------------------------------
    def window_history(self, count: int):
        """Normed keys/values of the ``count`` positions before the current one, oldest first."""
        idx = torch.arange(self.length - count, self.length, device=self.ring_k.device) % self.window
        return self.ring_k.index_select(2, idx), self.ring_v.index_select(2, idx)

    def write_window(self, k: torch.Tensor, v: torch.Tensor, first_position: int) -> None:
        """Store normed keys/values of positions ``first_position ..`` (only the last ``w`` can matter)."""
        m = k.shape[2]
        if m == 1:  # a decode step: one slot
            slot = first_position % self.window
            self.ring_k[:, :, slot] = k[:, :, 0]
            self.ring_v[:, :, slot] = v[:, :, 0]
            return
        keep = min(m, self.window)
        start = first_position + m - keep
        idx = torch.arange(start, start + keep, device=k.device) % self.window
        self.ring_k.index_copy_(2, idx, k[:, :, m - keep:])
        self.ring_v.index_copy_(2, idx, v[:, :, m - keep:])

    # ---- sizes ---------------------------------------------------------------------------------------------
    def size(self) -> LayerCacheSize:
        tensors_fixed = [t for t in (self.ring_k, self.ring_v, self.part_k, self.part_v, self.part_logits)
                         if t is not None]
        fixed = sum(t.numel() * t.element_size() for t in tensors_fixed)
        used = allocated = fixed
        if self.comp_k is not None:
            used += self.comp_k.used_bytes() + self.comp_v.used_bytes()
            allocated += self.comp_k.allocated_bytes() + self.comp_v.allocated_bytes()
        return LayerCacheSize(kind=self.kind, ring_capacity=self.window, ring_filled=min(self.length, self.window),
                              compressed=0 if self.comp_k is None else self.comp_k.length,
                              partial=self.part_len, used_bytes=used, allocated_bytes=allocated)


class FullLayerCache:
    """Ordinary KV cache of a full-attention layer (keys rotated when the model uses RoPE)."""

    kind = "full"

    def __init__(self, batch: int, heads: int, head_dim: int, *, dtype: torch.dtype, device: torch.device,
                 max_length: int = 0) -> None:
        self.length = 0
        self.k = GrowableSequence(batch, heads, head_dim, dtype, device, max_length)
        self.v = GrowableSequence(batch, heads, head_dim, dtype, device, max_length)

    def size(self) -> LayerCacheSize:
        return LayerCacheSize(kind=self.kind, full=self.k.length,
                              used_bytes=self.k.used_bytes() + self.v.used_bytes(),
                              allocated_bytes=self.k.allocated_bytes() + self.v.allocated_bytes())


LayerCache = Union[LongShortLayerCache, FullLayerCache]


class DecodingCache:
    """Per-layer caches of a whole model for a batch whose rows are all at position ``length``."""

    def __init__(self, layers: List[LayerCache], batch: int) -> None:
        self.layers = layers
        self.batch = batch

    @property
    def length(self) -> int:
        """Tokens processed so far (the position of the next token)."""
        return self.layers[0].length if self.layers else 0

    def sizes(self) -> List[LayerCacheSize]:
        return [layer.size() for layer in self.layers]

    def used_bytes(self) -> int:
        """Bytes of cache content (fixed ring and partial-chunk buffers + filled growing parts)."""
        return sum(s.used_bytes for s in self.sizes())

    def allocated_bytes(self) -> int:
        """Bytes of every buffer the cache holds, spare capacity included."""
        return sum(s.allocated_bytes for s in self.sizes())


def new_cache(model: torch.nn.Module, batch: int, *, max_length: int = 0,
              dtype: Optional[torch.dtype] = None, device: Optional[torch.device] = None) -> DecodingCache:
    """An empty cache for ``model`` (a single-process ``GPTModel``); ``max_length`` pre-sizes growing parts."""
    ref = next(model.parameters())
    dtype = dtype or ref.dtype
    device = device or ref.device
    config = model.config
    layers: List[LayerCache] = []
    for layer in model.layers:
        attn = layer.self_attention
        if attn.full:
            layers.append(FullLayerCache(batch, attn.num_heads, attn.head_dim, dtype=dtype, device=device,
                                         max_length=max_length))
        else:
            layers.append(LongShortLayerCache(batch, attn.num_heads, attn.head_dim, window=attn.window,
                                              segment_len=config.segment_length, rank=attn.rank, dtype=dtype,
                                              device=device, max_length=max_length))
    return DecodingCache(layers, batch)
