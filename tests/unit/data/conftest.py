"""Fixtures for data tests: a tiny GPT-2 vocab/merges and a tiny SentencePiece model, built in tmp dirs."""
import json

import pytest

# The GPT-2 byte table, written out from its definition: printable Latin-1 bytes map to themselves,
# the remaining 68 bytes (in byte order) map to U+0100, U+0101, ...
_PRINTABLE = set(range(33, 127)) | set(range(161, 173)) | set(range(174, 256))
BYTE_SYMBOLS = {}
_next = 256
for _b in range(256):
    if _b in _PRINTABLE:
        BYTE_SYMBOLS[_b] = chr(_b)
    else:
        BYTE_SYMBOLS[_b] = chr(_next)
        _next += 1

MERGES = [("h", "e"), ("t", "h"), ("Ġ", "t"), ("Ġt", "he"), ("o", "r"), ("e", "or"), ("Ġ", "w"), ("Ġw", "or")]


@pytest.fixture(scope="session")
def gpt2_files(tmp_path_factory):
    """(vocab.json, merges.txt) for a tiny byte-level BPE: 256 byte symbols, 8 merges, <|endoftext|>."""
    d = tmp_path_factory.mktemp("gpt2")
    vocab = {BYTE_SYMBOLS[b]: b for b in range(256)}
    for a, b in MERGES:
        vocab.setdefault(a + b, len(vocab))
    vocab["<|endoftext|>"] = len(vocab)
    (d / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (d / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in MERGES), encoding="utf-8")
    return str(d / "vocab.json"), str(d / "merges.txt")


SP_TEXT = [
    "The quick brown fox jumps over the lazy dog.",
    "Long-short transformers attend to a sliding window and to a dynamic projection.",
    "Pack my box with five dozen liquor jugs; the five boxing wizards jump quickly.",
    "Sphinx of black quartz, judge my vow. How vexingly quick daft zebras jump!",
] * 20


@pytest.fixture(scope="session")
def spm_model(tmp_path_factory):
    """Path of a tiny SentencePiece model (vocab 400 incl. 256 byte pieces) trained here."""
    import sentencepiece as spm

    d = tmp_path_factory.mktemp("spm")
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(SP_TEXT), model_prefix=str(d / "sp"), vocab_size=400, model_type="bpe",
        byte_fallback=True, character_coverage=1.0, minloglevel=2, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
    )
    return str(d / "sp.model")
