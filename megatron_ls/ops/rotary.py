"""Rotary position embedding (RoPE) for queries and keys, and where Long-Short attention's keys sit.

Megatron's convention: the first ``rotary_dim`` channels of each head are rotated in two halves
(``[x1, x2] -> [x1·cos − x2·sin, x2·cos + x1·sin]``) with frequencies ``base^(−2i/rotary_dim)``; the remaining
channels pass through. ``q·k`` of a query at ``t`` and a key at ``s`` then depends on ``t − s`` only.

In Long-Short attention (causal) a window key is rotated by its own position, after LN_L (a LayerNorm's per-channel
affine would otherwise break the relative property), and a compressed key of chunk ``c`` — a mixture of the chunk's
tokens — is rotated, after LN_G, by the chunk's last position ``(c+1)·l − 1``. Shifting every position by the same
amount therefore leaves the attention unchanged, and nothing limits the length. Values are never rotated.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Rotary:
    """RoPE settings: ``base`` (``--rotary-base``) and the rotated channels per head, ``dim`` (even)."""

    base: float
    dim: int

    def __post_init__(self) -> None:
        if self.dim <= 0 or self.dim % 2:
            raise ValueError(f"rotary dimension must be a positive even number, got {self.dim} "
                             "(check --rotary-percent against the head dimension)")
        if self.base <= 1:
            raise ValueError(f"--rotary-base must be > 1, got {self.base}")

    @classmethod
    def for_head(cls, head_dim: int, base: float, percent: float) -> "Rotary":
        """The settings for a head of ``head_dim`` channels with ``percent`` of them rotated (rounded down to even)."""
        if not 0.0 < percent <= 1.0:
            raise ValueError(f"--rotary-percent must be in (0, 1], got {percent}")
        return cls(base, int(head_dim * percent) // 2 * 2)

    def rotate(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Rotate ``x`` (B, H, N, D) whose token ``i`` sits at ``positions[i]`` (shape (N,) or (B, N))."""
        d = x.shape[-1]
        if self.dim > d:
            raise ValueError(f"rotary dimension {self.dim} exceeds the head dimension {d}")
        if positions.shape[-1] != x.shape[2]:
            raise ValueError(f"{positions.shape[-1]} positions for {x.shape[2]} tokens")
        half = self.dim // 2
        # angles in float64 so positions in the millions keep their precision
        inv_freq = self.base ** (-torch.arange(half, dtype=torch.float64, device=x.device) * 2.0 / self.dim)
        angles = positions.to(device=x.device, dtype=torch.float64)[..., None] * inv_freq  # (..., N, half)
        if angles.dim() == 3:  # per-sequence positions (B, N, half) -> broadcast over heads
            angles = angles[:, None]
        compute = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
        cos, sin = angles.cos().to(compute), angles.sin().to(compute)
        xc = x.to(compute)
        x1, x2, rest = xc[..., :half], xc[..., half:self.dim], xc[..., self.dim:]
        out = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest], dim=-1)
        return out.to(x.dtype)


def chunk_positions(first_chunk: int, num_chunks: int, rank: int, segment_len: int,
                    device: torch.device | str | None = None) -> torch.Tensor:
    """Positions of compressed keys ``c·r + j`` for chunks ``first_chunk ..``: each chunk's last token."""
    chunks = torch.arange(first_chunk, first_chunk + num_chunks, device=device)
    return ((chunks + 1) * segment_len - 1).repeat_interleave(rank)
