"""3D parallelism end to end: TP, PP, TP x PP and DP with ZeRO 1-3 reproduce the one-process losses and
--log-params-norm values (fp32, dropout off), and a TP2 x PP2 run resumes exactly. All runs use torchrun with gloo
on CPU."""
from __future__ import annotations

import re
import sys

import pytest

from tests.e2e.conftest import iteration_losses, pretrain_cmd, run_cli

pytestmark = [pytest.mark.e2e, pytest.mark.distributed]

ITERS = 4
# 4 layers so that PP=2 puts two layers (one LS, one MASFormer full-attention) on each stage.
LAYOUT_FLAGS = ["--num-layers", "4", "--full-attention-layers", "1", "--hidden-dropout", "0",
                "--attention-dropout", "0", "--train-iters", str(ITERS), "--global-batch-size", "8",
                "--micro-batch-size", "2", "--log-params-norm"]
PARAMS_NORM = re.compile(r" iteration\s+(\d+)/.*? \| params norm: ([0-9.]+) \|")


def params_norms(stdout: str) -> dict[int, float]:
    return {int(m.group(1)): float(m.group(2)) for m in PARAMS_NORM.finditer(stdout)}


def vocab_flags(tp: int) -> list:
    # Megatron pads the vocab to a multiple of (divisible-by x TP); keep the padded size (and so the model) equal.
    return ["--make-vocab-size-divisible-by", str(256 // tp)]


def torchrun_cmd(nproc: int, corpus: str, *extra: str) -> list:
    tp = int(extra[extra.index("--tensor-model-parallel-size") + 1]) if "--tensor-model-parallel-size" in extra else 1
    cmd = pretrain_cmd(corpus, *LAYOUT_FLAGS, *vocab_flags(tp), *extra)
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), *cmd[1:]]


@pytest.fixture(scope="module")
def reference(corpus_prefix):
    out = run_cli(pretrain_cmd(corpus_prefix, *LAYOUT_FLAGS, *vocab_flags(1))).stdout
    losses, norms = iteration_losses(out), params_norms(out)
    assert sorted(losses) == sorted(norms) == list(range(1, ITERS + 1))
    assert norms[ITERS] != norms[1]  # the weights move (Megatron prints the norm with 3 decimals)
    return losses, norms


@pytest.fixture(scope="module")
def reference_losses(reference):
    return reference[0]


def _assert_same(losses, reference, what):
    assert sorted(losses) == sorted(reference), what
    for it, ref in reference.items():
        assert losses[it] == pytest.approx(ref, rel=2e-5), (what, it, losses[it], ref)


@pytest.mark.parametrize("layout", [
    ("--tensor-model-parallel-size", "2"),
    ("--pipeline-model-parallel-size", "2"),
    ("--pipeline-model-parallel-size", "2", "--zero-stage", "1"),
    ("--zero-stage", "1"),
    ("--zero-stage", "2"),
    ("--zero-stage", "3"),
    ("--use-distributed-optimizer", "--overlap-grad-reduce"),
], ids=["tp2", "pp2", "pp2-zero1", "dp2-zero1", "dp2-zero2", "dp2-zero3", "dp2-distopt-overlap"])
def test_two_rank_layouts_match_one_process(corpus_prefix, reference, layout):
    proc = run_cli(torchrun_cmd(2, corpus_prefix, *layout), timeout=400)
    _assert_same(iteration_losses(proc.stdout), reference[0], layout)
    # the weights' norm is counted once per parameter: TP shards, PP stages, a tied embedding, ZeRO-3 partitions
    norms = params_norms(proc.stdout)
    assert sorted(norms) == sorted(reference[1]), layout
    for it, want in reference[1].items():
        assert norms[it] == pytest.approx(want, rel=1e-4, abs=2e-3), (layout, it)


def test_tp2_pp2_matches_and_resumes_exactly(corpus_prefix, reference_losses, tmp_path):
    layout = ("--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2")
    ckpt = tmp_path / "ckpt"
    first = run_cli(torchrun_cmd(4, corpus_prefix, *layout, "--save", str(ckpt), "--exit-interval", "2"),
                    timeout=500)
    resumed = run_cli(torchrun_cmd(4, corpus_prefix, *layout, "--load", str(ckpt)), timeout=500)
    losses = {**iteration_losses(first.stdout), **iteration_losses(resumed.stdout)}
    assert sorted(iteration_losses(resumed.stdout)) == [3, 4]
    _assert_same(losses, reference_losses, "tp2xpp2 with resume")


def test_deepspeed_launcher_runs_data_parallel(corpus_prefix, reference_losses):
    cmd = pretrain_cmd(corpus_prefix, *LAYOUT_FLAGS, *vocab_flags(1), "--zero-stage", "1")
    proc = run_cli([sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", *cmd[1:]], timeout=400)
    assert "world size 2 (TP=1 PP=1 DP=2)" in proc.stdout
    _assert_same(iteration_losses(proc.stdout), reference_losses, "deepspeed launcher, DP=2")


def test_dp2_zero3_resumes_exactly_with_dropout(corpus_prefix, tmp_path):
    # ZeRO-3 partitions parameters and optimizer states over the two ranks; dropout stays on.
    flags = ("--zero-stage", "3", "--train-iters", "4", "--global-batch-size", "4", "--micro-batch-size", "2")
    full = iteration_losses(run_cli(torchrun_cmd(2, corpus_prefix, *flags, "--hidden-dropout", "0.1"),
                                    timeout=400).stdout)
    ckpt = tmp_path / "ckpt"
    run_cli(torchrun_cmd(2, corpus_prefix, *flags, "--hidden-dropout", "0.1", "--save", str(ckpt),
                         "--exit-interval", "2"), timeout=400)
    resumed = iteration_losses(run_cli(torchrun_cmd(2, corpus_prefix, *flags, "--hidden-dropout", "0.1",
                                                    "--load", str(ckpt)), timeout=400).stdout)
    assert sorted(resumed) == [3, 4]
    assert all(resumed[it] == full[it] for it in (3, 4)), (resumed, full)
