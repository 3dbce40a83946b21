"""The Long-Short decoding cache of an exported megatron_ls model, as a ``transformers`` ``Cache``.

Self-contained: imports only ``torch`` and ``transformers``. Per Long-Short layer, batch row and head it keeps

* a **ring** of the last ``w`` window keys/values (after LN_L, rotated with RoPE), the key of position ``p`` in
  slot ``p % w``, with the position each slot holds (-1: empty);
* the **compressed** keys/values of every finished chunk: ``r`` per chunk of ``l`` tokens (after LN_G), entry
  ``c·r + j`` is the j-th key of chunk ``c``;
* the **partial chunk**: raw keys/values and projection logits of the ``t mod l`` tokens of the unfinished chunk.

so after ``t`` tokens a layer holds ``w + r·floor(t/l) + (t mod l)`` entries. Full-attention (MASFormer) layers
keep an ordinary KV cache of ``t`` entries. A token whose attention-mask value is 0 is removed altogether: it takes
no position and is never stored, so rows of a batch may hold different numbers of tokens (their buffers are as
long as the longest row's; the extra entries of shorter rows are never visible).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

Tensor = torch.Tensor


def take(x: Tensor, index: Tensor) -> Tensor:
    """``x[b, :, index[b, i]]`` for ``x`` (B, H, N, F) and ``index`` (B, M): gathers along dim 2 per row."""
    b, h, _, f = x.shape
    return x.gather(2, index[:, None, :, None].expand(b, h, index.shape[1], f))


def extend_rows(old: Tensor, old_len: Tensor, new: Tensor, new_len: Tensor) -> Tensor:
    """Per row: the first ``old_len[b]`` entries of ``old`` followed by the first ``new_len[b]`` of ``new``.

    ``old`` (B, H, N, F), ``new`` (B, H, M, F); the result has ``max(old_len + new_len)`` entries along dim 2
    (entries past a row's total are filler, never attended).
    """
    total = int((old_len + new_len).max()) if old_len.numel() else 0
    slot = torch.arange(total, device=new.device)[None, :]
    from_old = slot < old_len[:, None]
    if old.shape[2] < total:
        pad = old.new_zeros(old.shape[0], old.shape[1], total - old.shape[2], old.shape[3])
        old = torch.cat([old, pad], dim=2)
    if new.shape[2] == 0:
        return old[:, :, :total]
    fresh = take(new, (slot - old_len[:, None]).clamp(0, new.shape[2] - 1))
    return torch.where(from_old[:, None, :, None], old[:, :, :total], fresh)


@dataclass
class TokenLayout:
    """Where the real tokens of one forward call sit. "Slots" are the call's input columns; the "aligned" order
    lists each row's real tokens first (in order), so aligned index ``j`` of row ``b`` is position ``past[b] + j``."""

    past: Tensor  # (B,) tokens each row held before this call
    count: Tensor  # (B,) real tokens in this call
    gather: Tensor  # (B, M) slot of the j-th real token (clamped for j >= count)
    aligned: Tensor  # (B, n) aligned index of each slot (clamped for padding)
    real: Tensor  # (B, n) bool: slot holds a real token
    trivial: bool  # no padding: aligned order == slots

    @classmethod
    def build(cls, mask: Optional[Tensor], past: Tensor, n: int) -> "TokenLayout":
        """From a (B, n) 0/1 attention mask of this call's slots (None: every slot is real)."""
        b = past.shape[0]
        slots = torch.arange(n, device=past.device)
        if mask is None or bool(mask.all()):
            real = torch.ones(b, n, dtype=torch.bool, device=past.device)
            index = slots.expand(b, n)
            return cls(past, torch.full_like(past, n), index, index, real, True)
        real = mask.to(device=past.device) != 0
        count = real.sum(dim=1)
        order = torch.sort((~real).to(torch.int8), dim=1, stable=True).indices  # real slots first, in order
        aligned = (real.long().cumsum(dim=1) - 1).clamp(min=0)
        return cls(past, count, order[:, :int(count.max())], aligned, real, False)

    @property
    def width(self) -> int:
        """M: the most real tokens any row has in this call."""
        return self.gather.shape[1]

    @property
    def positions(self) -> Tensor:
        """(B, M) position of aligned token j of each row."""
        return self.past[:, None] + torch.arange(self.width, device=self.past.device)[None, :]

    def slot_positions(self) -> Tensor:
        """(B, n) position of each slot's token (padding slots get their row's next position; never used)."""
        return self.past[:, None] + self.aligned

    def to_aligned(self, x: Tensor) -> Tensor:
        """(B, H, n, F) slots -> (B, H, M, F) aligned tokens."""
        return x if self.trivial else take(x, self.gather)

    def to_slots(self, y: Tensor) -> Tensor:
        """(B, H, M, F) aligned -> (B, H, n, F) slots; padding slots are 0."""
        if self.trivial:
            return y
        if y.shape[2] == 0:
            return y.new_zeros(y.shape[0], y.shape[1], self.real.shape[1], y.shape[3])
        return take(y, self.aligned.clamp(max=y.shape[2] - 1)) * self.real[:, None, :, None].to(y.dtype)


@dataclass
class LongShortKeys:
    """What a Long-Short layer's queries of one call attend to besides the call's own window keys."""

    ring_k: Optional[Tensor]  # (B, H, w, D) window keys of earlier calls
    ring_v: Optional[Tensor]
    ring_pos: Optional[Tensor]  # (B, w) position held by each ring slot, -1 = empty
    comp_k: Optional[Tensor]  # (B, H, G, D) compressed keys of every finished chunk, this call's included
    comp_v: Optional[Tensor]


# compress(raw_k (B,H,K,l,D), raw_v, logits (B,H,K,l,r), keep (B,K,l), chunk_ids (B,K)) -> (k (B,H,K·r,D), v)
Compressor = Callable[[Tensor, Tensor, Tensor, Tensor, Tensor], tuple]


class RowsCacheLayer(CacheLayerMixin):
    """Bookkeeping shared by both layer caches: columns consumed, and batch reordering of the named tensors."""

    is_compileable = False
    is_croppable = False
    supports_early_init = False
    tensor_names: tuple = ()

    def __init__(self) -> None:
        super().__init__()
        self.slots = 0
        for name in self.tensor_names:
            setattr(self, name, None)

    def _apply(self, fn: Callable[[Tensor], Tensor]) -> None:
        for name in self.tensor_names:
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, fn(t))

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._apply(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._apply(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: Tensor) -> None:
        self._apply(lambda t: t[indices])

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.slots + query_length, 0

    def get_seq_length(self) -> int:
        return self.slots

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.is_initialized = False
        RowsCacheLayer.__init__(self)

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("the Long-Short cache cannot be cropped (finished chunks are compressed for good), "
                                  "so assisted decoding and rollbacks are not supported")

    def offload(self) -> None:
        raise NotImplementedError("the Long-Short cache does not support offloading")

    def prefetch(self) -> None:
        raise NotImplementedError("the Long-Short cache does not support offloading")


class LongShortCacheLayer(RowsCacheLayer):
    """Window ring, compressed chunk keys and partial chunk of one Long-Short layer."""

    is_sliding = True
    tensor_names = ("ring_k", "ring_v", "ring_pos", "comp_k", "comp_v", "part_k", "part_v", "part_logits")

    def __init__(self, window: int, segment_length: int, rank: int) -> None:
        super().__init__()
        self.window, self.segment_length, self.rank = window, segment_length, rank

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        b, h, _, d = key_states.shape
        self.dtype, self.device = key_states.dtype, key_states.device
        if self.window > 0:
            self.ring_k = key_states.new_zeros(b, h, self.window, d)
            self.ring_v = key_states.new_zeros(b, h, self.window, d)
            self.ring_pos = torch.full((b, self.window), -1, dtype=torch.long, device=self.device)
        if self.rank > 0:
            self.comp_k = key_states.new_zeros(b, h, 0, d)
            self.comp_v = key_states.new_zeros(b, h, 0, d)
            self.part_k = key_states.new_zeros(b, h, 0, d)
            self.part_v = key_states.new_zeros(b, h, 0, d)
            self.part_logits = key_states.new_zeros(b, h, 0, self.rank)
        self.is_initialized = True

    def update(self, key_states: Optional[Tensor], value_states: Optional[Tensor], *args, raw_keys: Tensor,
               raw_values: Tensor, logits: Optional[Tensor], layout: TokenLayout,
               compress: Optional[Compressor] = None, **kwargs) -> LongShortKeys:
        """Take this call's aligned tokens: normed window keys/values (``key_states``/``value_states``, None
        without a window), raw keys/values and projection logits. Returns the earlier ring (the new window keys
        are the caller's) and all compressed keys, this call's finished chunks included."""
        if not self.is_initialized:
            self.lazy_initialization(raw_keys, raw_values)
        if self.rank > 0:
            self._compress_chunks(raw_keys, raw_values, logits, layout, compress)
        keys = LongShortKeys(self.ring_k, self.ring_v, self.ring_pos, self.comp_k, self.comp_v)
        if self.window > 0:
            self._write_ring(key_states, value_states, layout)
        self.slots += layout.real.shape[1]
        return keys

    def _write_ring(self, k: Tensor, v: Tensor, layout: TokenLayout) -> None:
        """Slot s keeps the newest position p ≡ s (mod w); it comes from this call when p >= past."""
        w, m = self.window, k.shape[2]
        last = layout.past + layout.count - 1
        slot = torch.arange(w, device=k.device)[None, :]
        newest = last[:, None] - torch.remainder(last[:, None] - slot, w)
        fresh = newest >= layout.past[:, None]
        if m == 0 or not bool(fresh.any()):
            return
        index = (newest - layout.past[:, None]).clamp(0, m - 1)
        self.ring_k = torch.where(fresh[:, None, :, None], take(k, index), self.ring_k)
        self.ring_v = torch.where(fresh[:, None, :, None], take(v, index), self.ring_v)
        self.ring_pos = torch.where(fresh, newest, self.ring_pos)

    def _compress_chunks(self, k: Tensor, v: Tensor, logits: Tensor, layout: TokenLayout,
                         compress: Compressor) -> None:
        """Append this call's raw tokens to the partial chunk; project every chunk that completes."""
        l, r = self.segment_length, self.rank
        held = layout.past % l  # partial-chunk tokens per row
        stream_len = held + layout.count  # row b's stream: positions past - held .. past + count - 1
        width = int(stream_len.max())
        src = [torch.cat([self.part_k, k], dim=2), torch.cat([self.part_v, v], dim=2),
               torch.cat([self.part_logits, logits], dim=2)]
        if width == 0:
            self.part_k, self.part_v, self.part_logits = (s[:, :, :0] for s in src)
            return
        i = torch.arange(width, device=k.device)[None, :]
        index = torch.where(i < held[:, None], i, self.part_k.shape[2] + i - held[:, None])
        stream = [take(s, index.clamp(0, s.shape[2] - 1)) for s in src]  # (B, H, width, .) per row from chunk start
        n_chunks = width // l
        if n_chunks > 0:
            b, h = k.shape[:2]
            keep = (i[:, :n_chunks * l] < stream_len[:, None]).view(b, n_chunks, l)
            done_before = layout.past // l
            chunk_ids = done_before[:, None] + torch.arange(n_chunks, device=k.device)[None, :]
            new_k, new_v = compress(*(s[:, :, :n_chunks * l].reshape(b, h, n_chunks, l, -1) for s in stream),
                                    keep, chunk_ids)
            self.comp_k = extend_rows(self.comp_k, done_before * r, new_k, (stream_len // l) * r)
            self.comp_v = extend_rows(self.comp_v, done_before * r, new_v, (stream_len // l) * r)
        # the new partial chunk: each row's last (stream_len mod l) stream tokens
        start = (stream_len // l) * l
        j = torch.arange(int((stream_len % l).max()), device=k.device)[None, :]
        self.part_k, self.part_v, self.part_logits = (take(s, (start[:, None] + j).clamp(max=width - 1))
                                                      for s in stream)

    def entries(self) -> dict:
        """Entries held per row and head (the longest row's): ring, compressed, partial."""
        return {"kind": "long_short", "ring": 0 if self.ring_k is None else self.ring_k.shape[2],
                "compressed": 0 if self.comp_k is None else self.comp_k.shape[2],
                "partial": 0 if self.part_k is None else self.part_k.shape[2]}


class FullAttentionCacheLayer(RowsCacheLayer):
    """Ordinary KV cache of a full-attention layer: every position's key/value (rotated with RoPE)."""

    tensor_names = ("keys", "values")

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        b, h, _, d = key_states.shape
        self.dtype, self.device = key_states.dtype, key_states.device
        self.keys, self.values = key_states.new_zeros(b, h, 0, d), value_states.new_zeros(b, h, 0, d)
        self.is_initialized = True

    def update(self, key_states: Tensor, value_states: Tensor, *args, layout: TokenLayout,
               **kwargs) -> tuple[Tensor, Tensor]:
        """Append this call's aligned keys/values after each row's earlier ones; returns all of them."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.keys = extend_rows(self.keys, layout.past, key_states, layout.count)
        self.values = extend_rows(self.values, layout.past, value_states, layout.count)
        self.slots += layout.real.shape[1]
        return self.keys, self.values

    def entries(self) -> dict:
        return {"kind": "full", "full": 0 if self.keys is None else self.keys.shape[2]}


class LongShortCache(Cache):
    """Decoding state of a whole MegatronLS model: one layer cache per layer plus each row's token count."""

    def __init__(self, config) -> None:
        layers = [FullAttentionCacheLayer() if config.is_full_attention(i)
                  else LongShortCacheLayer(config.window_size, config.segment_length, config.projection_rank)
                  for i in range(config.num_hidden_layers)]
        super().__init__(layers=layers)
        self.row_lengths: Optional[Tensor] = None  # (B,) real tokens per row
        self.slots = 0  # input columns consumed (padding included), what generate() slices by

    def start_call(self, mask: Optional[Tensor], batch: int, n: int, device: torch.device) -> TokenLayout:
        """The layout of a call feeding ``n`` columns; ``mask`` (B, slots + n) or (B, n) 0/1, or None."""
        if self.row_lengths is None:
            self.row_lengths = torch.zeros(batch, dtype=torch.long, device=device)
        elif self.row_lengths.shape[0] != batch:
            raise ValueError(f"this cache holds {self.row_lengths.shape[0]} rows, the input has {batch}")
        if mask is not None:
            if mask.dim() != 2 or mask.shape[0] != batch or mask.shape[1] < n:
                raise ValueError(f"attention_mask must be 2D (batch, length >= {n}) with 0 for padding, got shape "
                                 f"{tuple(mask.shape)}")
            mask = mask[:, -n:]
        return TokenLayout.build(mask, self.row_lengths, n)

    def end_call(self, layout: TokenLayout) -> None:
        self.row_lengths = layout.past + layout.count
        self.slots += layout.real.shape[1]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.slots

    def entries(self) -> list:
        """Per layer: the entries held per row and head (ring / compressed / partial, or full)."""
        return [layer.entries() for layer in self.layers]

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        if self.row_lengths is not None:
            self.row_lengths = self.row_lengths.index_select(0, beam_idx.to(self.row_lengths.device))

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        if self.row_lengths is not None:
            self.row_lengths = self.row_lengths.repeat_interleave(repeats, dim=0)

    def batch_select_indices(self, indices: Tensor) -> None:
        super().batch_select_indices(indices)
        if self.row_lengths is not None:
            self.row_lengths = self.row_lengths[indices]

    def reset(self) -> None:
        super().reset()
        self.row_lengths, self.slots = None, 0
