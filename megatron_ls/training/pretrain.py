"""The pretraining driver: DeepSpeed engine, train/eval loop, checkpoints, logging."""
from __future__ import annotations

import math
import os
import sys
import time
import traceback
from typing import Any, Callable, Optional

import torch.distributed as dist
from torch import nn

from megatron_ls.arguments import Arguments, build_deepspeed_config
from megatron_ls.config import ConfigError, TransformerConfig, config_to_dict
from megatron_ls.training import checkpointing, faults
from megatron_ls.training.data_loading import build_data_iterator
from megatron_ls.training.initialize import initialize_megatron_ls, shutdown
from megatron_ls.training.loop_hooks import LoopHooks
from megatron_ls.training.lr_schedule import build_scheduler
from megatron_ls.training.metrics import (TensorboardWriter, format_eval_line, format_iteration_line,
                                          memory_stats_mb, model_flops_per_token)
from megatron_ls.training.optimizer import build_optimizer
from megatron_ls.training.steps import Steps, build_steps
from megatron_ls.training.task import Task

ModelProvider = Callable[[TransformerConfig, bool], nn.Module]
DatasetsProvider = Callable[[Arguments, tuple], tuple]


def print_rank_0(message: str) -> None:
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(message, flush=True)


def _args_dict(args: Arguments) -> dict:
    return {name: config_to_dict(getattr(args, name))
            for name in ("model", "parallel", "training", "data", "checkpoint", "logging")}


