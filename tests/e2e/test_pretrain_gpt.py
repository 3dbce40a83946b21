"""End-to-end runs of pretrain_gpt_ls.py on CPU: learning, exact resume, precisions, ZeRO stages, errors."""
from __future__ import annotations

import math
import os
from pathlib import Path

import pytest

from tests.e2e.conftest import iteration_losses, pretrain_cmd, run_cli

pytestmark = pytest.mark.e2e


def test_loss_falls_and_reports_bits_per_byte(corpus_prefix, tmp_path):
    tb = tmp_path / "tb"
    proc = run_cli(pretrain_cmd(corpus_prefix, "--train-iters", "30", "--eval-interval", "15",
                                "--hidden-dropout", "0", "--attention-dropout", "0",
                                "--tensorboard-dir", str(tb)))
    losses = iteration_losses(proc.stdout)
    assert sorted(losses) == list(range(1, 31))
    first, last = sum(losses[i] for i in (1, 2, 3)) / 3, sum(losses[i] for i in (28, 29, 30)) / 3
    assert last < first - 0.5, (first, last)
    assert "validation loss at iteration 30" in proc.stdout and "bits per byte:" in proc.stdout
    assert "throughput per GPU (TFLOP/s/GPU)" in proc.stdout and "tokens per second per GPU" in proc.stdout
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(tb))


@pytest.mark.parametrize("positions", ["learned", pytest.param("rope", marks=pytest.mark.slow)])
def test_resume_reproduces_uninterrupted_run(corpus_prefix, tmp_path, positions):
    common = ("--train-iters", "6", "--lr-warmup-iters", "2", "--eval-interval", "2",
              "--position-embedding-type", positions)
    full = iteration_losses(run_cli(pretrain_cmd(corpus_prefix, *common)).stdout)
    ckpt = tmp_path / "ckpt"
    first = run_cli(pretrain_cmd(corpus_prefix, *common, "--save", str(ckpt), "--save-interval", "2",
                                 "--exit-interval", "3"))
    assert "exiting program at iteration 3" in first.stdout
    assert (ckpt / "latest").read_text().strip() == "iter_0000003"
    # A later save that crashed half-way: its directory exists but `latest` was never moved to it.
    (ckpt / "iter_0000005").mkdir()
    (ckpt / "iter_0000005" / "mp_rank_00_model_states.pt").write_bytes(b"truncated")
    resumed = run_cli(pretrain_cmd(corpus_prefix, *common, "--load", str(ckpt), "--save", str(ckpt)))
    resumed_losses = iteration_losses(resumed.stdout)
    assert sorted(resumed_losses) == [4, 5, 6]
    for it in (4, 5, 6):  # dropout is on: RNG, data order, optimizer and schedule all resume exactly
        assert resumed_losses[it] == full[it], (it, resumed_losses[it], full[it])


@pytest.mark.parametrize("precision", ["--bf16", "--fp16"])
def test_mixed_precision_trains(corpus_prefix, precision):
    from deepspeed.accelerator import get_accelerator

    proc = run_cli(pretrain_cmd(corpus_prefix, "--train-iters", "8", precision), check=False)
    if precision == "--fp16" and not get_accelerator().is_fp16_supported():
        # DeepSpeed's CPU accelerator has no fp16 training: that must be one clear error, not a crash.
        assert proc.returncode != 0 and "--fp16" in proc.stderr and "--bf16" in proc.stderr, proc.stderr[-2000:]
        return
    assert proc.returncode == 0, proc.stdout + proc.stderr
    losses = iteration_losses(proc.stdout)
    finite = [v for v in losses.values() if math.isfinite(v)]
    assert len(losses) == 8 and len(finite) >= 6
    assert "number of skipped iterations:" in proc.stdout


