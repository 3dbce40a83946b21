"""One optimizer step / one evaluation over a global batch, for the plain and the pipeline DeepSpeed engines."""
from __future__ import annotations

import math
from typing import Any, Iterator, Optional

import torch
import torch.distributed as dist

from megatron_ls.model.gpt import masked_token_mean


def _data_parallel_mean(value: torch.Tensor) -> float:
    """Mean of a per-replica loss over DP x CP (the logged loss is the global-batch mean).

    Each context-parallel rank's loss is CP x its share of the micro-batch loss (``masked_token_mean``), so the
    mean over DP x CP is the mean over DP of whole-sample losses: the same number as without CP.
    """
    from megatron_ls.parallel import state as ps

    value = value.detach().float().reshape(1).clone()
    group = ps.get_data_parallel_group_with_context_parallel()
    size = ps.get_data_parallel_world_size_with_context_parallel()
    if dist.is_initialized() and size > 1:
        dist.all_reduce(value, group=group)
        value /= size
    return float(value.item())


def _global_l2_norm(module: torch.nn.Module, of_param) -> float:
    """L2 norm over the whole model of ``of_param(param)`` (a tensor, or None to skip): TP shards summed over the
    TP group, stages over the PP group; ZeRO-3 partitions (``ds_tensor``) summed over the data-parallel group."""
    from megatron_ls.parallel import state as ps

    # Accumulate on the parameters' device: NCCL cannot reduce CPU tensors.
    device = next(module.parameters()).device
    # [sharded over TP, replicated over TP] x [whole on this rank, a ZeRO-3 partition]
    sums = torch.zeros(2, 2, dtype=torch.float64, device=device)
    partitioned = False  # the same on every rank (ZeRO-3 or not), so the collective below is taken by all or none
    skip = set()
    if ps.get_pipeline_model_parallel_rank() > 0:
        # A tied embedding lives on the first and the last stage: count it once.
        skip = {id(p) for p in getattr(module, "tied_modules", torch.nn.ModuleDict()).parameters()}
    for param in module.parameters():
        value = None if id(param) in skip else of_param(param)
        if value is None:
            continue
        tp_sharded = 0 if getattr(param, "tensor_model_parallel", False) else 1
        is_part = value is getattr(param, "ds_tensor", None)
        partitioned |= is_part
        sums[tp_sharded, int(is_part)] += value.detach().double().pow(2).sum()
    if dist.is_initialized() and partitioned:
        parts = sums[:, 1].clone()
        dist.all_reduce(parts, group=ps.get_data_parallel_group_with_context_parallel())
        sums[:, 1] = parts
    sharded, replicated = sums[0].sum(), sums[1].sum()
    if dist.is_initialized() and ps.get_tensor_model_parallel_world_size() > 1:
        dist.all_reduce(sharded, group=ps.get_tensor_model_parallel_group())
    total = sharded + replicated
    if dist.is_initialized() and ps.get_pipeline_model_parallel_world_size() > 1:
        dist.all_reduce(total, group=ps.get_pipeline_model_parallel_group())
    return float(total.sqrt())


def unclipped_grad_norm(module: torch.nn.Module) -> float:
    """Global L2 norm of the gradients: TP shards summed over the TP group, stages over the PP group.

    After DeepSpeed's reduction every DP x CP replica holds the same gradients, so nothing is summed over DP or
    CP: a parameter replicated over context-parallel ranks counts once.
    """
    return _global_l2_norm(module, lambda param: param.grad)


def parameters_norm(module: torch.nn.Module) -> float:
    """Global L2 norm of the weights (Megatron's ``--log-params-norm``), counted once whatever the layout; under
    ZeRO-3 from each rank's partition (a collective over the data-parallel group)."""
    def weight(param: torch.nn.Parameter) -> torch.Tensor:
        partition = getattr(param, "ds_tensor", None)
        return param.data if partition is None else partition
    return _global_l2_norm(module, weight)


class _GradNormRecorder:
    """Gradient norm, clipping and non-finite skipping when DeepSpeed steps our torch optimizer (fp32, ZeRO-0).

    DeepSpeed's own optimizer wrappers (ZeRO, bf16, fp16) record the norm themselves and skip a step whose norm
    is not finite. On the plain path DeepSpeed neither records the norm nor, with pipeline parallelism, counts a
    tied embedding once (it sits on two stages), so the clip factor would depend on the layout; it also applies
    a NaN update. Here the norm is computed layout-independently, applied as the clip, and a step with a
    non-finite norm is skipped: the optimizer's ``overflow`` flag tells DeepSpeed, which then counts the step
    as skipped and leaves the LR schedule where it is (as Megatron does for skipped iterations).
    """

    def __init__(self, engine: Any) -> None:
        self.value: Optional[float] = None
        self._fresh = False
        optimizer = engine.optimizer
        if hasattr(optimizer, "_global_grad_norm") or not isinstance(optimizer, torch.optim.Optimizer):
            return
        module, max_norm = engine.module, engine.gradient_clipping()

        def clip_and_record() -> None:
            self.value, self._fresh = unclipped_grad_norm(module), True
            coeff = max_norm / (self.value + 1e-6)
            if coeff < 1.0:
                for param in module.parameters():
                    if param.grad is not None:
                        param.grad.mul_(coeff)

        inner_step = optimizer.step

        def guarded_step(*args: Any, **kwargs: Any) -> Any:
            if not self._fresh:  # no clipping configured: measure here
                self.value = unclipped_grad_norm(module)
            self._fresh = False
            optimizer.overflow = not math.isfinite(self.value)
            if optimizer.overflow:
                return None  # weights untouched; DeepSpeed zeroes the gradients and counts a skipped step
            return inner_step(*args, **kwargs)

        optimizer.overflow = False
        engine.clip_fp32_gradients = clip_and_record
        optimizer.step = guarded_step