def _num_samples(args: Arguments) -> tuple[int, int, int]:
    """Samples each split must provide (train for every iteration; valid for every evaluation; one test pass)."""
    t, lg = args.training, args.logging
    gbs = t.global_batch_size
    evals = (t.train_iters // lg.eval_interval + 1) if lg.eval_interval else 1
    train = t.train_samples if t.train_samples is not None else t.train_iters * gbs  # Megatron's count
    return train, evals * lg.eval_iters * gbs, lg.eval_iters * gbs


def check_precision_supported(training: Any) -> None:
    """``--fp16`` / ``--bf16`` the DeepSpeed accelerator of this machine cannot train in, as a ConfigError."""
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    if training.fp16 and not accelerator.is_fp16_supported():
        raise ConfigError(f"--fp16: DeepSpeed's {accelerator.device_name()} accelerator does not support float16 "
                          f"training on this machine; use --bf16")
    if training.bf16 and not accelerator.is_bf16_supported():
        raise ConfigError(f"--bf16: DeepSpeed's {accelerator.device_name()} accelerator does not support bfloat16 "
                          f"training on this machine; use --fp16")


def pretrain(args: Arguments, model_provider: ModelProvider,
             datasets_provider: DatasetsProvider, *, byte_level: Optional[bool] = None,
             task: Optional[Task] = None) -> dict:
    """Train as the flags say; returns a summary dict (final losses) on every rank.

    ``model_provider(config, pipeline)`` builds the model (a ``PipelineModule`` when ``pipeline`` is True).
    ``datasets_provider(args, num_samples)`` returns ``(train, valid, test, byte_level)``; it may also set
    ``args.model.vocab_size`` from its tokenizer before the model is built. ``task`` swaps collation, the loss
    name, evaluation and metadata for other tasks (``training/task.py``; default: language modelling).
    """
    task = task or Task()
    p, t, lg, ck = args.parallel, args.training, args.logging, args.checkpoint
    initialize_megatron_ls(p.tensor_model_parallel_size, p.pipeline_model_parallel_size, p.context_parallel_size,
                           backend=p.distributed_backend, timeout_minutes=p.distributed_timeout_minutes,
                           seed=args.model.seed, context_parallel_layout=p.context_parallel_layout)
    import deepspeed

    from megatron_ls.parallel import state as ps
    from megatron_ls.parallel.context_parallel import get_context_layout
    from megatron_ls.training.deepspeed_mpu import deepspeed_mpu

    check_precision_supported(t)
    world = dist.get_world_size()
    dp_size, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    cp_size = ps.get_context_parallel_world_size()
    # Samples are sharded over DP only; each CP rank keeps its tokens of them (None: whole sequences).
    cp_layout = get_context_layout(args.model.seq_length) if cp_size > 1 else None
    t.resolve_global_batch_size(dp_size)
    ds_config = build_deepspeed_config(args, dp_size, cp_size)
    # A --deepspeed-config may override the stage: record what DeepSpeed really runs (checkpoints depend on it).
    p.zero_stage = int(ds_config.get("zero_optimization", {}).get("stage", p.zero_stage))
    grad_accum = ds_config["gradient_accumulation_steps"]

    train_ds, valid_ds, test_ds, data_byte_level = datasets_provider(args, _num_samples(args))
    byte_level = data_byte_level if byte_level is None else byte_level
    if ck.load:
        faults.set_phase(f"checking --load {ck.load}")
        checkpointing.check_compatible(ck.load, args.model, finetune=ck.finetune,
                                       allow_attention_change=ck.allow_attention_change)
        checkpointing.check_layout_change(ck.load, p, dp_size)
        if not t.skip_train:  # evaluating only: where the schedule would end does not matter
            checkpointing.check_resume_position(ck.load, t.train_iters, finetune=ck.finetune)
    pipeline = p.pipeline_model_parallel_size > 1
    args.model.sequence_parallel = p.sequence_parallel and p.tensor_model_parallel_size > 1
    if p.sequence_parallel and not args.model.sequence_parallel:
        print_rank_0(" warning: --sequence-parallel needs --tensor-model-parallel-size > 1; running without it "
                     "(as Megatron-LM does)")
    model = model_provider(args.model, pipeline)
    if args.model.sequence_parallel and not any(getattr(m, "sequence_parallel", False) for m in model.modules()):
        raise ConfigError("--sequence-parallel is not supported by this model (GPT-LS only); drop the flag")
    optimizer = build_optimizer(model, t)
    scheduler = build_scheduler(optimizer, t)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=ds_config, mpu=None if pipeline else deepspeed_mpu(),
                                           dist_init_required=False)
    checkpointing.install_safe_checkpoint_engine(engine)
    faults.bound_collective_timeouts(p.distributed_timeout_minutes)  # DeepSpeed's pipeline groups too
    steps: Steps = build_steps(engine, pipeline, grad_accum, t.bf16, t.fp16)

    iteration, consumed = 0, 0
    unchanged_in_save = None  # an iteration --save already holds, unchanged (resumed from that directory)
    if ck.load:
        from megatron_ls.parallel.random import set_rng_state_dict

        faults.set_phase(f"loading checkpoint {ck.load}")
        loaded, rng_state = checkpointing.load_checkpoint(engine, ck.load, load_optimizer=not ck.no_load_optim,
                                                          load_rng=not ck.no_load_rng, finetune=ck.finetune)
        iteration, consumed = loaded.iteration, loaded.consumed_samples
        if rng_state is not None:
            set_rng_state_dict(rng_state)
        elif loaded.metadata.get("rng_saved") is False and not (ck.no_load_rng or ck.finetune):
            print_rank_0(" RNG states not restored: the checkpoint was saved with --no-save-rng (dropout masks "
                         "differ from an uninterrupted run)")
        elif not (ck.no_load_rng or ck.finetune):
            print_rank_0(f" RNG states not restored: saved by {loaded.metadata.get('world_size')} ranks, "
                         f"{world} now (dropout masks differ from an uninterrupted run)")
        if ck.save and not ck.finetune and os.path.realpath(ck.save) == os.path.realpath(ck.load):
            unchanged_in_save = iteration
        print_rank_0(f" loaded checkpoint from {ck.load} at iteration {iteration}")
    elif getattr(args.extra, "load_note", None):
        print_rank_0(args.extra.load_note)

    mb = t.micro_batch_size
    hooks = LoopHooks(args)
    train_iter = build_data_iterator(train_ds, consumed, mb, dp_rank, dp_size, args.data.num_workers, cp_layout,
                                     collate_fn=task.collate_fn, worker_init_fn=hooks.worker_init_fn)
    flops_per_token = task.flops_per_token if task.flops_per_token is not None else model_flops_per_token(args.model)
    tokens_per_iter = t.global_batch_size * args.model.seq_length
    tb = TensorboardWriter(lg.tensorboard_dir, enabled=dist.get_rank() == world - 1)
    summary: dict[str, Any] = {"train_losses": []}

    def run_eval(prefix: str, dataset: Any, step: int, name: str) -> Optional[float]:
        if dataset is None or lg.eval_iters <= 0:
            return None
        faults.set_phase(f"{prefix} evaluation at iteration {step}")
        if task.evaluate is not None:
            result = task.evaluate(steps, dataset, lg.eval_iters)
            print_rank_0("-" * 80 + f"\n {prefix} at iteration {step} | {result['line']}\n" + "-" * 80)
            tb.scalars({f"{key} {name}": value for key, value in result.items() if isinstance(value, float)}, step)
            summary[f"{name}_metrics"] = {k: v for k, v in result.items() if k != "line"}
            return result["loss"]
        data_iter = build_data_iterator(dataset, 0, mb, dp_rank, dp_size, context_layout=cp_layout)
        loss = steps.evaluate(data_iter, lg.eval_iters)
        print_rank_0("-" * 80 + "\n" + format_eval_line(f"{prefix} loss at iteration {step}", loss, byte_level)
                     + "\n" + "-" * 80)
        tb.scalars({f"lm loss {name}": loss, f"lm loss {name} ppl": math.exp(min(20.0, loss))}, step)
        if byte_level:
            tb.scalars({f"bits per byte {name}": loss / math.log(2)}, step)
        return loss

    run_eval = hooks.wrap_evaluation(run_eval)

    def save(step: int) -> None:
        nonlocal unchanged_in_save
        from megatron_ls.parallel.random import get_rng_state_dict

        if step == unchanged_in_save:
            print_rank_0(f" checkpoint of iteration {step} is already in {ck.save}, unchanged; not rewritten")
            return
        faults.set_phase(f"saving the checkpoint of iteration {step} to {ck.save}")
        path = checkpointing.save_checkpoint(engine, ck.save, step, consumed, _args_dict(args),
                                             None if ck.no_save_rng else get_rng_state_dict(), {"layout": {
                                                 "tensor_model_parallel_size": p.tensor_model_parallel_size,
                                                 "pipeline_model_parallel_size": p.pipeline_model_parallel_size,
                                                 "context_parallel_size": cp_size,
                                                 "context_parallel_layout": p.context_parallel_layout,
                                                 "data_parallel_size": dp_size}, **task.metadata},
                                             retain_interval=ck.save_retain_interval,
                                             save_optimizer=not ck.no_save_optim)
        unchanged_in_save = step
        print_rank_0(f" saved checkpoint at iteration {step} to {path}")

    cp_text = f" CP={cp_size} ({p.context_parallel_layout})" if cp_size > 1 else ""
    cp_text += " SP" if args.model.sequence_parallel else ""
    print_rank_0(f" training: world size {world} (TP={p.tensor_model_parallel_size} "
                 f"PP={p.pipeline_model_parallel_size} DP={dp_size}{cp_text}), global batch {t.global_batch_size}, "
                 f"micro batch {mb}, gradient accumulation {grad_accum}, ZeRO-{p.zero_stage}")
    interval_losses: list[float] = []
    interval_start = time.perf_counter()
    skipped_total = 0
    exited_early = False
    nonfinite = faults.NonFiniteTracker(t.nonfinite_steps_limit, loss_scaling=t.fp16, loss_name=task.loss_name)
    hooks.start()
    if t.skip_train:
        print_rank_0(f" skipping training (--skip-train): evaluating the weights of iteration {iteration}")
    while not t.skip_train and iteration < t.train_iters:
        faults.set_phase(f"training iteration {iteration + 1}")
        lr = scheduler.current_lr  # the rate this step uses (the scheduler moves on inside the step)
        loss, skipped = steps.train_step(train_iter)
        iteration += 1
        consumed += t.global_batch_size
        skipped_total += int(skipped)
        interval_losses.append(loss)
        summary["train_losses"].append(loss)
        grad_norm = steps.grad_norm()
        tb_values = {task.loss_name: loss, "learning-rate": lr, "grad-norm": grad_norm, "loss-scale": steps.loss_scale(),
                     "consumed-samples": consumed}
        params_norm = logged_params_norm(args, steps, iteration)
        if params_norm is not None:
            tb_values["params-norm"] = params_norm
        if iteration % lg.tensorboard_log_interval == 0:
            tb.scalars(tb_values, iteration)
        if iteration % lg.log_interval == 0 or iteration == t.train_iters:
            elapsed = (time.perf_counter() - interval_start) / len(interval_losses)
            tokens_per_sec = tokens_per_iter / elapsed / world
            tflops = flops_per_token * tokens_per_iter / elapsed / world / 1e12
            print_rank_0(format_iteration_line(
                iteration=iteration, train_iters=t.train_iters, consumed_samples=consumed,
                elapsed_ms=elapsed * 1000, tflops=tflops, tokens_per_sec=tokens_per_sec, lr=lr,
                global_batch_size=t.global_batch_size, loss=sum(interval_losses) / len(interval_losses),
                loss_scale=steps.loss_scale(), grad_norm=grad_norm, skipped=skipped_total, loss_name=task.loss_name,
                params_norm=params_norm))
            tb.scalars({"throughput": tflops, "tokens-per-second-per-gpu": tokens_per_sec, **memory_stats_mb()},
                       iteration)
            interval_losses, interval_start = [], time.perf_counter()
        nonfinite.update(iteration, loss, grad_norm, skipped)
        if lg.eval_interval and iteration % lg.eval_interval == 0 and iteration < t.train_iters:
            run_eval("validation", valid_ds, iteration, "validation")
        if ck.save and ck.save_interval and iteration % ck.save_interval == 0:
            save(iteration)
        stop = hooks.after_iteration(iteration)  # the same on every rank
        if stop:
            if ck.save and not (ck.save_interval and iteration % ck.save_interval == 0):
                save(iteration)
            print_rank_0(f" exiting program at iteration {iteration} {stop}")
            exited_early = True
            break
    if not exited_early:
        if ck.save and not t.skip_train and not (ck.save_interval and iteration % ck.save_interval == 0):
            save(iteration)
        summary["validation_loss"] = run_eval("validation", valid_ds, iteration, "validation")
        summary["test_loss"] = run_eval("test", test_ds, iteration, "test")
        if byte_level and summary["validation_loss"] is not None:
            summary["validation_bits_per_byte"] = summary["validation_loss"] / math.log(2)
    hooks.finish()
    summary.update(iteration=iteration, consumed_samples=consumed, skipped_iterations=skipped_total)
    if lg.tensorboard_dir:
        print_rank_0(f" tensorboard logs: {os.path.abspath(lg.tensorboard_dir)}")
    tb.close()
    return summary


