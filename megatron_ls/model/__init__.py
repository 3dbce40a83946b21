"""Model code (no training logic): attention modules, transformer layers, GPT-LS."""
from megatron_ls.model.attention import FullAttention, LongShortAttention, SelfAttention
from megatron_ls.model.gpt import GPTEmbedding, GPTModel, language_model_loss
from megatron_ls.model.transformer import MLP, TransformerLayer

__all__ = ["SelfAttention", "LongShortAttention", "FullAttention", "GPTEmbedding", "GPTModel", "language_model_loss", "MLP", "TransformerLayer"]
