"""full_attention, a tiny GPT-LS and one DeepSpeed training run on CUDA.

full_attention against the dense float64 definition (values and gradients, padding); GPTModel with the flex
backend against the torch backend in fp32, and bf16 (autocast, and bf16 weights as DeepSpeed keeps them) against
fp32; ``pretrain_gpt_ls.py --bf16`` for two iterations when DeepSpeed is importable.
"""
from __future__ import annotations

import copy
import importlib.util
import math
import os
import subprocess
import sys

import pytest
import torch

from megatron_ls.config import TransformerConfig
from megatron_ls.model import GPTModel
from megatron_ls.ops import full_attention
from tests.cuda.helpers import CUDA_MARKS, DEVICE, HAS_CUDA, REPO, assert_close_rel, need_gpu

from ls_reference import dense_full  # noqa: E402  (tests/unit/ops, see helpers)

pytestmark = CUDA_MARKS
TOL = {torch.float32: ((1e-4, 1e-3), (3e-4, 3e-3)), torch.bfloat16: ((3e-2, 1e-1), (6e-2, 2e-1))}


@pytest.fixture(autouse=True)
def _no_tf32():
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = old


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("padded", [False, True])
def test_full_attention_matches_dense(dtype, causal, padded):
    b, h, n, d = 2, 3, 300, 64
    g = torch.Generator().manual_seed(0)
    q, k, v, g_out = (torch.randn(b, h, n, d, generator=g).to(dtype).double() for _ in range(4))
    pad = None
    if padded:
        pad = torch.zeros(b, n, dtype=torch.bool)
        pad[0, :40] = True  # left padding
        pad[1, ::5] = True  # holes
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = dense_full(*leaves, causal=causal, key_padding_mask=pad)
    ref_grads = torch.autograd.grad(ref, leaves, g_out)
    dev = [t.to(DEVICE, dtype).requires_grad_() for t in (q, k, v)]
    out = full_attention(*dev, causal=causal, key_padding_mask=None if pad is None else pad.to(DEVICE))
    grads = torch.autograd.grad(out, dev, g_out.to(DEVICE, dtype))
    ctx = f"[{dtype} causal={causal} padded={padded}]"
    (vt, vr), (gt, gr) = TOL[dtype]
    assert out.dtype == dtype
    assert_close_rel("output", out, ref, rel=vt, row_rel=vr, context=ctx)
    for name, got, want in zip("qkv", grads, ref_grads):
        assert_close_rel(f"grad {name}", got, want, rel=gt, row_rel=gr, context=ctx)


def _config(backend: str) -> TransformerConfig:
    # layer 1 is a full-attention (MASFormer) layer; d = 128 / 4 = 32 lets backend="auto" pick flex on CUDA
    return TransformerConfig(num_layers=3, hidden_size=128, num_attention_heads=4, vocab_size=256, seq_length=600,
                             max_position_embeddings=600, window_size=64, segment_length=16, projection_rank=1,
                             full_attention_layers=(1,), hidden_dropout=0.0, attention_dropout=0.0,
                             attention_backend=backend, seed=11)


def _tokens(b=2, n=600, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (b, n + 1), generator=g).to(DEVICE)


def _loss_and_grads(model, tokens, autocast=False):
    model.zero_grad(set_to_none=True)
    with torch.autocast(device_type=DEVICE.type, dtype=torch.bfloat16, enabled=autocast):
        loss = model(tokens[:, :-1], tokens[:, 1:]).mean()
    loss.backward()
    return loss.detach().float(), {n: p.grad.detach().float() for n, p in model.named_parameters()}


