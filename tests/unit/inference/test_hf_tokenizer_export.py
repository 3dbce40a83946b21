"""Tokenizer files of a Hugging Face export: the byte-level and GPT-2 BPE tokenizers become a ``tokenizer.json``
that ``transformers`` reads into the same ids as megatron_ls' own tokenizers; SentencePiece is copied, not
converted; NullTokenizer exports nothing."""
from __future__ import annotations

import json
import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_MODULES_CACHE", os.path.join(tempfile.gettempdir(), "megatron_ls_hf_modules"))

import pytest  # noqa: E402
from transformers import PreTrainedTokenizerFast  # noqa: E402

from megatron_ls.data.gpt2_bpe import bytes_to_unicode  # noqa: E402
from megatron_ls.data.tokenizers import build_tokenizer  # noqa: E402
from megatron_ls.inference.hf_export import tokenizer_files  # noqa: E402

TEXTS = ["", "hello world", "Ünïcödé — 日本語のテキスト 😀🚀 and emoji",
         "tabs\tand\nnewlines\r\n  and   runs of spaces   ", "control \x00\x01\x1c\x7f bytes, the theory of worlds"]
MERGES = [("h", "e"), ("t", "h"), ("Ġ", "t"), ("Ġt", "he"), ("o", "r"), ("e", "or"), ("Ġ", "w"), ("Ġw", "or")]


def hf_tokenizer(tmp_path, settings: dict) -> PreTrainedTokenizerFast:
    tok_json, tok_config, _ = tokenizer_files(settings, 128)
    (tmp_path / "tokenizer.json").write_text(json.dumps(tok_json), encoding="utf-8")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(tok_config), encoding="utf-8")
    return PreTrainedTokenizerFast.from_pretrained(str(tmp_path))


def test_byte_tokenizer_ids_are_the_bytes(tmp_path):
    ours = build_tokenizer("ByteTokenizer")
    hf = hf_tokenizer(tmp_path, {"tokenizer_type": "ByteTokenizer"})
    assert hf.eos_token_id == hf.pad_token_id == ours.eod == 256 and hf.padding_side == "left"
    for text in TEXTS:
        ids = hf(text)["input_ids"]
        assert ids == ours.tokenize(text)
        assert hf.decode(ids) == text
    assert hf("ab<|endoftext|>c")["input_ids"] == [97, 98, 256, 99]
    assert hf.decode([104, 105, 256], skip_special_tokens=True) == "hi"


def test_gpt2_bpe_ids_equal_ours(tmp_path):
    table = bytes_to_unicode()
    vocab = {table[b]: b for b in range(256)}
    for a, b in MERGES:
        vocab.setdefault(a + b, len(vocab))
    vocab["<|endoftext|>"] = len(vocab)
    (tmp_path / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (tmp_path / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in MERGES))
    files = {"vocab_file": str(tmp_path / "vocab.json"), "merge_file": str(tmp_path / "merges.txt")}
    ours = build_tokenizer("GPT2BPETokenizer", **files)
    out = tmp_path / "hf"
    out.mkdir()
    hf = hf_tokenizer(out, {"tokenizer_type": "GPT2BPETokenizer", **files})
    assert hf.eos_token_id == ours.eod
    for text in TEXTS + ["the other worlds, the theory: hello there"]:
        assert hf(text)["input_ids"] == ours.tokenize(text), text
        assert hf.decode(hf(text)["input_ids"]) == text


@pytest.mark.parametrize("kind", ["SentencePieceTokenizer", "NullTokenizer", None])
def test_tokenizers_without_a_hf_form_say_so(kind):
    tok_json, tok_config, note = tokenizer_files({"tokenizer_type": kind} if kind else {}, 128)
    assert tok_json is None and tok_config is None and note.startswith("tokenizer:")
    if kind == "SentencePieceTokenizer":
        assert "tokenizer.model is copied" in note


def test_missing_gpt2_files_are_reported(tmp_path):
    _, _, note = tokenizer_files({"tokenizer_type": "GPT2BPETokenizer", "vocab_file": str(tmp_path / "no.json"),
                                  "merge_file": str(tmp_path / "no.txt")}, 128)
    assert "not found" in note and "--vocab-file" in note
