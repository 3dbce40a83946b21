"""Helpers for per-rank worker scripts: start/stop distributed, compare tensors, report per check."""
from __future__ import annotations

import sys
from typing import Callable

import torch
import torch.distributed as dist

from megatron_ls.parallel import state


def start() -> None:
    """Initialise torch.distributed from the torchrun environment."""
    state.initialize_distributed(timeout_s=60)


def finish() -> None:
    """Barrier and tear down (avoids gloo aborts at exit)."""
    state.shutdown_distributed()


def say(msg: str) -> None:
    """Print one line prefixed with this rank."""
    print(f"[rank{dist.get_rank()}] {msg}", flush=True)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str, atol: float = 1e-12,
                 rtol: float = 1e-10) -> None:
    """Raise AssertionError naming ``what`` and the largest difference when the tensors differ."""
    if actual.shape != expected.shape:
        raise AssertionError(f"{what}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}")
    if not torch.allclose(actual, expected, atol=atol, rtol=rtol):
        diff = (actual.double() - expected.double()).abs().max().item()
        raise AssertionError(f"{what}: max abs difference {diff:.3e} (atol {atol}, rtol {rtol})")


def all_gather_obj(obj: object) -> list:
    """Every rank's ``obj``, in global-rank order."""
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def run_checks(checks: list[tuple[str, Callable[[], None]]]) -> None:
    """Run each check; print ``CHECK-OK name`` (rank 0) or exit non-zero with the failure."""
    for name, fn in checks:
        try:
            fn()
        except Exception:
            say(f"CHECK-FAILED {name}")
            raise
        dist.barrier()
        if dist.get_rank() == 0:
            print(f"CHECK-OK {name}", flush=True)
    sys.stdout.flush()
