"""Top-1 / top-5 accuracy and mean loss of an image classifier over (part of) a split, on any layout.

Evaluation covers ``min(len(split), eval_iters x global batch)`` images in file order. Every rank runs the same
number of full-size micro-batches (ZeRO-3 gathers weights collectively, the pipeline engine needs fixed shapes):
positions past the end are filled with a copy of the first image labelled ``-1`` and not counted. Counts are
summed over data-parallel ranks; under pipeline parallelism the last stage computes them (the engine's
``loss_fn`` is swapped for a statistics function during evaluation) and broadcasts them to the other stages.
"""
from __future__ import annotations

from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist

from megatron_ls.model.vit import classification_loss

STATS = ("loss_sum", "top1", "top5", "count")


def classification_stats(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``[loss sum, top-1 correct, top-5 correct, count]`` (float64) over the labels that are not ``-1``."""
    valid = labels >= 0
    k = min(5, logits.shape[-1])
    top = logits.float().topk(k, dim=-1).indices
    hit = top == labels[:, None]
    loss = classification_loss(logits, labels)
    stats = [loss[valid].double().sum(), hit[:, :1].any(-1)[valid].double().sum(),
             hit.any(-1)[valid].double().sum(), valid.double().sum()]
    return torch.stack(stats)


def pipeline_stats_loss(logits: torch.Tensor, labels_and_mask: tuple) -> torch.Tensor:
    """The pipeline's ``loss_fn`` during evaluation: the statistics vector instead of a loss."""
    return classification_stats(logits, labels_and_mask[0])


def eval_batches(dataset: Any, collate: Callable[[list], dict], *, total: int, micro_batch: int,
                 dp_rank: int, dp_size: int, micro_batches: int) -> Iterator[dict]:
    """This rank's micro-batches for the first ``total`` samples (global batches of ``micro_batch x dp_size x
    micro_batches``, the last one padded with ``-1`` labels)."""
    per_step = micro_batch * dp_size * micro_batches
    filler = None
    for step in range(-(-total // per_step)):
        for micro in range(micro_batches):
            start = step * per_step + micro * micro_batch * dp_size + dp_rank * micro_batch
            samples = []
            for i in range(start, start + micro_batch):
                if i < total:
                    samples.append(dataset[i])
                else:
                    filler = filler or dict(dataset[0], label=-1)
                    samples.append(filler)
            yield collate(samples)


@torch.no_grad()
def evaluate_classifier(steps: Any, dataset: Any, eval_iters: int, collate: Callable[[list], dict]) -> dict:
    """``{"loss", "top1", "top5", "count", "line"}`` (accuracies in percent) for a plain or pipeline engine."""
    from megatron_ls.parallel import state as ps

    engine = steps.engine
    mb = engine.train_micro_batch_size_per_gpu()
    dp_size, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    accum = steps.grad_accum
    total = min(len(dataset), max(eval_iters, 1) * mb * dp_size * accum)
    batches = eval_batches(dataset, collate, total=total, micro_batch=mb, dp_rank=dp_rank, dp_size=dp_size,
                           micro_batches=accum)
    device = engine.device
    pipeline = hasattr(engine, "eval_batch") and ps.get_pipeline_model_parallel_world_size() > 1
    engine.eval()
    if pipeline:
        stats = _pipeline_stats(engine, batches, -(-total // (mb * dp_size * accum)), accum)
    else:
        stats = torch.zeros(len(STATS), dtype=torch.float64, device=device)
        for batch in batches:
            logits = engine(batch["tokens"].to(device))
            stats += classification_stats(logits, batch["labels"].to(device)).to(device)
        if dist.is_initialized() and dp_size > 1:
            dist.all_reduce(stats, group=ps.get_data_parallel_group())
    engine.train()
    loss_sum, top1, top5, count = (float(x) for x in stats.cpu())
    count = max(count, 1.0)
    result = {"loss": loss_sum / count, "top1": 100.0 * top1 / count, "top5": 100.0 * top5 / count,
              "count": int(count)}
    result["line"] = (f"loss: {result['loss']:.6E} | top-1 accuracy: {result['top1']:.2f}% | "
                      f"top-5 accuracy: {result['top5']:.2f}% | images: {result['count']} |")
    return result


def _pipeline_stats(engine: Any, batches: Iterator[dict], steps: int, accum: int) -> torch.Tensor:
    """Run ``steps`` evaluation batches through the pipeline engine; statistics summed, on every stage."""
    module = engine.module
    saved = module.loss_fn
    module.loss_fn = pipeline_stats_loss
    feed = ((b["tokens"], (b["labels"], b["loss_mask"])) for b in batches)
    total = torch.zeros(len(STATS), dtype=torch.float64, device=engine.device)
    try:
        for _ in range(steps):
            engine.total_loss = None  # the engine sums eval outputs into the last training loss otherwise
            out = engine.eval_batch(data_iter=feed, bcast_loss=False)
            if engine.is_last_stage():  # the engine averaged over micro-batches and data-parallel ranks
                total += out.to(total.device, torch.float64) * accum * engine.dp_world_size
    finally:
        module.loss_fn = saved
        engine.total_loss = None
    last = engine.grid.stage_to_global(stage_id=engine.num_stages - 1)
    dist.broadcast(total, src=last, group=engine.grid.get_pipe_parallel_group())
    return total
