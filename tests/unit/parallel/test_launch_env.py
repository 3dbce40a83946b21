"""launch_env without MPI: when discovery applies, the world size read before MPI starts, clear errors."""
from __future__ import annotations

import sys

import pytest

from megatron_ls.parallel import launch_env

TORCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture
def mpirun_env(monkeypatch):
    """The environment of a rank started by `mpirun -np 2` (no torch variables), without mpi4py."""
    for name in (*TORCH_VARS, *launch_env.MPI_WORLD_SIZE_VARS):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "2")
    monkeypatch.setenv("OMPI_COMM_WORLD_RANK", "1")
    monkeypatch.setitem(sys.modules, "mpi4py", None)  # `import mpi4py` now raises ImportError
    return monkeypatch


@pytest.mark.parametrize("env, expected", [
    ({}, False),
    ({"OMPI_COMM_WORLD_SIZE": "2"}, True),
    ({"PMI_SIZE": "4"}, True),
    ({"OMPI_COMM_WORLD_SIZE": "2", "RANK": "0", "WORLD_SIZE": "2"}, False),  # torchrun under srun/mpirun
])
def test_launched_by_mpi(env, expected):
    assert launch_env.launched_by_mpi(env) is expected


def test_launcher_world_size(monkeypatch):
    for name in ("WORLD_SIZE", *launch_env.MPI_WORLD_SIZE_VARS):
        monkeypatch.delenv(name, raising=False)
    assert launch_env.launcher_world_size() == 1
    monkeypatch.setenv("PMI_SIZE", "3")
    assert launch_env.launcher_world_size() == 3
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert launch_env.launcher_world_size() == 4
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ValueError, match="WORLD_SIZE='two'"):
        launch_env.launcher_world_size()


def test_no_discovery_outside_mpi(monkeypatch):
    for name in launch_env.MPI_WORLD_SIZE_VARS:
        monkeypatch.delenv(name, raising=False)
    assert launch_env.discover_mpi_launch() is None


def test_missing_mpi4py_is_one_clear_line(mpirun_env):
    with pytest.raises(RuntimeError) as info:
        launch_env.discover_mpi_launch()
    message = str(info.value)
    assert "\n" not in message and "OMPI_COMM_WORLD_SIZE=2" in message and "pip install mpi4py" in message


def test_missing_mpi4py_with_exported_master_falls_back_to_launcher_vars(mpirun_env):
    mpirun_env.setenv("MASTER_ADDR", "127.0.0.1")
    mpirun_env.setenv("MASTER_PORT", "29500")
    assert launch_env.discover_mpi_launch() is None


def test_free_port_and_outward_address():
    assert 0 < launch_env.free_port("127.0.0.1") < 65536
    assert isinstance(launch_env.outward_address(), str) and launch_env.outward_address()
