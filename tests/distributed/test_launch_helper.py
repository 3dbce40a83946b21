"""The torchrun helper other tests rely on: environment, output, failures and timeouts."""
from __future__ import annotations

import time

import pytest

from tests.distributed.launch import run_torchrun

pytestmark = pytest.mark.distributed
PROBE = "tests/distributed/workers/launch_probe.py"


def test_success_returns_stdout_with_env() -> None:
    out = run_torchrun(PROBE, 2, ["ok"], timeout=120, env={"PROBE_EXTRA": "yes"})
    for rank in (0, 1):
        assert f"probe rank {rank} of 2 omp=1 ds=cpu extra=yes" in out, out


def test_failure_raises_with_output() -> None:
    with pytest.raises(RuntimeError) as info:
        run_torchrun(PROBE, 2, ["fail"], timeout=120)
    msg = str(info.value)
    assert "exit status" in msg and "probe failing on purpose" in msg and "probe rank 0 of 2" in msg, msg


def test_timeout_kills_and_raises() -> None:
    start = time.monotonic()
    with pytest.raises(RuntimeError, match="timed out after 6s"):
        run_torchrun(PROBE, 1, ["hang"], timeout=6)
    assert time.monotonic() - start < 30


def test_missing_script() -> None:
    with pytest.raises(FileNotFoundError, match="no_such_worker.py"):
        run_torchrun("tests/distributed/workers/no_such_worker.py", 1)
