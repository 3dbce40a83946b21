"""mpirun target: start torch.distributed through mpi4py discovery, check ranks against MPI, all_reduce."""
import os

import torch
import torch.distributed as dist
from mpi4py import MPI

from megatron_ls.parallel import state

state.initialize_distributed(timeout_s=60)
comm = MPI.COMM_WORLD
rank, world = dist.get_rank(), dist.get_world_size()
assert (rank, world) == (comm.Get_rank(), comm.Get_size()), (rank, world, comm.Get_rank(), comm.Get_size())
total = torch.tensor([float(rank + 1)])
dist.all_reduce(total)  # gloo
ports = comm.allgather(os.environ["MASTER_PORT"])
print(f"MPI-PROBE rank={rank} world={world} local={os.environ['LOCAL_RANK']} "
      f"local_world={os.environ['LOCAL_WORLD_SIZE']} backend={dist.get_backend()} sum={total.item():g} "
      f"addr={os.environ['MASTER_ADDR']} port={os.environ['MASTER_PORT']} same_port={len(set(ports)) == 1}", flush=True)
state.shutdown_distributed()
