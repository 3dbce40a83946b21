"""At TP=1 (no process groups) the parallel layers are exactly nn.Linear / nn.Embedding / cross_entropy."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from megatron_ls.parallel import (ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding,
                                  parallel_lm_logits, vocab_parallel_cross_entropy)
from megatron_ls.parallel.init import init_method_normal, scaled_init_method_normal
from megatron_ls.parallel.layers import param_is_tensor_parallel


def _reference_linear(seed: int, n_in: int, n_out: int, std: float = 0.02) -> torch.nn.Linear:
    ref = torch.nn.Linear(n_in, n_out)
    torch.manual_seed(seed)
    torch.nn.init.normal_(ref.weight, 0.0, std)
    torch.nn.init.zeros_(ref.bias)
    return ref


@pytest.mark.parametrize("cls", [ColumnParallelLinear, RowParallelLinear])
def test_linear_is_nn_linear(cls: type) -> None:
    torch.manual_seed(3)
    layer = cls(7, 5)
    ref = _reference_linear(3, 7, 5)
    assert torch.equal(layer.weight, ref.weight) and torch.equal(layer.bias, ref.bias)
    x = torch.randn(2, 4, 7, requires_grad=True)
    xr = x.detach().clone().requires_grad_(True)
    y, yr = layer(x), ref(xr)
    assert torch.equal(y, yr)
    g = torch.randn_like(y)
    (y * g).sum().backward()
    (yr * g).sum().backward()
    assert torch.equal(x.grad, xr.grad)
    assert torch.equal(layer.weight.grad, ref.weight.grad) and torch.equal(layer.bias.grad, ref.bias.grad)


def test_linear_options_and_attributes() -> None:
    torch.manual_seed(0)
    col = ColumnParallelLinear(4, 6, bias=False, gather_output=True, init_method=init_method_normal(1.0))
    row = RowParallelLinear(6, 4, input_is_parallel=False, init_method=scaled_init_method_normal(1.0, 2))
    assert col.bias is None and "bias" not in dict(col.named_parameters())
    assert param_is_tensor_parallel(col.weight) and col.weight.partition_dim == 0
    assert param_is_tensor_parallel(row.weight) and row.weight.partition_dim == 1
    assert row.weight.partition_stride == 1 and not param_is_tensor_parallel(row.bias)
    torch.manual_seed(0)
    w1 = torch.empty(6, 4).normal_(0, 1.0)
    w2 = torch.empty(4, 6).normal_(0, 0.5)  # 1.0 / sqrt(2 * 2)
    assert torch.equal(col.weight, w1) and torch.equal(row.weight, w2)
    x = torch.randn(3, 4)
    assert torch.allclose(row(col(x)), x @ w1.T @ w2.T, atol=1e-6)


def test_params_dtype_keeps_fp32_init() -> None:
    torch.manual_seed(1)
    layer = ColumnParallelLinear(8, 8, params_dtype=torch.bfloat16)
    torch.manual_seed(1)
    full = torch.empty(8, 8).normal_(0, 0.02)
    assert layer.weight.dtype == torch.bfloat16 and torch.equal(layer.weight, full.to(torch.bfloat16))


def test_embedding_is_nn_embedding() -> None:
    torch.manual_seed(5)
    emb = VocabParallelEmbedding(11, 4)
    ref = torch.nn.Embedding(11, 4)
    torch.manual_seed(5)
    torch.nn.init.normal_(ref.weight, 0.0, 0.02)
    assert torch.equal(emb.weight, ref.weight) and emb.weight.partition_dim == 0
    ids = torch.tensor([[0, 10, 3], [3, 3, 7]])
    out, out_ref = emb(ids), ref(ids)
    assert torch.equal(out, out_ref)
    out.pow(2).sum().backward()
    out_ref.pow(2).sum().backward()
    assert torch.equal(emb.weight.grad, ref.weight.grad)


def test_lm_logits_and_cross_entropy_match_dense() -> None:
    torch.manual_seed(0)
    h = torch.randn(2, 5, 4, requires_grad=True)
    w = torch.randn(9, 4, requires_grad=True)
    target = torch.randint(0, 9, (2, 5))
    loss = vocab_parallel_cross_entropy(parallel_lm_logits(h, w), target)
    h2, w2 = h.detach().clone().requires_grad_(True), w.detach().clone().requires_grad_(True)
    ref = F.cross_entropy(F.linear(h2, w2).reshape(-1, 9), target.reshape(-1), reduction="none").reshape(2, 5)
    assert loss.shape == (2, 5) and loss.dtype == torch.float32
    assert torch.allclose(loss, ref, atol=1e-6)
    weights = torch.rand(2, 5)
    (loss * weights).sum().backward()
    (ref * weights).sum().backward()
    assert torch.allclose(h.grad, h2.grad, atol=1e-6) and torch.allclose(w.grad, w2.grad, atol=1e-6)


def test_cross_entropy_low_precision_computes_in_fp32() -> None:
    torch.manual_seed(0)
    logits = (torch.randn(4, 33) * 20).to(torch.bfloat16).requires_grad_(True)
    target = torch.randint(0, 33, (4,))
    loss = vocab_parallel_cross_entropy(logits, target)
    ref = F.cross_entropy(logits.detach().float(), target, reduction="none")
    assert loss.dtype == torch.float32 and torch.allclose(loss, ref, atol=1e-5)
    loss.sum().backward()
    assert logits.grad.dtype == torch.bfloat16
    want = torch.softmax(logits.detach().float(), -1) - F.one_hot(target, 33).float()
    assert torch.allclose(logits.grad.float(), want, atol=1e-2)


def test_cross_entropy_shape_error() -> None:
    with pytest.raises(ValueError, match=r"target shape \(3,\) does not match logits shape \(2, 5\)"):
        vocab_parallel_cross_entropy(torch.randn(2, 5), torch.zeros(3, dtype=torch.long))
