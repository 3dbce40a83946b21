"""How long a collective may take, per backend: what ``init_process_group`` / ``new_group`` get, and NCCL's
environment.

gloo raises from a collective that exceeds its group's timeout. NCCL collectives run asynchronously on the GPU;
only the watchdog thread notices one that exceeds the timeout, and only ``TORCH_NCCL_ASYNC_ERROR_HANDLING`` makes
it act (3: tear the process down, the mode that works whatever the main thread is blocked in). The variable is
read when the NCCL process group is created, so it must be in the environment before ``init_process_group``.
Every group needs the timeout passed explicitly: ``new_group`` otherwise uses torch's per-backend default
(30 minutes for gloo, 10 for NCCL), not the default group's.
"""
from __future__ import annotations

import datetime
import os
from typing import Mapping, Optional

__all__ = ["NCCL_ASYNC_ERROR_HANDLING", "NCCL_ERROR_HANDLING_VARIABLES", "uses_nccl", "backend_environment",
           "apply_backend_environment", "group_kwargs", "set_collective_timeout", "collective_timeout"]

# The mode set when the user chose none: abort the communicators and tear the process down.
NCCL_ASYNC_ERROR_HANDLING = "3"
# torch reads the first name; the second is its deprecated spelling, which a user's setting may still use.
NCCL_ERROR_HANDLING_VARIABLES = ("TORCH_NCCL_ASYNC_ERROR_HANDLING", "NCCL_ASYNC_ERROR_HANDLING")

_TIMEOUT: Optional[datetime.timedelta] = None


def uses_nccl(backend: str) -> bool:
    """True for ``nccl`` and for a mixed backend string that maps a device to NCCL (``cpu:gloo,cuda:nccl``)."""
    return "nccl" in backend.lower()


def backend_environment(backend: str, environ: Optional[Mapping[str, str]] = None) -> dict[str, str]:
    """Environment variables to set before creating a ``backend`` process group (only those the user left unset).

    For NCCL: ``TORCH_NCCL_ASYNC_ERROR_HANDLING=3`` unless either spelling of it is already set.
    """
    environ = os.environ if environ is None else environ
    if not uses_nccl(backend) or any(environ.get(name) for name in NCCL_ERROR_HANDLING_VARIABLES):
        return {}
    return {NCCL_ERROR_HANDLING_VARIABLES[0]: NCCL_ASYNC_ERROR_HANDLING}


def apply_backend_environment(backend: str) -> dict[str, str]:
    """Set :func:`backend_environment` in ``os.environ``; returns what was set."""
    settings = backend_environment(backend)
    os.environ.update(settings)
    return settings


def set_collective_timeout(seconds: float) -> datetime.timedelta:
    """Record the timeout every process group of this job gets (done once, before the default group exists)."""
    global _TIMEOUT
    _TIMEOUT = datetime.timedelta(seconds=float(seconds))
    return _TIMEOUT


def collective_timeout() -> Optional[datetime.timedelta]:
    """The recorded timeout, or None before :func:`set_collective_timeout`."""
    return _TIMEOUT


def group_kwargs() -> dict:
    """Keyword arguments for ``init_process_group`` / ``new_group``: the recorded timeout (any backend)."""
    return {} if _TIMEOUT is None else {"timeout": _TIMEOUT}
