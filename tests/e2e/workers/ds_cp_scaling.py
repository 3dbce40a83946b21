"""torchrun worker (4 ranks): what DeepSpeed does with gradients and losses under context parallelism.

Every rank computes a loss on its own data; DeepSpeed reduces the gradients over the ranks holding the same
parameters and divides by something. This worker measures that divisor (SGD, lr 1: the update IS the applied
gradient) and prints one JSON line per engine, which tests/e2e/test_context_parallel.py checks:

* plain engine with ``mpu=megatron_ls.parallel.state`` at DP2 x CP2, ZeRO 0-3 (fp32) and ZeRO-0 bf16;
* ``PipelineEngine`` at PP2 x CP2 whose topology has data = DP x CP (ZeRO 0 and 1), plus the loss
  ``train_batch`` returns.

    torchrun --nproc_per_node 4 tests/e2e/workers/ds_cp_scaling.py
"""
from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", ".."))

from megatron_ls.parallel import state  # noqa: E402

WIDTH = 3


class FixedLinear(nn.Linear):
    """A bias-free linear layer with fixed, distinct weights (same on every rank, no RNG)."""

    def __init__(self, n_in: int, n_out: int, offset: float) -> None:
        super().__init__(n_in, n_out, bias=False)
        with torch.no_grad():
            self.weight.copy_(torch.arange(n_in * n_out, dtype=torch.float32).view(n_out, n_in) * 0.1 + offset)


def _coefficient(dp_rank: int, cp_rank: int, cp: int) -> float:
    """A distinct loss weight per (DP, CP) position, so sums and means are told apart."""
    return float(1 + dp_rank * cp + cp_rank) ** 1.5


def _gather(value: float) -> list[float]:
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def _report(record: dict) -> None:
    if dist.get_rank() == 0:
        print("DSCP " + json.dumps(record), flush=True)


def _divisor(sum_of_local: torch.Tensor, applied: torch.Tensor) -> float:
    """sum over the replica group of the local gradients / the gradient DeepSpeed applied."""
    ratio = sum_of_local.double() / applied.double()
    return float(ratio.mean())


def plain_engine(zero_stage: int, bf16: bool, mpu_kind: str) -> None:
    """DP2 x CP2: divisor of the gradient on every rank, and DeepSpeed's grad norm against the update.

    ``mpu_kind`` "state" hands DeepSpeed ``megatron_ls.parallel.state``; "training" the view training uses.
    """
    import deepspeed

    from megatron_ls.training.deepspeed_mpu import deepspeed_mpu

    mpu = state if mpu_kind == "state" else deepspeed_mpu()

    model = nn.Sequential(FixedLinear(WIDTH, 1, 0.5))
    config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "gradient_clipping": 0.0,
              "zero_optimization": {"stage": zero_stage}, "zero_allow_untested_optimizer": True,
              "steps_per_print": 10 ** 9}
    if bf16:
        config["bf16"] = {"enabled": True}
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config, mpu=mpu)
    c = _coefficient(state.get_data_parallel_rank(), state.get_context_parallel_rank(),
                     state.get_context_parallel_world_size())
    x = torch.full((1, WIDTH), c, dtype=torch.bfloat16 if bf16 else torch.float32)
    engine.backward(engine(x).float().sum())
    engine.step()
    with deepspeed.zero.GatheredParameters(list(engine.module.parameters()), enabled=zero_stage == 3):
        after = engine.module[0].weight.detach().float().clone()
    before = FixedLinear(WIDTH, 1, 0.5).weight.detach()
    # Local gradient of sum(W x) is x; summed over the DP x CP group it is sum(c) per element.
    total = sum(_gather(c))
    applied = (before - after).view(-1)
    norm = engine.get_global_grad_norm()
    _report({"engine": "plain", "mpu": mpu_kind, "zero_stage": zero_stage, "bf16": bf16,
             "dp": state.get_data_parallel_world_size(), "cp": state.get_context_parallel_world_size(),
             "ds_seq_dp_world_size": engine.seq_dp_world_size, "ds_dp_world_size": engine.dp_world_size,
             "divisors": _gather(_divisor(torch.full_like(applied, total), applied)),
             "grad_norm_over_applied": None if norm is None else float(norm) / float(applied.norm())})


