"""Megatron sequence parallelism at TP = 2 against one process (float64), its communication, dropout and memory."""
import re
import sys
from pathlib import Path

import pytest
import torch

from tests.distributed.launch import run_torchrun

pytestmark = pytest.mark.distributed
sys.path.insert(0, str(Path(__file__).resolve().parent / "workers"))
import check_sequence_parallel as worker  # noqa: E402


def test_sequence_parallel_equals_one_process_and_cuts_activation_memory(tmp_path):
    path = tmp_path / "reference.pt"
    torch.save(worker.reference(), path)  # no process group here: an ordinary single-process model
    out = run_torchrun("tests/distributed/workers/check_sequence_parallel.py", 2, [str(path)], timeout=300)
    for name in ("sp-model-exact-learned", "sp-model-exact-rope", "sp-selective-recompute", "sp-layer-comm", "sp-mappings",
                 "sp-dropout-per-rank", "sp-trains-with-dropout", "sp-activation-memory"):
        assert f"CHECK-OK {name}" in out, out
    saved = re.search(r"SP-MEMORY saved_bytes plain=(\d+) sp=(\d+).*", out)
    assert saved and int(saved.group(2)) < int(saved.group(1)), out
    print(saved.group(0))
