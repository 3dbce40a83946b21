"""Megatron-LM flags a user brings: the LR schedule (WSD, samples, warmup fraction) against hand-computed values,
flag mappings (distributed optimizer, recompute, flash attention, sequence parallel), one-line errors."""
import subprocess
import sys

import pytest
import torch

from megatron_ls.arguments import build_deepspeed_config, parse_args
from megatron_ls.training.lr_schedule import build_scheduler

BASE = ["--data-path", "x", "--lr", "1.0", "--min-lr", "0.0"]


def lrs(argv: list, world_size: int = 1) -> list[float]:
    """The learning rate of every optimizer step of the run the flags describe."""
    args = parse_args(BASE + argv, world_size=world_size)
    t = args.training
    t.resolve_global_batch_size(args.parallel.data_parallel_size(world_size))
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = build_scheduler(opt, t)
    out = []
    for _ in range(t.train_iters):
        out.append(sched.current_lr)
        sched.step()
    return out


# WSD over 10 iterations, warmup 2, the last 4 annealed: coefficients at anneal ratios 1/4, 2/4, 3/4, 1
WSD_TAILS = {
    "linear": [0.75, 0.5, 0.25, 0.0],
    "cosine": [0.8535534, 0.5, 0.1464466, 0.0],
    "exponential": [0.6817928, 0.4142136, 0.1892071, 0.0],  # 2 * 0.5 ** r - 1
    "minus_sqrt": [0.5, 0.2928932, 0.1339746, 0.0],  # 1 - sqrt(r)
}


@pytest.mark.parametrize("style", sorted(WSD_TAILS))
def test_wsd_warmup_stable_then_anneal(style):
    got = lrs(["--train-iters", "10", "--lr-warmup-iters", "2", "--lr-decay-style", "WSD",
               "--lr-wsd-decay-style", style, "--lr-wsd-decay-iters", "4"])
    assert got == pytest.approx([0.5, 1.0, 1.0, 1.0, 1.0, 1.0] + WSD_TAILS[style], abs=1e-6)


def test_wsd_anneals_to_min_lr():
    got = lrs(["--train-iters", "4", "--min-lr", "0.1", "--lr-decay-style", "WSD", "--lr-wsd-decay-style",
               "linear", "--lr-wsd-decay-iters", "2"])
    assert got == pytest.approx([1.0, 1.0, 0.55, 0.1])


def test_sample_based_schedule_counts_samples():
    # 100 samples / global batch 8 = 12 iterations; step k sits at 8k samples.
    argv = ["--train-samples", "100", "--micro-batch-size", "2", "--global-batch-size", "8",
            "--lr-warmup-samples", "20", "--lr-decay-samples", "80", "--lr-decay-style", "linear"]
    got = lrs(argv)
    assert len(got) == 12
    expected = [0.4, 0.8, 1 - 4 / 60, 1 - 12 / 60, 1 - 20 / 60, 1 - 28 / 60, 1 - 36 / 60, 1 - 44 / 60,
                1 - 52 / 60, 0.0, 0.0, 0.0]
    assert got == pytest.approx(expected)
    a = parse_args(BASE + argv, world_size=1)
    assert a.training.train_iters == 12


def test_sample_based_wsd_and_warmup_fraction():
    # decay over 96 samples (= --train-samples), warmup 0.25 x 96 = 24, anneal the last 32 samples linearly
    got = lrs(["--train-samples", "96", "--micro-batch-size", "8", "--lr-warmup-fraction", "0.25",
               "--lr-decay-style", "WSD", "--lr-wsd-decay-samples", "32", "--lr-wsd-decay-style", "linear"])
    assert got == pytest.approx([8 / 24, 16 / 24, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.75, 0.5, 0.25, 0.0])


