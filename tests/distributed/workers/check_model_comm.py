"""A whole transformer layer (LS attention and full attention) does exactly Megatron's communication:
forward one all-reduce in attention + one in the MLP, backward the two all-reduces of the column inputs.
DualLN over the full width of all heads (the released code, ``dual_ln_scope="full"``) adds one small all-reduce of
the per-token moments per norm call: 4 calls (LN_L on k and v, LN_G on the projected k and v), each of 2 values
per key, forward and backward."""
from __future__ import annotations

from typing import Callable

import torch

from megatron_ls.parallel import state
from megatron_ls.parallel.comm_stats import CommCounter

B, S, H = 2, 16, 16


def check_layer_comm(full: bool, scope: str = "head") -> None:
    from megatron_ls.config import TransformerConfig
    from megatron_ls.model.transformer import TransformerLayer

    cfg = TransformerConfig(num_layers=2, hidden_size=H, num_attention_heads=4, seq_length=S, window_size=4,
                            segment_length=4, projection_rank=1, hidden_dropout=0.1, attention_dropout=0.1,
                            full_attention_layers=(0,) if full else (), dual_ln_scope=scope)
    layer = TransformerLayer(cfg, 0)
    x = torch.randn(B, S, H, generator=torch.Generator().manual_seed(0), requires_grad=True)
    with CommCounter() as cc:
        y = layer(x)
        forward = dict(cc.calls)
        y.sum().backward()
    if state.get_tensor_model_parallel_world_size() == 1:
        assert cc.count() == 0, cc
        return
    norm_calls = 4 if scope == "full" and not full else 0
    global_keys = (S - 1) // cfg.segment_length * cfg.projection_rank  # compressed keys normed by LN_G
    norm_elements = 2 * (2 * B * S + 2 * B * global_keys) if norm_calls else 0
    calls = 2 + norm_calls
    assert forward == {("all_reduce", "forward"): calls}, cc
    assert dict(cc.calls) == {("all_reduce", "forward"): calls, ("all_reduce", "backward"): calls}, cc
    assert cc.total_elements("all_reduce", "forward") == 2 * B * S * H + norm_elements, cc
    assert cc.total_elements("all_reduce", "backward") == 2 * B * S * H + norm_elements, cc


def checks(tag: str) -> list[tuple[str, Callable[[], None]]]:
    """Layer communication checks named with the layout ``tag``."""
    return [(f"{tag}:ls-layer-comm", lambda: check_layer_comm(False)),
            (f"{tag}:ls-layer-full-width-dual-ln-comm", lambda: check_layer_comm(False, "full")),
            (f"{tag}:full-layer-comm", lambda: check_layer_comm(True))]
