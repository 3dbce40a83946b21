"""GPT-LS with Megatron-LM's Llama-style flags (--normalization RMSNorm --swiglu --disable-bias-linear
--untie-embeddings-and-output-weights, RoPE) end to end: TP2 with sequence parallelism and PP2 reproduce one process
(fp32, dropout off); a PP2 checkpoint (ZeRO-1; its untied output layer is a pipeline layer of its own) re-shards to TP2
with its optimizer state and the resumed run continues the one-process loss curve."""
from __future__ import annotations

import sys

import pytest

from tests.e2e.conftest import iteration_losses, pretrain_cmd, run_cli

pytestmark = [pytest.mark.e2e, pytest.mark.distributed]

LLAMA = ["--normalization", "RMSNorm", "--swiglu", "--disable-bias-linear", "--untie-embeddings-and-output-weights",
         "--position-embedding-type", "rope"]
FLAGS = [*LLAMA, "--num-layers", "2", "--full-attention-layers", "1", "--hidden-dropout", "0",
         "--attention-dropout", "0", "--train-iters", "4", "--global-batch-size", "8", "--micro-batch-size", "2"]


def _cmd(corpus: str, nproc: int, tp: int, *extra: str) -> list:
    cmd = pretrain_cmd(corpus, *FLAGS, "--make-vocab-size-divisible-by", str(256 // tp), *extra)
    if nproc == 1:
        return cmd
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), *cmd[1:]]


def _assert_same(losses: dict, reference: dict, what: str) -> None:
    assert losses and all(it in reference for it in losses), (what, losses)
    for it, value in losses.items():
        assert value == pytest.approx(reference[it], rel=2e-5), (what, it, value, reference[it])


@pytest.fixture(scope="module")
def reference(corpus_prefix) -> dict:
    out = run_cli(_cmd(corpus_prefix, 1, 1)).stdout
    losses = iteration_losses(out)
    assert sorted(losses) == [1, 2, 3, 4]
    return losses


def test_tp2_with_sequence_parallelism_matches_one_process(corpus_prefix, reference):
    out = run_cli(_cmd(corpus_prefix, 2, 2, "--tensor-model-parallel-size", "2", "--sequence-parallel"),
                  timeout=400).stdout
    _assert_same(iteration_losses(out), reference, "tp2+sp")


def test_pp2_checkpoint_reshards_to_tp2_and_continues(corpus_prefix, reference, tmp_path):
    from megatron_ls.inference.checkpoint_io import load_gpt_model

    ckpt, tp2 = tmp_path / "pp2", tmp_path / "tp2"
    first = run_cli(_cmd(corpus_prefix, 2, 1, "--pipeline-model-parallel-size", "2", "--zero-stage", "1", "--save",
                         str(ckpt), "--exit-interval", "2"), timeout=400).stdout
    assert (ckpt / "iter_0000002" / "layer_04-model_00-model_states.pt").exists()  # 0 embed, 1-2, 3 norm, 4 head
    run_cli([sys.executable, "tools/convert_checkpoint.py", "--load", str(ckpt), "--save", str(tp2),
             "--target-tensor-parallel-size", "2", "--target-pipeline-model-parallel-size", "1",
             "--consolidated-dir", str(tmp_path / "full")])
    resumed = run_cli(_cmd(corpus_prefix, 2, 2, "--tensor-model-parallel-size", "2", "--load", str(tp2)),
                      timeout=400).stdout
    assert sorted(iteration_losses(resumed)) == [3, 4]
    _assert_same({**iteration_losses(first), **iteration_losses(resumed)}, reference, "pp2 -> tp2 resume")
    model, _, _ = load_gpt_model(str(tmp_path / "full"))
    names = dict(model.named_parameters())
    assert "output_layer.weight" in names and "layers.0.mlp.dense_h_to_4h_gate.weight" in names
    assert not any(name.endswith(".bias") for name in names if ".mlp." in name or ".qkvp." in name)
    assert not model.output_layer.weight.data_ptr() == model.embedding.word_embeddings.weight.data_ptr()
