"""FAR_RECALL: a long-range probe on which a sliding window alone cannot beat chance.

Each example is ``length`` random noise symbols (drawn uniformly from ``num_symbols``) with the information
that decides the label at position ``p >= min_distance``; it is classified from a CLS token put in front
(position 0). Two modes:

* ``needle`` (default): one needle token ``nK`` (``K < num_classes``, never used as noise) at ``p``; label ``K``.
  One hop: a query that attends to the needle reads the label.
* ``pair``: a marker ``@`` at ``p`` followed by a value symbol ``sK`` (one of the first ``num_classes`` noise
  symbols, so the value is also common as noise); label ``K``. Two hops: a layer must first tie the value to
  the marker before it, then carry it to the CLS token (associative recall of one pair).

Why locality cannot win: in a bidirectional window layer a query in segment ``s`` sees keys
``[s·w - e, (s+1)·w + e)`` (``e = max(w // 2, 1)``), so after ``L`` window-only layers position 0 depends only on
positions ``< L·w + e``; with ``min_distance`` beyond that, the CLS output of a window-only model is independent
of the needle (marker, value), and its accuracy is chance (``1 / num_classes``) by construction. Long-short and
full attention can carry it to the CLS token through the projected (global) keys or directly.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np

__all__ = ["FarRecallConfig", "MODES", "vocab", "generate_examples", "window_receptive_field"]

PAD, CLS, MARK = "<pad>", "<cls>", "@"
MODES = ("needle", "pair")
FIRST_SYMBOL = 3  # ids: 0 padding, 1 CLS, 2 marker, then noise symbols, then needles


@dataclass
class FarRecallConfig:
    length: int = 512
    min_distance: int = 128
    num_symbols: int = 32
    num_classes: int = 10
    mode: str = "needle"

    def validate(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"--mode must be one of {MODES}, got {self.mode!r}")
        if not 2 <= self.num_classes <= self.num_symbols:
            raise ValueError(f"need 2 <= --num-classes <= --num-symbols, got {self.num_classes}, {self.num_symbols}")
        if FIRST_SYMBOL + self.num_symbols + self.num_classes > 256:
            raise ValueError(f"--num-symbols + --num-classes must be <= {256 - FIRST_SYMBOL} (uint8 ids)")
        if not 0 <= self.min_distance <= self.length - 2:
            raise ValueError(f"need 0 <= --min-distance <= --length - 2, got {self.min_distance}, {self.length}")

    @property
    def first_needle(self) -> int:
        return FIRST_SYMBOL + self.num_symbols


def vocab(config: FarRecallConfig) -> list[str]:
    """Ids: 0 padding, 1 CLS, 2 the marker, the noise symbols ``s0 ..``, then the needles ``n0 ..``."""
    return ([PAD, CLS, MARK] + [f"s{i}" for i in range(config.num_symbols)]
            + [f"n{i}" for i in range(config.num_classes)])


def window_receptive_field(window: int, num_layers: int) -> int:
    """Positions that can influence position 0 after ``num_layers`` bidirectional window-only layers."""
    return num_layers * window + max(window // 2, 1)


def generate_examples(num: int, seed: int, config: FarRecallConfig = FarRecallConfig(), stream: int = 0
                      ) -> Iterator[tuple[np.ndarray, int]]:
    """``num`` examples ``(token ids, label)``, a pure function of the arguments (``stream``: one per split)."""
    config.validate()
    rng = np.random.default_rng([seed, stream])
    for _ in range(num):
        ids = rng.integers(FIRST_SYMBOL, FIRST_SYMBOL + config.num_symbols, size=config.length)
        pos = int(rng.integers(config.min_distance, config.length - 1))
        label = int(rng.integers(0, config.num_classes))
        if config.mode == "needle":
            ids[pos] = config.first_needle + label
        else:
            ids[pos] = 2
            ids[pos + 1] = FIRST_SYMBOL + label
        yield ids.astype(np.uint8), label