def test_zero_stages_give_the_same_losses(corpus_prefix):
    results = {}
    for stage in (0, 1, 2, 3):
        proc = run_cli(pretrain_cmd(corpus_prefix, "--train-iters", "4", "--zero-stage", str(stage),
                                    "--hidden-dropout", "0", "--attention-dropout", "0"))
        results[stage] = iteration_losses(proc.stdout)
    for stage in (1, 2, 3):
        for it, loss in results[0].items():
            assert results[stage][it] == pytest.approx(loss, rel=1e-5, abs=1e-6), (stage, it)


def test_corrupt_checkpoint_is_a_clear_error(corpus_prefix, tmp_path):
    ckpt = tmp_path / "ckpt"
    run_cli(pretrain_cmd(corpus_prefix, "--train-iters", "1", "--save", str(ckpt)))
    model_file = next(Path(ckpt, "iter_0000001").glob("*model_states.pt"))
    model_file.write_bytes(model_file.read_bytes()[:100])
    proc = run_cli(pretrain_cmd(corpus_prefix, "--train-iters", "2", "--load", str(ckpt)), check=False)
    assert proc.returncode != 0
    assert "iter_0000001" in proc.stderr and "corrupt" in proc.stderr.lower(), proc.stderr[-2000:]


def test_missing_checkpoint_dir_and_data_file_are_clear_errors(corpus_prefix, tmp_path):
    proc = run_cli(pretrain_cmd(corpus_prefix, "--train-iters", "1", "--load", str(tmp_path / "nope")), check=False)
    assert proc.returncode != 0 and "--load" in proc.stderr and "nope" in proc.stderr
    proc = run_cli(pretrain_cmd(str(tmp_path / "missing_text_document"), "--train-iters", "1"), check=False)
    assert proc.returncode != 0 and "missing_text_document" in proc.stderr


def test_requeued_job_with_load_equal_to_save_starts_then_resumes(corpus_prefix, tmp_path):
    """Megatron's habit: every submission passes --load X --save X; the first finds nothing and starts fresh."""
    ckpt = str(tmp_path / "ckpt")
    first = run_cli(pretrain_cmd(corpus_prefix, "--train-iters", "2", "--load", ckpt, "--save", ckpt)).stdout
    assert f"no checkpoint in --load {ckpt} yet (it is the --save directory): starting from scratch" in first
    second = run_cli(pretrain_cmd(corpus_prefix, "--train-iters", "3", "--load", ckpt, "--save", ckpt)).stdout
    assert f"loaded checkpoint from {ckpt} at iteration 2" in second and sorted(iteration_losses(second)) == [3]
    strict = run_cli(pretrain_cmd(corpus_prefix, "--train-iters", "1", "--load", str(tmp_path / "new"), "--save",
                                  str(tmp_path / "new"), "--exit-on-missing-checkpoint"), check=False)
    assert strict.returncode != 0 and "no such directory" in strict.stderr


def test_invalid_flags_fail_before_training(corpus_prefix):
    proc = run_cli(pretrain_cmd(corpus_prefix, "--window-size", "8", "--segment-length", "16"), check=False)
    assert proc.returncode == 2
    assert "--window-size >= --segment-length" in proc.stderr
    proc = run_cli(pretrain_cmd(corpus_prefix, "--global-batch-size", "3"), check=False)
    assert proc.returncode == 2 and "--global-batch-size 3" in proc.stderr
    proc = run_cli(pretrain_cmd(corpus_prefix, "--num-attention-heads", "3"), check=False)
    assert proc.returncode == 2 and "--num-attention-heads" in proc.stderr
    proc = run_cli(pretrain_cmd(corpus_prefix, "--tensor-model-parallel-size", "2"), check=False)
    assert proc.returncode == 2 and "world size 1 is not divisible by tensor (2)" in proc.stderr
    proc = run_cli(pretrain_cmd(corpus_prefix, "--pipeline-model-parallel-size", "1", "--num-layers", "3",
                                "--full-attention-layers", "3"), check=False)
    assert proc.returncode == 2 and "--full-attention-layers [3] out of range" in proc.stderr


