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