class Steps:
    """Train/eval steps on a non-pipeline engine: ``grad_accum`` micro-batches per optimizer step."""

    def __init__(self, engine: Any, grad_accum: int) -> None:
        self.engine = engine
        self.grad_accum = grad_accum
        self.device = engine.device
        self._norm_recorder = _GradNormRecorder(engine)

    def _loss(self, batch: dict) -> torch.Tensor:
        tokens = batch["tokens"].to(self.device, non_blocking=True)
        labels = batch["labels"].to(self.device, non_blocking=True)
        loss_mask = batch["loss_mask"].to(self.device, non_blocking=True)
        return masked_token_mean(self.engine(tokens, labels), loss_mask)

    def train_step(self, data_iter: Iterator[dict]) -> tuple[float, bool]:
        """Returns (global-batch mean loss, whether the optimizer step was skipped by the loss scaler)."""
        self.engine.train()
        skipped_before = self.engine.skipped_steps
        total = torch.zeros((), device=self.device)
        for _ in range(self.grad_accum):
            loss = self._loss(next(data_iter))
            self.engine.backward(loss)
            self.engine.step()
            total += loss.detach().float()
        skipped = self.engine.skipped_steps > skipped_before
        return _data_parallel_mean(total / self.grad_accum), skipped

    @torch.no_grad()
    def evaluate(self, data_iter: Optional[Iterator[dict]], eval_iters: int) -> float:
        self.engine.eval()
        total, count = torch.zeros((), device=self.device), 0
        for _ in range(eval_iters):
            for _ in range(self.grad_accum):
                try:
                    batch = next(data_iter)
                except StopIteration:
                    break
                total += self._loss(batch).float()
                count += 1
        self.engine.train()
        return _data_parallel_mean(total / max(count, 1))

    def grad_norm(self) -> Optional[float]:
        norm = self.engine.get_global_grad_norm()
        if norm is None:
            norm = self._norm_recorder.value
        if norm is None:
            return None
        return float(norm.item() if torch.is_tensor(norm) else norm)

    def params_norm(self) -> float:
        """The weights' global L2 norm (a collective: call it on every rank)."""
        return parameters_norm(self.engine.module)

    def loss_scale(self) -> float:
        optimizer = self.engine.optimizer
        for attr in ("cur_scale", "loss_scale"):
            value = getattr(optimizer, attr, None)
            if isinstance(value, (int, float)) or torch.is_tensor(value):
                return float(value)
        return 1.0


class PipelineSteps(Steps):
    """Steps on DeepSpeed's ``PipelineEngine`` (1F1B over the micro-batches of one global batch)."""

    def __init__(self, engine: Any, grad_accum: int, cast_dtype: Optional[torch.dtype]) -> None:
        super().__init__(engine, grad_accum)
        self.cast_dtype = cast_dtype

    def _pipe_iter(self, data_iter: Iterator[dict]) -> Iterator[tuple]:
        # The pipeline engine feeds (inputs, labels); labels carry the loss mask along to the last stage.
        for batch in data_iter:
            yield batch["tokens"], (batch["labels"], batch["loss_mask"])

    def train_step(self, data_iter: Iterator[dict]) -> tuple[float, bool]:
        skipped_before = self.engine.skipped_steps
        loss = self.engine.train_batch(data_iter=self._pipe_iter(data_iter))
        return float(loss.item()), self.engine.skipped_steps > skipped_before

    @torch.no_grad()
    def evaluate(self, data_iter: Optional[Iterator[dict]], eval_iters: int) -> float:
        total = 0.0
        pipe_iter = self._pipe_iter(data_iter)
        for _ in range(eval_iters):
            loss = self.engine.eval_batch(data_iter=pipe_iter)
            total += float(loss.item())
        self.engine.train()
        return total / max(eval_iters, 1)


def build_steps(engine: Any, pipeline: bool, grad_accum: int, bf16: bool, fp16: bool) -> Steps:
    if pipeline:
        dtype = torch.bfloat16 if bf16 else (torch.float16 if fp16 else None)
        return PipelineSteps(engine, grad_accum, dtype)
    return Steps(engine, grad_accum)
