"""CLI generated from the configs, DeepSpeed config assembly, LR schedule, FLOP count, log line."""
import json
import subprocess
import sys

import pytest
import torch

from megatron_ls.arguments import build_deepspeed_config, parse_args
from megatron_ls.config import TransformerConfig
from megatron_ls.training.lr_schedule import OptimizerParamScheduler
from megatron_ls.training.metrics import format_iteration_line, model_flops_per_token

BASE = ["--data-path", "x", "--micro-batch-size", "2", "--global-batch-size", "16"]


def test_megatron_flag_names_fill_the_configs():
    a = parse_args(BASE + ["--num-layers", "6", "--full-attention-layers", "0", "5", "--no-dual-ln", "--bf16",
                           "--window-size", "64", "--segment-length", "16", "--projection-rank", "2",
                           "--tensor-model-parallel-size", "2", "--zero-stage", "2", "--lr-decay-style", "linear",
                           "--split", "949,50,1", "--save", "s", "--tensorboard-dir", "tb"], world_size=4)
    assert a.model.num_layers == 6 and a.model.full_attention_layers == (0, 5) and a.model.dual_ln is False
    assert (a.model.window_size, a.model.segment_length, a.model.projection_rank) == (64, 16, 2)
    assert a.training.bf16 and a.parallel.zero_stage == 2 and a.parallel.tensor_model_parallel_size == 2
    assert a.data.split == "949,50,1" and a.checkpoint.save == "s" and a.logging.tensorboard_dir == "tb"


def test_deepspeed_config_from_flags_and_user_json(tmp_path):
    user = tmp_path / "ds.json"
    user.write_text(json.dumps({"zero_optimization": {"stage": 3, "overlap_comm": True}, "gradient_clipping": 0.5}))
    a = parse_args(BASE + ["--bf16", "--zero-stage", "1", "--deepspeed-config", str(user)], world_size=2)
    cfg = build_deepspeed_config(a, data_parallel_size=2)
    assert cfg["train_batch_size"] == 16 and cfg["train_micro_batch_size_per_gpu"] == 2
    assert cfg["gradient_accumulation_steps"] == 4 and cfg["bf16"] == {"enabled": True}
    assert cfg["zero_optimization"] == {"stage": 3, "overlap_comm": True} and cfg["gradient_clipping"] == 0.5


