"""The sequence classifier at TP2 equals one process: logits, loss and every gradient (float64)."""
from __future__ import annotations

import pytest
import torch

from tests.distributed.launch import run_torchrun
from tests.distributed.workers import classification_tp as worker

pytestmark = pytest.mark.distributed


def test_tp2_classifier_equals_one_process(tmp_path):
    out = tmp_path / "tp2.pt"
    run_torchrun("tests/distributed/workers/classification_tp.py", 2, [str(out)], timeout=180)
    parallel = torch.load(out, weights_only=True)
    for name, case in worker.CASES.items():
        ref = worker.run(case)
        got = parallel[name]
        torch.testing.assert_close(got["logits"], ref["logits"], rtol=1e-10, atol=1e-12, msg=name)
        torch.testing.assert_close(got["loss"], ref["loss"], rtol=1e-10, atol=1e-12, msg=name)
        assert got["grads"].keys() == ref["grads"].keys()
        for param, grad in ref["grads"].items():
            torch.testing.assert_close(got["grads"][param], grad, rtol=1e-9, atol=1e-11,
                                       msg=lambda m, p=param: f"{name} {p}: {m}")
