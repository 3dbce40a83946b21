"""Hugging Face export: a GPT-LS checkpoint as a ``trust_remote_code`` model directory.

``export_hf(directory, config, state)`` writes ``config.json``, ``model.safetensors`` (weights renamed to the
remote-code modules' names, a tied LM head not stored), ``generation_config.json``, the remote-code files of
``megatron_ls/inference/hf_remote/`` (torch + transformers only) and, when the tokenizer can be expressed for
Hugging Face, ``tokenizer.json`` + ``tokenizer_config.json``. Needs neither transformers nor tokenizers itself.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from typing import Optional

import torch

from megatron_ls.config import TransformerConfig
from megatron_ls.inference.checkpoint_io import InferenceCheckpointError

REMOTE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "hf_remote")
REMOTE_FILES = ("configuration_megatron_ls.py", "modeling_megatron_ls.py", "cache_megatron_ls.py")
EOD_TOKEN = "<|endoftext|>"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# GPTModel parameter name -> remote-code name (regex, replacement), tried in order; the first match wins.
_RENAMES = (
    (r"^embedding\.word_embeddings\.", "model.embed_tokens."),
    (r"^embedding\.position_embeddings\.", "model.embed_positions."),
    (r"^layers\.(\d+)\.self_attention\.", r"model.layers.\1.self_attn."),
    (r"^layers\.(\d+)\.(input_layernorm|post_attention_layernorm|mlp)\.", r"model.layers.\1.\2."),
    (r"^final_layernorm\.", "model.final_layernorm."),
    (r"^output_layer\.", "lm_head."),
)


def hf_name(name: str) -> str:
    """The remote-code parameter name of a ``GPTModel`` parameter; unknown names are an error."""
    for pattern, replacement in _RENAMES:
        if re.match(pattern, name):
            return re.sub(pattern, replacement, name)
    raise InferenceCheckpointError(f"parameter {name!r} has no Hugging Face counterpart")


def hf_config(config: TransformerConfig, eod: Optional[int], metadata: Optional[dict] = None) -> dict:
    """``config.json`` content for ``MegatronLSConfig`` (remote code) from a ``TransformerConfig``."""
    if not config.causal:
        raise InferenceCheckpointError("only causal GPT-LS models can be exported to Hugging Face")
    return {
        "architectures": ["MegatronLSForCausalLM"],
        "auto_map": {"AutoConfig": "configuration_megatron_ls.MegatronLSConfig",
                     "AutoModel": "modeling_megatron_ls.MegatronLSModel",
                     "AutoModelForCausalLM": "modeling_megatron_ls.MegatronLSForCausalLM"},
        "model_type": "megatron_ls",
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_attention_heads,
        "intermediate_size": config.ffn_hidden_size,
        "max_position_embeddings": config.max_position_embeddings,
        "position_embedding_type": config.position_embedding_type,
        "rotary_base": config.rotary_base,
        "rotary_percent": config.rotary_percent,
        "layer_norm_epsilon": config.layernorm_epsilon,
        "window_size": config.window_size,
        "segment_length": config.segment_length,
        "projection_rank": config.projection_rank,
        "full_attention_layers": list(config.full_attention_layers),
        "dual_ln": config.dual_ln,
        "dual_ln_scope": config.dual_ln_scope,
        "attention_block_size": 128,
        "initializer_range": config.init_method_std,
        "bos_token_id": None,
        "eos_token_id": eod,
        "pad_token_id": eod,
        "tie_word_embeddings": not config.untie_embeddings_and_output_weights,
        "normalization": config.normalization,
        "swiglu": config.swiglu,
        "add_bias_linear": config.add_bias_linear,
        "use_cache": True,
        "megatron_ls": {"seq_length": config.seq_length, **(metadata or {})},
    }


def _byte_level_tokenizer_json(vocab: dict, merges: list, use_regex: bool) -> dict:
    """A ``tokenizers`` byte-level BPE description (GPT-2's byte -> character table, no normaliser)."""
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": use_regex}
    eod = vocab[EOD_TOKEN]
    return {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": [{"id": eod, "content": EOD_TOKEN, "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": False, "special": True}],
        "normalizer": None, "pre_tokenizer": byte_level, "post_processor": None, "decoder": byte_level,
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": vocab, "merges": merges},
    }


def tokenizer_files(tokenizer: dict, model_max_length: int) -> tuple[Optional[dict], Optional[dict], str]:
    """(tokenizer.json, tokenizer_config.json, note) for the checkpoint's tokenizer settings; the JSONs are None
    when it cannot be expressed for Hugging Face (the note says what to do instead)."""
    from megatron_ls.data.gpt2_bpe import bytes_to_unicode

    kind = tokenizer.get("tokenizer_type")
    if kind == "ByteTokenizer":  # ids 0..255 are the bytes, 256 is EOD
        table = bytes_to_unicode()
        vocab = {table[b]: b for b in range(256)}
        vocab[EOD_TOKEN] = 256
        tok_json = _byte_level_tokenizer_json(vocab, [], use_regex=False)
        note = "tokenizer: ByteTokenizer as a byte-level tokenizer.json (ids = UTF-8 bytes, EOD 256)"
    elif kind == "GPT2BPETokenizer":
        vocab_file, merge_file = tokenizer.get("vocab_file"), tokenizer.get("merge_file")
        for path in (vocab_file, merge_file):
            if not path or not os.path.isfile(path):
                return None, None, (f"tokenizer: GPT2BPETokenizer files not found ({path}); pass --vocab-file and "
                                    "--merge-file to export it")
        with open(vocab_file, encoding="utf-8") as fh:
            vocab = json.load(fh)
        with open(merge_file, encoding="utf-8") as fh:
            merges = [line.rstrip("\n") for line in fh if line.strip() and not line.startswith("#version")]
        if EOD_TOKEN not in vocab:
            return None, None, f"tokenizer: {vocab_file} has no {EOD_TOKEN}; not exported"
        tok_json = _byte_level_tokenizer_json(vocab, merges, use_regex=True)
        note = "tokenizer: GPT-2 BPE as tokenizer.json"
    elif kind in ("SentencePieceTokenizer", "GPTSentencePieceTokenizer"):
        return None, None, ("tokenizer: SentencePiece is not converted (Hugging Face's SentencePiece tokenizers add "
                            "their own prefix/BOS rules); tokenizer.model is copied: encode with "
                            "sentencepiece's EncodeAsIds as megatron_ls does (docs/inference.md)")
    elif kind == "NullTokenizer":
        return None, None, "tokenizer: NullTokenizer (token ids are the text); nothing to export"
    else:
        return None, None, "tokenizer: unknown (pass --tokenizer-type ...); no tokenizer files written"
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": EOD_TOKEN, "pad_token": EOD_TOKEN,
              "bos_token": None, "unk_token": None, "padding_side": "left", "model_max_length": model_max_length,
              "clean_up_tokenization_spaces": False, "add_bos_token": False, "add_eos_token": False}
    return tok_json, config, note


