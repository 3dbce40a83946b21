"""Inference-side checkpoints: consolidated safetensors files, loading a GPT-LS, TP/PP re-sharding."""
from megatron_ls.inference.checkpoint_io import (InferenceCheckpointError, load_consolidated, load_gpt_model,
                                                 save_consolidated)

__all__ = ["InferenceCheckpointError", "load_consolidated", "load_gpt_model", "save_consolidated"]
