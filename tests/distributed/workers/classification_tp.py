"""torchrun worker: ClassificationModel at TP = world size; rank 0 saves logits, losses and gradients.

Gradients of replicated parameters are saved as they are; TP-sharded ones (heads, MLP columns, vocab rows) are
gathered along their partition dimension so the test can compare them with a one-process model.
"""
import sys

import torch
import torch.distributed as dist

from megatron_ls.config import TransformerConfig
from megatron_ls.model.classification import ClassificationModel
from megatron_ls.parallel import state as ps
from megatron_ls.parallel.random import model_parallel_manual_seed

CASES = {
    "mean": dict(pooling="mean"),
    "cls": dict(pooling="cls"),
    "post-cls": dict(cls_last_layer=True),
    "post-cls-full-last": dict(cls_last_layer=True, full_attention_layers=(1,)),
    "post-cls-head-dualln": dict(cls_last_layer=True, dual_ln_scope="head"),
    "post-cls-random-cls": dict(cls_last_layer=True, cls_init_std=0.5),
}
MODEL_KEYS = ("pooling", "cls_last_layer", "cls_init_std")


def build(case: dict) -> ClassificationModel:
    config = TransformerConfig(num_layers=2, hidden_size=32, num_attention_heads=4, ffn_hidden_size=48,
                               vocab_size=40, seq_length=64, window_size=4, projection_rank=2, causal=False,
                               hidden_dropout=0.0, attention_dropout=0.0, seed=3,
                               **{k: v for k, v in case.items() if k not in MODEL_KEYS})
    return ClassificationModel(config, 6, **{k: v for k, v in case.items() if k in MODEL_KEYS}).double()


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    tokens = torch.randint(2, 40, (3, 29), generator=torch.Generator().manual_seed(1))
    tokens[1, 20:] = 0
    tokens[2, 7:] = 0
    return tokens, torch.tensor([0, 4, 5])


def run(case: dict) -> dict:
    model = build(case)
    tokens, labels = batch()
    logits = model(tokens)
    loss = model(tokens, labels).mean()
    loss.backward()
    grads = {}
    for name, p in model.named_parameters():
        g = p.grad.detach()
        if getattr(p, "tensor_model_parallel", False) and ps.get_tensor_model_parallel_world_size() > 1:
            parts = [torch.empty_like(g) for _ in range(ps.get_tensor_model_parallel_world_size())]
            dist.all_gather(parts, g.contiguous(), group=ps.get_tensor_model_parallel_group())
            g = torch.cat(parts, dim=getattr(p, "partition_dim", 0))
        grads[name] = g
    return {"logits": logits.detach(), "loss": loss.detach(), "grads": grads}


def main(out_path: str) -> None:
    ps.initialize_distributed(backend="gloo", timeout_s=120)
    ps.initialize_model_parallel(tensor_model_parallel_size=dist.get_world_size())
    model_parallel_manual_seed(7)
    results = {name: run(case) for name, case in CASES.items()}
    if dist.get_rank() == 0:
        torch.save(results, out_path)
    ps.destroy_model_parallel()
    ps.shutdown_distributed()


if __name__ == "__main__":
    main(sys.argv[1])
