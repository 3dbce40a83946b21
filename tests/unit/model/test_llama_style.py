"""Megatron-LM's Llama-style GPT flags on one process: RMSNorm and SwiGLU compute their formulas, biases go,
the untied head is its own seeded matrix, defaults follow Megatron, and wrong uses fail naming the flag."""
import pytest
import torch
import torch.nn.functional as F

from megatron_ls.arguments import parse_args
from megatron_ls.config import TransformerConfig
from megatron_ls.model import GPTModel
from megatron_ls.parallel.sequence_parallel import RMSNorm

BASE = dict(num_layers=2, hidden_size=96, num_attention_heads=4, seq_length=32, window_size=16, segment_length=8,
            projection_rank=1, hidden_dropout=0.0, attention_dropout=0.0, attention_backend="torch")


def test_rms_norm_formula_and_half_precision():
    norm = RMSNorm(8, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.arange(1.0, 9.0))
    x = torch.randn(3, 5, 8, generator=torch.Generator().manual_seed(0))
    want = x / torch.sqrt(x.square().mean(-1, keepdim=True) + 1e-6) * torch.arange(1.0, 9.0)
    torch.testing.assert_close(norm(x), want)
    half = norm(x.bfloat16())
    assert half.dtype == torch.bfloat16 and torch.allclose(half.float(), want, rtol=2e-2, atol=2e-2)


def test_swiglu_mlp_bias_and_untied_head():
    config = TransformerConfig(**BASE, normalization="RMSNorm", swiglu=True, add_bias_linear=False,
                               untie_embeddings_and_output_weights=True)
    assert config.ffn_hidden_size == 256  # Megatron: int(4 * 96 * 2 / 3 / 64) * 64
    model = GPTModel(config).eval()
    names = dict(model.named_parameters())
    assert not [n for n in names if n.endswith("bias") and ("qkvp" in n or "dense" in n)]
    assert isinstance(model.layers[0].input_layernorm, RMSNorm) and isinstance(model.final_layernorm, RMSNorm)
    mlp, x = model.layers[0].mlp, torch.randn(2, 4, 96)
    want = F.silu(x @ mlp.dense_h_to_4h_gate.weight.T) * (x @ mlp.dense_h_to_4h.weight.T) @ mlp.dense_4h_to_h.weight.T
    torch.testing.assert_close(mlp(x), want)
    tokens = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(1))
    h = model.final_layernorm(model._run_layers(0, 2)(model.embedding(tokens)))
    torch.testing.assert_close(model(tokens), h @ model.output_layer.weight.T)  # the untied matrix is the head
    assert not torch.equal(model.output_layer.weight, model.embedding.word_embeddings.weight)
    again = GPTModel(TransformerConfig(**BASE, untie_embeddings_and_output_weights=True))
    assert torch.equal(again.output_layer.weight, GPTModel(TransformerConfig(
        **BASE, untie_embeddings_and_output_weights=True)).output_layer.weight)  # seeded: layout independent
    tied = GPTModel(TransformerConfig(**BASE))
    assert tied.output_layer is None and "layers.0.mlp.dense_h_to_4h.bias" in dict(tied.named_parameters())
    # the untied head does not shift the other modules' seeded weights
    assert torch.equal(tied.layers[1].mlp.dense_4h_to_h.weight, again.layers[1].mlp.dense_4h_to_h.weight)


def test_flags_and_errors(capsys):
    args = parse_args(["--data-path", "x", "--normalization", "RMSNorm", "--swiglu", "--disable-bias-linear",
                       "--untie-embeddings-and-output-weights", "--hidden-size", "128"])
    m = args.model
    assert (m.normalization, m.swiglu, m.add_bias_linear, m.untie_embeddings_and_output_weights) == \
        ("RMSNorm", True, False, True)
    assert m.ffn_hidden_size == 320
    with pytest.raises(SystemExit):
        parse_args(["--data-path", "x", "--swiglu", "--hidden-size", "16", "--num-attention-heads", "2"])
    assert "--ffn-hidden-size must be positive, got 0 (the --swiglu default for this --hidden-size; set it)" in \
        capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_args(["--data-path", "x", "--normalization", "rmsnorm"])
    assert "RMSNorm" in capsys.readouterr().err  # the nearest choice is named


def test_resume_refuses_another_architecture(tmp_path):
    import json

    from megatron_ls.checkpoint_files import CheckpointError
    from megatron_ls.training.checkpointing import check_compatible

    config = TransformerConfig(**BASE, normalization="RMSNorm", add_bias_linear=False)
    (tmp_path / "iter_0000002").mkdir()
    (tmp_path / "latest").write_text("iter_0000002\n")
    saved = {"normalization": "LayerNorm", "add_bias_linear": True, "swiglu": False}
    (tmp_path / "iter_0000002" / "megatron_ls.json").write_text(json.dumps({"iteration": 2, "consumed_samples": 8,
                                                                                "args": {"model": saved}}))
    with pytest.raises(CheckpointError, match="--normalization is RMSNorm here but LayerNorm in the checkpoint; "
                                              "--disable-bias-linear is given here but not given in the checkpoint"):
        check_compatible(str(tmp_path), config, finetune=True)  # shapes: not even --finetune loads them


def test_parameters_norm_on_one_process_is_the_plain_l2_norm():
    from megatron_ls.training.steps import parameters_norm

    model = GPTModel(TransformerConfig(**BASE, untie_embeddings_and_output_weights=True))
    want = torch.sqrt(sum(p.detach().double().pow(2).sum() for p in model.parameters()))
    assert parameters_norm(model) == pytest.approx(float(want), rel=1e-12)
