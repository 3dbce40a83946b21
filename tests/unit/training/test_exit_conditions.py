"""ExitConditions in one process: the handler records the signal instead of dying, restores the old one, the
duration counts from the given start, and a run without either flag does no collective at all."""
import os
import signal
import time

import pytest

from megatron_ls.arguments import parse_args
from megatron_ls.parallel.utils import any_rank
from megatron_ls.training.exit_conditions import ExitConditions


def test_signal_is_recorded_and_the_old_handler_restored():
    seen = []
    old = signal.signal(signal.SIGUSR1, lambda *a: seen.append("old"))
    try:
        exits = ExitConditions(None, True, "SIGUSR1")
        exits.install()
        assert exits.check() is None
        os.kill(os.getpid(), signal.SIGUSR1)
        assert exits.check() == "after receiving SIGUSR1 (--exit-signal-handler)" and seen == []
        exits.restore()
        os.kill(os.getpid(), signal.SIGUSR1)
        assert seen == ["old"]
    finally:
        signal.signal(signal.SIGUSR1, old)


def test_duration_and_inactive():
    assert ExitConditions(1.0, False, start_time=time.time()).check() is None
    late = ExitConditions(1.0, False, start_time=time.time() - 90).check()
    assert late.startswith("after 1.5 minutes") and late.endswith("(--exit-duration-in-mins 1)")
    idle = ExitConditions(None, False)
    assert not idle.active and idle.check() is None
    idle.install()  # nothing to install: SIGTERM keeps its handler
    assert signal.getsignal(signal.SIGTERM) is not idle._record
    assert any_rank([True, False]) == [True, False]  # no process group: the local flags


def test_flag_errors(capsys):
    with pytest.raises(ValueError, match="--exit-signal must be one of"):
        ExitConditions(None, True, "SIGKILL")
    for flags, message in ((["--exit-duration-in-mins", "-1"], "--exit-duration-in-mins must be positive, got -1.0"),
                           (["--exit-signal", "SIGKILL"], "--exit-signal: invalid choice")):
        with pytest.raises(SystemExit):
            parse_args([*flags, "--data-path", "x"])
        assert message in capsys.readouterr().err
