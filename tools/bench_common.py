"""Provenance helpers shared by the benchmark tools: device name and git commit of the measured code."""
from __future__ import annotations

import os
import platform
import subprocess
from typing import Optional, Sequence

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def device_name(device: str) -> str:
    """Human-readable name of the benchmarked device (GPU model, or the CPU model string)."""
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip() + f" ({os.cpu_count()} logical CPUs)"
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_commit() -> Optional[str]:
    """``git rev-parse HEAD`` of this repository (None outside git)."""
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def git_dirty(paths: Sequence[str]) -> bool:
    """True when any of ``paths`` (the measured code) differs from the recorded commit."""
    try:
        res = subprocess.run(["git", "status", "--porcelain", "--", *paths], cwd=REPO, capture_output=True,
                             text=True, check=True)
        return bool(res.stdout.strip())
    except (OSError, subprocess.CalledProcessError):
        return True


def rss_kb(field: str) -> int:
    """A memory field of ``/proc/self/status`` in KiB (``VmRSS``: resident now, ``VmHWM``: peak)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not found in /proc/self/status")


def reset_peak_rss() -> int:
    """Reset the kernel's peak-RSS counter (``VmHWM``) to the current RSS and return that RSS in KiB."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return rss_kb("VmRSS")


def parse_int_list(text: str, flag: str) -> list:
    """Comma-separated positive ints for ``flag`` (ValueError naming the flag otherwise)."""
    try:
        values = [int(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"{flag} must be comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise ValueError(f"{flag} must list positive integers, got {text!r}")
    return values


def write_json_atomic(path: str | os.PathLike, payload: dict) -> None:
    """Write ``payload`` as indented JSON; a reader never sees a half-written file."""
    import json
    from pathlib import Path

    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(target.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    os.replace(tmp, target)
