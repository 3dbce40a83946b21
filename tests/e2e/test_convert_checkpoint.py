"""Checkpoint conversion: a TP=2 checkpoint re-sharded to TP=1 (and consolidated) gives the TP=2 model's logits;
a TP2 x PP2 checkpoint round-trips through conversion and trains again from the re-sharded files."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from tests.e2e.conftest import REPO, iteration_losses, pretrain_cmd, run_cli

pytestmark = [pytest.mark.e2e, pytest.mark.distributed]

SMALL = ["--num-layers", "2", "--full-attention-layers", "1", "--train-iters", "2", "--hidden-dropout", "0",
         "--attention-dropout", "0", "--make-vocab-size-divisible-by", "64"]


def _torchrun(nproc, *args):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), *args]


def test_tp2_to_tp1_and_consolidated_give_the_same_logits(corpus_prefix, tmp_path):
    from megatron_ls.inference.checkpoint_io import load_gpt_model

    ckpt = tmp_path / "tp2"
    run_cli(_torchrun(2, *pretrain_cmd(corpus_prefix, *SMALL, "--tensor-model-parallel-size", "2",
                                       "--save", str(ckpt))[1:]), timeout=300)
    out = tmp_path / "tp2_logits.pt"
    run_cli(_torchrun(2, str(REPO / "tests/e2e/workers/tp_logits.py"), str(ckpt), str(out)))
    reference = torch.load(out, weights_only=True)

    run_cli([sys.executable, "tools/convert_checkpoint.py", "--load", str(ckpt), "--save", str(tmp_path / "tp1"),
             "--consolidated-dir", str(tmp_path / "full")])
    for path in (tmp_path / "tp1", tmp_path / "full"):
        model, config, _ = load_gpt_model(str(path))
        assert config.vocab_size == reference["logits"].shape[-1]
        with torch.no_grad():
            logits = model(reference["tokens"])
        torch.testing.assert_close(logits, reference["logits"], rtol=1e-5, atol=1e-5)
    assert (tmp_path / "full" / "model.safetensors").exists() and (tmp_path / "full" / "config.json").exists()


def test_tp2pp2_checkpoint_reshards_and_trains_again(corpus_prefix, tmp_path):
    from megatron_ls.inference.checkpoint_io import load_gpt_model

    flags = ["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2"]
    ckpt = tmp_path / "tp2pp2"
    run_cli(_torchrun(4, *pretrain_cmd(corpus_prefix, *SMALL, *flags, "--save", str(ckpt))[1:]), timeout=400)
    run_cli([sys.executable, "tools/convert_checkpoint.py", "--load", str(ckpt), "--consolidated-dir",
             str(tmp_path / "full"), "--save", str(tmp_path / "pp2"), "--target-pipeline-model-parallel-size", "2",
             "--target-tensor-parallel-size", "1"])
    # Re-sharded to TP1 x PP2 (same padded vocab: 64 x 2 = 128 x 1) and trained from it.
    proc = run_cli(_torchrun(2, *pretrain_cmd(corpus_prefix, *SMALL, "--pipeline-model-parallel-size", "2",
                                              "--make-vocab-size-divisible-by", "128", "--load",
                                              str(tmp_path / "pp2"), "--finetune")[1:]), timeout=300)
    assert "loaded checkpoint" in proc.stdout and len(iteration_losses(proc.stdout)) >= 1
    # Converting the re-sharded checkpoint back gives the same full weights.
    run_cli([sys.executable, "tools/convert_checkpoint.py", "--load", str(tmp_path / "pp2"), "--consolidated-dir",
             str(tmp_path / "full2")])
    a, _, _ = load_gpt_model(str(tmp_path / "full"))
    b, _, _ = load_gpt_model(str(tmp_path / "full2"))
    for (name, p), (_, q) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(p, q), name


def test_convert_errors_are_clear(tmp_path):
    proc = run_cli([sys.executable, "tools/convert_checkpoint.py", "--load", str(tmp_path / "nothing"),
                    "--consolidated-dir", str(tmp_path / "x")], check=False)
    assert proc.returncode != 0 and "nothing" in proc.stderr
    assert not Path(tmp_path / "x").exists()
