"""NCCL process groups get --distributed-timeout-minutes and the watchdog's error handling (issue 9).

One process, one GPU, in a fresh interpreter (the NCCL environment is read when the group is created): the default
group and every model-parallel group must carry the requested timeout, ``TORCH_NCCL_ASYNC_ERROR_HANDLING`` must be
3 unless the user chose a mode, and a collective must still run. The CPU side (the settings computed for
``nccl``, and gloo groups made with the timeout) is in tests/unit/training/test_faults.py.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.cuda.helpers import CUDA_MARKS, REPO, need_gpu

pytestmark = CUDA_MARKS

PROBE = r"""
import json, os, torch, torch.distributed as dist
from megatron_ls.parallel import state as ps
ps.initialize_distributed(backend="nccl", timeout_s=30, collective_timeout_s=30)
ps.initialize_model_parallel(1, 1, 1)
groups = [dist.distributed_c10d._get_default_group()] + list(ps._GROUPS.values())
x = torch.ones(4, device="cuda")
dist.all_reduce(x, group=ps.get_data_parallel_group())
seconds = [g._get_backend(torch.device("cuda")).options._timeout.total_seconds() for g in groups]
print(json.dumps({"env": os.environ.get("TORCH_NCCL_ASYNC_ERROR_HANDLING"), "timeouts": seconds,
                  "sum": float(x.sum())}))
ps.destroy_model_parallel()
dist.destroy_process_group()
"""


@pytest.mark.parametrize("user_mode", [None, "1"])
def test_nccl_groups_carry_the_timeout_and_error_handling(user_mode):
    need_gpu("NCCL")
    env = {k: v for k, v in os.environ.items() if k not in ("TORCH_NCCL_ASYNC_ERROR_HANDLING",
                                                             "NCCL_ASYNC_ERROR_HANDLING", "RANK", "WORLD_SIZE",
                                                             "MASTER_PORT")}
    if user_mode is not None:
        env["TORCH_NCCL_ASYNC_ERROR_HANDLING"] = user_mode
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", PROBE], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["env"] == (user_mode or "3")
    assert len(result["timeouts"]) >= 8 and set(result["timeouts"]) == {30.0}, result
    assert result["sum"] == 4.0
