"""Tensor-parallel LS attention (heads, projection logits and DualLN sharded; full-width DualLN statistics reduced
over TP) equals the single-process module."""
import sys
from pathlib import Path

import pytest
import torch

from tests.distributed.launch import run_torchrun

pytestmark = pytest.mark.distributed
sys.path.insert(0, str(Path(__file__).resolve().parent / "workers"))
import check_tp_attention as worker  # noqa: E402


@pytest.mark.parametrize("tp", [2, 4])
def test_tp_attention_matches_single_process(tmp_path, tp):
    # Reference in this process: no parallel state, so the module is an ordinary single-device nn.Module.
    reference = {f"{full}-{dual_ln}-{scope}": worker.run(worker.build(full, dual_ln, scope))
                 for full, dual_ln, scope in worker.CASES}
    for entry in reference.values():
        entry.pop("dims")
    path = tmp_path / "reference.pt"
    torch.save(reference, path)
    out = run_torchrun("tests/distributed/workers/check_tp_attention.py", tp, [str(path)], timeout=240)
    assert out.count("CHECK-OK tp-attention") == len(worker.CASES) * tp, out
