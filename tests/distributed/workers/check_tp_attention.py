"""torchrun worker: TP-sharded LS / full attention against the single-process module's saved results.

argv: reference.pt written by the test in one process (no parallel state). Each TP rank builds the same module
(same seed -> same full weights, its shard kept), runs the same input, and compares the output, the input gradient
and the gradients of its weight shards with the matching slices of the single-process gradients.
"""
import sys

import torch

from megatron_ls.config import TransformerConfig
from megatron_ls.model.attention import SelfAttention
from megatron_ls.model.init_rng import seeded_init
from megatron_ls.parallel import state as ps


def build(full: bool, dual_ln: bool, scope: str = "full") -> SelfAttention:
    cfg = TransformerConfig(num_layers=2, hidden_size=32, num_attention_heads=4, seq_length=24, window_size=6,
                            segment_length=3, projection_rank=2, hidden_dropout=0.0, attention_dropout=0.0,
                            dual_ln=dual_ln, full_attention_layers=(0,) if full else (), dual_ln_scope=scope)
    with seeded_init(11, 0):
        attn = SelfAttention(cfg, 0).double()
    if not full and dual_ln:  # non-trivial per-head DualLN parameters (identical full values on every layout)
        with seeded_init(12, 0), torch.no_grad():
            for name, p in sorted(attn.named_parameters()):
                if "norm" in name:
                    full_shape = (cfg.num_attention_heads, cfg.head_dim)
                    noise = torch.randn(full_shape, dtype=torch.float64)
                    h = p.shape[0]
                    p.add_(noise[ps.get_tensor_model_parallel_rank() * h:(ps.get_tensor_model_parallel_rank() + 1) * h])
    return attn


def run(attn: SelfAttention) -> dict:
    x = torch.randn(2, 23, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(5), requires_grad=True)
    y = attn(x)
    y.backward(torch.randn(y.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(6)))
    grads = {name: p.grad.detach().clone() for name, p in attn.named_parameters()}
    return {"y": y.detach(), "dx": x.grad.detach(), "grads": grads,
            "dims": {name: (p.partition_dim if getattr(p, "tensor_model_parallel", False) else None)
                     for name, p in attn.named_parameters()}}


CASES = [(False, True, "full"), (False, True, "head"), (False, False, "full"), (True, True, "full")]


def main(ref_path: str) -> None:
    ps.initialize_distributed(backend="gloo", timeout_s=120)
    tp = torch.distributed.get_world_size()
    ps.initialize_model_parallel(tensor_model_parallel_size=tp)
    rank = ps.get_tensor_model_parallel_rank()
    reference = torch.load(ref_path, weights_only=True)
    for full, dual_ln, scope in CASES:
        ref, got = reference[f"{full}-{dual_ln}-{scope}"], run(build(full, dual_ln, scope))
        torch.testing.assert_close(got["y"], ref["y"], rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(got["dx"], ref["dx"], rtol=1e-10, atol=1e-10)
        for name, g in got["grads"].items():
            dim = got["dims"][name]
            want = ref["grads"][name]
            if dim is not None:
                per = want.shape[dim] // tp
                want = want.narrow(dim, rank * per, per)
            torch.testing.assert_close(g, want, rtol=1e-9, atol=1e-10, msg=lambda m: f"{name}: {m}")
        print(f"CHECK-OK tp-attention full={full} dual_ln={dual_ln} scope={scope}", flush=True)
    ps.destroy_model_parallel()
    ps.shutdown_distributed()


if __name__ == "__main__":
    main(sys.argv[1])