def _write_json(path: str, payload: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(payload, fh, indent=2, ensure_ascii=False)
    os.replace(tmp, path)


def export_hf(directory: str, config: TransformerConfig, state: dict, *, tokenizer: Optional[dict] = None,
              dtype: Optional[str] = None, metadata: Optional[dict] = None) -> list[str]:
    """Write a Hugging Face model directory from full (unsharded) ``GPTModel`` weights; returns notes to print.

    ``tokenizer``: ``{"tokenizer_type", "vocab_file", "merge_file", "tokenizer_model"}`` (Megatron flag names);
    ``dtype``: ``float32``/``bfloat16``/``float16`` to cast floating weights to (default: as stored).
    """
    from safetensors.torch import save_file

    if dtype is not None and dtype not in DTYPES:
        raise InferenceCheckpointError(f"--hf-dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    os.makedirs(directory, exist_ok=True)
    tensors = {}
    for name, tensor in state.items():
        t = tensor.detach().to("cpu")
        if dtype is not None and t.is_floating_point():
            t = t.to(DTYPES[dtype])
        tensors[hf_name(name)] = t.contiguous()
    stored = tensors["model.embed_tokens.weight"].dtype
    notes = []
    tokenizer = tokenizer or {}
    if tokenizer.get("tokenizer_type") == "HuggingFaceTokenizer":  # its own files, written by transformers
        from megatron_ls.data.hf_tokenizer import HuggingFaceTokenizer

        hf_tok = HuggingFaceTokenizer(tokenizer.get("tokenizer_model") or "")
        hf_tok.save_pretrained(directory)
        tok_json, tok_config, eod = None, None, hf_tok.eod
        notes.append(f"tokenizer: the Hugging Face tokenizer of {hf_tok.model_dir} (EOD {eod})")
    else:
        tok_json, tok_config, note = tokenizer_files(tokenizer, config.seq_length)
        notes.append(note)
        eod = None
    if tok_json is not None:
        eod = tok_json["added_tokens"][0]["id"]
        _write_json(os.path.join(directory, "tokenizer.json"), tok_json)
        _write_json(os.path.join(directory, "tokenizer_config.json"), tok_config)
    elif tokenizer.get("tokenizer_type") == "ByteTokenizer":
        eod = 256
    model_file = tokenizer.get("tokenizer_model")
    if model_file and os.path.isfile(model_file) and tokenizer.get("tokenizer_type") != "HuggingFaceTokenizer":
        shutil.copyfile(model_file, os.path.join(directory, "tokenizer.model"))
    tmp = os.path.join(directory, ".model.safetensors.tmp")
    save_file(tensors, tmp, metadata={"format": "pt"})
    os.replace(tmp, os.path.join(directory, "model.safetensors"))
    payload = hf_config(config, eod, metadata)
    payload["dtype"] = str(stored).replace("torch.", "")
    _write_json(os.path.join(directory, "config.json"), payload)
    generation = {"eos_token_id": eod, "pad_token_id": eod, "bos_token_id": None, "do_sample": False}
    _write_json(os.path.join(directory, "generation_config.json"), generation)
    for name in REMOTE_FILES:
        shutil.copyfile(os.path.join(REMOTE_DIR, name), os.path.join(directory, name))
    return notes
