"""Context-parallel LS and full attention equal the one-process op (values and gradients, float64)."""
import pytest

from tests.distributed.launch import run_torchrun

pytestmark = pytest.mark.distributed

WORKER = "tests/distributed/workers/check_cp_attention.py"


@pytest.mark.parametrize("cp", [2, pytest.param(4, marks=pytest.mark.slow)])
def test_cp_attention_matches_one_process(cp):
    out = run_torchrun(WORKER, cp, ["contiguous", "balanced"], timeout=300)
    for kind in ("contiguous", "balanced"):
        assert out.count(f"CHECK-OK cp-attention {kind}") == 14, out
        assert out.count(f"CHECK-OK cp-full {kind}") == 4, out
        assert f"CHECK-OK cp-comm {kind}" in out, out
