"""Layout-independent initialisation: every module draws its weights from its own seeded stream."""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch

# Salts keep the streams of different modules apart; layer i uses LAYER_SALT + i.
EMBEDDING_SALT = 0
OUTPUT_LAYER_SALT = 1
LAYER_SALT = 1000


@contextlib.contextmanager
def seeded_init(seed: int, salt: int) -> Iterator[None]:
    """Seed torch's default CPU generator for one module's construction, then restore it.

    Parallel layers build the full weight from the default generator and keep their shard, so a module built inside
    this context has the same full weights whatever the TP/PP layout and whatever was built before it (a pipeline
    stage builds only its own layers).
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed * 1_000_003 + salt)
        yield
