"""torchrun worker (2 ranks, CP=2): GPT-LS under context parallelism equals the one-process model.

For the contiguous and the balanced layout, in float64: each rank's logits are its slice of the whole-sequence
logits (so the position embedding saw global positions), and the loss each rank returns (``masked_token_mean``),
averaged over CP as DeepSpeed averages over DP x CP, has the one-process gradients. Rank 1's whole shard is
masked under the contiguous layout: no NaN, same loss. Prints ``CHECK-OK <name>`` lines.

    torchrun --nproc_per_node 2 tests/e2e/workers/cp_model_check.py
"""
from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", ".."))

from megatron_ls.config import TransformerConfig  # noqa: E402
from megatron_ls.model import GPTModel  # noqa: E402
from megatron_ls.model.gpt import masked_token_mean  # noqa: E402
from megatron_ls.parallel import state  # noqa: E402
from megatron_ls.parallel.context_parallel import get_context_layout, set_context_layout_kind  # noqa: E402

SEQ, BATCH = 64, 2


# The paper's GPT-LS, and Megatron's Llama-style switches (RMSNorm, SwiGLU, no biases, untied head, RoPE).
VARIANTS = {"": {}, "llama-": dict(normalization="RMSNorm", swiglu=True, add_bias_linear=False,
                                   untie_embeddings_and_output_weights=True, position_embedding_type="rope")}


def _config(variant: str = "") -> TransformerConfig:
    return TransformerConfig(num_layers=2, hidden_size=32, num_attention_heads=4, vocab_size=64, seq_length=SEQ,
                             window_size=16, segment_length=8, projection_rank=1, full_attention_layers=(1,),
                             hidden_dropout=0.0, attention_dropout=0.0, seed=11, **VARIANTS[variant])


def _data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    tokens = torch.randint(0, 64, (BATCH, SEQ + 1), generator=g)
    mask = (torch.rand(BATCH, SEQ, generator=g) > 0.3).double()
    mask[:, SEQ // 2:] = 0  # second halves masked: rank 1's whole shard under the contiguous layout
    return tokens[:, :-1], tokens[:, 1:], mask


def _reference(variant: str) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """Logits, loss and gradients of the one-process model (CP groups not built yet: sizes are 1)."""
    tokens, labels, mask = _data()
    model = GPTModel(_config(variant)).double()
    logits = model(tokens)
    loss = masked_token_mean(model(tokens, labels), mask)
    loss.backward()
    return logits.detach(), loss.detach(), [p.grad.clone() for p in model.parameters()]


def _check(kind: str, reference: tuple, variant: str) -> None:
    ref_logits, ref_loss, ref_grads = reference
    set_context_layout_kind(kind)
    layout = get_context_layout(SEQ)
    tokens, labels, mask = (layout.slice_sequence(t, dim=1) for t in _data())
    model = GPTModel(_config(variant)).double()
    logits = model(tokens)
    torch.testing.assert_close(logits, layout.slice_sequence(ref_logits, dim=1), rtol=1e-10, atol=1e-10)
    loss = masked_token_mean(model(tokens, labels), mask)
    assert torch.isfinite(loss), f"{kind}: loss {loss} on rank {dist.get_rank()}"
    loss.backward()
    cp, group = state.get_context_parallel_world_size(), state.get_context_parallel_group()
    mean_loss = loss.detach().clone()
    dist.all_reduce(mean_loss, group=group)
    # the cross entropy runs in float32: the sums differ only in their order
    torch.testing.assert_close(mean_loss / cp, ref_loss, rtol=1e-6, atol=0.0)
    for (name, param), ref in zip(model.named_parameters(), ref_grads):
        grad = param.grad.clone()
        dist.all_reduce(grad, group=group)
        torch.testing.assert_close(grad / cp, ref, rtol=1e-9, atol=1e-11, msg=lambda m: f"{kind} {name}: {m}")


def main() -> None:
    state.initialize_distributed(timeout_s=120)
    references = {variant: _reference(variant) for variant in VARIANTS}
    state.initialize_model_parallel(context_parallel_size=dist.get_world_size())
    for variant, reference in references.items():
        for kind in ("contiguous", "balanced"):
            _check(kind, reference, variant)
            dist.barrier()
            if dist.get_rank() == 0:
                print(f"CHECK-OK cp-model-{variant}{kind}", flush=True)
    set_context_layout_kind("contiguous")
    state.shutdown_distributed()


if __name__ == "__main__":
    main()
