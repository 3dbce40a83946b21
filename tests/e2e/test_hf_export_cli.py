"""``tools/convert_checkpoint.py --to-hf`` from a TP2 x PP2 training checkpoint and from a consolidated one: the
same weights, files that import only torch + transformers, and a clean interpreter that loads the export with
``trust_remote_code=True`` (never importing megatron_ls), gives our logits, tokenizes like ByteTokenizer and
generates with the Long-Short cache."""
from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest
import torch

from tests.e2e.conftest import run_cli
from tests.e2e.inference_checkpoints import write_checkpoints

pytestmark = pytest.mark.e2e

REMOTE = ("configuration_megatron_ls.py", "modeling_megatron_ls.py", "cache_megatron_ls.py")

CLEAN_LOAD = r"""
import os, sys, torch
os.environ["HF_HUB_OFFLINE"] = "1"
from transformers import AutoModelForCausalLM, AutoTokenizer
path, tokens_file, out_file = sys.argv[1:4]
model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)
tok = AutoTokenizer.from_pretrained(path, trust_remote_code=True)
tokens = torch.load(tokens_file, weights_only=True)
with torch.no_grad():
    logits = model(tokens).logits
enc = tok(["hello world", "h"], return_tensors="pt", padding=True)
gen = model.generate(**enc, max_new_tokens=20, do_sample=False, return_dict_in_generate=True)
torch.save({"logits": logits, "ids": enc["input_ids"], "gen": gen.sequences,
            "cache": type(gen.past_key_values).__name__, "text": tok.decode(tok("héllo")["input_ids"])}, out_file)
assert "megatron_ls" not in sys.modules, "the export imported megatron_ls"
print("clean load ok")
"""


def _imports(path: Path) -> set:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.slow
def test_to_hf_from_any_layout_loads_in_a_clean_interpreter(tmp_path):
    from safetensors.torch import load_file

    from megatron_ls.inference.checkpoint_io import load_gpt_model

    consolidated, training = write_checkpoints(tmp_path)
    convert = [sys.executable, "tools/convert_checkpoint.py"]
    proc = run_cli([*convert, "--load", training, "--to-hf", str(tmp_path / "hf_tp2pp2"), "--consolidated-dir",
                    str(tmp_path / "merged")])
    assert "wrote hugging face" in proc.stdout and "ByteTokenizer" in proc.stdout
    # a consolidated checkpoint without a recorded tokenizer needs the flag; one written by the converter not
    proc = run_cli([*convert, "--load", consolidated, "--to-hf", str(tmp_path / "hf_cons")])
    assert "tokenizer: unknown" in proc.stdout and not (tmp_path / "hf_cons" / "tokenizer.json").exists()
    run_cli([*convert, "--load", consolidated, "--to-hf", str(tmp_path / "hf_cons"), "--tokenizer-type",
             "ByteTokenizer"])
    run_cli([*convert, "--load", str(tmp_path / "merged"), "--to-hf", str(tmp_path / "hf_merged")])
    a = load_file(tmp_path / "hf_tp2pp2" / "model.safetensors")
    tokenizer_json = (tmp_path / "hf_tp2pp2" / "tokenizer.json").read_text()
    for other in ("hf_cons", "hf_merged"):
        b = load_file(tmp_path / other / "model.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), other
        assert (tmp_path / other / "tokenizer.json").read_text() == tokenizer_json, other
    assert "lm_head.weight" not in a  # tied to model.embed_tokens.weight
    hf = tmp_path / "hf_tp2pp2"
    assert {p.name for p in hf.iterdir()} == {"config.json", "model.safetensors", "generation_config.json",
                                              "tokenizer.json", "tokenizer_config.json", *REMOTE}
    for name in REMOTE:
        assert _imports(hf / name) <= {"__future__", "dataclasses", "typing", "torch", "transformers"}, name

    ours, _, _ = load_gpt_model(consolidated)
    tokens = torch.randint(0, 384, (2, 50), generator=torch.Generator().manual_seed(0))
    torch.save(tokens, tmp_path / "tokens.pt")
    script = tmp_path / "clean_load.py"
    script.write_text(CLEAN_LOAD)
    proc = run_cli([sys.executable, str(script), str(hf), str(tmp_path / "tokens.pt"), str(tmp_path / "out.pt")],
                   timeout=300)
    assert "clean load ok" in proc.stdout
    out = torch.load(tmp_path / "out.pt", weights_only=True)
    with torch.no_grad():
        torch.testing.assert_close(out["logits"], ours(tokens), rtol=1e-5, atol=1e-4)
    assert out["cache"] == "LongShortCache" and out["text"] == "héllo"
    assert out["ids"][0].tolist() == list(b"hello world") and out["ids"][1].tolist() == [256] * 10 + [ord("h")]
    for row, prompt in enumerate((b"hello world", b"h")):
        seq = torch.tensor([list(prompt)])
        with torch.no_grad():
            for _ in range(20):
                nxt = ours(seq)[:, -1:].argmax(-1)
                seq = torch.cat([seq, nxt], dim=1)
                if int(nxt) == 256:
                    break
        got = out["gen"][row, 11:].tolist()
        assert got[:seq.shape[1] - len(prompt)] == seq[0, len(prompt):].tolist()


def test_to_hf_errors_are_clear(tmp_path):
    consolidated, _ = write_checkpoints(tmp_path)
    proc = run_cli([sys.executable, "tools/convert_checkpoint.py", "--load", consolidated, "--save",
                    str(tmp_path / "x")], check=False)
    assert proc.returncode == 1 and "consolidated checkpoint" in proc.stderr
    proc = run_cli([sys.executable, "tools/convert_checkpoint.py", "--load", str(tmp_path / "missing"), "--to-hf",
                    str(tmp_path / "y")], check=False)
    assert proc.returncode == 1 and "missing" in proc.stderr and not (tmp_path / "y").exists()
    proc = run_cli([sys.executable, "tools/convert_checkpoint.py", "--load", consolidated], check=False)
    assert proc.returncode == 2 and "--to-hf" in proc.stderr