@pytest.mark.parametrize("argv,message", [
    (["--global-batch-size", "3"], "--global-batch-size 3 is not divisible"),
    (["--bf16", "--fp16"], "mutually exclusive"),
    (["--window-size", "4", "--segment-length", "8"], "--window-size >= --segment-length"),
    (["--window-size", "0", "--projection-rank", "0"], "leave long-short layers no keys"),
    (["--split", "a,b"], "--split"),
    (["--tokenizer-type", "SentencePieceTokenizer"], "--tokenizer-model"),
    (["--context-parallel-size", "2", "--seq-length", "99"], "--seq-length 99 is not divisible by 4"),
    (["--context-parallel-size", "2", "--seq-length", "80"],
     "pieces of 20 tokens (--seq-length / --context-parallel-size / 2), which must be a multiple of --segment-length 16"),
    (["--context-parallel-size", "2", "--context-parallel-layout", "balanced", "--seq-length", "96",
      "--segment-length", "16", "--window-size", "16"], "(--seq-length / --context-parallel-size / 2)"),
    (["--context-parallel-size", "2", "--context-parallel-layout", "striped"], "invalid choice: 'striped'"),
    (["--num-layers", "3", "--pipeline-model-parallel-size", "2"], "--num-layers 3 is not divisible"),
    (["--tensor-model-parallel-size", "3"], "world size 2 is not divisible by tensor (3)"),
    (["--pipeline-model-parallel-size", "2", "--zero-stage", "2"], "--zero-stage 2 cannot be combined"),
])
def test_invalid_flags_exit_2_with_the_flag_named(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        parse_args(["--data-path", "x"] + argv, world_size=2)
    assert exc.value.code == 2 and message in capsys.readouterr().err


def test_context_parallel_flags_and_deepspeed_batch():
    a = parse_args(BASE + ["--context-parallel-size", "2", "--context-parallel-layout", "balanced",
                           "--seq-length", "128"], world_size=4)
    assert (a.parallel.context_parallel_size, a.parallel.context_parallel_layout) == (2, "balanced")
    assert a.parallel.data_parallel_size(4) == 2
    cfg = build_deepspeed_config(a, data_parallel_size=2, context_parallel_size=2)
    # DeepSpeed counts CP ranks as replicas: every sample is fed twice (half of it to each CP rank).
    assert cfg["train_batch_size"] == 32 and cfg["gradient_accumulation_steps"] == 4
    assert a.training.global_batch_size == 16


def test_help_groups_flags_by_concern():
    out = subprocess.run([sys.executable, "pretrain_gpt_ls.py", "--help"], capture_output=True, text=True,
                         check=True).stdout
    for title in ("Model and Long-Short attention", "Distributed layout", "Training", "Data and tokenizer",
                  "Checkpointing", "Logging and evaluation"):
        assert title in out
    for flag in ("--window-size", "--segment-length", "--projection-rank", "--full-attention-layers",
                 "--no-dual-ln", "--attention-backend", "--tensor-model-parallel-size", "--zero-stage",
                 "--context-parallel-size", "--context-parallel-layout"):
        assert flag in out


@pytest.mark.parametrize("style", ["constant", "linear", "cosine"])
def test_lr_schedule_warmup_then_decay(style):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = OptimizerParamScheduler(opt, max_lr=1.0, min_lr=0.1, warmup_steps=4, decay_steps=14,
                                    decay_style=style)
    lrs = []
    for _ in range(16):
        lrs.append(sched.current_lr)
        sched.step()
    assert lrs[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    expected_mid = {"constant": 1.0, "linear": 0.55, "cosine": 0.55}[style]
    assert lrs[8] == pytest.approx(expected_mid)  # step 9: halfway through the 10 decay steps
    assert lrs[15] == pytest.approx(1.0 if style == "constant" else 0.1)
    restored = OptimizerParamScheduler(opt, max_lr=1.0, min_lr=0.1, warmup_steps=4, decay_steps=14,
                                       decay_style=style)
    restored.load_state_dict(sched.state_dict())
    assert restored.current_lr == pytest.approx(sched.current_lr)


def test_ls_flops_grow_linearly_full_attention_quadratically():
    def flops(n, full):
        cfg = TransformerConfig(num_layers=2, hidden_size=64, num_attention_heads=4, vocab_size=256, seq_length=n,
                                window_size=128, segment_length=16, projection_rank=1,
                                full_attention_layers=(0, 1) if full else ())
        return model_flops_per_token(cfg)

    ls_growth = flops(8192, False) / flops(4096, False)
    full_growth = (flops(8192, True) - flops(4096, True)) / (flops(4096, True) - flops(2048, True))
    assert ls_growth < 1.5 and full_growth == pytest.approx(2.0, rel=0.01)


def test_iteration_line_has_megatron_shape():
    line = format_iteration_line(iteration=20, train_iters=100, consumed_samples=160, elapsed_ms=81.2, tflops=0.4,
                                 tokens_per_sec=25000, lr=1e-3, global_batch_size=8, loss=2.345678,
                                 loss_scale=1.0, grad_norm=0.812, skipped=0)
    assert line == (" iteration       20/     100 | consumed samples: 160 | elapsed time per iteration (ms): 81.2 | "
                    "throughput per GPU (TFLOP/s/GPU): 0.400 | tokens per second per GPU: 25000 | "
                    "learning rate: 1.000000E-03 | global batch size: 8 | lm loss: 2.345678E+00 | loss scale: 1.0 | "
                    "grad norm: 0.812 | number of skipped iterations: 0 |")


@pytest.mark.parametrize("style", ["linear", "cosine"])
def test_weight_decay_schedule_moves_the_decayed_group_only(style):
    import math

    from megatron_ls.training.lr_schedule import build_scheduler
    from megatron_ls.training.optimizer import build_optimizer

    args = parse_args(["--data-path", "x", "--train-iters", "8", "--weight-decay-incr-style", style,
                       "--start-weight-decay", "0.0", "--end-weight-decay", "0.1"], world_size=1)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    optimizer = build_optimizer(model, args.training)
    scheduler = build_scheduler(optimizer, args.training)
    seen = []
    for _ in range(10):
        decayed, plain = (g["weight_decay"] for g in optimizer.param_groups)
        seen.append(decayed)
        assert plain == 0.0
        scheduler.step()

    def want(step: int) -> float:  # Megatron's get_wd at position `step` of 8 (ours: step k at k, like the lr)
        ratio = min(step / 8, 1.0)
        coeff = ratio if style == "linear" else 0.5 * (math.cos(math.pi * (1 - ratio)) + 1)
        return 0.1 if step > 8 else 0.1 * coeff
    assert seen == pytest.approx([want(k) for k in range(1, 11)])
    resumed = build_scheduler(build_optimizer(model, args.training), args.training)
    resumed.load_state_dict(scheduler.state_dict())  # the position comes back, and with it the weight decay
    assert resumed.optimizer.param_groups[0]["weight_decay"] == pytest.approx(0.1)


def test_weight_decay_schedule_flags_are_checked(capsys):
    for argv, message in ((["--start-weight-decay", "0.2"], "a changing weight decay needs --weight-decay-incr-style"),
                          (["--weight-decay-incr-style", "cosine"], "needs --start-weight-decay and --end-weight-decay")):
        with pytest.raises(SystemExit):
            parse_args(["--data-path", "x", *argv], world_size=1)
        assert message in capsys.readouterr().err