def pipeline_engine(zero_stage: int) -> None:
    """PP2 x CP2, topology data axis = DP x CP: divisor of the gradients and of the returned loss."""
    import deepspeed
    from deepspeed.pipe import LayerSpec, PipelineModule
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

    dp, cp = state.get_data_parallel_world_size(), state.get_context_parallel_world_size()
    coord_c = _coefficient(state.get_data_parallel_rank(), state.get_context_parallel_rank(), cp)

    def loss_fn(out: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        return (out * label).sum()

    topology = PipeModelDataParallelTopology(num_pp=state.get_pipeline_model_parallel_world_size(),
                                             num_mp=state.get_tensor_model_parallel_world_size(), num_dp=dp * cp)
    module = PipelineModule(layers=[LayerSpec(FixedLinear, WIDTH, WIDTH, 0.2), LayerSpec(FixedLinear, WIDTH, 1, 0.5)],
                            loss_fn=loss_fn, topology=topology, partition_method="uniform")
    config = {"train_batch_size": dp * cp, "train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
              "gradient_clipping": 0.0, "zero_optimization": {"stage": zero_stage},
              "zero_allow_untested_optimizer": True, "steps_per_print": 10 ** 9}
    optimizer = torch.optim.SGD(module.parameters(), lr=1.0)
    engine, _, _, _ = deepspeed.initialize(model=module, optimizer=optimizer, config=config)
    x = torch.full((1, WIDTH), 1.0)
    label = torch.full((1, 1), coord_c)
    loss = engine.train_batch(data_iter=iter([(x, label)]))

    # The same two layers as a plain model: this (dp, cp) position's local gradients and loss.
    l0, l1 = FixedLinear(WIDTH, WIDTH, 0.2), FixedLinear(WIDTH, 1, 0.5)
    local_loss = loss_fn(l1(l0(x)), label)
    local_loss.backward()
    stage = state.get_pipeline_model_parallel_rank()
    mine = l0 if stage == 0 else l1
    before = mine.weight.detach()
    after = next(engine.module.parameters()).detach().clone()
    local_grad = mine.weight.grad.detach().view(-1)
    group = state.get_data_parallel_group_with_context_parallel()
    summed = local_grad.clone()
    dist.all_reduce(summed, group=group)
    divisor = _divisor(summed, (before - after).view(-1))
    # Ranks [0, DP x CP) are stage 0 and cover every (dp, cp) position once.
    losses = _gather(float(local_loss))[:dp * cp]
    record = {"engine": "pipeline", "zero_stage": zero_stage, "stage": stage, "dp": dp, "cp": cp,
              "ds_dp_world_size": engine.dp_world_size, "grad_divisor": divisor,
              "loss_divisor": sum(losses) / float(loss)}
    records = _gather(json.dumps(record))
    if dist.get_rank() == 0:
        for r in records:
            print("DSCP " + r, flush=True)


def main() -> None:
    state.initialize_distributed(timeout_s=120)
    state.initialize_model_parallel(context_parallel_size=2)
    for mpu_kind in ("state", "training"):
        for zero_stage in (0, 1, 2, 3):
            plain_engine(zero_stage, bf16=False, mpu_kind=mpu_kind)
        plain_engine(0, bf16=True, mpu_kind=mpu_kind)
    state.destroy_model_parallel()
    state.initialize_model_parallel(pipeline_model_parallel_size=2, context_parallel_size=2)
    for zero_stage in (0, 1):
        pipeline_engine(zero_stage)
    state.shutdown_distributed()


if __name__ == "__main__":
    main()
