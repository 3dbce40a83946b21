"""initialize_distributed: an unreachable rendezvous ends in a clear RuntimeError, never a hang."""
from __future__ import annotations

import subprocess
import sys

import pytest

from megatron_ls.parallel.state import _free_local_port
from tests.distributed.launch import REPO_ROOT, torchrun_env

pytestmark = pytest.mark.distributed

SNIPPET = """
from megatron_ls.parallel import state
try:
    state.initialize_distributed(timeout_s=2)
except RuntimeError as exc:
    print("RUNTIME-ERROR", exc)
else:
    print("NO-ERROR")
"""


@pytest.mark.parametrize("rank", [0, 1], ids=["master-without-peer", "worker-without-master"])
def test_unreachable_rendezvous_raises(rank: int) -> None:
    port = _free_local_port()
    env = torchrun_env({"RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": "0",
                        "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    for name in ("TORCHELASTIC_USE_AGENT_STORE", "TORCHELASTIC_RUN_ID"):
        env.pop(name, None)
    res = subprocess.run([sys.executable, "-c", SNIPPET], cwd=REPO_ROOT, env=env, capture_output=True,
                         text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert "RUNTIME-ERROR" in res.stdout, res.stdout + res.stderr
    assert f"MASTER_ADDR=127.0.0.1 MASTER_PORT={port}" in res.stdout and f"rank {rank}/2" in res.stdout


def test_plain_python_is_a_world_of_one() -> None:
    env = {k: v for k, v in torchrun_env().items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    code = ("import torch.distributed as dist\nfrom megatron_ls.parallel import state\n"
            "state.initialize_distributed(); state.initialize_distributed()\n"
            "state.initialize_model_parallel(); state.initialize_model_parallel()\n"
            "import os\nprint('WORLD', dist.get_world_size(), dist.get_rank(), dist.get_backend(),"
            " os.environ['MASTER_PORT'] != '')\n"
            "state.shutdown_distributed(); print('DOWN', dist.is_initialized())\n")
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 0, res.stderr
    assert "WORLD 1 0 gloo True" in res.stdout and "DOWN False" in res.stdout, res.stdout
