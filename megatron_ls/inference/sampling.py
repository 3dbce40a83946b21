"""Choosing the next token: greedy, temperature, top-k and top-p (nucleus) sampling, with a seedable generator.

The order follows Megatron-LM: divide the logits by the temperature, keep the ``top_k`` largest (``top_k = 1`` is
greedy), or keep the smallest set of most likely tokens whose probability reaches ``top_p``, then sample from the
softmax of what is left. ``top_k = 0`` and ``top_p = 0`` sample from the whole (tempered) distribution.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass(frozen=True)
class SamplingParams:
    """How the next token is chosen; ``greedy`` (or ``top_k == 1``) takes the most likely token."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 0.0
    greedy: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0, got {self.top_k!r}")
        if isinstance(self.top_p, bool) or not isinstance(self.top_p, (int, float)) or not 0.0 <= self.top_p <= 1.0:
            raise ValueError(f"top_p must be a number in [0, 1], got {self.top_p!r}")
        if self.top_k > 1 and self.top_p > 0.0:
            raise ValueError(f"set top_k ({self.top_k}) or top_p ({self.top_p}), not both")
        if not self.is_greedy and (isinstance(self.temperature, bool) or not isinstance(self.temperature, (int, float))
                                   or not self.temperature > 0.0):
            raise ValueError(f"temperature must be a number > 0, got {self.temperature!r} (use greedy=True or "
                             f"top_k=1 for greedy decoding)")

    @property
    def is_greedy(self) -> bool:
        return self.greedy or self.top_k == 1


def restrict_vocab(logits: torch.Tensor, vocab_size: Optional[int]) -> torch.Tensor:
    """Exclude padded vocabulary entries (ids >= ``vocab_size``) from being chosen."""
    if vocab_size is None or vocab_size >= logits.shape[-1]:
        return logits
    out = logits.clone()
    out[..., vocab_size:] = float("-inf")
    return out


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the ``k`` largest logits of each row (ties at the boundary are kept), -inf elsewhere."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probability reaches ``p`` (always at least one)."""
    if p <= 0.0 or p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = torch.softmax(sorted_logits, dim=-1)
    mass_before = torch.cumsum(probs, dim=-1) - probs  # probability of the tokens ranked above each one
    drop_sorted = mass_before >= p
    drop_sorted[..., 0] = False
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def sample_next(logits: torch.Tensor, params: SamplingParams, generator: Optional[torch.Generator] = None,
                vocab_size: Optional[int] = None) -> torch.Tensor:
    """Next token ids (B,) from last-position logits (B, vocab); computed in fp32 whatever the model dtype."""
    logits = restrict_vocab(logits.float(), vocab_size)
    if params.is_greedy:
        return torch.argmax(logits, dim=-1)
    logits = logits / float(params.temperature)
    if params.top_k > 1:
        logits = top_k_filter(logits, params.top_k)
    elif params.top_p > 0.0:
        logits = top_p_filter(logits, params.top_p)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def make_generator(seed: Optional[int], device: torch.device) -> Optional[torch.Generator]:
    """A generator seeded with ``seed`` on ``device`` (None: torch's global RNG)."""
    if seed is None:
        return None
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be an integer >= 0, got {seed!r}")
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return gen
