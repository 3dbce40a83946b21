"""`mpirun -np 2 python pretrain_gpt_ls.py` (ranks from mpi4py) logs the same losses as torchrun, TP=2."""
from __future__ import annotations

import sys

import pytest

from tests.distributed.mpi import mpi_skip_reason, run_mpirun
from tests.e2e.conftest import iteration_losses, pretrain_cmd, run_cli

pytestmark = [pytest.mark.e2e, pytest.mark.mpi,
              pytest.mark.skipif(mpi_skip_reason() is not None, reason=str(mpi_skip_reason()))]

ITERS = 3
# TP=2 pads the vocab to a multiple of 128 x 2, the same padded size as a one-process run would use.
FLAGS = ["--tensor-model-parallel-size", "2", "--make-vocab-size-divisible-by", "128", "--hidden-dropout", "0",
         "--attention-dropout", "0", "--train-iters", str(ITERS)]


def test_mpirun_matches_torchrun(corpus_prefix):
    cmd = pretrain_cmd(corpus_prefix, *FLAGS)
    torchrun = run_cli([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        *cmd[1:]], timeout=300)
    mpirun = run_mpirun(cmd[1:], nproc=2, timeout=300)
    assert "world size 2 (TP=2 PP=1 DP=1)" in mpirun.stdout, mpirun.stdout
    # Our discovery exported a complete environment, so DeepSpeed did not run its own.
    assert "attempting to detect MPI environment" not in mpirun.stdout + mpirun.stderr
    expected = iteration_losses(torchrun.stdout)
    assert sorted(expected) == list(range(1, ITERS + 1)), torchrun.stdout
    assert iteration_losses(mpirun.stdout) == expected  # same printed values, bit for bit
