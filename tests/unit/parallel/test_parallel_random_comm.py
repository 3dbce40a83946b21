"""RNG tracker, RNG state capture/restore, tracker-aware activation checkpointing, and CommCounter."""
from __future__ import annotations

import io
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from megatron_ls.parallel.comm_stats import CommCounter, record_collective
from megatron_ls.parallel.random import (MODEL_PARALLEL_RNG, RNGStatesTracker, checkpoint, get_rng_state_dict,
                                         get_rng_tracker, model_parallel_manual_seed, set_rng_state_dict)


def test_tracker_add_and_fork() -> None:
    tracker = RNGStatesTracker()
    tracker.add("a", 7)
    with pytest.raises(ValueError, match="already exists"):
        tracker.add("a", 8)
    with pytest.raises(ValueError, match="seed 7 is already used"):
        tracker.add("b", 7)
    with pytest.raises(KeyError, match="no state 'zzz'"):
        with tracker.fork("zzz"):
            pass
    torch.manual_seed(0)
    with tracker.fork("a"):
        first = torch.rand(3)
    default_after_fork = torch.rand(3)
    with tracker.fork("a"):
        second = torch.rand(3)
    g = torch.Generator().manual_seed(7)
    assert torch.equal(first, torch.rand(3, generator=g)) and torch.equal(second, torch.rand(3, generator=g))
    torch.manual_seed(0)
    assert torch.equal(torch.rand(3), default_after_fork), "fork() consumed the default generator"


def test_model_parallel_manual_seed_single_process() -> None:
    model_parallel_manual_seed(99)
    assert get_rng_tracker().seeds() == {MODEL_PARALLEL_RNG: 99 + 2718}
    a_py, a_np, a_t = random.random(), np.random.rand(), torch.rand(1)
    model_parallel_manual_seed(99)
    assert (random.random(), np.random.rand()) == (a_py, a_np) and torch.equal(torch.rand(1), a_t)


def test_rng_state_dict_roundtrip_weights_only() -> None:
    model_parallel_manual_seed(5)
    np.random.randn()  # leave a cached gaussian around
    random.gauss(0, 1)
    sd = get_rng_state_dict()
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)

    def draw() -> tuple:
        with get_rng_tracker().fork():
            tracked = torch.rand(4)
        return random.random(), random.gauss(0, 1), np.random.randn(3).tolist(), torch.rand(4), tracked

    first = draw()
    model_parallel_manual_seed(123)  # scramble everything
    draw()
    set_rng_state_dict(loaded)
    second = draw()
    assert first[:3] == second[:3]
    assert torch.equal(first[3], second[3]) and torch.equal(first[4], second[4])
    with pytest.raises(KeyError, match="missing"):
        set_rng_state_dict({"python": sd["python"]})


def _dropout_block(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    h = torch.tanh(x @ w)
    with get_rng_tracker().fork():
        h = F.dropout(h, p=0.5, training=True)
    return F.dropout(h, p=0.3, training=True) @ w.T


def test_checkpoint_replays_tracker_dropout() -> None:
    x = torch.randn(6, 8, requires_grad=True)
    w = torch.randn(8, 8, requires_grad=True)
    model_parallel_manual_seed(1)
    start = get_rng_state_dict()
    _dropout_block(x, w).pow(2).sum().backward()
    ref = (x.grad.clone(), w.grad.clone())
    after_ref = get_rng_state_dict()
    x.grad = w.grad = None

    set_rng_state_dict(start)
    checkpoint(_dropout_block, x, w).pow(2).sum().backward()
    assert torch.equal(x.grad, ref[0]) and torch.equal(w.grad, ref[1])
    # The recompute must not advance the streams: the next draws are as without checkpointing.
    with get_rng_tracker().fork():
        tracked = torch.rand(3)
    default = torch.rand(3)
    set_rng_state_dict(after_ref)
    with get_rng_tracker().fork():
        assert torch.equal(torch.rand(3), tracked)
    assert torch.equal(torch.rand(3), default)


def test_comm_counter_tallies() -> None:
    t32 = torch.zeros(2, 3)
    t16 = torch.zeros(5, dtype=torch.bfloat16)
    record_collective("all_reduce", "forward", t32)  # no active counter: nothing happens, no error
    with CommCounter() as outer:
        record_collective("all_reduce", "forward", t32)
        with CommCounter() as inner:
            record_collective("all_gather", "backward", t16)
        record_collective("all_reduce", "backward", t32)
    assert inner.count() == 1 and inner.total_bytes() == 10
    assert outer.count() == 3 and outer.count("all_reduce") == 2 and outer.count(direction="backward") == 2
    assert outer.total_bytes("all_reduce", "forward") == 24 and outer.total_elements("all_gather") == 5
    assert outer.summary()["all_gather/backward"] == {"calls": 1, "bytes": 10, "elements": 5}
    with pytest.raises(ValueError, match="unknown collective kind 'allreduce'"):
        with CommCounter():
            record_collective("allreduce", "forward", t32)
    outer.reset()
    assert outer.count() == 0 and outer.total_bytes() == 0