def test_recompute_activations_keeps_the_losses(corpus_prefix):
    flags = ("--train-iters", "3", "--hidden-dropout", "0", "--attention-dropout", "0")
    plain = iteration_losses(run_cli(pretrain_cmd(corpus_prefix, *flags)).stdout)
    recomputed = iteration_losses(run_cli(pretrain_cmd(corpus_prefix, *flags, "--recompute-activations")).stdout)
    assert recomputed == pytest.approx(plain, rel=1e-6)


def test_sliding_evaluation_scores_every_token_once(corpus_prefix, tmp_path):
    import json
    import sys

    import torch

    from megatron_ls.inference import load_gpt_model

    ckpt = tmp_path / "ckpt"
    run_cli(pretrain_cmd(corpus_prefix, "--train-iters", "3", "--save", str(ckpt)))
    results = {}
    for stride in (127, 32):
        out = tmp_path / f"eval_{stride}.json"
        run_cli([sys.executable, "tools/evaluate.py", "--load", str(ckpt), "--data-path", corpus_prefix,
                 "--split", "90,8,2", "--stride", str(stride), "--max-tokens", "1017", "--json", str(out)])
        results[stride] = json.loads(out.read_text())
        assert results[stride]["tokens"] == 1016  # every token after the first, exactly once
    # stride = window - 1 and 1016 = 8 x 127 predictions: eight disjoint windows; recompute them directly.
    from tools.evaluate import split_token_stream

    tokens = torch.from_numpy(split_token_stream(corpus_prefix, "90,8,2", "test")[:1017])
    model, _, _ = load_gpt_model(str(ckpt))
    total = 0.0
    with torch.no_grad():
        for begin in range(0, 1016, 127):
            end = begin + 128
            total += float(model(tokens[begin:end - 1][None], tokens[begin + 1:end][None]).sum())
    assert results[127]["loss_nats"] == pytest.approx(total / 1016, rel=1e-5)
    assert results[32]["loss_nats"] != results[127]["loss_nats"]


def test_use_checkpoint_args_continues_without_repeating_the_architecture(corpus_prefix, tmp_path):
    import sys

    ckpt = tmp_path / "ckpt"
    shape = ["--num-layers", "3", "--hidden-size", "48", "--normalization", "RMSNorm", "--window-size", "16",
             "--projection-rank", "2", "--full-attention-layers", "2"]
    run_cli(pretrain_cmd(corpus_prefix, *shape, "--train-iters", "2", "--save", str(ckpt)))
    bare = [sys.executable, "pretrain_gpt_ls.py", "--data-path", corpus_prefix, "--load", str(ckpt), "--finetune",
            "--train-iters", "2", "--micro-batch-size", "2", "--global-batch-size", "4", "--eval-iters", "1",
            "--split", "90,8,2", "--log-interval", "1"]
    refused = run_cli(bare, check=False)
    assert refused.returncode != 0 and "--num-layers is 2 here but 3 in the checkpoint" in refused.stderr
    out = run_cli([*bare, "--use-checkpoint-args"]).stdout
    assert "loaded checkpoint" in out and sorted(iteration_losses(out)) == [1, 2]


@pytest.mark.distributed
def test_mock_data_trains_without_files_alike_on_one_and_two_ranks(corpus_prefix, tmp_path):
    """--mock-data: megatron-core's synthetic sequences (parity: tests/unit/data/test_megatron_parity.py); every
    rank builds its own indices in a local temp dir, so two data-parallel ranks log the one-process losses."""
    import sys

    flags = ["--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size", "1000", "--num-layers", "2",
             "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "128", "--window-size", "32",
             "--segment-length", "16", "--micro-batch-size", "2", "--global-batch-size", "4", "--train-iters", "3",
             "--log-interval", "1", "--eval-iters", "1", "--hidden-dropout", "0", "--attention-dropout", "0"]
    one = iteration_losses(run_cli([sys.executable, "pretrain_gpt_ls.py", *flags]).stdout)
    two = iteration_losses(run_cli([sys.executable, "-m", "torch.distributed.run", "--standalone",
                                    "--nproc_per_node", "2", "pretrain_gpt_ls.py", *flags], timeout=300).stdout)
    assert sorted(one) == [1, 2, 3] and two == pytest.approx(one, rel=2e-5)
    both = run_cli(pretrain_cmd(corpus_prefix, "--mock-data", "--train-iters", "1"), check=False)
    assert both.returncode != 0 and "--mock-data replaces --data-path" in both.stderr


