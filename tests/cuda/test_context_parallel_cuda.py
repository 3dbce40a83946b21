"""Context-parallel attention on GPUs: NCCL with one GPU per rank, and gloo with ranks sharing one GPU.

The worker (``workers/cp_worker.py``) checks ``cp_long_short_attention`` / ``cp_full_attention`` against the
one-process op on the full sequence, rank by rank, in values and gradients (torch backend in float64, flex in
float32), for contiguous and balanced layouts. The CPU/gloo version of these checks is in tests/distributed.
"""
from __future__ import annotations

import pytest
import torch

from tests.cuda.helpers import CUDA_MARKS, HAS_CUDA, need_gpu
from tests.distributed.launch import run_torchrun

pytestmark = CUDA_MARKS
WORKER = "tests/cuda/workers/cp_worker.py"
N_LS, N_FLEX, N_FULL = 8, 3, 8  # checks per layout the worker prints: LS (torch), LS (flex), full attention


def _check(out: str, flex: bool) -> None:
    assert "CP-DONE" in out, out[-4000:]
    for kind in ("contiguous", "balanced"):
        lines = [line for line in out.splitlines() if line.startswith(f"CP-OK {kind} ")]
        flex_lines = sum(line.endswith(" flex") for line in lines)
        assert flex_lines == (N_FLEX if flex else 0) and len(lines) - flex_lines == N_LS + N_FULL, out[-4000:]


@pytest.mark.timeout(1500)  # flex compiles one kernel per shard shape
@pytest.mark.parametrize("cp", [2, 4])
def test_nccl_context_parallel(cp):
    need_gpu("NCCL")
    gpus = torch.cuda.device_count()
    if gpus < cp:
        pytest.skip(f"NCCL context parallelism with CP={cp} needs one GPU per rank; {gpus} visible")
    out = run_torchrun(WORKER, cp, ["nccl"], timeout=1200)
    assert f"CP-DEVICE nccl cuda:0 world {cp}" in out, out[-4000:]
    _check(out, flex=True)


@pytest.mark.timeout(1800)
def test_gloo_context_parallel_shared_device():
    """Two ranks on one device over gloo: CUDA tensors where this gloo runs CP's collectives on them correctly.

    A separate probe launch comes first: gloo's send/recv take a CUDA tensor's pointer as host memory, which may
    crash or move garbage; a crash or a wrong value there means "unsupported" (skip), not a CP failure.
    """
    try:
        probe = run_torchrun(WORKER, 2, ["gloo", "probe"], timeout=300)
    except RuntimeError as exc:
        pytest.skip(f"gloo cannot run CP's collectives on CUDA tensors here (the probe launch failed): "
                    f"{str(exc)[-300:]}")
    unsupported = [line for line in probe.splitlines() if line.startswith("CP-UNSUPPORTED")]
    if unsupported:
        pytest.skip(unsupported[0])
    assert "CP-PROBE-OK" in probe, probe[-4000:]
    out = run_torchrun(WORKER, 2, ["gloo"], timeout=1200)
    assert f"CP-DEVICE gloo {'cuda:0' if HAS_CUDA else 'cpu'} world 2" in out, out[-4000:]
    _check(out, flex=HAS_CUDA)
