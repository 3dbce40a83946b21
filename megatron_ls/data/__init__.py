"""Data pipeline: Megatron-compatible indexed datasets, tokenizers, GPT samples, blending, samplers.

Depends on nothing else in ``megatron_ls`` (see DESIGN.md).
"""
from megatron_ls.data.blend_config import parse_data_path, parse_split, split_ranges
from megatron_ls.data.blended_dataset import BlendedDataset, BlendedDatasetError, blending_indices
from megatron_ls.data.dataset_builder import build_gpt_datasets
from megatron_ls.data.gpt_dataset import GPTDataset, GPTDatasetError
from megatron_ls.data.index_cache import IndexCacheError
from megatron_ls.data.indexed_dataset import (
    IndexedDataset,
    IndexedDatasetBuilder,
    IndexedDatasetError,
    best_fitting_dtype,
)
from megatron_ls.data.sampler import PretrainingSampler, SamplerError
from megatron_ls.data.tokenizers import (
    ByteTokenizer,
    GPT2BPETokenizer,
    NullTokenizer,
    SentencePieceTokenizer,
    Tokenizer,
    TokenizerError,
    build_tokenizer,
)

__all__ = [
    "BlendedDataset",
    "BlendedDatasetError",
    "ByteTokenizer",
    "GPT2BPETokenizer",
    "GPTDataset",
    "GPTDatasetError",
    "IndexCacheError",
    "IndexedDataset",
    "IndexedDatasetBuilder",
    "IndexedDatasetError",
    "NullTokenizer",
    "PretrainingSampler",
    "SamplerError",
    "SentencePieceTokenizer",
    "Tokenizer",
    "TokenizerError",
    "best_fitting_dtype",
    "blending_indices",
    "build_gpt_datasets",
    "build_tokenizer",
    "parse_data_path",
    "parse_split",
    "split_ranges",
]
