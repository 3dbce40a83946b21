"""Sequence parallelism at TP = 2: GPT-LS equals one process (float64: logits, losses, every gradient) for learned
and rotary positions with an LS and a full-attention layer; selective recomputation keeps the gradients with
dropout on; a layer communicates by all-gather / reduce-scatter (counted); dropout masks differ per TP rank; a
few optimizer steps with dropout reduce the loss; a layer's activation memory per rank falls (measured).

Run: torchrun --nproc_per_node 2 check_sequence_parallel.py REFERENCE.pt (written by the pytest caller).
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import all_gather_obj, assert_close, finish, run_checks, say, start  # noqa: E402

from megatron_ls.config import TransformerConfig  # noqa: E402
from megatron_ls.parallel import state  # noqa: E402
from megatron_ls.parallel.comm_stats import CommCounter  # noqa: E402

B, S, VOCAB = 2, 32, 64
POSITIONS = ("learned", "rope")


def config(positions: str, sp: bool, dropout: float = 0.0, **kw) -> TransformerConfig:
    return TransformerConfig(num_layers=2, hidden_size=32, num_attention_heads=4, seq_length=S, vocab_size=VOCAB,
                             window_size=8, segment_length=4, projection_rank=1, full_attention_layers=(1,),
                             hidden_dropout=dropout, attention_dropout=dropout, position_embedding_type=positions,
                             sequence_parallel=sp, seed=3, **kw)


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(11)
    tokens = torch.randint(0, VOCAB, (B, S + 1), generator=g)
    return tokens[:, :-1], tokens[:, 1:]


def run_model(cfg: TransformerConfig) -> dict:
    """Logits, per-token losses and every parameter's gradient of one forward + backward (float64)."""
    from megatron_ls.model import GPTModel

    torch.set_default_dtype(torch.float64)
    try:
        model = GPTModel(cfg)
        tokens, labels = batch()
        logits = model(tokens)
        losses = model(tokens, labels)
        losses.sum().backward()
        grads = {name: (p.grad.detach().clone(), getattr(p, "partition_dim", None)
                        if getattr(p, "tensor_model_parallel", False) else None)
                 for name, p in model.named_parameters()}
        return {"logits": logits.detach(), "losses": losses.detach(), "grads": grads}
    finally:
        torch.set_default_dtype(torch.float32)


def reference() -> dict:
    """The single-process results (called by the test, before any process group exists)."""
    out = {}
    for pos in POSITIONS:
        r = run_model(config(pos, sp=False))
        r["grads"] = {n: g for n, (g, _) in r["grads"].items()}
        out[pos] = r
    return out


def _shard(full: torch.Tensor, dim: int) -> torch.Tensor:
    tp, rank = state.get_tensor_model_parallel_world_size(), state.get_tensor_model_parallel_rank()
    return full.chunk(tp, dim=dim)[rank]


def check_model_exact(ref: dict, pos: str) -> None:
    got = run_model(config(pos, sp=True))
    assert_close(got["logits"], _shard(ref["logits"], -1), f"{pos}: logits")
    # the cross entropy computes in float32 (its TP reductions sum in another order): float32 tolerances
    assert_close(got["losses"], ref["losses"], f"{pos}: per-token losses", atol=1e-6, rtol=1e-6)
    for name, (grad, dim) in got["grads"].items():
        expected = ref["grads"][name] if dim is None else _shard(ref["grads"][name], dim)
        assert_close(grad, expected, f"{pos}: grad of {name}", atol=1e-7, rtol=1e-5)


def check_selective_recompute_keeps_gradients() -> None:
    from megatron_ls.parallel.random import get_rng_state_dict, set_rng_state_dict

    rng = get_rng_state_dict()
    plain = run_model(config("learned", sp=True, dropout=0.2))
    set_rng_state_dict(rng)
    again = run_model(config("learned", sp=True, dropout=0.2, recompute_granularity="selective"))
    assert_close(again["losses"], plain["losses"], "selective recompute: losses", atol=0, rtol=0)
    for name, (grad, _) in again["grads"].items():
        assert_close(grad, plain["grads"][name][0], f"selective recompute: grad of {name}", atol=0, rtol=0)


def layer_comm(sp: bool, h: int = 16) -> CommCounter:
    from megatron_ls.model.transformer import TransformerLayer

    cfg = TransformerConfig(num_layers=2, hidden_size=h, num_attention_heads=4, seq_length=S, window_size=4,
                            segment_length=4, projection_rank=1, dual_ln_scope="head", sequence_parallel=sp)
    layer = TransformerLayer(cfg, 0)
    tokens = S // 2 if sp else S
    x = torch.randn(B, tokens, h, generator=torch.Generator().manual_seed(0), requires_grad=True)
    with CommCounter() as cc:
        layer(x).sum().backward()
    return cc


