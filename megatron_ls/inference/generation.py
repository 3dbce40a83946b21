"""Text generation with the Long-Short decoding cache, and per-token log-probabilities of given text.

Batches of prompts with different lengths are **right-padded and fed in lockstep** (as Megatron-LM does): the
common prefix (the shortest prompt) is prefilled in one pass, then every step feeds one token per row at the same
position -- the row's own prompt token while it still has one, otherwise the token just chosen for it. All rows
of the cache therefore sit at the same position and hold no padding, and each row's result is exactly what it
would get alone (a batch of one prefills its whole prompt in one pass).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Union

import torch

from megatron_ls.inference.cache import new_cache
from megatron_ls.inference.incremental import check_positions, check_single_process, forward_step, prefill
from megatron_ls.inference.sampling import SamplingParams, make_generator, sample_next

Prompts = Union[Sequence[int], Sequence[Sequence[int]], torch.Tensor]


@dataclass
class GenerationOutput:
    """Per row: prompt + generated tokens, the prompt length, why it stopped, and optionally log-probs."""

    tokens: List[List[int]]
    prompt_lengths: List[int]
    finish_reasons: List[str]  # "eod", "stop" (a stop string appeared) or "length" (max_new_tokens reached)
    logprobs: Optional[List[List[float]]] = None  # row i: len(tokens[i]) - 1 values, log p(tokens[i][j+1] | ..)
    steps: int = 0  # forward passes made (prefill counts one)
    cache_bytes: int = 0  # cache content after the last step

    @property
    def generated(self) -> List[List[int]]:
        return [t[n:] for t, n in zip(self.tokens, self.prompt_lengths)]


def _as_rows(prompt_tokens: Prompts) -> List[List[int]]:
    if isinstance(prompt_tokens, torch.Tensor):
        if prompt_tokens.dim() == 1:
            prompt_tokens = prompt_tokens[None]
        if prompt_tokens.dim() != 2:
            raise ValueError(f"prompt_tokens tensor must be (n,) or (B, n), got {tuple(prompt_tokens.shape)}")
        return [[int(t) for t in row] for row in prompt_tokens.tolist()]
    rows = list(prompt_tokens)
    if rows and all(isinstance(t, int) for t in rows):
        rows = [rows]
    out = []
    for i, row in enumerate(rows):
        if isinstance(row, (str, bytes)) or not all(isinstance(t, int) and not isinstance(t, bool) for t in row):
            raise ValueError(f"prompt {i} must be a sequence of token ids (int), got {type(row).__name__}")
        out.append(list(row))
    return out


def _check_prompts(rows: List[List[int]], vocab: int) -> None:
    if not rows:
        raise ValueError("no prompts given")
    for i, row in enumerate(rows):
        if not row:
            raise ValueError(f"prompt {i} is empty: the model needs at least one token to condition on "
                             f"(prepend an end-of-document token as BOS)")
        bad = [t for t in row if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt {i} has token ids outside the model's vocabulary [0, {vocab}): {bad[:5]}")


def _stop_string_hit(text: str, stop_strings: Sequence[str]) -> bool:
    return any(s and s in text for s in stop_strings)


@torch.no_grad()
def generate(model, prompt_tokens: Prompts, max_new_tokens: int, *, temperature: float = 1.0, top_k: int = 0,
             top_p: float = 0.0, greedy: bool = False, seed: Optional[int] = None, eod_id: Optional[int] = None,
             stop_strings: Sequence[str] = (), detokenize: Optional[Callable[[List[int]], str]] = None,
             return_logprobs: bool = False, vocab_size: Optional[int] = None,
             prefill_chunk: Optional[int] = None) -> GenerationOutput:
    """Continue each prompt by up to ``max_new_tokens`` tokens with the decoding cache.

    ``prompt_tokens``: one list of ids, a list of lists (any lengths) or a LongTensor. Sampling: ``greedy`` (or
    ``top_k=1``), else ``temperature`` with ``top_k`` or ``top_p``; ``seed`` makes sampling reproducible.
    A row stops after ``eod_id`` (kept as its last token), after a token that completes one of ``stop_strings``
    in its generated text (needs ``detokenize``; the stop string is kept), or at ``max_new_tokens``.
    ``vocab_size`` (the tokenizer's) keeps padded vocabulary ids from being sampled. ``return_logprobs`` adds
    the model's log-probability of every token after the first (prompt and generated).
    The prompt plus ``max_new_tokens`` must fit a learned position table (ValueError otherwise, before any work).
    """
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, greedy=greedy)
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    if stop_strings and detokenize is None:
        raise ValueError("stop_strings need a detokenize function (token ids -> text)")
    check_single_process(model)
    rows = _as_rows(prompt_tokens)
    vocab = model.embedding.word_embeddings.weight.shape[0]
    _check_prompts(rows, vocab)
    lengths = [len(r) for r in rows]
    batch, shortest, longest = len(rows), min(lengths), max(lengths)
    total = longest + max_new_tokens
    check_positions(model, 0, total)  # refuse before allocating anything
    device = next(model.parameters()).device
    generator = make_generator(seed, device)

    buf = torch.zeros(batch, total, dtype=torch.long, device=device)
    for i, row in enumerate(rows):
        buf[i, :len(row)] = torch.tensor(row, dtype=torch.long)
    lens = torch.tensor(lengths, device=device)
    cache = new_cache(model, batch, max_length=total)
    logits = prefill(model, buf[:, :shortest], cache, all_logits=return_logprobs, chunk_size=prefill_chunk)
    steps = 1
    logprob_cols: List[torch.Tensor] = []
    if return_logprobs and shortest > 1:
        lp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
        logprob_cols.append(lp.gather(-1, buf[:, 1:shortest, None]).squeeze(-1))
    last = logits[:, -1]

    new_counts = [0] * batch
    reasons: List[Optional[str]] = [None] * batch
    if max_new_tokens == 0:
        reasons = ["length"] * batch
    position = shortest
    while position < total:
        in_prompt = position < lens
        if all(r is not None for r in reasons) and not bool(in_prompt.any()):
            break
        chosen = sample_next(last, params, generator, vocab_size)
        nxt = torch.where(in_prompt, buf[:, position], chosen)
        if return_logprobs:
            lp = torch.log_softmax(last.float(), dim=-1)
            logprob_cols.append(lp.gather(-1, nxt[:, None]))
        nxt_list = nxt.tolist()
        prompt_rows = in_prompt.tolist()
        for i in range(batch):
            if prompt_rows[i] or reasons[i] is not None:
                continue
            buf[i, position] = nxt_list[i]
            new_counts[i] += 1
            if eod_id is not None and nxt_list[i] == eod_id:
                reasons[i] = "eod"
            elif stop_strings:
                if _stop_string_hit(detokenize(buf[i, lengths[i]:position + 1].tolist()), stop_strings):
                    reasons[i] = "stop"
            if reasons[i] is None and new_counts[i] >= max_new_tokens:
                reasons[i] = "length"
        position += 1
        if all(r is not None for r in reasons) and not bool((position < lens).any()):
            break
        last = forward_step(model, nxt[:, None], cache)[:, -1]
        steps += 1

    tokens = [buf[i, :lengths[i] + new_counts[i]].tolist() for i in range(batch)]
    logprobs = None
    if return_logprobs:
        cols = torch.cat(logprob_cols, dim=1).tolist() if logprob_cols else [[] for _ in range(batch)]
        logprobs = [cols[i][:len(tokens[i]) - 1] for i in range(batch)]
    return GenerationOutput(tokens=tokens, prompt_lengths=lengths, finish_reasons=[r or "length" for r in reasons],
                            logprobs=logprobs, steps=steps, cache_bytes=cache.used_bytes())


@torch.no_grad()
def token_logprobs(model, sequences: Prompts, *, batch_size: int = 8) -> List[List[float]]:
    """log p(x_j | x_<j) for j >= 1 of each token sequence, by full forward passes (right-padded batches:
    causal attention keeps padding after a sequence from touching it)."""
    check_single_process(model)
    rows = _as_rows(sequences)
    vocab = model.embedding.word_embeddings.weight.shape[0]
    _check_prompts(rows, vocab)
    device = next(model.parameters()).device
    out: List[List[float]] = []
    for start in range(0, len(rows), batch_size):
        group = rows[start:start + batch_size]
        longest = max(len(r) for r in group)
        check_positions(model, 0, longest)
        toks = torch.zeros(len(group), longest, dtype=torch.long, device=device)
        for i, r in enumerate(group):
            toks[i, :len(r)] = torch.tensor(r, dtype=torch.long)
        was_training = model.training
        model.eval()  # no dropout
        try:
            logits = model(toks)[:, :-1].float()
        finally:
            model.train(was_training)
        lp = torch.log_softmax(logits, dim=-1).gather(-1, toks[:, 1:, None]).squeeze(-1)
        out.extend(lp[i, :len(r) - 1].tolist() for i, r in enumerate(group))
    return out
