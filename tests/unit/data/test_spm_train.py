"""Training a SentencePiece model from JSONL: usable model, clear errors, no partial files."""
import json
import os

import pytest

from megatron_ls.data.spm_train import SentencePieceTrainError, main
from megatron_ls.data.tokenizers import build_tokenizer

LINES = [
    "The Long-Short Transformer combines a sliding window with a dynamic projection.",
    "Each head attends to local keys and to a few projected global keys.",
    "DualLN balances the scales of the two sets of keys.",
    "Efficient attention makes long sequences affordable.",
]


def write(path, docs):
    path.write_text("".join(json.dumps(d) + "\n" for d in docs))
    return str(path)


def test_train_and_use(tmp_path):
    src = write(tmp_path / "c.jsonl", [{"text": "\n".join(LINES[i:] + LINES[:i])} for i in range(4)] * 10)
    model = main(["--input", src, "--model-prefix", str(tmp_path / "tok"), "--vocab-size", "320"])
    assert sorted(os.listdir(tmp_path)) == ["c.jsonl", "tok.model", "tok.vocab"]
    tok = build_tokenizer("SentencePieceTokenizer", tokenizer_model=model)
    assert tok.vocab_size == 320 and tok.eod == 2
    text = "The projection attends to long sequences."
    ids = tok.tokenize(text)
    assert tok.detokenize(ids) == text and len(ids) < len(text)


def test_errors_leave_nothing(tmp_path):
    empty = write(tmp_path / "e.jsonl", [{"text": ""}, {"text": "  \n "}])
    with pytest.raises(SentencePieceTrainError, match="no text to train on"):
        main(["--input", empty, "--model-prefix", str(tmp_path / "m"), "--vocab-size", "300"])
    bad = tmp_path / "b.jsonl"
    bad.write_text('{"text": "fine"}\n{"txt": "oops"}\n')
    with pytest.raises(SentencePieceTrainError, match=r"b.jsonl:2: no key 'text'"):
        main(["--input", str(bad), "--model-prefix", str(tmp_path / "m"), "--vocab-size", "300"])
    tiny = write(tmp_path / "t.jsonl", [{"text": "ab"}])
    with pytest.raises(SentencePieceTrainError, match="could not train"):
        main(["--input", tiny, "--model-prefix", str(tmp_path / "m"), "--vocab-size", "5000"])
    assert sorted(os.listdir(tmp_path)) == ["b.jsonl", "e.jsonl", "t.jsonl"]
