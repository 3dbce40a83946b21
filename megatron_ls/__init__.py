"""megatron_ls: Megatron-style distributed training for Long-Short Transformer models."""

__version__ = "0.1.0"
