"""RNG rules for tensor parallelism, plus RNG capture/restore for exact checkpoint resume.

Rule: the default generator is seeded identically on every rank (same init, same dropout on replicated
activations); a tracked state ``model-parallel-rng`` = ``seed + 2718 + tp_rank`` is swapped in with
``get_rng_tracker().fork()`` around dropout on TP-sharded activations (e.g. attention probabilities of
this rank's heads), so those masks differ across TP ranks.
"""
from __future__ import annotations

import contextlib
import random as _pyrandom
from typing import Any, Callable, Iterator

import numpy as np
import torch
import torch.utils.checkpoint

from megatron_ls.parallel import state

MODEL_PARALLEL_RNG = "model-parallel-rng"
_MODEL_PARALLEL_SEED_OFFSET = 2718


def _cuda() -> bool:
    return torch.cuda.is_available()


class RNGStatesTracker:
    """Named (CPU, CUDA-current-device) generator states that can be swapped in with :meth:`fork`."""

    def __init__(self) -> None:
        self._states: dict[str, dict[str, torch.Tensor | None]] = {}
        self._seeds: dict[str, int] = {}

    def reset(self) -> None:
        """Forget all tracked states."""
        self._states.clear()
        self._seeds.clear()

    def __contains__(self, name: object) -> bool:
        return name in self._states

    def names(self) -> list[str]:
        """Names of the tracked states."""
        return list(self._states)

    def add(self, name: str, seed: int) -> None:
        """Track a new state ``name`` seeded with ``seed`` (the default generators are not touched)."""
        if name in self._states:
            raise ValueError(f"RNG tracker state {name!r} already exists")
        if seed in self._seeds.values():
            raise ValueError(f"RNG tracker seed {seed} is already used by another state")
        cpu = torch.Generator(device="cpu").manual_seed(seed).get_state()
        cuda = torch.Generator(device="cuda").manual_seed(seed).get_state() if _cuda() else None
        self._states[name] = {"cpu": cpu, "cuda": cuda}
        self._seeds[name] = int(seed)

    def get_states(self) -> dict[str, dict[str, torch.Tensor | None]]:
        """Copies of all tracked states (plain tensors)."""
        return {n: {k: (v.clone() if v is not None else None) for k, v in s.items()}
                for n, s in self._states.items()}

    def set_states(self, states: dict[str, dict[str, torch.Tensor | None]]) -> None:
        """Replace the tracked states (as produced by :meth:`get_states`)."""
        self._states = {n: {k: (v.clone() if v is not None else None) for k, v in s.items()}
                        for n, s in states.items()}

    def seeds(self) -> dict[str, int]:
        """Seed each state was created with."""
        return dict(self._seeds)

    @contextlib.contextmanager
    def fork(self, name: str = MODEL_PARALLEL_RNG) -> Iterator[None]:
        """Run the block with state ``name`` as the default CPU (and CUDA) generator state, then swap back."""
        if name not in self._states:
            raise KeyError(f"RNG tracker has no state {name!r} (known: {self.names()}); call "
                           f"model_parallel_manual_seed(seed) or get_rng_tracker().add(name, seed) first")
        saved_cpu = torch.get_rng_state()
        saved_cuda = torch.cuda.get_rng_state() if _cuda() else None
        tracked = self._states[name]
        torch.set_rng_state(tracked["cpu"])
        if saved_cuda is not None and tracked["cuda"] is not None:
            torch.cuda.set_rng_state(tracked["cuda"])
        try:
            yield
        finally:
            tracked["cpu"] = torch.get_rng_state()
            if saved_cuda is not None:
                tracked["cuda"] = torch.cuda.get_rng_state()
                torch.cuda.set_rng_state(saved_cuda)
            torch.set_rng_state(saved_cpu)


_TRACKER = RNGStatesTracker()


def get_rng_tracker() -> RNGStatesTracker:
    """The process-wide RNG tracker."""
    return _TRACKER


def model_parallel_manual_seed(seed: int) -> None:
    """Seed python/numpy/torch identically on every rank; track ``model-parallel-rng`` = seed+2718+tp_rank."""
    seed = int(seed)
    _pyrandom.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # CPU and every CUDA device
    _TRACKER.reset()
    _TRACKER.add(MODEL_PARALLEL_RNG, seed + _MODEL_PARALLEL_SEED_OFFSET + state.get_tensor_model_parallel_rank())


def get_rng_state_dict() -> dict[str, Any]:
    """Capture python, numpy, torch CPU, CUDA and tracker RNG states.

    Only tensors, ints, floats, strings, lists, dicts and None: loadable with
    ``torch.load(..., weights_only=True)``.
    """
    py_version, py_internal, py_gauss = _pyrandom.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    return {
        "python": [int(py_version), [int(v) for v in py_internal], py_gauss],
        "numpy": {"name": str(np_name), "keys": torch.from_numpy(np_keys.astype(np.int64)),
                  "pos": int(np_pos), "has_gauss": int(np_has_gauss), "cached_gaussian": float(np_gauss)},
        "torch_cpu": torch.get_rng_state(),
        "torch_cuda": list(torch.cuda.get_rng_state_all()) if _cuda() else [],
        "tracker": _TRACKER.get_states(),
        "tracker_seeds": _TRACKER.seeds(),
    }


def set_rng_state_dict(sd: dict[str, Any]) -> None:
    """Restore the states captured by :func:`get_rng_state_dict` (exact resume)."""
    missing = {"python", "numpy", "torch_cpu", "torch_cuda", "tracker"} - set(sd)
    if missing:
        raise KeyError(f"RNG state dict is missing {sorted(missing)}; was it written by get_rng_state_dict()?")
    version, internal, gauss = sd["python"]
    _pyrandom.setstate((int(version), tuple(int(v) for v in internal), gauss))
    npd = sd["numpy"]
    np.random.set_state((npd["name"], npd["keys"].numpy().astype(np.uint32), int(npd["pos"]),
                         int(npd["has_gauss"]), float(npd["cached_gaussian"])))
    torch.set_rng_state(sd["torch_cpu"])
    cuda_states = sd["torch_cuda"]
    if cuda_states and _cuda():
        if len(cuda_states) != torch.cuda.device_count():
            raise RuntimeError(f"RNG state has {len(cuda_states)} CUDA generator states but "
                               f"{torch.cuda.device_count()} CUDA devices are visible")
        torch.cuda.set_rng_state_all(cuda_states)
    _TRACKER.set_states(sd["tracker"])
    _TRACKER._seeds = {str(k): int(v) for k, v in sd.get("tracker_seeds", {}).items()}


def checkpoint(function: Callable[..., Any], *args: Any) -> Any:
    """Activation checkpointing that also replays the RNG tracker states.

    ``torch.utils.checkpoint`` restores only the default generators for the recomputation; dropout inside
    ``get_rng_tracker().fork()`` would otherwise draw a different mask in the recompute and give wrong
    gradients. Here the recompute sees the tracker exactly as the original forward did.
    """
    snapshot: dict[str, Any] = {}

    def run(*inner: Any) -> Any:
        if not snapshot:
            snapshot["states"] = _TRACKER.get_states()
            return function(*inner)
        current = _TRACKER.get_states()
        _TRACKER.set_states(snapshot["states"])
        try:
            return function(*inner)
        finally:
            _TRACKER.set_states(current)

    return torch.utils.checkpoint.checkpoint(run, *args, use_reentrant=False, preserve_rng_state=True)
