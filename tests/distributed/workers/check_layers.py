"""Each TP layer against its dense twin: same seed -> same full weight; outputs and all gradients match."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from _common import assert_close
from megatron_ls.parallel import state
from megatron_ls.parallel.comm_stats import CommCounter
from megatron_ls.parallel.cross_entropy import vocab_parallel_cross_entropy
from megatron_ls.parallel.init import init_method_normal
from megatron_ls.parallel.layers import (ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding,
                                         parallel_lm_logits)
from megatron_ls.parallel.mappings import (gather_from_tensor_model_parallel_region,
                                           scatter_to_tensor_model_parallel_region)

B, S, H, FFN, V = 2, 3, 8, 16, 12
DT = torch.float64


def _rand(*shape: int, seed: int, dtype: torch.dtype = DT, requires_grad: bool = False) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float32).to(dtype).requires_grad_(requires_grad)


def _dense_weight(rows: int, cols: int, seed: int, std: float = 0.02) -> torch.Tensor:
    """The full weight a layer built right after ``torch.manual_seed(seed)`` must have."""
    torch.manual_seed(seed)
    w = torch.empty(rows, cols)
    init_method_normal(std)(w)
    return w.to(DT).requires_grad_(True)


def _tp() -> tuple[int, int]:
    return state.get_tensor_model_parallel_rank(), state.get_tensor_model_parallel_world_size()


def _rows(t: torch.Tensor, dim: int) -> torch.Tensor:
    rank, world = _tp()
    n = t.size(dim) // world
    return t.narrow(dim, rank * n, n)


def check_column() -> None:
    for gather in (False, True):
        torch.manual_seed(11)
        layer = ColumnParallelLinear(H, FFN, gather_output=gather, params_dtype=DT)
        w = _dense_weight(FFN, H, 11)
        assert layer.weight.tensor_model_parallel and layer.weight.partition_dim == 0
        assert layer.weight.partition_stride == 1
        assert_close(layer.weight.detach(), _rows(w.detach(), 0), f"column weight shard (gather={gather})")
        x = _rand(B, S, H, seed=1, requires_grad=True)
        xd = x.detach().clone().requires_grad_(True)
        gy = _rand(B, S, FFN, seed=2)
        y = layer(x)
        yd = F.linear(xd, w)
        if gather:
            assert_close(y, yd, "column gathered output")
            (y * gy).sum().backward()
        else:
            assert_close(y, _rows(yd, -1), "column local output")
            (y * _rows(gy, -1)).sum().backward()
        (yd * gy).sum().backward()
        assert_close(x.grad, xd.grad, f"column input grad (gather={gather})")
        assert_close(layer.weight.grad, _rows(w.grad, 0), f"column weight grad (gather={gather})")
        assert_close(layer.bias.grad, _rows(gy.sum((0, 1)), 0), f"column bias grad (gather={gather})")


def check_row() -> None:
    for parallel_input in (True, False):
        torch.manual_seed(12)
        layer = RowParallelLinear(FFN, H, input_is_parallel=parallel_input, params_dtype=DT)
        w = _dense_weight(H, FFN, 12)
        assert layer.weight.tensor_model_parallel and layer.weight.partition_dim == 1
        assert not layer.bias.tensor_model_parallel
        assert_close(layer.weight.detach(), _rows(w.detach(), 1), "row weight shard")
        x_full = _rand(B, S, FFN, seed=3)
        x = (_rows(x_full, -1) if parallel_input else x_full).clone().requires_grad_(True)
        xd = x_full.clone().requires_grad_(True)
        gy = _rand(B, S, H, seed=4)
        y = layer(x)
        yd = F.linear(xd, w)
        assert_close(y, yd, f"row output (input_is_parallel={parallel_input})")
        (y * gy).sum().backward()
        (yd * gy).sum().backward()
        assert_close(x.grad, _rows(xd.grad, -1) if parallel_input else xd.grad, "row input grad")
        assert_close(layer.weight.grad, _rows(w.grad, 1), "row weight grad")
        assert_close(layer.bias.grad, gy.sum((0, 1)), "row bias grad")


def check_mlp_comm_counts() -> None:
    """Column -> GeLU -> Row: exactly one b*s*h all-reduce forward and one backward (Megatron's f/g)."""
    torch.manual_seed(13)
    fc1 = ColumnParallelLinear(H, FFN, params_dtype=torch.float32)
    fc2 = RowParallelLinear(FFN, H, params_dtype=torch.float32)
    torch.manual_seed(13)  # the dense twin draws the two full weights in the same order
    w1, w2 = torch.empty(FFN, H), torch.empty(H, FFN)
    init_method_normal(0.02)(w1)
    init_method_normal(0.02)(w2)
    x = _rand(B, S, H, seed=5, dtype=torch.float32, requires_grad=True)
    with CommCounter() as cc:
        y = fc2(F.gelu(fc1(x)))
        fwd = dict(cc.calls)
        y.sum().backward()
    assert_close(y, F.linear(F.gelu(F.linear(x, w1)), w2), "column->row MLP output", atol=1e-6, rtol=1e-5)
    _, world = _tp()
    if world == 1:
        assert cc.count() == 0, cc
        return
    assert fwd == {("all_reduce", "forward"): 1}, cc
    assert cc.count("all_reduce", "forward") == 1 and cc.count("all_reduce", "backward") == 1, cc
    assert cc.count() == 2, cc
    assert cc.total_elements("all_reduce", "forward") == B * S * H, cc
    assert cc.total_bytes("all_reduce", "forward") == 4 * B * S * H, cc
    assert cc.total_bytes("all_reduce", "backward") == 4 * B * S * H, cc


def check_embedding_and_lm_head() -> None:
    torch.manual_seed(14)
    emb = VocabParallelEmbedding(V, H, params_dtype=DT)
    w = _dense_weight(V, H, 14)
    assert emb.weight.tensor_model_parallel and emb.weight.partition_dim == 0
    assert_close(emb.weight.detach(), _rows(w.detach(), 0), "embedding shard")
    g = torch.Generator().manual_seed(6)
    ids = torch.randint(0, V, (B, S), generator=g)
    ids[0, 0], ids[-1, -1] = 0, V - 1  # both ends of the vocabulary
    target = torch.randint(0, V, (B, S), generator=g)
    target[0, 1], target[1, 0] = 0, V - 1

    with CommCounter() as cc:
        e = emb(ids)
        emb_calls = cc.count()
        logits = parallel_lm_logits(e, emb.weight)        # tied output layer
        loss = vocab_parallel_cross_entropy(logits, target)
        ce_calls = cc.count() - emb_calls
    ed = F.embedding(ids, w)
    logits_d = F.linear(ed, w)
    loss_d = F.cross_entropy(logits_d.reshape(-1, V), target.reshape(-1), reduction="none").reshape(B, S)
    assert_close(e, ed, "embedding output")
    assert_close(logits, _rows(logits_d, -1), "vocab-parallel logits")
    assert loss.dtype == torch.float32 or DT == torch.float64
    assert_close(loss.double(), loss_d.double(), "vocab-parallel cross entropy", atol=1e-6, rtol=1e-6)
    scale = _rand(B, S, seed=7).abs()
    (loss * scale).sum().backward()
    (loss_d * scale).sum().backward()
    assert_close(emb.weight.grad, _rows(w.grad, 0), "tied embedding weight grad", atol=1e-9, rtol=1e-7)
    _, world = _tp()
    if world > 1:
        assert emb_calls == 1 and cc.total_elements("all_reduce", "forward") == B * S * H + 3 * B * S, cc
        assert ce_calls == 3, cc


def check_cross_entropy_alone() -> None:
    """Random logits with large offsets (stability) in fp32: loss and logits-grad vs dense fp32."""
    full = (_rand(B, S, V, seed=8, dtype=torch.float32) * 30.0 + 50.0)
    target = torch.randint(0, V, (B, S), generator=torch.Generator().manual_seed(9))
    local = _rows(full, -1).clone().requires_grad_(True)
    dense = full.clone().requires_grad_(True)
    loss = vocab_parallel_cross_entropy(local, target)
    loss_d = F.cross_entropy(dense.reshape(-1, V), target.reshape(-1), reduction="none").reshape(B, S)
    assert_close(loss, loss_d, "cross entropy fp32", atol=1e-4, rtol=1e-5)
    loss.mean().backward()
    loss_d.mean().backward()
    assert_close(local.grad, _rows(dense.grad, -1), "cross entropy logits grad", atol=1e-6, rtol=1e-5)


def check_scatter_gather() -> None:
    x = _rand(B, S, H, seed=10, requires_grad=True)
    with CommCounter() as cc:
        y = gather_from_tensor_model_parallel_region(scatter_to_tensor_model_parallel_region(x))
        assert_close(y, x, "gather(scatter(x))")
        gy = _rand(B, S, H, seed=15)
        (y * gy).sum().backward()
    assert_close(x.grad, gy, "scatter/gather backward")
    _, world = _tp()
    if world > 1:
        assert cc.calls == {("all_gather", "forward"): 1, ("all_gather", "backward"): 1}, cc
        assert cc.total_elements("all_gather", "forward") == B * S * H // world, cc


def checks(tag: str) -> list[tuple[str, Callable[[], None]]]:
    """The layer checks, named with the layout ``tag``."""
    return [(f"{tag}:column", check_column), (f"{tag}:row", check_row),
            (f"{tag}:mlp-comm", check_mlp_comm_counts), (f"{tag}:embedding+lm-head+ce", check_embedding_and_lm_head),
            (f"{tag}:cross-entropy", check_cross_entropy_alone), (f"{tag}:scatter-gather", check_scatter_gather)]
