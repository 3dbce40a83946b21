"""Sequence-classification training on the DeepSpeed engine (Megatron's ``tasks/`` finetuning loop, reshaped).

Reuses the pretraining pieces: start-up and parallel groups, the DeepSpeed config built from the flags, AdamW
groups, the LR schedule, the train steps (``engine(tokens, labels)`` returns per-example losses, the loss mask is
one per example), checkpoints (DeepSpeed files + metadata + RNG, atomic ``latest``) and Megatron's iteration
line. Adds: padded micro-batches from the classification format, an epoch-shuffled resumable sample order, and
accuracy on the validation and test splits. TP and DP (ZeRO 0-3) work; PP and CP are refused.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any, Iterator, Optional

import torch
import torch.distributed as dist

from megatron_ls.arguments import Arguments, build_deepspeed_config
from megatron_ls.config import ConfigError, config_to_dict
from megatron_ls.data.classification_dataset import (SPLITS, ClassificationDataset, EpochShuffledView,
                                                     collate_classification, read_meta, split_prefix)
from megatron_ls.data.sampler import PretrainingSampler
from megatron_ls.model.classification import ClassificationModel
from megatron_ls.training import checkpointing, faults
from megatron_ls.training.data_loading import check_dataset_vocabulary
from megatron_ls.training.initialize import initialize_megatron_ls
from megatron_ls.training.loop_hooks import LoopHooks
from megatron_ls.training.lr_schedule import build_scheduler
from megatron_ls.training.metrics import TensorboardWriter, format_iteration_line, model_flops_per_token
from megatron_ls.training.optimizer import build_optimizer
from megatron_ls.training.pretrain import check_precision_supported, logged_params_norm
from megatron_ls.training.steps import build_steps

PAD_MULTIPLE = 8  # micro-batches are padded to their longest example, rounded up to this


def print_rank_0(message: str) -> None:
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(message, flush=True)


def padded_vocab_size(vocab: int, divisible_by: int, tp: int) -> int:
    multiple = max(divisible_by, 1) * tp
    return -(-vocab // multiple) * multiple


def check_task_arguments(args: Arguments) -> None:
    """Layouts and flags this driver cannot run, as one ConfigError."""
    p, e = args.parallel, args.extra
    problems = []
    if p.pipeline_model_parallel_size > 1:
        problems.append("--pipeline-model-parallel-size > 1 is not supported for sequence classification (the "
                        "pooled vector and the head are not cut into pipeline stages); use TP and DP")
    if getattr(p, "sequence_parallel", False):
        problems.append("--sequence-parallel is not supported for sequence classification (the post-CLS layer "
                        "and the pooling read whole sequences)")
    if p.context_parallel_size > 1:
        problems.append("--context-parallel-size > 1 is not supported for sequence classification (pooling needs "
                        "the whole sequence on one rank)")
    if e.cls_init_std < 0:
        problems.append(f"--cls-init-std must be >= 0, got {e.cls_init_std}")
    if e.bucket_batches < 0:
        problems.append(f"--bucket-batches must be >= 0, got {e.bucket_batches}")
    if args.data.mock_data:
        problems.append("--mock-data is GPT-LS's synthetic text; tasks read --data-path made by "
                        "tools/generate_task_data.py")
    if args.model.untie_embeddings_and_output_weights:
        problems.append("--untie-embeddings-and-output-weights does not apply to sequence classification (its "
                        "head is a classifier, not an LM head)")
    if e.pooling == "cls" and e.cls_last_layer:
        problems.append("--pooling cls and --cls-last-layer are two different CLS schemes: pick one")
    if problems:
        raise ConfigError("; ".join(problems))


def _batches(dataset: Any, consumed: int, mb: int, dp_rank: int, dp_size: int, pad_id: int, max_tokens: int
             ) -> Iterator[dict]:
    sampler = PretrainingSampler(total_samples=len(dataset), consumed_samples=consumed, micro_batch_size=mb,
                                 data_parallel_rank=dp_rank, data_parallel_size=dp_size)
    for indices in sampler:
        yield collate_classification([dataset[i] for i in indices], pad_id, max_tokens, PAD_MULTIPLE)


def _dp_sum(values: list[float], device: torch.device) -> list[float]:
    from megatron_ls.parallel import state as ps

    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized() and ps.get_data_parallel_world_size() > 1:
        dist.all_reduce(tensor, group=ps.get_data_parallel_group())
    return tensor.tolist()


@torch.no_grad()
def evaluate_accuracy(engine: Any, dataset: ClassificationDataset, mb: int, dp_rank: int, dp_size: int,
                      pad_id: int, max_tokens: int, max_steps: Optional[int] = None) -> dict:
    """Accuracy and mean loss over a split (or its first ``max_steps`` global batches), summed over DP.

    Every DP rank runs the same number of forward passes (ZeRO-3 gathers weights collectively): a rank with
    nothing left in the last step runs a dummy example that is not counted.
    """
    engine.eval()
    n = len(dataset)
    per_step = mb * dp_size
    steps = -(-n // per_step)
    if max_steps is not None:
        steps = min(steps, max_steps)
    correct = total = loss_sum = 0.0
    for step in range(steps):
        start = step * per_step + dp_rank * mb
        indices = list(range(start, min(start + mb, n)))
        weight = 1.0 if indices else 0.0
        batch = collate_classification([dataset[i] for i in (indices or [0])], pad_id, max_tokens, PAD_MULTIPLE)
        logits = engine(batch["tokens"].to(engine.device)).float()
        labels = batch["labels"].to(engine.device)
        correct += weight * float((logits.argmax(dim=-1) == labels).sum())
        loss_sum += weight * float(torch.nn.functional.cross_entropy(logits, labels, reduction="sum"))
        total += weight * len(indices)
    engine.train()
    correct, total, loss_sum = _dp_sum([correct, total, loss_sum], engine.device)
    return {"correct": int(correct), "total": int(total), "accuracy": correct / max(total, 1.0),
            "loss": loss_sum / max(total, 1.0)}


def _args_dict(args: Arguments) -> dict:
    out = {name: config_to_dict(getattr(args, name))
           for name in ("model", "parallel", "training", "data", "checkpoint", "logging")}
    out["task"] = {k: v for k, v in vars(args.extra).items() if isinstance(v, (str, int, float, bool, type(None)))}
    return out


def _check_task_checkpoint(load_dir: str, task_meta: dict) -> None:
    saved = checkpointing.read_metadata(load_dir, checkpointing.read_latest_tag(load_dir)).get("task", {})
    diffs = [f"{k} is {task_meta[k]} here but {saved[k]} in the checkpoint"
             for k in task_meta if k in saved and saved[k] != task_meta[k]]
    if diffs:
        raise checkpointing.CheckpointError(f"--load {load_dir}: " + "; ".join(diffs))


def train_classification(args: Arguments) -> dict:
    """Train and evaluate as the flags say; returns a summary (accuracies, history) on every rank."""
    check_task_arguments(args)
    p, t, lg, ck, e = args.parallel, args.training, args.logging, args.checkpoint, args.extra
    initialize_megatron_ls(p.tensor_model_parallel_size, 1, 1, backend=p.distributed_backend,
                           timeout_minutes=p.distributed_timeout_minutes, seed=args.model.seed)
    import deepspeed

    from megatron_ls.parallel import state as ps
    from megatron_ls.parallel.random import get_rng_state_dict, set_rng_state_dict
    from megatron_ls.training.deepspeed_mpu import deepspeed_mpu

    check_precision_supported(t)
    prefix = args.data.data_path[-1]
    meta = read_meta(prefix)
    if meta["task"] != e.task:
        raise ConfigError(f"--task {e.task} but {prefix}_meta.json holds {meta['task']} data")
    num_classes = int(meta["num_classes"])
    pad_id, cls_id = int(meta["pad_id"]), int(meta["cls_id"])
    args.model.causal = False
    args.model.vocab_size = padded_vocab_size(len(meta["vocab"]), args.data.make_vocab_size_divisible_by,
                                              p.tensor_model_parallel_size)
    world = dist.get_world_size()
    dp_size, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    t.resolve_global_batch_size(dp_size)
    ds_config = build_deepspeed_config(args, dp_size)
    p.zero_stage = int(ds_config.get("zero_optimization", {}).get("stage", p.zero_stage))
    grad_accum = ds_config["gradient_accumulation_steps"]
    task_meta = {"task": e.task, "num_classes": num_classes, "pooling": e.pooling, "cls_last_layer": e.cls_last_layer}

    splits = {s: ClassificationDataset(prefix, s, meta) for s in SPLITS}
    # Token ids outside the task's vocabulary would index past the embedding (or, at TP > 1, be masked silently).
    check_dataset_vocabulary([split_prefix(prefix, s) for s in SPLITS], len(meta["vocab"]),
                             f"the vocab of {prefix}_meta.json", args.data.data_cache_path)
    train_view = EpochShuffledView(splits["train"], t.train_iters * t.global_batch_size, args.model.seed,
                                   e.bucket_batches, t.global_batch_size)
    model = ClassificationModel(args.model, num_classes, pooling=e.pooling, cls_last_layer=e.cls_last_layer,
                                pad_id=pad_id, cls_id=cls_id, cls_init_std=e.cls_init_std)
    max_tokens = model.max_tokens
    if ck.load:
        faults.set_phase(f"checking --load {ck.load}")
        # The pretraining checks: attention changes need --finetune or --allow-attention-change, and a checkpoint
        # past --train-iters is refused (as a resume) rather than only evaluated.
        checkpointing.check_compatible(ck.load, args.model, finetune=ck.finetune,
                                       allow_attention_change=ck.allow_attention_change)
        checkpointing.check_layout_change(ck.load, p, dp_size, load_optimizer=not (ck.no_load_optim or ck.finetune))
        if not t.skip_train:
            checkpointing.check_resume_position(ck.load, t.train_iters, finetune=ck.finetune)
        _check_task_checkpoint(ck.load, task_meta)
    optimizer = build_optimizer(model, t)
    scheduler = build_scheduler(optimizer, t)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=ds_config, mpu=deepspeed_mpu(), dist_init_required=False)
    checkpointing.install_safe_checkpoint_engine(engine)
    faults.bound_collective_timeouts(p.distributed_timeout_minutes)  # any group DeepSpeed made, as pretraining
    steps = build_steps(engine, False, grad_accum, t.bf16, t.fp16)

    iteration, consumed = 0, 0
    loaded_iteration = -1
    if ck.load:
        faults.set_phase(f"loading checkpoint {ck.load}")
        loaded, rng_state = checkpointing.load_checkpoint(engine, ck.load, load_optimizer=not ck.no_load_optim,
                                                          load_rng=not ck.no_load_rng, finetune=ck.finetune)
        iteration, consumed = loaded.iteration, loaded.consumed_samples
        loaded_iteration = iteration
        if rng_state is not None:
            set_rng_state_dict(rng_state)
        print_rank_0(f" loaded checkpoint from {ck.load} at iteration {iteration}")
    elif getattr(args.extra, "load_note", None):
        print_rank_0(args.extra.load_note)

    mb = t.micro_batch_size
    train_iter = _batches(train_view, consumed, mb, dp_rank, dp_size, pad_id, max_tokens)
    flops_per_token = model_flops_per_token(dataclasses.replace(args.model, vocab_size=0))
    tb = TensorboardWriter(lg.tensorboard_dir, enabled=dist.get_rank() == 0)
    summary: dict[str, Any] = {"train_losses": [], "history": [], **task_meta}

    def run_eval(split: str, step: int, max_steps: Optional[int]) -> dict:
        faults.set_phase(f"{split} evaluation at iteration {step}")
        start = time.perf_counter()
        result = evaluate_accuracy(engine, splits[split], mb, dp_rank, dp_size, pad_id, max_tokens, max_steps)
        name = "validation" if split == "valid" else "test"
        print_rank_0("-" * 80 + f"\n > metrics for {name} at iteration {step}: correct / total = "
                     f"{result['correct']} / {result['total']} = {100 * result['accuracy']:.4f} % | loss: "
                     f"{result['loss']:.6E} | elapsed time (sec): {time.perf_counter() - start:.1f}\n" + "-" * 80)
        tb.scalars({f"accuracy {name}": result["accuracy"], f"loss {name}": result["loss"]}, step)
        summary["history"].append({"iteration": step, "split": split, **result})
        return result

    hooks = LoopHooks(args)
    run_eval = hooks.wrap_evaluation(run_eval)

    def save(step: int) -> None:
        faults.set_phase(f"saving the checkpoint of iteration {step} to {ck.save}")
        path = checkpointing.save_checkpoint(engine, ck.save, step, consumed, _args_dict(args),
                                             None if ck.no_save_rng else get_rng_state_dict(),
                                             {"task": task_meta, "layout": {
                                                 "tensor_model_parallel_size": p.tensor_model_parallel_size,
                                                 "pipeline_model_parallel_size": 1, "context_parallel_size": 1,
                                                 "data_parallel_size": dp_size}},
                                             retain_interval=ck.save_retain_interval,
                                             save_optimizer=not ck.no_save_optim)
        print_rank_0(f" saved checkpoint at iteration {step} to {path}")

    print_rank_0(f" classification task {e.task}: {num_classes} classes, pooling "
                 f"{'post-CLS (last layer)' if e.cls_last_layer else e.pooling}, splits "
                 + ", ".join(f"{s} {len(d)}" for s, d in splits.items())
                 + f"; world size {world} (TP={p.tensor_model_parallel_size} DP={dp_size}), global batch "
                 f"{t.global_batch_size}, micro batch {mb}, gradient accumulation {grad_accum}, ZeRO-{p.zero_stage}")
    interval_losses: list[float] = []
    interval_tokens = 0
    interval_start = time.perf_counter()
    skipped_total = 0
    exited_early = saved_now = False

    def counting(it: Iterator[dict]) -> Iterator[dict]:
        nonlocal interval_tokens
        for batch in it:
            interval_tokens += batch["tokens"].numel()
            yield batch

    counted_iter = counting(train_iter)
    # Non-finite steps as in pretraining: skipped and counted, --nonfinite-steps-limit in a row stop in one line.
    nonfinite = faults.NonFiniteTracker(t.nonfinite_steps_limit, loss_scaling=t.fp16)
    stop = None
    hooks.start()
    if t.skip_train:
        print_rank_0(f" skipping training (--skip-train): evaluating the weights of iteration {iteration}")
    while not t.skip_train and iteration < t.train_iters:
        faults.set_phase(f"training iteration {iteration + 1}")
        lr = scheduler.current_lr
        loss, skipped = steps.train_step(counted_iter)
        iteration += 1
        consumed += t.global_batch_size
        skipped_total += int(skipped)
        interval_losses.append(loss)
        summary["train_losses"].append(loss)
        grad_norm = steps.grad_norm()
        params_norm = logged_params_norm(args, steps, iteration)
        if iteration % lg.tensorboard_log_interval == 0:
            tb.scalars({"lm loss": loss, "learning-rate": lr, "grad-norm": grad_norm,
                        **({"params-norm": params_norm} if params_norm is not None else {})}, iteration)
        if iteration % lg.log_interval == 0 or iteration == t.train_iters:
            elapsed = (time.perf_counter() - interval_start) / len(interval_losses)
            tokens_per_sec = interval_tokens / len(interval_losses) / elapsed
            print_rank_0(format_iteration_line(
                iteration=iteration, train_iters=t.train_iters, consumed_samples=consumed,
                elapsed_ms=elapsed * 1000, tflops=flops_per_token * tokens_per_sec / 1e12,
                tokens_per_sec=tokens_per_sec, lr=lr, global_batch_size=t.global_batch_size,
                loss=sum(interval_losses) / len(interval_losses), loss_scale=steps.loss_scale(),
                grad_norm=grad_norm, skipped=skipped_total, params_norm=params_norm))
            interval_losses, interval_tokens, interval_start = [], 0, time.perf_counter()
        nonfinite.update(iteration, loss, grad_norm, skipped)
        if lg.eval_interval and iteration % lg.eval_interval == 0 and iteration < t.train_iters:
            run_eval("valid", iteration, lg.eval_iters if lg.eval_iters > 0 else None)
        saved_now = bool(ck.save and ck.save_interval and iteration % ck.save_interval == 0)
        if saved_now:
            save(iteration)
        stop = hooks.after_iteration(iteration)  # the same on every rank
        if stop:
            exited_early = True
            break
    if ck.save and not saved_now and iteration not in (0, loaded_iteration):
        save(iteration)  # the final state, or the one an early exit stops at
    if exited_early:
        print_rank_0(f" exiting program at iteration {iteration} {stop}")
    else:
        summary["valid"] = run_eval("valid", iteration, None)
        summary["test"] = run_eval("test", iteration, None)
    hooks.finish()
    summary.update(iteration=iteration, consumed_samples=consumed, skipped_iterations=skipped_total)
    if e.results_json and dist.get_rank() == 0:
        os.makedirs(os.path.dirname(os.path.abspath(e.results_json)), exist_ok=True)
        with open(e.results_json, "w") as fh:
            json.dump(summary, fh, indent=1)
    tb.close()
    return summary
