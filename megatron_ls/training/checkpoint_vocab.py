"""The padded vocabulary of a checkpoint wins over this run's padding rule when it fits.

Megatron pads the vocabulary to a multiple of ``--make-vocab-size-divisible-by x TP``, so a checkpoint re-sharded to
another TP size (``tools/convert_checkpoint.py`` keeps the padded rows) would otherwise need that flag changed by
hand before ``--load ... --finetune`` at the new TP. Adopting the saved size is exact: the extra rows are padding
that no token id reaches.
"""
from __future__ import annotations

from typing import Callable, Optional

from megatron_ls.checkpoint_files import CheckpointError, read_latest_tag, read_metadata


def checkpoint_padded_vocab(load_dir: str, padded: int, real_vocab: int, tensor_model_parallel_size: int,
                            notice: Optional[Callable[[str], None]] = None) -> int:
    """The padded vocab size to build the model with: the checkpoint's when it holds every real id and splits
    over the TP ranks, else this run's ``padded`` (a mismatch is then reported by the checkpoint checks)."""
    try:
        saved = int(read_metadata(load_dir, read_latest_tag(load_dir))["args"]["model"]["vocab_size"])
    except (CheckpointError, KeyError, TypeError, ValueError, OSError):
        return padded
    if saved == padded or saved < real_vocab or saved % tensor_model_parallel_size:
        return padded
    if notice is not None:
        notice(f" padded vocab size {saved} taken from --load {load_dir} (this run's --make-vocab-size-divisible-by "
               f"x --tensor-model-parallel-size {tensor_model_parallel_size} would give {padded})")
    return saved
