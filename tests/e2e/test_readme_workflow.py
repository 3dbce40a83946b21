"""The README's workflow as typed: quickstart, long-context evaluation, re-shard to TP2, fine-tune at TP2 with
sequence parallelism (small iteration counts appended as overrides); and what it relies on: a real held-out test
slice, Megatron's treatment of empty split parts, the learned-position limit as one error line."""
from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.e2e.conftest import REPO, cli_env, iteration_losses, pretrain_cmd, run_cli

pytestmark = pytest.mark.e2e

# Appended to the README's commands (argparse keeps the last value of a repeated flag).
OVERRIDES = {"tools/evaluate.py": ["--max-tokens", "8700"],
             "pretrain_gpt_ls.py": ["--train-iters", "2", "--global-batch-size", "4", "--log-interval", "1",
                                    "--eval-iters", "1"]}


def readme_commands() -> list[str]:
    """The commands of the README block between the readme-workflow markers, continuation lines joined."""
    text = (REPO / "README.md").read_text()
    block = re.search(r"<!-- readme-workflow:begin -->\s*```bash\n(.*?)```\s*<!-- readme-workflow:end -->", text,
                      re.S)
    assert block, "README.md lost its readme-workflow block"
    joined = block.group(1).replace("\\\n", " ")
    return [line.strip() for line in joined.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def as_run_here(command: str, root: Path) -> list[str]:
    """A README command with its paths moved under ``root``, this Python, and the overrides appended."""
    command = command.replace("checkpoints/", f"{root}/checkpoints/").replace("data/sample", f"{root}/data/sample")
    argv = shlex.split(command)
    assert argv[0] == "python", command
    argv[0] = sys.executable
    for script, extra in OVERRIDES.items():
        if script in argv:
            argv += extra
    return argv


@pytest.mark.slow
@pytest.mark.distributed
def test_readme_quickstart_then_long_evaluation_reshard_and_tp2_finetune(tmp_path):
    env = {"MEGATRON_LS_SKIP_INSTALL": "1", "DATA_DIR": f"{tmp_path}/data/sample",
           "CHECKPOINT_DIR": f"{tmp_path}/checkpoints/quickstart", "TENSORBOARD_DIR": f"{tmp_path}/runs/quickstart"}
    quick = subprocess.run(["bash", "scripts/quickstart.sh", "--train-iters", "2", "--lr-warmup-iters", "1",
                            "--global-batch-size", "8", "--log-interval", "1", "--eval-iters", "1"], cwd=REPO,
                           env={**cli_env(), **env}, capture_output=True, text=True, timeout=600)
    assert quick.returncode == 0, quick.stdout + quick.stderr
    assert sorted(iteration_losses(quick.stdout)) == [1, 2]
    assert "test loss at iteration 2" in quick.stdout and "bits per byte" in quick.stdout
    noise = quick.stdout + quick.stderr
    assert noise.count("built successfully") <= 1 and noise.count("FutureWarning") <= 1, noise  # rank 0 only

    from tools.evaluate import split_token_stream

    test = split_token_stream(f"{tmp_path}/data/sample/python_docs_text_document", "90,5,5", "test")
    assert len(test) > 50_000  # a held-out slice of many documents, longer than an 8192-byte window

    commands = readme_commands()
    assert [c.split()[1 if c.startswith("python tools") else -1] for c in commands][:2] == [
        "tools/evaluate.py", "tools/convert_checkpoint.py"]
    outputs = [run_cli(as_run_here(c, tmp_path), timeout=600).stdout for c in commands]
    assert "window 8192 stride 512" in outputs[0] and "bits per token" in outputs[0], outputs[0]
    finetune = outputs[2]
    assert "padded vocab size 384 taken from --load" in finetune, finetune  # 512 at TP2 without it
    assert "loaded checkpoint" in finetune and "(TP=2 PP=1 DP=1 SP)" in finetune, finetune
    assert sorted(iteration_losses(finetune)) == [1, 2]


def test_long_windows_on_a_learned_position_table_are_one_error_line(corpus_prefix, tmp_path):
    from megatron_ls.config import TransformerConfig
    from megatron_ls.inference.checkpoint_io import save_consolidated
    from megatron_ls.model import GPTModel

    config = TransformerConfig(num_layers=1, hidden_size=16, num_attention_heads=2, seq_length=32, vocab_size=384,
                               window_size=16, segment_length=8)
    save_consolidated(str(tmp_path / "model"), config, GPTModel(config).state_dict())
    proc = run_cli([sys.executable, "tools/evaluate.py", "--load", str(tmp_path / "model"), "--data-path",
                    corpus_prefix, "--eval-seq-length", "8192"], check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"error: --eval-seq-length 8192 exceeds the 32 learned positions of {tmp_path / 'model'}; evaluate at most 32 "
        f"tokens per window, or train with --position-embedding-type rope (or none) to evaluate longer windows"]


def test_default_split_on_a_55_document_corpus_trains_without_a_test_part(tmp_path):
    from megatron_ls.data.indexed_dataset import IndexedDatasetBuilder

    prefix = tmp_path / "small_text_document"
    builder = IndexedDatasetBuilder(f"{prefix}.bin", np.uint16)
    rng = np.random.default_rng(0)
    for _ in range(55):
        builder.add_item(rng.integers(0, 256, size=400))
        builder.end_document()
    builder.finalize(f"{prefix}.idx")
    cmd = pretrain_cmd(str(prefix), "--train-iters", "2")
    cmd.remove("--split")  # TINY_MODEL's own split: back to the default 969,30,1
    cmd.remove("90,8,2")
    proc = run_cli(cmd)
    assert sorted(iteration_losses(proc.stdout)) == [1, 2]
    assert proc.stdout.count("the test part gets 0 of the 55 documents") == 1, proc.stdout
    assert "validation loss at iteration 2" in proc.stdout and "test loss" not in proc.stdout
