"""Shared pieces of the CUDA tests: the device they run on, the skip rule, and error-norm comparisons.

Every test in ``tests/cuda`` is marked ``cuda`` and skipped when ``torch.cuda.is_available()`` is False, so CPU CI
pays only the collection. ``MEGATRON_LS_CUDA_TESTS_ON_CPU=1`` (set by ``scripts/gpu_check.sh --allow-cpu``) runs
the parts that work on CPU instead, to check the tests' own plumbing before a GPU is at hand.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

CPU_ENV = "MEGATRON_LS_CUDA_TESTS_ON_CPU"
HAS_CUDA = torch.cuda.is_available()
ON_CPU = not HAS_CUDA and os.environ.get(CPU_ENV) == "1"
DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")
SKIP_REASON = ("CUDA is not available (torch.cuda.is_available() is False): run `bash scripts/gpu_check.sh` on a "
               f"GPU machine ({CPU_ENV}=1 runs the CPU-checkable parts of these tests on CPU)")
# Apply as ``pytestmark = CUDA_MARKS`` in every module of tests/cuda.
CUDA_MARKS = [pytest.mark.cuda, pytest.mark.skipif(not (HAS_CUDA or ON_CPU), reason=SKIP_REASON)]

REPO = Path(__file__).resolve().parents[2]
OPS_TESTS = REPO / "tests" / "unit" / "ops"
if str(OPS_TESTS) not in sys.path:
    sys.path.insert(0, str(OPS_TESTS))  # the dense float64 reference of the CPU op tests


def need_gpu(what: str) -> None:
    """Skip the rest of a test in a CPU plumbing run: ``what`` only exists on CUDA."""
    if not HAS_CUDA:
        pytest.skip(f"{what} needs CUDA (CPU plumbing run)")


def raise_compile_limits() -> None:
    """Let dynamo keep one compiled kernel per tested shape instead of falling back to eager after 8."""
    cfg = torch._dynamo.config
    for name in ("cache_size_limit", "recompile_limit", "accumulated_cache_size_limit",
                 "accumulated_recompile_limit"):
        if hasattr(cfg, name):
            setattr(cfg, name, max(getattr(cfg, name), 512))


def assert_close_rel(name: str, got, want, *, rel: float, row_rel: float | None = None, context: str = "") -> None:
    """``got`` is within ``rel`` of ``want`` in relative Frobenius norm, and (with ``row_rel``) in every row.

    Rows are the last dimension; each row's error is judged against its own norm plus the mean row norm, so a
    single wrong query row (a mask bug) fails even when the whole-tensor error is small, while rows that should be
    ~0 are not judged against 0. ``want`` is the float64 reference; both are compared on CPU in float64.
    """
    got = got.detach().double().cpu()
    want = want.detach().double().cpu()
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)} {context}"
    assert torch.isfinite(got).all(), f"{name}: {int((~torch.isfinite(got)).sum())} non-finite values {context}"
    err = got - want
    ref_norm = float(want.norm())
    total = float(err.norm()) / ref_norm if ref_norm > 0 else float(err.norm())
    head = f"{name} {context}: max abs err {float(err.abs().max()):.3g} (ref max {float(want.abs().max()):.3g})"
    assert total <= rel, f"{head}, relative error {total:.3g} > {rel:g}"
    if row_rel is None or want.dim() < 2 or want.numel() == 0:
        return
    e_rows = err.reshape(-1, want.shape[-1]).norm(dim=1)
    w_rows = want.reshape(-1, want.shape[-1]).norm(dim=1)
    ratio = e_rows / (w_rows + w_rows.mean()).clamp_min(1e-30)
    worst = int(ratio.argmax())
    index = tuple(int(i) for i in torch.unravel_index(torch.tensor(worst), want.shape[:-1]))
    assert float(ratio[worst]) <= row_rel, (f"{head}, worst row {index} relative error {float(ratio[worst]):.3g} > "
                                            f"{row_rel:g}")