def test_skip_train_evaluates_the_checkpoint_and_writes_nothing(corpus_prefix, tmp_path):
    import re

    ckpt = tmp_path / "ckpt"
    trained = run_cli(pretrain_cmd(corpus_prefix, "--train-iters", "3", "--save", str(ckpt))).stdout
    before = sorted(p.name for p in ckpt.iterdir())
    # --train-iters below the checkpoint's iteration: no training, so no refusal
    out = run_cli(pretrain_cmd(corpus_prefix, "--train-iters", "1", "--load", str(ckpt), "--save", str(ckpt),
                               "--skip-train")).stdout
    assert "skipping training (--skip-train): evaluating the weights of iteration 3" in out
    assert not iteration_losses(out) and sorted(p.name for p in ckpt.iterdir()) == before

    def loss(text: str, split: str) -> str:
        return re.search(rf" {split} loss at iteration 3 \| lm loss value: (\S+)", text).group(1)
    assert loss(out, "validation") == loss(trained, "validation") and loss(out, "test") == loss(trained, "test")


def test_save_retain_interval_keeps_multiples_and_the_newest(corpus_prefix, tmp_path):
    ckpt = tmp_path / "ckpt"
    run_cli(pretrain_cmd(corpus_prefix, "--train-iters", "7", "--save", str(ckpt), "--save-interval", "1",
                         "--save-retain-interval", "3"))
    assert sorted(p.name for p in ckpt.iterdir()) == ["iter_0000003", "iter_0000006", "iter_0000007", "latest"]
    assert (ckpt / "latest").read_text().strip() == "iter_0000007"
    bad = run_cli(pretrain_cmd(corpus_prefix, "--save-retain-interval", "0"), check=False)
    assert bad.returncode != 0 and "--save-retain-interval must be positive, got 0" in bad.stderr


@pytest.mark.parametrize("layout", [[], pytest.param(["--zero-stage", "1"], marks=pytest.mark.distributed)],
                         ids=["plain", "dp2-zero1"])
def test_no_save_optim_and_rng_give_a_smaller_checkpoint_that_resumes_with_no_load_optim(corpus_prefix, tmp_path,
                                                                                          layout):
    import sys

    from megatron_ls.checkpoint_files import safe_torch_load

    def cmd(*extra: str) -> list:
        base = pretrain_cmd(corpus_prefix, "--train-iters", "4", *layout, *extra)
        if not layout:
            return base
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *base[1:]]

    ckpt = tmp_path / "ckpt"
    run_cli(cmd("--save", str(ckpt), "--exit-interval", "2", "--no-save-optim", "--no-save-rng"), timeout=300)
    files = sorted(p.name for p in (ckpt / "iter_0000002").iterdir())
    assert not [f for f in files if f.endswith("optim_states.pt")] and "rng" in files
    assert not list((ckpt / "iter_0000002" / "rng").iterdir())
    assert safe_torch_load(str(ckpt / "iter_0000002" / "mp_rank_00_model_states.pt")).get("optimizer") is None
    refused = run_cli(cmd("--load", str(ckpt)), check=False, timeout=300)
    assert refused.returncode != 0 and "saved with --no-save-optim" in refused.stderr
    out = run_cli(cmd("--load", str(ckpt), "--no-load-optim"), timeout=300).stdout
    assert "loaded checkpoint from" in out and "saved with --no-save-rng" in out
    assert sorted(iteration_losses(out)) == [3, 4]
