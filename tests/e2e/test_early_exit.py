"""Leaving early and cleanly (Megatron-LM's --exit-signal-handler / --exit-duration-in-mins), end to end: a SIGTERM
to one rank of a torchrun job, or to torchrun itself, makes every rank finish the iteration, save and exit; the
resumed job continues the uninterrupted loss curve bit for bit; a wall-clock limit does the same."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.e2e.conftest import REPO, cli_env, iteration_losses, pretrain_cmd, run_cli

pytestmark = pytest.mark.e2e

ITERS = "40"
FLAGS = ("--hidden-dropout", "0", "--attention-dropout", "0", "--train-iters", ITERS)
EXITED = re.compile(r" exiting program at iteration (\d+) (.*)")


def _torchrun(cmd: list) -> list:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *cmd[1:]]


def _worker_pids(launcher: int) -> dict[int, int]:
    """``{RANK: pid}`` of the launcher's worker processes (read from /proc)."""
    out = {}
    for tid in os.listdir(f"/proc/{launcher}/task"):
        for child in Path(f"/proc/{launcher}/task/{tid}/children").read_text().split():
            environ = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
            rank = [e for e in environ if e.startswith(b"RANK=")]
            if rank:
                out[int(rank[0][5:])] = int(child)
    return out


def _interrupt(cmd: list, target: str) -> tuple[int, str]:
    """Start ``cmd`` under torchrun, and once iteration 2 is logged send SIGTERM to ``target`` ("rank1" or
    "launcher"). (exit status, stdout)."""
    proc = subprocess.Popen(_torchrun(cmd), cwd=REPO, env=cli_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    lines, deadline = [], time.time() + 300
    for line in proc.stdout:
        lines.append(line)
        if re.match(r" iteration\s+2/", line):
            pid = _worker_pids(proc.pid)[1] if target == "rank1" else proc.pid
            os.kill(pid, signal.SIGTERM)
            break
        assert time.time() < deadline, "".join(lines)
    rest, _ = proc.communicate(timeout=300)
    return proc.returncode, "".join(lines) + rest


@pytest.fixture(scope="module")
def reference(corpus_prefix) -> dict:
    """The uninterrupted two-rank run's losses."""
    return iteration_losses(run_cli(_torchrun(pretrain_cmd(corpus_prefix, *FLAGS))).stdout)


@pytest.mark.distributed
def test_sigterm_to_one_rank_saves_exits_and_resumes_exactly(corpus_prefix, reference, tmp_path):
    ckpt = str(tmp_path / "ckpt")
    rc, out = _interrupt(pretrain_cmd(corpus_prefix, *FLAGS, "--save", ckpt, "--exit-signal-handler"), "rank1")
    assert rc == 0, out
    match = EXITED.search(out)
    assert match and match.group(2) == "after receiving SIGTERM (--exit-signal-handler)", out
    stopped = int(match.group(1))
    assert 2 <= stopped < int(ITERS) and "validation loss" not in out.split(match.group(0))[1]
    assert Path(ckpt, "latest").read_text().strip() == f"iter_{stopped:07d}"
    first = iteration_losses(out)
    resumed = iteration_losses(run_cli(_torchrun(pretrain_cmd(corpus_prefix, *FLAGS, "--load", ckpt))).stdout)
    assert sorted(first) == list(range(1, stopped + 1)) and sorted(resumed) == list(range(stopped + 1, 41))
    assert {**first, **resumed} == reference  # bit for bit


@pytest.mark.distributed
def test_sigterm_to_the_launcher_reaches_every_rank_which_saves(corpus_prefix, tmp_path):
    """torchrun passes SIGTERM on to its workers' process groups (as a scheduler signalling the job step would):
    they save, DataLoader worker processes included in the signal."""
    ckpt = str(tmp_path / "ckpt")
    # DataLoader workers: torchrun signals the trainer's whole process group, and a worker dying of it would
    # fail the trainer's next batch; they outlive the signal (exit_conditions.worker_signal_init)
    _, out = _interrupt(pretrain_cmd(corpus_prefix, *FLAGS, "--save", ckpt, "--exit-signal-handler",
                                     "--num-workers", "2"), "launcher")
    match = EXITED.search(out)
    assert match and "SIGTERM" in match.group(2), out
    assert Path(ckpt, "latest").read_text().strip() == f"iter_{int(match.group(1)):07d}"


def test_exit_duration_saves_after_the_first_iteration_past_the_limit(corpus_prefix, tmp_path):
    ckpt = str(tmp_path / "ckpt")
    out = run_cli(pretrain_cmd(corpus_prefix, *FLAGS, "--save", ckpt, "--exit-duration-in-mins", "0.0001")).stdout
    match = EXITED.search(out)
    assert match and match.group(1) == "1" and match.group(2).endswith("(--exit-duration-in-mins 0.0001)"), out
    assert Path(ckpt, "latest").read_text().strip() == "iter_0000001"
    warned = run_cli(pretrain_cmd(corpus_prefix, "--train-iters", "1", "--exit-duration-in-mins", "5")).stdout
    assert "without --save: an early exit keeps nothing" in warned
    bad = run_cli(pretrain_cmd(corpus_prefix, "--exit-duration-in-mins", "0"), check=False)
    assert bad.returncode != 0 and "--exit-duration-in-mins must be positive, got 0.0" in bad.stderr
