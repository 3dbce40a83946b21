"""Megatron-LM habits from the command line: sequence parallelism composed with PP (+ the distributed optimizer,
ZeRO-1) and with CP reproduces one process, selective recomputation keeps the losses exactly, sample-based WSD
schedules log the hand-computed rates, unknown flags fail in one line naming the nearest."""
from __future__ import annotations

import re
import sys

import pytest

from tests.e2e.conftest import iteration_losses, pretrain_cmd, run_cli

pytestmark = pytest.mark.e2e

# One Long-Short and one full-attention layer; fp32, dropout off: layouts must reproduce one process.
EXACT = ["--full-attention-layers", "1", "--hidden-dropout", "0", "--attention-dropout", "0", "--train-iters", "4",
         "--eval-interval", "2"]
EVALUATION = re.compile(r" (validation|test) loss at iteration (\d+) \| lm loss value: (\S+) \|")
LEARNING_RATE = re.compile(r" iteration\s+(\d+)/.*? learning rate: (\S+) \|")


def _torchrun(nproc: int, corpus: str, tp: int, *extra: str) -> list:
    cmd = pretrain_cmd(corpus, *EXACT, "--make-vocab-size-divisible-by", str(256 // tp), *extra)
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), *cmd[1:]]


def _logged(stdout: str) -> dict:
    out = {("train", it): loss for it, loss in iteration_losses(stdout).items()}
    out.update({(m[1], int(m[2])): float(m[3]) for m in EVALUATION.finditer(stdout)})
    return out


@pytest.fixture(scope="module")
def one_process(corpus_prefix) -> dict:
    logged = _logged(run_cli(pretrain_cmd(corpus_prefix, *EXACT, "--make-vocab-size-divisible-by", "256")).stdout)
    assert len(logged) == 4 + 3  # 4 iterations, validation at 2 and 4, test at 4
    return logged


def _assert_same(logged: dict, reference: dict, what: str) -> None:
    assert sorted(logged) == sorted(reference), what
    for key, ref in reference.items():
        assert logged[key] == pytest.approx(ref, rel=2e-5), (what, key, logged[key], ref)


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("layout", [("--pipeline-model-parallel-size", "2", "--use-distributed-optimizer"),
                                    ("--context-parallel-size", "2")], ids=["tp2-pp2-sp-zero1", "tp2-cp2-sp"])
def test_sequence_parallel_composes_with_pp_and_cp(corpus_prefix, one_process, layout):
    # (TP2 + SP alone: tests/distributed/test_sequence_parallel.py; the README workflow fine-tunes with it)
    proc = run_cli(_torchrun(4, corpus_prefix, 2, "--tensor-model-parallel-size", "2", "--sequence-parallel",
                             *layout), timeout=500)
    assert " SP)" in proc.stdout, proc.stdout
    if "--use-distributed-optimizer" in layout:
        assert "ZeRO-1" in proc.stdout, proc.stdout
    noise = proc.stdout + proc.stderr
    assert noise.count("built successfully") <= 1 and noise.count("UserWarning") <= 1, noise  # rank 0 only
    _assert_same(_logged(proc.stdout), one_process, f"TP2 + SP + {layout}")


def test_recomputation_keeps_losses_exactly_and_sample_based_wsd_logs_hand_computed_rates(corpus_prefix):
    # dropout on: the recomputed forward must redraw the same masks (TP tracker replayed)
    flags = ["--train-samples", "26", "--global-batch-size", "4", "--lr", "0.004", "--min-lr", "0.0004",
             "--lr-warmup-fraction", "0.25", "--lr-decay-style", "WSD", "--lr-wsd-decay-style", "linear",
             "--lr-wsd-decay-samples", "8", "--hidden-dropout", "0.1", "--attention-dropout", "0.1",
             "--weight-decay-incr-style", "linear", "--start-weight-decay", "0.01", "--end-weight-decay", "0.1"]
    runs = {}
    # (the second run also collects garbage by hand: --manual-gc changes when, never what, is computed)
    for name, extra in {"plain": [], "selective": ["--recompute-granularity", "selective", "--manual-gc",
                                                   "--manual-gc-interval", "2"]}.items():
        runs[name] = run_cli(pretrain_cmd(corpus_prefix, *flags, *extra)).stdout
    plain = iteration_losses(runs["plain"])
    assert sorted(plain) == [1, 2, 3, 4, 5, 6]  # 26 samples // 4 per iteration
    assert iteration_losses(runs["selective"]) == plain  # bit for bit
    # samples: decay over 26, warmup 0.25 x 26 = 6.5, anneal over the last 8 (from 18); step k at 4k samples
    rates = {int(m[1]): float(m[2]) for m in LEARNING_RATE.finditer(runs["plain"])}
    expected = {1: 0.004 * 4 / 6.5, 2: 0.004, 3: 0.004, 4: 0.004, 5: 0.0004 + 0.0036 * (1 - 2 / 8),
                6: 0.0004 + 0.0036 * (1 - 6 / 8)}
    assert rates == pytest.approx(expected, rel=1e-6)


def test_unknown_megatron_flag_is_one_line_naming_the_nearest(corpus_prefix):
    proc = run_cli(pretrain_cmd(corpus_prefix, "--recompute-granularty", "full"), check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "pretrain_gpt_ls.py: error: unrecognized argument --recompute-granularty; did you mean "
        "--recompute-granularity?"], proc.stderr


def test_pytorch_profiler_traces_megatrons_iterations(corpus_prefix, tmp_path):
    """--profile --use-pytorch-profiler --profile-step-start 1 --profile-step-end 3 records iterations 2 and 3
    (Megatron's counting) into a trace in --tensorboard-dir; nsys mode without a GPU is one clear error."""
    import json

    tb = tmp_path / "tb"
    run_cli(pretrain_cmd(corpus_prefix, "--train-iters", "4", "--profile", "--use-pytorch-profiler",
                         "--profile-step-start", "1", "--profile-step-end", "3", "--tensorboard-dir", str(tb)))
    traces = list(tb.glob("*.pt.trace.json"))
    assert len(traces) == 1
    events = json.loads(traces[0].read_text())["traceEvents"]
    steps = sorted({e["name"] for e in events if str(e.get("name", "")).startswith("ProfilerStep#")})
    assert steps == ["ProfilerStep#1", "ProfilerStep#2"]  # profiler step k = iteration k + 1
    assert any("aten::mm" in str(e.get("name")) or "aten::addmm" in str(e.get("name")) for e in events)
    nsys = run_cli(pretrain_cmd(corpus_prefix, "--train-iters", "1", "--profile"), check=False)
    assert nsys.returncode != 0 and "add --use-pytorch-profiler" in nsys.stderr
