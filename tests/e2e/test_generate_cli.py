"""tools/generate.py end to end: consolidated and TP2 x PP2 training checkpoints, prompt files, errors."""
import json
import sys

import pytest

from tests.e2e.conftest import run_cli
from tests.e2e.inference_checkpoints import write_checkpoints

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return write_checkpoints(tmp_path_factory.mktemp("gen_ckpt"))


def test_consolidated_and_tp2pp2_checkpoints_generate_the_same(checkpoints, tmp_path):
    consolidated, training = checkpoints
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("The Python\n\nline one\\nline two\n")
    outs = []
    for load in (consolidated, training):
        out_json = tmp_path / f"{len(outs)}.json"
        proc = run_cli([sys.executable, "tools/generate.py", "--load", load, "--device", "cpu", "--prompt", "x",
                        "--prompt-file", str(prompts), "--max-new-tokens", "12", "--greedy", "--logprobs",
                        "--json", str(out_json)], timeout=120)
        assert proc.stdout.count("--- prompt ") == 3
        outs.append(json.loads(out_json.read_text()))
    assert outs[0] == outs[1]
    assert [r["prompt"] for r in outs[0]] == ["x", "The Python", "line one\nline two"]
    for r in outs[0]:
        assert len(r["tokens"]) == r["prompt_tokens"] + 12 or r["finish_reason"] == "eod"
        assert len(r["logprobs"]) == len(r["tokens"]) - 1


def test_jsonl_prompts_sampling_and_errors(checkpoints, tmp_path):
    consolidated, _ = checkpoints
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "ab"}) + "\n" + json.dumps({"text": "cd"}) + "\n")
    results = []
    for run in range(2):  # the same seed samples the same continuations
        out_json = tmp_path / f"run{run}.json"
        run_cli([sys.executable, "tools/generate.py", "--load", consolidated, "--prompt-file", str(prompts),
                 "--max-new-tokens", "6", "--top-p", "0.9", "--seed", "3", "--json", str(out_json)], timeout=120)
        results.append(json.loads(out_json.read_text()))
    assert results[0] == results[1]
    assert [r["prompt"] for r in results[0]] == ["ab", "cd"]
    bad = run_cli([sys.executable, "tools/generate.py", "--load", consolidated, "--prompt", "x",
                   "--max-new-tokens", "500"], check=False, timeout=120)
    assert bad.returncode == 1 and "max-position-embeddings 128" in bad.stderr
    missing = run_cli([sys.executable, "tools/generate.py", "--load", str(tmp_path / "nope"), "--prompt", "x"],
                      check=False, timeout=120)
    assert missing.returncode == 1 and "no such directory" in missing.stderr