def check_layer_communication() -> None:
    h = 16
    full = B * S * h  # one (B, S, h) activation
    plain = layer_comm(False, h)
    assert dict(plain.calls) == {("all_reduce", "forward"): 2, ("all_reduce", "backward"): 2}, plain
    assert plain.total_elements("all_reduce") == 4 * full, plain
    sp = layer_comm(True, h)
    # forward: all-gather the (B, S/2, h) slice before qkv and before the MLP, reduce-scatter the two outputs
    # backward: all-gather the inputs again (not kept), reduce-scatter their gradients, all-gather the
    # gradients of the two reduce-scatters; six small all-reduces of replicated parameters' gradients
    # (two LayerNorms' weight and bias, two row-parallel biases)
    assert dict(sp.calls) == {("all_gather", "forward"): 2, ("reduce_scatter", "forward"): 2,
                              ("all_gather", "backward"): 4, ("reduce_scatter", "backward"): 2,
                              ("all_reduce", "backward"): 6}, sp
    assert sp.total_elements("all_gather", "forward") == 2 * full // 2
    assert sp.total_elements("reduce_scatter", "forward") == 2 * full
    assert sp.total_elements("all_reduce", "backward") == 6 * h  # no activation is all-reduced any more


def check_mappings() -> None:
    from megatron_ls.parallel.sequence_parallel import (gather_from_sequence_parallel_region,
                                                        scatter_to_sequence_parallel_region)

    x = torch.randn(B, S, 8, generator=torch.Generator().manual_seed(1), requires_grad=True)
    w = torch.randn(B, S, 8, generator=torch.Generator().manual_seed(2))
    y = gather_from_sequence_parallel_region(scatter_to_sequence_parallel_region(x))
    assert_close(y, x.detach(), "scatter then gather", atol=0, rtol=0)
    (y * w).sum().backward()  # the gather's backward sums the TP ranks' (equal) gradients
    assert_close(x.grad, 2 * w, "scatter/gather gradients", atol=0, rtol=0)


def check_dropout_differs_per_rank() -> None:
    from megatron_ls.parallel.sequence_parallel import sequence_parallel_rng

    before = torch.get_rng_state()
    with sequence_parallel_rng(True):
        mask = torch.nn.functional.dropout(torch.ones(4096), p=0.5)
    assert torch.equal(torch.get_rng_state(), before), "the default stream moved"
    masks = all_gather_obj(mask)
    assert not torch.equal(masks[0], masks[1]), "both TP ranks drew the same dropout mask for different tokens"


def check_trains_with_dropout() -> None:
    from megatron_ls.model import GPTModel
    from megatron_ls.model.gpt import masked_token_mean

    model = GPTModel(config("learned", sp=True, dropout=0.1))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    tokens, labels = batch()
    losses = []
    for _ in range(8):
        loss = masked_token_mean(model(tokens, labels))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    assert losses[-1] < losses[0] - 0.5, losses
    assert all_gather_obj(losses)[0] == losses, "TP ranks disagree on the loss"


def saved_activation_bytes(sp: bool, seq: int = 256, h: int = 64) -> tuple[int, int, int]:
    """(bytes saved for backward, of which hidden-wide, peak bytes allocated) of one layer forward + backward
    on this rank."""
    from megatron_ls.model.transformer import TransformerLayer
    from tools.bench_sequence_parallel import peak_allocated_bytes, saved_tensor_bytes

    cfg = TransformerConfig(num_layers=2, hidden_size=h, num_attention_heads=4, seq_length=seq, window_size=32,
                            segment_length=16, projection_rank=1, sequence_parallel=sp)
    layer = TransformerLayer(cfg, 0)
    x = torch.randn(2, seq // 2 if sp else seq, h, requires_grad=True)
    params = list(layer.parameters())
    saved = saved_tensor_bytes(lambda: layer(x), params)
    wide = saved_tensor_bytes(lambda: layer(x), params, where=lambda t: t.shape[-1] == h)
    peak = peak_allocated_bytes(lambda: layer(x).sum().backward())
    return saved, wide, peak


def check_activation_memory() -> None:
    plain_saved, plain_wide, plain_peak = saved_activation_bytes(False)
    sp_saved, sp_wide, sp_peak = saved_activation_bytes(True)
    if state.get_tensor_model_parallel_rank() == 0:
        print(f"SP-MEMORY saved_bytes plain={plain_saved} sp={sp_saved} hidden_wide plain={plain_wide} "
              f"sp={sp_wide} peak_bytes plain={plain_peak} sp={sp_peak}", flush=True)
    # the (B, S, h) activations (LayerNorm inputs, dropout masks, residuals, linear inputs) are cut by TP; the
    # head-sharded attention and MLP activations were already split by tensor parallelism
    assert sp_wide * 2 == plain_wide, (sp_wide, plain_wide)
    assert sp_saved < plain_saved, (sp_saved, plain_saved)  # (the peak, printed, is tools/bench_sequence_parallel's)


def main() -> None:
    start()
    state.initialize_model_parallel(tensor_model_parallel_size=2)
    from megatron_ls.parallel.random import model_parallel_manual_seed

    model_parallel_manual_seed(5)
    ref = torch.load(sys.argv[1], weights_only=True)
    checks = [(f"sp-model-exact-{pos}", lambda pos=pos: check_model_exact(ref[pos], pos)) for pos in POSITIONS]
    checks += [("sp-selective-recompute", check_selective_recompute_keeps_gradients),
               ("sp-layer-comm", check_layer_communication),
               ("sp-mappings", check_mappings),
               ("sp-dropout-per-rank", check_dropout_differs_per_rank),
               ("sp-trains-with-dropout", check_trains_with_dropout),
               ("sp-activation-memory", check_activation_memory)]
    run_checks(checks)
    say("done")
    finish()


if __name__ == "__main__":
    main()
