"""mpirun -np 2: ranks, local ranks and the rendezvous come from mpi4py discovery; gloo collectives work."""
from __future__ import annotations

import re

import pytest

from megatron_ls.parallel.launch_env import free_port
from tests.distributed.mpi import mpi_skip_reason, run_mpirun

pytestmark = [pytest.mark.distributed, pytest.mark.mpi,
              pytest.mark.skipif(mpi_skip_reason() is not None, reason=str(mpi_skip_reason()))]

PROBE = "tests/distributed/workers/mpi_probe.py"
LINE = re.compile(r"MPI-PROBE rank=(\d+) world=(\d+) local=(\d+) local_world=(\d+) backend=(\w+) sum=(\S+) "
                  r"addr=(\S+) port=(\d+) same_port=(\w+)")


def _probe_lines(stdout: str) -> dict[int, tuple]:
    found = {int(m.group(1)): m.groups()[1:] for m in LINE.finditer(stdout)}
    assert sorted(found) == [0, 1], stdout
    return found


def test_mpirun_discovers_ranks_and_rendezvous() -> None:
    lines = _probe_lines(run_mpirun([PROBE], nproc=2, timeout=120).stdout)
    for rank, (world, local, local_world, backend, total, addr, _port, same_port) in lines.items():
        assert (world, local, local_world, backend) == ("2", str(rank), "2", "gloo"), lines
        assert float(total) == 3.0 and same_port == "True" and addr == "127.0.0.1", lines


def test_mpirun_keeps_exported_master_port() -> None:
    port = free_port("127.0.0.1")
    lines = _probe_lines(run_mpirun([PROBE], nproc=2, timeout=120,
                                    env={"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}).stdout)
    assert {fields[6] for fields in lines.values()} == {str(port)}, lines
