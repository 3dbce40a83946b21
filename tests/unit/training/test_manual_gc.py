"""--manual-gc: no automatic collections while training, collections at the chosen iterations and around
evaluation, the collector back on afterwards (counted with gc.callbacks on the real collector)."""
import gc

import pytest

from megatron_ls.arguments import parse_args
from megatron_ls.training.manual_gc import ManualGC


class _Cycle:
    def __init__(self) -> None:
        self.me = self


def _collections(action) -> int:
    seen = []

    def count(phase, info):
        if phase == "start":
            seen.append(info["generation"])
    gc.callbacks.append(count)
    try:
        action()
    finally:
        gc.callbacks.remove(count)
    return len(seen)


def _allocate() -> None:
    for _ in range(50_000):  # far past the automatic collector's threshold
        _Cycle()


def test_schedule():
    assert gc.isenabled()
    collector = ManualGC(True, interval=2)
    collector.start()
    try:
        assert not gc.isenabled()
        assert _collections(_allocate) == 0  # nothing automatic any more
        assert [_collections(lambda i=i: collector.after_iteration(i)) for i in range(1, 5)] == [0, 1, 0, 1]
        evaluate = collector.wrap_evaluation(lambda x: x + 1)
        assert _collections(lambda: evaluate(1)) == 2  # before and after
        assert ManualGC(True, 0, around_eval=False).wrap_evaluation(abs) is abs
    finally:
        collector.stop()
    assert gc.isenabled() and _collections(_allocate) > 0
    off = ManualGC(False, interval=1)
    off.start()
    assert gc.isenabled() and _collections(lambda: off.after_iteration(1)) == 0
    off.stop()


def test_flags(capsys):
    a = parse_args(["--data-path", "x", "--manual-gc", "--manual-gc-interval", "10", "--no-manual-gc-eval"])
    assert (a.training.manual_gc, a.training.manual_gc_interval, a.training.manual_gc_eval) == (True, 10, False)
    with pytest.raises(SystemExit):
        parse_args(["--data-path", "x", "--manual-gc-interval", "-1"])
    assert "--manual-gc-interval must be >= 0, got -1" in capsys.readouterr().err
