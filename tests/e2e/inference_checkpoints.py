"""A tiny byte-level GPT-LS written as a consolidated checkpoint and as a TP2 x PP2 training checkpoint.

Built straight from a random model (no training run): the generation tools only need weights in either layout.
"""
from __future__ import annotations

from pathlib import Path

from megatron_ls.config import TransformerConfig
from megatron_ls.inference.checkpoint_io import save_consolidated
from megatron_ls.inference.convert import partition_dims, write_training_checkpoint

TINY = dict(num_layers=2, hidden_size=32, num_attention_heads=4, seq_length=128, vocab_size=384, window_size=16,
            segment_length=8, projection_rank=1, full_attention_layers=(1,), init_method_std=0.3, seed=5)


def write_checkpoints(root: Path) -> tuple[str, str]:
    """(consolidated dir, TP2 x PP2 training checkpoint dir) holding the same weights."""
    import torch

    from megatron_ls.model import GPTModel

    config = TransformerConfig(**TINY)
    state = GPTModel(config).state_dict()
    consolidated, training = root / "consolidated", root / "tp2pp2"
    save_consolidated(str(consolidated), config, state)
    metadata = {"iteration": 7, "consumed_samples": 0,
                "args": {"data": {"tokenizer_type": "ByteTokenizer"}, "parallel": {"zero_stage": 0}}}
    with torch.no_grad():
        write_training_checkpoint(str(training), config, state, partition_dims(config), 2, 2, metadata)
    return str(consolidated), str(training)