def logged_params_norm(args: Arguments, steps: Steps, iteration: int) -> Optional[float]:
    """The weights' norm when ``--log-params-norm`` and this iteration logs (a collective: every rank calls it)."""
    lg = args.logging
    if not lg.log_params_norm:
        return None
    logs = (iteration % lg.log_interval == 0 or iteration % lg.tensorboard_log_interval == 0
            or iteration == args.training.train_iters)
    if not logs:
        return None
    return steps.params_norm()


def run_main(main: Callable[[], Any]) -> None:
    """Run an entry point: a clean shutdown on success; on a known failure one line ``error: ...`` on stderr and
    exit status 1 (a traceback only for what is not a known failure class, i.e. a bug); never a barrier after a
    failure, since the peers may be gone."""
    try:
        main()
    except (SystemExit, KeyboardInterrupt):
        raise
    except BaseException as exc:  # noqa: BLE001 - every failure ends here, known ones in one line
        line = faults.error_line(exc)
        if line is None:
            traceback.print_exc()
        elif not getattr(exc, "all_ranks", False) or not dist.is_initialized() or dist.get_rank() == 0:
            print(f"error: {line}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)
    try:
        shutdown()
    except Exception as exc:  # noqa: BLE001 - shutdown must not hide the real outcome
        print(f"warning: shutdown failed: {exc}", file=sys.stderr)
