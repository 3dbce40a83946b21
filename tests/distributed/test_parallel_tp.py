"""Tensor-parallel layers, groups, RNG and comm counts on 2 and 4 gloo processes (see workers/)."""
from __future__ import annotations

import pytest

from tests.distributed.launch import run_torchrun

pytestmark = pytest.mark.distributed

WORKER = "tests/distributed/workers/worker.py"
LAYER_CHECKS = ["column", "row", "mlp-comm", "embedding+lm-head+ce", "cross-entropy", "scatter-gather"]
RNG_CHECKS = ["rng-tracker", "rng-seed"]
MODEL_COMM_CHECKS = ["ls-layer-comm", "ls-layer-full-width-dual-ln-comm", "full-layer-comm"]  # the lead's TransformerLayer on our layers


def _tag(layout: str) -> str:
    tp, pp, cp = layout.split(",")
    return f"tp{tp}pp{pp}cp{cp}"


def _assert_all_ok(out: str, expected: list[str]) -> None:
    ok = {line.split("CHECK-OK ", 1)[1].strip() for line in out.splitlines() if "CHECK-OK " in line}
    missing = [name for name in expected if name not in ok]
    assert not missing, f"checks that did not report OK: {missing}\n{out}"


def test_two_ranks_tp2_and_dp2() -> None:
    """TP=2 (every layer vs dense, comm counts incl. a whole LS/full transformer layer, RNG), then
    TP=1 x DP=2 (collectives vanish, RNG shared)."""
    layouts = ["2,1,1", "1,1,1"]
    out = run_torchrun(WORKER, 2, ["--layouts", *layouts, "--suites", "layers", "rng", "model-comm"], timeout=180)
    _assert_all_ok(out, [f"{_tag(lay)}:{c}" for lay in layouts for c in LAYER_CHECKS + RNG_CHECKS + MODEL_COMM_CHECKS])


def test_four_ranks_layouts() -> None:
    """TP2xPP2, TP2xDP2, TP2xCP2, PP2xDP2 and TP4: group membership, layers and RNG at each."""
    layouts = ["2,2,1", "2,1,1", "2,1,2", "1,2,1", "4,1,1"]
    out = run_torchrun(WORKER, 4, ["--layouts", *layouts, "--suites", "groups", "layers", "rng"], timeout=240)
    expected = [f"({lay.replace(',', ', ')}):groups" for lay in layouts]
    expected += [f"{_tag(lay)}:{c}" for lay in layouts for c in LAYER_CHECKS + RNG_CHECKS]
    _assert_all_ok(out, expected + ["bad-size"])


def test_deepspeed_uses_state_as_mpu() -> None:
    """deepspeed.initialize(mpu=state) at TP2 x DP2: DP/MP sizes, global grad norm and SGD step vs dense."""
    stages = ["0", "2"]  # stage 1 shares stage 2's code path (stage_1_and_2.py)
    out = run_torchrun("tests/distributed/workers/ds_mpu_worker.py", 4, ["--zero-stage", *stages], timeout=240)
    _assert_all_ok(out, [f"deepspeed-mpu-zero{s}" for s in stages])
