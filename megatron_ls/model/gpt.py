"""GPT-LS: embeddings, N pre-norm Long-Short (or full, per layer) transformer layers, final norm, LM head (tied
to the input embedding, or Megatron's untied ``output_layer``)."""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from megatron_ls.config import TransformerConfig
from megatron_ls.model.init_rng import EMBEDDING_SALT, OUTPUT_LAYER_SALT, seeded_init
from megatron_ls.model.norms import block_norm
from megatron_ls.model.transformer import TransformerLayer
from megatron_ls.parallel import state as ps
from megatron_ls.parallel.context_parallel import get_context_layout
from megatron_ls.parallel.cross_entropy import vocab_parallel_cross_entropy
from megatron_ls.parallel.init import init_method_normal
from megatron_ls.parallel.layers import ColumnParallelLinear, VocabParallelEmbedding, parallel_lm_logits
from megatron_ls.parallel.random import checkpoint as rng_checkpoint
from megatron_ls.parallel.sequence_parallel import (mark_sequence_parallel, sequence_parallel_active,
                                                    sequence_parallel_grad, sequence_parallel_rng, split_sequence)


class GPTEmbedding(nn.Module):
    """Token (vocab-parallel) + learned absolute position embeddings; also owns the tied LM head.

    Under sequence parallelism the output is this TP rank's slice of the sequence: the vocab-parallel lookups
    are reduce-scattered (not all-reduced) and the position embeddings of that slice added.
    """

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.config = config
        self.sequence_parallel = sequence_parallel_active(config.sequence_parallel)
        with seeded_init(config.seed, EMBEDDING_SALT):
            self.word_embeddings = VocabParallelEmbedding(config.vocab_size, config.hidden_size,
                                                          init_method=init_method_normal(config.init_method_std),
                                                          reduce_scatter_embeddings=self.sequence_parallel)
            self.position_embeddings: Optional[nn.Embedding] = None
            if config.position_embedding_type == "learned":
                self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
                nn.init.normal_(self.position_embeddings.weight, std=config.init_method_std)
                if self.sequence_parallel:
                    mark_sequence_parallel(self.position_embeddings.weight)
        self.dropout = nn.Dropout(config.hidden_dropout)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """``tokens (B, n)``: the whole sequence, or under context parallelism this rank's tokens in local order."""
        h = self.word_embeddings(tokens)
        if self.position_embeddings is not None:
            cp = ps.get_context_parallel_world_size()
            n = tokens.shape[1] * cp
            if n > self.position_embeddings.num_embeddings:
                raise ValueError(f"sequence length {n} exceeds --max-position-embeddings "
                                 f"{self.position_embeddings.num_embeddings}")
            if cp == 1:
                positions = torch.arange(n, device=tokens.device)
            else:  # the global positions of this rank's pieces
                positions = get_context_layout(n).local_positions(tokens.device)
            table = self.position_embeddings.weight
            if self.sequence_parallel:  # this TP rank's slice of the positions; the table's grad summed over TP
                positions, table = split_sequence(positions[None])[0], sequence_parallel_grad(table)
            h = h + F.embedding(positions, table).unsqueeze(0)
        with sequence_parallel_rng(self.sequence_parallel):
            return self.dropout(h)

    def lm_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Vocab-parallel logits with the tied input embedding as output matrix (under sequence parallelism
        the slices are all-gathered first)."""
        return parallel_lm_logits(hidden, self.word_embeddings.weight, sequence_parallel=self.sequence_parallel)


class OutputLayer(ColumnParallelLinear):
    """The untied LM head (``--untie-embeddings-and-output-weights``): a ``(V/tp, h)`` vocab-parallel matrix, no
    bias, its own seeded initialisation (the same whichever layout builds it)."""

    def __init__(self, config: TransformerConfig) -> None:
        with seeded_init(config.seed, OUTPUT_LAYER_SALT):
            super().__init__(config.hidden_size, config.vocab_size, bias=False, gather_output=False,
                             sequence_parallel=config.sequence_parallel,
                             init_method=init_method_normal(config.init_method_std))


def masked_token_mean(losses: torch.Tensor, loss_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Mean of per-token ``losses`` over the unmasked tokens of a micro-batch, as a data-parallel replica's loss.

    Under context parallelism (CP > 1) each rank holds a slice of every sample and returns
    ``CP x (its masked sum) / (masked count over the CP group)``: DeepSpeed averages gradients over DP x CP
    (``training/deepspeed_mpu.py``), so the CP average of these is the micro-batch mean. The count is the
    all-reduced one, so a rank whose slice is all masked contributes 0, not NaN. A fully masked micro-batch
    gives 0.
    """
    if losses.dtype in (torch.float16, torch.bfloat16):
        losses = losses.float()
    cp = ps.get_context_parallel_world_size()
    if loss_mask is None:  # every CP rank holds as many tokens: CP x local sum / global count = local mean
        return losses.mean()
    loss_mask = loss_mask.to(losses.dtype)
    count = loss_mask.sum().detach()
    if cp > 1:
        import torch.distributed as dist

        count = count.clone()
        dist.all_reduce(count, group=ps.get_context_parallel_group())
    return (losses * loss_mask).sum() * cp / count.clamp(min=1.0)


def language_model_loss(logits: torch.Tensor, labels: torch.Tensor,
                        loss_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Mean next-token cross entropy over unmasked positions (vocab-parallel logits are fine; under context
    parallelism this rank's term of it, see :func:`masked_token_mean`)."""
    return masked_token_mean(vocab_parallel_cross_entropy(logits.float(), labels), loss_mask)


class GPTModel(nn.Module):
    """Autoregressive GPT-LS language model.

    ``model(tokens) -> logits (B, N, vocab / tp)``; ``model(tokens, labels)`` -> per-token losses ``(B, N)``.
    With no parallel state initialised it is an ordinary single-process module.
    """

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        if not config.causal:
            raise ValueError("GPTModel is autoregressive: config.causal must be True")
        config.validate()
        self.config = config
        self.embedding = GPTEmbedding(config)
        self.layers = nn.ModuleList(TransformerLayer(config, i) for i in range(config.num_layers))
        self.final_layernorm = block_norm(config)
        self.output_layer = OutputLayer(config) if config.untie_embeddings_and_output_weights else None

    def lm_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Vocab-parallel logits of final-norm outputs (tied embedding or the untied output layer)."""
        if self.output_layer is not None:
            return self.output_layer(hidden)
        return self.embedding.lm_logits(hidden)

    def _run_layers(self, start: int, end: int) -> Callable[[torch.Tensor], torch.Tensor]:
        def run(h: torch.Tensor) -> torch.Tensor:
            for layer in self.layers[start:end]:
                h = layer(h)
            return h
        return run

    def forward(self, tokens: torch.Tensor, labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        h = self.embedding(tokens)
        recompute = self.training and torch.is_grad_enabled()
        for start, end, full in self.config.recomputed_layer_groups(len(self.layers)):
            if full and recompute:
                # Restores the TP tracker's RNG too, so recomputed attention dropout draws the same mask.
                h = rng_checkpoint(self._run_layers(start, end), h)
            else:
                h = self._run_layers(start, end)(h)
        logits = self.lm_logits(self.final_layernorm(h))
        if labels is None:
            return logits
        return vocab_parallel_cross_entropy(logits.float(), labels)
