"""Launch a script under ``python -m torch.distributed.run`` for tests; raise with the full log on failure.

Reused by the distributed, parallel-training and e2e tests::

    from tests.distributed.launch import run_torchrun
    out = run_torchrun("tests/distributed/workers/tp_worker.py", nproc=2, args=["--tp", "2"])
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Sequence

REPO_ROOT = Path(__file__).resolve().parents[2]


def torchrun_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """The environment the workers run with: one thread each, CPU DeepSpeed, the repo on PYTHONPATH."""
    full = dict(os.environ)
    full["OMP_NUM_THREADS"] = "1"
    full["DS_ACCELERATOR"] = "cpu"
    full["PYTHONUNBUFFERED"] = "1"
    path = full.get("PYTHONPATH", "")
    full["PYTHONPATH"] = str(REPO_ROOT) + (os.pathsep + path if path else "")
    full.update(env or {})
    return full


def run_torchrun(script: str | Path, nproc: int, args: Sequence[str] = (), timeout: float = 300,
                 env: dict[str, str] | None = None) -> str:
    """Run ``script`` on ``nproc`` local processes (``torchrun --standalone``); return its stdout.

    Raises RuntimeError with the command, exit status, stdout and stderr when the run fails or exceeds
    ``timeout`` seconds (the whole process group is killed then, so no worker outlives the test).
    """
    script = Path(script)
    if not script.is_absolute():
        script = REPO_ROOT / script
    if not script.is_file():
        raise FileNotFoundError(f"torchrun script not found: {script}")
    if nproc < 1:
        raise ValueError(f"nproc must be >= 1, got {nproc}")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "--max_restarts=0", str(script), *[str(a) for a in args]]
    return run_launcher(cmd, timeout, env).stdout


def run_launcher(cmd: Sequence[str], timeout: float = 300, env: dict[str, str] | None = None,
                 name: str = "torchrun") -> subprocess.CompletedProcess:
    """Run a launcher command (torchrun, mpirun, ...) from the repo root with :func:`torchrun_env`.

    Raises RuntimeError naming ``name``, the command, the exit status, stdout and stderr when it fails or
    exceeds ``timeout`` seconds (then every process it started is killed).
    """
    cmd = [str(c) for c in cmd]
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=torchrun_env(env), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        stdout, stderr = _kill_tree(proc)
        raise RuntimeError(_report(cmd, f"timed out after {timeout:.0f}s", stdout, stderr, name)) from None
    if proc.returncode != 0:
        raise RuntimeError(_report(cmd, f"exit status {proc.returncode}", stdout, stderr, name))
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


def _descendants(pid: int) -> list[int]:
    """All live descendants of ``pid`` (Linux /proc walk; torchrun puts workers in their own sessions)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _kill_tree(proc: subprocess.Popen) -> tuple[str, str]:
    """Stop torchrun and every worker it started; return what they printed."""
    victims = _descendants(proc.pid)
    proc.send_signal(signal.SIGTERM)  # torchrun forwards it to its workers
    try:
        return proc.communicate(timeout=5)
    except subprocess.TimeoutExpired:
        pass
    for pid in [proc.pid, *victims, *_descendants(proc.pid)]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    try:
        return proc.communicate(timeout=10)
    except subprocess.TimeoutExpired:  # a stray process still holds the pipes; give up on the output
        proc.kill()
        return "", "(output unavailable: pipes still held after killing the process tree)"


def _report(cmd: list[str], what: str, stdout: str, stderr: str, name: str = "torchrun") -> str:
    return (f"{name} {what}: {' '.join(cmd)}\n----- stdout -----\n{stdout}\n----- stderr -----\n{stderr}")
