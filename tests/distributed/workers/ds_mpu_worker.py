"""DeepSpeed with ``mpu=megatron_ls.parallel.state`` at TP2 x DP2: group sizes DeepSpeed sees, the global
gradient norm it computes (TP-sharded params summed over the TP group, replicated ones counted once),
and one optimizer step, all against a dense single-model twin.

    torchrun --nproc_per_node 4 ds_mpu_worker.py --zero-stage 0
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch import nn

from _common import assert_close, finish, run_checks, start
from megatron_ls.parallel import state
from megatron_ls.parallel.init import init_method_normal
from megatron_ls.parallel.layers import ColumnParallelLinear, RowParallelLinear

H, FFN, MICRO = 8, 16, 3


class TPBlock(nn.Module):
    """LayerNorm (replicated) -> column -> GeLU -> row (+ residual)."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(H)
        self.fc1 = ColumnParallelLinear(H, FFN, init_method=init_method_normal(0.5))
        self.fc2 = RowParallelLinear(FFN, H, init_method=init_method_normal(0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(F.gelu(self.fc1(self.norm(x))))


def _dense_weights() -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(42)
    w1, w2 = torch.empty(FFN, H), torch.empty(H, FFN)
    init_method_normal(0.5)(w1)
    init_method_normal(0.5)(w2)
    return w1.requires_grad_(True), w2.requires_grad_(True)


def _batch(dp_rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + dp_rank)
    return torch.randn(MICRO, H, generator=g), torch.randn(MICRO, H, generator=g)


def check(zero_stage: int) -> None:
    import deepspeed

    torch.manual_seed(42)
    model = TPBlock()
    config = {"train_micro_batch_size_per_gpu": MICRO, "gradient_accumulation_steps": 1,
              "optimizer": {"type": "SGD", "params": {"lr": 0.1}}, "gradient_clipping": 1e9,
              "zero_optimization": {"stage": zero_stage}, "zero_allow_untested_optimizer": True,
              "steps_per_print": 10**9}
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config,
                                           mpu=state)
    dp = state.get_data_parallel_world_size()
    assert engine.dp_world_size == dp == 2 and engine.mp_world_size == 2, (engine.dp_world_size,
                                                                          engine.mp_world_size)
    assert engine.train_batch_size() == MICRO * dp

    x, y = _batch(state.get_data_parallel_rank())
    loss = F.mse_loss(engine(x), y)
    engine.backward(loss)  # gradients are DP-averaged at the end of backward
    if zero_stage == 0:
        # fp32 without ZeRO: the engine clips with this very function but does not keep the norm.
        from deepspeed.runtime.utils import clip_grad_norm_
        norm = float(clip_grad_norm_(parameters=engine.module.parameters(), max_norm=1e9, mpu=state))
        engine.step()
    else:
        engine.step()
        norm = float(engine.get_global_grad_norm())

    # Dense twin: the loss DeepSpeed optimises is the mean over DP ranks of each rank's loss.
    w1, w2 = _dense_weights()
    b1, b2 = torch.zeros(FFN, requires_grad=True), torch.zeros(H, requires_grad=True)
    ln = nn.LayerNorm(H)
    dense_loss = 0.0
    for r in range(dp):
        xr, yr = _batch(r)
        out = xr + F.linear(F.gelu(F.linear(ln(xr), w1, b1)), w2, b2)
        dense_loss = dense_loss + F.mse_loss(out, yr) / dp
    dense_loss.backward()
    grads = [w1.grad, w2.grad, b1.grad, b2.grad, ln.weight.grad, ln.bias.grad]
    dense_norm = torch.sqrt(sum(g.pow(2).sum() for g in grads)).item()
    assert abs(norm - dense_norm) <= 1e-5 * dense_norm, f"DeepSpeed grad norm {norm} != dense {dense_norm}"

    # After one SGD step every shard equals the slice of the dense updated weight.
    tp, n = state.get_tensor_model_parallel_rank(), FFN // 2
    with torch.no_grad():
        new_w1, new_w2 = w1 - 0.1 * w1.grad, w2 - 0.1 * w2.grad
    assert_close(engine.module.fc1.weight.detach(), new_w1[tp * n:(tp + 1) * n], "fc1 after step", 1e-6, 1e-5)
    assert_close(engine.module.fc2.weight.detach(), new_w2[:, tp * n:(tp + 1) * n], "fc2 after step", 1e-6, 1e-5)
    assert_close(engine.module.fc1.bias.detach(), -0.1 * b1.grad[tp * n:(tp + 1) * n], "fc1 bias", 1e-6, 1e-5)
    assert_close(engine.module.fc2.bias.detach(), -0.1 * b2.grad, "fc2 bias after step", 1e-6, 1e-5)
    assert_close(engine.module.norm.weight.detach(), ln.weight - 0.1 * ln.weight.grad, "ln after step",
                 1e-6, 1e-5)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--zero-stage", type=int, nargs="+", default=[0])
    args = parser.parse_args()
    start()
    state.initialize_model_parallel(tensor_model_parallel_size=2)
    run_checks([(f"deepspeed-mpu-zero{s}", lambda s=s: check(s)) for s in args.zero_stage])
    finish()


if __name__ == "__main__":
    main()
