"""FAR_RECALL: a long-range probe on which a sliding window alone cannot beat chance.

Each example is ``length`` random symbols with one marker ``@`` at position ``p >= min_distance`` followed by a
value symbol ``v`` (one of the first ``num_classes`` symbols); the label is ``v``. Symbols, the value included,
are drawn uniformly from ``num_symbols`` symbols, so the value is also common as noise: only the marker says
which occurrence counts. Classified from a CLS token put in front (position 0).

Why locality cannot win: in a bidirectional window layer a query in segment ``s`` sees keys
``[s·w - e, (s+1)·w + e)`` (``e = max(w // 2, 1)``), so after ``L`` window-only layers position 0 depends only on
positions ``< L·w + e``; with ``min_distance`` beyond that, the CLS output of a window-only model is independent
of the marker and the value, and its accuracy is chance (``1 / num_classes``) by construction. Long-short and
full attention can carry the value to the CLS token through the projected (global) keys or directly.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np

__all__ = ["FarRecallConfig", "vocab", "generate_examples", "window_receptive_field"]

PAD, CLS, MARK = "<pad>", "<cls>", "@"


@dataclass
class FarRecallConfig:
    length: int = 512
    min_distance: int = 128
    num_symbols: int = 32
    num_classes: int = 10

    def validate(self) -> None:
        if not 2 <= self.num_classes <= self.num_symbols:
            raise ValueError(f"need 2 <= --num-classes <= --num-symbols, got {self.num_classes}, {self.num_symbols}")
        if self.num_symbols > 253:
            raise ValueError(f"--num-symbols must be <= 253 (uint8 ids), got {self.num_symbols}")
        if not 0 <= self.min_distance <= self.length - 2:
            raise ValueError(f"need 0 <= --min-distance <= --length - 2, got {self.min_distance}, {self.length}")


def vocab(config: FarRecallConfig) -> list[str]:
    """Ids: 0 padding, 1 CLS, 2 the marker, then the symbols ``s0 ..``; symbol ``sK`` is label ``K``."""
    return [PAD, CLS, MARK] + [f"s{i}" for i in range(config.num_symbols)]


def window_receptive_field(window: int, num_layers: int) -> int:
    """Positions that can influence position 0 after ``num_layers`` bidirectional window-only layers."""
    return num_layers * window + max(window // 2, 1)


def generate_examples(num: int, seed: int, config: FarRecallConfig = FarRecallConfig(), stream: int = 0
                      ) -> Iterator[tuple[np.ndarray, int]]:
    """``num`` examples ``(token ids, label)``, a pure function of the arguments (``stream``: one per split)."""
    config.validate()
    rng = np.random.default_rng([seed, stream])
    first_symbol = 3
    for _ in range(num):
        ids = rng.integers(first_symbol, first_symbol + config.num_symbols, size=config.length)
        pos = int(rng.integers(config.min_distance, config.length - 1))
        label = int(rng.integers(0, config.num_classes))
        ids[pos] = 2
        ids[pos + 1] = first_symbol + label
        yield ids.astype(np.uint8), label
