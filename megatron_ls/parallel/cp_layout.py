"""Which tokens of a sequence each context-parallel (CP) rank holds: pure arithmetic, no process groups.

Two layouts, chosen with ``--context-parallel-layout``:

* ``contiguous``: rank ``i`` of ``cp`` holds tokens ``[i·n/cp, (i+1)·n/cp)``: one piece per rank.
* ``balanced``: the sequence is cut into ``2·cp`` equal pieces and rank ``i`` holds pieces ``i`` and
  ``2·cp−1−i`` (Megatron-LM's causal load balancing): under causal attention every rank then gets one cheap
  early piece and one expensive late piece.

A rank's local tokens are its pieces concatenated in order, so ``local_positions`` are the global position ids
(what the position embedding must see) and ``slice_sequence`` cuts a full sample to this rank's part.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Tuple

import torch

LAYOUTS = ("contiguous", "balanced")


@dataclass(frozen=True)
class ContextLayout:
    """How a sequence of ``seq_length`` tokens is split over ``cp`` ranks; ``rank`` is this rank's CP index."""

    seq_length: int
    cp: int
    rank: int = 0
    kind: str = "contiguous"

    def __post_init__(self) -> None:
        if self.kind not in LAYOUTS:
            raise ValueError(f"--context-parallel-layout must be one of {LAYOUTS}, got {self.kind!r}")
        if self.cp < 1 or not 0 <= self.rank < self.cp:
            raise ValueError(f"context-parallel rank {self.rank} outside a group of {self.cp}")
        parts = self.num_pieces_total
        if self.seq_length % parts:
            raise ValueError(f"--seq-length {self.seq_length} is not divisible by {parts} "
                             f"({'2 x ' if self.kind == 'balanced' else ''}--context-parallel-size {self.cp}"
                             f"{', --context-parallel-layout balanced' if self.kind == 'balanced' else ''})")

    @property
    def num_pieces_total(self) -> int:
        return self.cp * (2 if self.kind == "balanced" and self.cp > 1 else 1)

    @property
    def piece_length(self) -> int:
        return self.seq_length // self.num_pieces_total

    @property
    def local_length(self) -> int:
        return self.seq_length // self.cp

    def piece_owner(self, piece: int) -> Tuple[int, int]:
        """(CP rank, index among that rank's pieces) of global piece ``piece``."""
        if self.num_pieces_total == self.cp:
            return piece, 0
        return (piece, 0) if piece < self.cp else (2 * self.cp - 1 - piece, 1)

    def pieces_of(self, rank: int) -> List[int]:
        """Global piece indices held by ``rank``, in local order."""
        if self.num_pieces_total == self.cp:
            return [rank]
        return [rank, 2 * self.cp - 1 - rank]

    def pieces(self, rank: int | None = None) -> List[Tuple[int, int]]:
        """``(global start, length)`` of each piece held by ``rank`` (default this rank), in local order."""
        rank = self.rank if rank is None else rank
        p = self.piece_length
        return [(i * p, p) for i in self.pieces_of(rank)]

    def local_positions(self, device: torch.device | str | None = None) -> torch.Tensor:
        """Global positions (LongTensor, ``local_length``) of this rank's tokens, in local order."""
        return torch.cat([torch.arange(s, s + n, device=device) for s, n in self.pieces()])

    def slice_sequence(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """This rank's tokens of a full-length tensor ``x`` (its ``dim`` has ``seq_length`` entries)."""
        if x.shape[dim] != self.seq_length:
            raise ValueError(f"expected {self.seq_length} tokens along dim {dim}, got {x.shape[dim]}")
        if self.cp == 1:
            return x
        return torch.cat([x.narrow(dim, s, n) for s, n in self.pieces()], dim=dim)

    def check_attention(self, *, causal: bool, window: int, segment_length: int, projection_rank: int) -> None:
        """Raise ValueError when a Long-Short layer cannot be split this way (names the flags)."""
        if self.cp == 1:
            return
        p = self.piece_length
        what = "--seq-length / --context-parallel-size" + (" / 2" if self.num_pieces_total > self.cp else "")
        if causal and projection_rank > 0 and p % segment_length:
            raise ValueError(f"context parallelism cuts the sequence into pieces of {p} tokens ({what}), which "
                             f"must be a multiple of --segment-length {segment_length} so every projection "
                             "chunk lives on one rank")
        if not causal and window > 0 and p % window:
            raise ValueError(f"context parallelism cuts the sequence into pieces of {p} tokens ({what}), which "
                             f"must be a multiple of --window-size {window} (bidirectional window segments "
                             "may not straddle ranks)")
