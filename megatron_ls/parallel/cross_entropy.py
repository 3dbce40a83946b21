"""Cross-entropy over vocabulary-parallel logits without gathering them.

Each TP rank holds logits for its vocabulary slice ``[t*V/tp, (t+1)*V/tp)``. The loss needs only three
all-reduces of ``b*s`` numbers (max, target logit, sum of exps); the gradient ``softmax - onehot`` is
local. All arithmetic is fp32; the gradient is returned in the logits' dtype.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_ls.parallel import state
from megatron_ls.parallel.comm_stats import record_collective


def _all_reduce(t: torch.Tensor, op: dist.ReduceOp.RedOpType) -> None:
    if state.get_tensor_model_parallel_world_size() > 1:
        record_collective("all_reduce", "forward", t)
        dist.all_reduce(t, op=op, group=state.get_tensor_model_parallel_group())


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        if target.shape != logits.shape[:-1]:
            raise ValueError(f"vocab_parallel_cross_entropy: target shape {tuple(target.shape)} does not match "
                             f"logits shape {tuple(logits.shape)} without its last (vocabulary) dimension")
        x = logits.float()
        local_vocab = x.size(-1)
        start = state.get_tensor_model_parallel_rank() * local_vocab

        # Subtract the global max for stability (it cancels exactly in the loss and the softmax).
        logits_max = x.max(dim=-1).values
        _all_reduce(logits_max, dist.ReduceOp.MAX)
        x = x - logits_max.unsqueeze(-1)

        # The target's logit lives on exactly one rank; others contribute 0, a sum-reduce picks it.
        outside = (target < start) | (target >= start + local_vocab)
        local_target = (target - start).masked_fill(outside, 0)
        predicted = x.gather(-1, local_target.unsqueeze(-1)).squeeze(-1).masked_fill(outside, 0.0)
        _all_reduce(predicted, dist.ReduceOp.SUM)

        exp = x.exp_()
        sum_exp = exp.sum(dim=-1)
        _all_reduce(sum_exp, dist.ReduceOp.SUM)
        loss = sum_exp.log() - predicted

        softmax = exp.div_(sum_exp.unsqueeze(-1))  # reuse the buffer: backward needs only the softmax
        ctx.save_for_backward(softmax, local_target, outside)
        ctx.logits_dtype = logits.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):  # type: ignore[override]
        softmax, local_target, outside = ctx.saved_tensors
        grad = softmax.clone()
        # d loss / d logit_j = softmax_j - [j == target]; the -1 lands only on the rank owning the target.
        hit = (~outside).to(grad.dtype)
        grad.scatter_add_(-1, local_target.unsqueeze(-1), -hit.unsqueeze(-1))
        grad.mul_(grad_loss.float().unsqueeze(-1))
        return grad.to(ctx.logits_dtype), None


def vocab_parallel_cross_entropy(vocab_parallel_logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-token cross-entropy (fp32, shape of ``target``) from this rank's ``[..., V/tp]`` logits.

    ``target`` holds global vocabulary ids. At TP=1 equals ``F.cross_entropy(logits.float(), target,
    reduction="none")``.
    """
    return _VocabParallelCrossEntropy.apply(vocab_parallel_logits, target)
