"""Fixtures for end-to-end CLI runs: a small byte-level corpus built once per session with our own tools."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
ITERATION_LOSS = re.compile(r" iteration\s+(\d+)/\s*\d+ \|.*? lm loss: ([0-9.E+\-naif]+) \|")

# A model small enough for a few CPU seconds per run, with every part of GPT-LS switched on.
TINY_MODEL = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "128",
              "--window-size", "32", "--segment-length", "16", "--projection-rank", "1",
              "--micro-batch-size", "2", "--global-batch-size", "4", "--lr", "3e-3", "--log-interval", "1",
              "--eval-iters", "1", "--split", "90,8,2", "--seed", "7"]


def cli_env() -> dict:
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    env["DS_ACCELERATOR"] = env.get("DS_ACCELERATOR", "cpu")
    env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".torch_extensions"))
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def run_cli(args: list, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess:
    """Run a command from the repo root; on unexpected failure show its whole output. The timeout only guards
    against hangs: on a slow or busy 2-core machine the ablation smoke test alone has needed over 300 s."""
    proc = subprocess.run(args, cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, args))} exited {proc.returncode}\n--- stdout\n{proc.stdout}"
                             f"\n--- stderr\n{proc.stderr}")
    return proc


def iteration_losses(stdout: str) -> dict[int, float]:
    return {int(m.group(1)): float(m.group(2)) for m in ITERATION_LOSS.finditer(stdout)}


@pytest.fixture(scope="session")
def corpus_prefix(tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("corpus")
    run_cli([sys.executable, "tools/prepare_sample_corpus.py", "--output-dir", str(out)])
    prefix = out / "python_docs_text_document"
    assert (Path(str(prefix) + ".bin")).exists()
    return str(prefix)


def pretrain_cmd(corpus: str, *extra: str) -> list:
    return [sys.executable, "pretrain_gpt_ls.py", "--data-path", corpus, *TINY_MODEL, *extra]