def test_warmup_fraction_init_and_inverse_square_root():
    got = lrs(["--train-iters", "50", "--lr-warmup-fraction", "0.1", "--lr-decay-style", "linear"])
    assert got[:5] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0]) and got[5] == pytest.approx(1 - 1 / 45)
    got = lrs(["--train-iters", "20", "--lr-warmup-iters", "4", "--lr-warmup-init", "0.2", "--lr-decay-style",
               "inverse-square-root"])
    assert got[0] == pytest.approx(0.4) and got[3] == 1.0
    assert got[15] == pytest.approx(0.5)  # step 16: sqrt(4 / 16)


def test_schedule_resumes_at_its_position():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    args = parse_args(BASE + ["--train-iters", "10", "--lr-decay-style", "WSD", "--lr-wsd-decay-iters", "5"],
                      world_size=1)
    first = build_scheduler(opt, args.training)
    for _ in range(7):
        first.step()
    again = build_scheduler(opt, args.training)
    again.load_state_dict(first.state_dict())
    assert again.current_lr == first.current_lr == pytest.approx(2 * 0.5 ** 0.6 - 1)


@pytest.mark.parametrize("argv,message", [
    (["--train-iters", "5", "--train-samples", "100"], "--train-iters and --train-samples are exclusive"),
    (["--train-samples", "100", "--lr-decay-iters", "3"], "--lr-decay-iters: sample-based training"),
    (["--train-iters", "5", "--lr-warmup-samples", "3"], "--lr-warmup-samples: iteration-based training"),
    (["--lr-decay-style", "WSD"], "--lr-decay-style WSD needs --lr-wsd-decay-iters"),
    (["--lr-warmup-fraction", "0.1", "--lr-warmup-iters", "3"], "are exclusive"),
    (["--lr-warmup-fraction", "1.5"], "--lr-warmup-fraction must be in [0, 1)"),
    (["--train-samples", "3", "--global-batch-size", "4"], "less than one global batch"),
    (["--recompute-granularity", "selective", "--recompute-num-layers", "2"], "full only"),
    (["--use-flash-attn", "--attention-backend", "torch"], "--use-flash-attn"),
    (["--tensor-model-parallel-size", "2", "--sequence-parallel", "--seq-length", "99"],
     "--sequence-parallel splits each rank's 99 tokens"),
    (["--pipeline-model-parallel-size", "2", "--recompute-granularity", "full", "--recompute-method", "block"],
     "--recompute-method block is not available with pipeline parallelism"),
    (["--overlap-grad-reduce"], "--overlap-grad-reduce overlaps ZeRO's gradient reduction: use it with --zero-stage"),
    (["--hysteresis", "0"], "--hysteresis must be >= 1, got 0"),
    (["--no-save-optim", "--zero-stage", "3"], "ZeRO-3 keeps the weights themselves only in its optimizer"),
    (["--profile", "--use-pytorch-profiler", "--tensorboard-dir", "tb", "--profile-step-start", "3",
      "--profile-step-end", "3"], "need 0 <= start < end"),
    (["--profile", "--use-pytorch-profiler"], "--use-pytorch-profiler writes its trace into --tensorboard-dir"),
    (["--min-loss-scale", "0"], "--min-loss-scale must be positive, got 0.0"),
])
def test_schedule_and_mapping_errors_name_the_flags(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        parse_args(BASE + argv, world_size=2)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and message in err, err
    assert err.count("\n") == 1 and "usage:" not in err  # one line, no usage dump


def test_megatron_flags_map_onto_ours():
    a = parse_args(BASE + ["--use-distributed-optimizer"], world_size=2)
    assert a.parallel.zero_stage == 1
    a = parse_args(BASE + ["--use-distributed-optimizer", "--zero-stage", "2"], world_size=2)
    assert a.parallel.zero_stage == 2
    from megatron_ls.arguments import build_deepspeed_config

    a = parse_args(BASE + ["--use-distributed-optimizer", "--overlap-grad-reduce"], world_size=2)
    assert build_deepspeed_config(a, 2)["zero_optimization"] == {"stage": 1, "overlap_comm": True}
    fp16 = build_deepspeed_config(parse_args(BASE + ["--fp16", "--hysteresis", "4", "--min-loss-scale", "0.25"],
                                             world_size=1), 1)["fp16"]
    assert (fp16["hysteresis"], fp16["min_loss_scale"]) == (4, 0.25)
    assert "overlap_comm" not in build_deepspeed_config(parse_args(BASE + ["--zero-stage", "1"], world_size=2),
                                                        2)["zero_optimization"]
    assert parse_args(BASE + ["--recompute-activations"], world_size=1).model.recompute_granularity == "full"
    a = parse_args(BASE + ["--recompute-granularity", "full", "--recompute-method", "uniform",
                           "--recompute-num-layers", "1"], world_size=1)
    assert a.model.recompute_granularity == "full" and a.model.recomputed_layer_groups(3) == [
        (0, 1, True), (1, 2, True), (2, 3, True)]
    a = parse_args(BASE + ["--num-layers", "4", "--recompute-granularity", "full", "--recompute-method", "block",
                           "--recompute-num-layers", "1"], world_size=1)
    assert a.model.recomputed_layer_groups(4) == [(0, 1, True), (1, 4, False)]
    a = parse_args(BASE + ["--use-flash-attn"], world_size=1)
    assert a.model.use_flash_attn and a.model.attention_backend == "auto"
    for megatron, ours in (("flash", "auto"), ("fused", "auto"), ("unfused", "torch"), ("local", "torch")):
        assert parse_args(BASE + ["--attention-backend", megatron], world_size=1).model.attention_backend == ours
    a = parse_args(BASE + ["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2",
                           "--sequence-parallel"], world_size=4)
    assert a.parallel.sequence_parallel
    # DeepSpeed's pipeline must not split activations over TP ranks that hold different sequence slices
    assert build_deepspeed_config(a, 1)["pipeline"] == {"pipe_partitioned": False, "grad_partitioned": False}


@pytest.mark.parametrize("argv,expected", [
    (["--recompute-granularty", "full"], "unrecognized argument --recompute-granularty; did you mean "
                                         "--recompute-granularity?"),
    (["--sequence-paralel"], "did you mean --sequence-parallel?"),
    (["--lr-wsd-decay-iter=5"], "did you mean --lr-wsd-decay-iters?"),
    (["--no-such-thing-at-all"], "unrecognized argument --no-such-thing-at-all (--help lists every flag)"),
    (["--lr-decay-style", "wsd"], "invalid choice: 'wsd' (choose from constant, linear, cosine, "
                                  "inverse-square-root, WSD); did you mean WSD?"),
    (["--recompute-granularity", "ful"], "did you mean full?"),
])
def test_unknown_flag_or_choice_is_one_line_with_the_nearest(argv, expected, capsys):
    with pytest.raises(SystemExit) as exc:
        parse_args(BASE + argv, world_size=1)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and expected in err, err
    assert err.count("\n") == 1 and "usage:" not in err


@pytest.mark.parametrize("entry", ["tasks.main:task_args", "pretrain_vit_ls:vision_args"])
def test_entry_flags_have_no_placeholder_metavars(entry):
    import importlib

    from megatron_ls.arguments import build_parser

    module, provider = entry.split(":")
    out = build_parser(extra_args_provider=getattr(importlib.import_module(module), provider)).format_help()
    assert "EXTRA." not in out and "VISION." not in out, out
    assert "--results-json RESULTS_JSON" in out


def test_help_has_no_placeholder_metavars():
    out = subprocess.run([sys.executable, "pretrain_gpt_ls.py", "--help"], capture_output=True, text=True,
                         check=True).stdout
    assert "EXTRA." not in out and "NULL_VOCAB_SIZE" not in out
    assert "--vocab-size VOCAB_SIZE" in out and "--local-rank N" in out
    for flag in ("--recompute-granularity", "--use-distributed-optimizer", "--lr-warmup-fraction", "--train-samples",
                 "--lr-decay-samples", "--lr-warmup-samples", "--lr-wsd-decay-style", "--lr-wsd-decay-iters",
                 "--lr-wsd-decay-samples", "--sequence-parallel", "--use-flash-attn"):
        assert flag in out, flag


def test_help_shows_the_entry_points_own_defaults():
    """pretrain_vit_ls.py turns dropout off and widens the window by default; its --help must say so."""
    import re

    vit = subprocess.run([sys.executable, "pretrain_vit_ls.py", "--help"], capture_output=True, text=True,
                         check=True).stdout
    gpt = subprocess.run([sys.executable, "pretrain_gpt_ls.py", "--help"], capture_output=True, text=True,
                         check=True).stdout

    def default_of(out: str, flag: str) -> str:
        block = re.search(rf"^  {flag} \S+\n(.*?)(?=^  -)", out, re.S | re.M).group(1)
        return re.search(r"Default:\s+(\S+)\.", " ".join(block.split())).group(1)

    assert default_of(vit, "--hidden-dropout") == "0.0" and default_of(gpt, "--hidden-dropout") == "0.1"
    assert default_of(vit, "--window-size") == "7" and default_of(gpt, "--window-size") != "7"


def test_use_checkpoint_args_takes_the_model_from_the_checkpoint_and_keeps_given_flags(tmp_path, capsys):
    import json

    (tmp_path / "iter_0000004").mkdir()
    (tmp_path / "latest").write_text("iter_0000004\n")
    model = {"num_layers": 3, "hidden_size": 48, "num_attention_heads": 4, "window_size": 16, "hidden_dropout": 0.3,
             "normalization": "RMSNorm", "full_attention_layers": [2], "seed": 99}
    data = {"tokenizer_type": "NullTokenizer", "null_vocab_size": 300, "data_path": ["elsewhere"]}
    (tmp_path / "iter_0000004" / "megatron_ls.json").write_text(json.dumps(
        {"iteration": 4, "consumed_samples": 16, "args": {"model": model, "data": data}}))
    a = parse_args(BASE + ["--load", str(tmp_path), "--use-checkpoint-args", "--hidden-size=64"], world_size=1)
    m = a.model
    assert (m.num_layers, m.num_attention_heads, m.window_size, m.normalization, m.full_attention_layers) == \
        (3, 4, 16, "RMSNorm", (2,))
    assert m.hidden_size == 64  # given on the command line: it wins
    assert m.hidden_dropout == 0.1 and m.seed == 1234  # run choices stay the run's own
    assert (a.data.tokenizer_type, a.data.null_vocab_size) == ("NullTokenizer", 300)
    assert a.data.data_path != ["elsewhere"]  # data paths are never taken
    fresh = str(tmp_path / "fresh")  # a requeued job's first run: nothing saved yet, the flags are used
    a = parse_args(BASE + ["--load", fresh, "--save", fresh, "--use-checkpoint-args", "--num-layers", "5"],
                   world_size=1)
    assert a.model.num_layers == 5 and a.checkpoint.load is None
    for argv, message in ((["--use-checkpoint-args"], "--use-checkpoint-args needs --load DIR"),
                          (["--use-checkpoint-args", "--load", str(tmp_path / "none")], "--use-checkpoint-args: ")):
        with pytest.raises(SystemExit):
            parse_args(BASE + argv, world_size=1)
        assert message in capsys.readouterr().err


@pytest.mark.parametrize("argv,kind", [
    ([], "learned"),
    (["--position-embedding-type", "learned_absolute"], "learned"),
    (["--use-rotary-position-embeddings"], "rope"),
    (["--no-position-embedding"], "none"),
    (["--use-rotary-position-embeddings", "--no-position-embedding"], "rope"),
    (["--no-position-embedding", "--use-rotary-position-embeddings"], "rope"),
])
def test_megatron_position_flag_spellings(argv, kind):
    assert parse_args(BASE + argv, world_size=1).model.position_embedding_type == kind