def test_gpt_flex_matches_torch_backend():
    """The same GPT-LS (same seed, same weights) with the flex and the torch backend: logits and every gradient."""
    tokens = _tokens()
    ref = GPTModel(_config("torch")).to(DEVICE)
    flex = GPTModel(_config("flex")).to(DEVICE)
    for (na, a), (nb, b) in zip(ref.state_dict().items(), flex.state_dict().items()):
        assert na == nb and torch.equal(a, b), f"seeded init differs at {na}"
    if not HAS_CUDA:  # CPU flex has no backward: compare logits only
        with torch.no_grad():
            x = tokens[:, :-1]
            assert_close_rel("logits", flex(x), ref(x), rel=1e-5, row_rel=1e-4, context="[cpu]")
        need_gpu("the flex backward")
    ref_loss, ref_grads = _loss_and_grads(ref, tokens)
    loss, grads = _loss_and_grads(flex, tokens)
    assert abs(float(loss) - float(ref_loss)) <= 1e-5 * abs(float(ref_loss)), (float(loss), float(ref_loss))
    for name, want in ref_grads.items():
        assert_close_rel(f"grad {name}", grads[name], want, rel=1e-3, context="[flex vs torch, fp32]")


@pytest.mark.parametrize("how", ["autocast", "bf16-weights"])
def test_gpt_bf16_close_to_fp32(how):
    """bf16 training math (autocast, or bf16 weights as DeepSpeed --bf16 keeps them) stays close to fp32."""
    tokens = _tokens(seed=1)
    model = GPTModel(_config("auto")).to(DEVICE)
    ref_loss, ref_grads = _loss_and_grads(model, tokens)
    if how == "autocast":
        loss, grads = _loss_and_grads(model, tokens, autocast=True)
    else:
        loss, grads = _loss_and_grads(copy.deepcopy(model).to(torch.bfloat16), tokens)
    assert math.isfinite(float(loss))
    assert abs(float(loss) - float(ref_loss)) <= 2e-2 * abs(float(ref_loss)), (float(loss), float(ref_loss))
    flat = torch.cat([grads[n].flatten() for n in ref_grads])
    flat_ref = torch.cat([g.flatten() for g in ref_grads.values()])
    # whole-model and per-parameter relative error; bf16 weights leave small, cancelling gradients (LN biases) at
    # ~0.3 on CPU, while a wrong or missing backward gives >= 1
    overall, each = (5e-2, 0.2) if how == "autocast" else (0.1, 0.8)
    assert_close_rel("all gradients", flat, flat_ref, rel=overall, context=f"[{how}]")
    for name, want in ref_grads.items():
        assert_close_rel(f"grad {name}", grads[name], want, rel=each, context=f"[{how}]")


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed is not importable")
def test_pretrain_one_step_bf16(tmp_path):
    """pretrain_gpt_ls.py --bf16 trains two iterations with DeepSpeed on the device; losses are finite."""
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    if HAS_CUDA:
        env.pop("DS_ACCELERATOR", None)  # let DeepSpeed pick its CUDA accelerator
    else:
        env["DS_ACCELERATOR"] = "cpu"
    run = dict(cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    corpus = subprocess.run([sys.executable, "tools/prepare_sample_corpus.py", "--output-dir", str(tmp_path)],
                            **run)
    assert corpus.returncode == 0, corpus.stdout + corpus.stderr
    cmd = [sys.executable, "pretrain_gpt_ls.py", "--data-path", str(tmp_path / "python_docs_text_document"),
           "--tokenizer-type", "ByteTokenizer", "--num-layers", "2", "--hidden-size", "64",
           "--num-attention-heads", "4", "--seq-length", "256", "--window-size", "32", "--segment-length", "16",
           "--projection-rank", "1", "--full-attention-layers", "1", "--micro-batch-size", "2",
           "--global-batch-size", "2", "--lr", "1e-3", "--train-iters", "2", "--log-interval", "1",
           "--eval-interval", "2", "--eval-iters", "1", "--split", "90,8,2", "--bf16", "--seed", "5"]
    proc = subprocess.run(cmd, **run)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-6000:]
    losses = [float(line.split("lm loss:")[1].split("|")[0]) for line in proc.stdout.splitlines()
              if " iteration " in line and "lm loss:" in line]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses), log[-6000:]
    if HAS_CUDA:
        assert "accelerator to cpu" not in log.lower(), "DeepSpeed fell back to its CPU accelerator"
