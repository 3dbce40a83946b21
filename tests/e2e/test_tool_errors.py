"""Bad input to the tools (issue 9): a wrong flag value, a missing checkpoint or an unusable output path ends in one
line ``error: ...`` naming the flag or file and a non-zero exit, never a traceback or argparse's usage dump. Every
case here escaped before (traceback, silent acceptance, a wrapped port, werkzeug's own two lines)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

from tests.e2e.conftest import run_cli
from tests.e2e.inference_checkpoints import write_checkpoints

pytestmark = pytest.mark.e2e

PY = sys.executable


@pytest.fixture(scope="module")
def consolidated(tmp_path_factory) -> str:
    return write_checkpoints(tmp_path_factory.mktemp("tool_errors"))[0]


CASES = {
    "generate-device": (["tools/generate.py", "--load", "{ckpt}", "--prompt", "x", "--device", "bogus"],
                        "--device bogus: not a device name"),
    "generate-json": (["tools/generate.py", "--load", "{ckpt}", "--prompt", "x", "--max-new-tokens", "1", "--json",
                       "{missing}/out.json"], "--json {missing}/out.json: directory {missing} does not exist"),
    "generate-max-new-tokens": (["tools/generate.py", "--load", "{ckpt}", "--prompt", "x", "--max-new-tokens", "-1"],
                                "--max-new-tokens must be >= 0, got -1"),
    "convert-output-dir": (["tools/convert_checkpoint.py", "--load", "{ckpt}", "--consolidated-dir", "/dev/null/c"],
                           "--consolidated-dir /dev/null/c: cannot create this directory (/dev/null is not a writable directory)"),
    "server-port": (["tools/run_text_generation_server.py", "--load", "{ckpt}", "--port", "99999"],
                    "--port 99999 must be in [0, 65535]"),
    "server-body": (["tools/run_text_generation_server.py", "--load", "{ckpt}", "--max-body-bytes", "-1"],
                    "--max-body-bytes must be >= 1, got -1"),
    "convert-tp0": (["tools/convert_checkpoint.py", "--load", "{ckpt}", "--consolidated-dir", "{tmp}/c",
                     "--target-tensor-parallel-size", "0"], "--target-tensor-parallel-size must be >= 1, got 0"),
    "convert-vocab-file": (["tools/convert_checkpoint.py", "--load", "{ckpt}", "--to-hf", "{tmp}/hf",
                            "--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", "{missing}/vocab.json"],
                           "--vocab-file {missing}/vocab.json: no such file"),
    "eval-image-load": (["tools/eval_image_classifier.py", "--load", "{missing}", "--data-path", "{tmp}"],
                        "--load {missing}: no such directory"),
    "eval-image-batch": (["tools/eval_image_classifier.py", "--load", "{ckpt}", "--data-path", "{tmp}",
                          "--micro-batch-size", "0"], "--micro-batch-size must be >= 1, got 0"),
    "evaluate-max-tokens": (["tools/evaluate.py", "--load", "{ckpt}", "--data-path", "{tmp}/d", "--max-tokens", "1"],
                            "--max-tokens must be >= 2, got 1"),
    "sample-corpus-dir": (["tools/prepare_sample_corpus.py", "--output-dir", "/dev/null/corpus"],
                          "Not a directory: /dev/null/corpus"),
    "task-data-choice": (["tools/generate_task_data.py", "--task", "LISTOP", "--output-prefix", "{tmp}/t"],
                         "invalid choice: 'LISTOP' (choose from LISTOPS, FAR_RECALL); did you mean LISTOPS?"),
    "preprocess-choice": (["tools/preprocess_data.py", "--input", "{tmp}/in.jsonl", "--output-prefix", "{tmp}/o",
                           "--tokenizer-type", "BiteTokenizer"], "invalid choice: 'BiteTokenizer'"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_one_error_line(case, consolidated, tmp_path):
    args, expected = CASES[case]
    names = {"ckpt": consolidated, "tmp": str(tmp_path), "missing": str(tmp_path / "missing")}
    proc = run_cli([PY] + [a.format(**names) for a in args], check=False, timeout=120)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode != 0 and len(lines) == 1, proc.stderr[-3000:]
    assert "error: " in lines[0] and expected.format(**names) in lines[0], lines[0]
    assert not Path(tmp_path / "c").exists() and not Path(tmp_path / "hf").exists()
