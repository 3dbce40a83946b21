"""Tokenizers: round trips, known answers for GPT-2 byte-level BPE, vocab padding, bad flags."""
import pytest

from megatron_ls.data.gpt2_bpe import bytes_to_unicode, pretokenize_pattern
from megatron_ls.data.tokenizers import (
    ByteTokenizer,
    NullTokenizer,
    TokenizerError,
    build_tokenizer,
    pad_vocab_size,
)

TEXTS = [
    "",
    "hello world",
    "Ünïcödé — 日本語のテキスト 😀🚀 and emoji",
    "tabs\tand\nnewlines\r\n  and   runs of spaces   ",
    "control \x00\x01\x1c\x7f bytes and the word theory in the other worlds",
]


def test_pad_vocab_size():
    assert pad_vocab_size(257, 128, 1) == 384
    assert pad_vocab_size(257, 128, 4) == 512
    assert pad_vocab_size(512, 128, 4) == 512
    assert pad_vocab_size(50257, 128, 2) == 50432
    with pytest.raises(TokenizerError, match="divisible-by"):
        pad_vocab_size(10, 0, 1)


def test_byte_tokenizer():
    tok = build_tokenizer("ByteTokenizer", make_vocab_size_divisible_by=128, tensor_model_parallel_size=2)
    assert isinstance(tok, ByteTokenizer) and tok.is_byte_level
    assert tok.vocab_size == 257 and tok.eod == 256 and tok.padded_vocab_size == 512
    assert tok.tokenize("aé") == [97, 0xC3, 0xA9]
    for text in TEXTS:
        assert tok.detokenize(tok.tokenize(text)) == text
    assert tok.detokenize([104, 105, tok.eod, 300]) == "hi"  # special/padding ids carry no text
    assert tok.detokenize([0xC3]) == "\ufffd"  # a cut UTF-8 sequence decodes visibly, not silently


def test_null_tokenizer():
    tok = build_tokenizer("NullTokenizer", vocab_size=1000)
    assert isinstance(tok, NullTokenizer) and not tok.is_byte_level
    assert tok.vocab_size == 1001 and tok.eod == 1000 and tok.padded_vocab_size == 1024
    assert tok.tokenize("5 17 999") == [5, 17, 999]
    assert tok.detokenize([5, 17]) == "5 17"
    with pytest.raises(TokenizerError, match="outside --vocab-size"):
        tok.tokenize("1000")
    with pytest.raises(TokenizerError, match="space-separated integers"):
        tok.tokenize("1 two")
    with pytest.raises(TokenizerError, match="needs --vocab-size"):
        build_tokenizer("NullTokenizer")


def test_gpt2_byte_table_facts():
    table = bytes_to_unicode()
    assert table[ord(" ")] == "Ġ" and table[ord("\n")] == "Ċ" and table[ord("a")] == "a"
    assert table[0] == "Ā" and table[0xAD] == "Ń" and len(set(table.values())) == 256


@pytest.mark.parametrize(
    "text, pieces",
    [
        ("Hello world's 123  foo\n\nbar", ["Hello", " world", "'s", " 123", " ", " foo", "\n", "\n", "bar"]),
        ("naïve café ½ Ⅻ²", ["naïve", " café", " ½", " Ⅻ²"]),
        ("I'll go—now!!  ", ["I", "'ll", " go", "—", "now", "!!", "  "]),
        ("!\x1c", ["!\x1c"]),  # U+001C is not White_Space for GPT-2's pattern (it is for re's \s)
    ],
)
def test_gpt2_pretokenizer_matches_reference_splits(text, pieces):
    # Expected splits were produced with the `regex` package and GPT-2's original pattern.
    assert pretokenize_pattern().findall(text) == pieces


def test_gpt2_bpe_known_answers(gpt2_files):
    vocab, merges = gpt2_files
    tok = build_tokenizer("GPT2BPETokenizer", vocab_file=vocab, merge_file=merges)
    assert tok.vocab_size == 256 + 8 + 1 and tok.eod == 264 and tok.padded_vocab_size == 384
    enc = tok.encoder
    # "the": merges rank 0 (h e) first, then (t, he) is not a merge -> ["t", "he"].
    assert tok.tokenize("the") == [enc["t"], enc["he"]]
    # " the": Ġ t h e -> (h e) -> (Ġ t) -> (Ġt he) -> one token.
    assert tok.tokenize(" the") == [enc["Ġthe"]]
    # " world": Ġ w o r l d -> (o r) -> (Ġ w) -> (Ġw or) -> Ġwor l d.
    assert tok.tokenize(" world") == [enc["Ġwor"], enc["l"], enc["d"]]
    assert tok.detokenize([enc["Ġthe"], enc["Ġwor"], enc["l"], enc["d"]]) == " the world"
    assert not tok.is_byte_level


def test_gpt2_round_trip(gpt2_files):
    vocab, merges = gpt2_files
    tok = build_tokenizer("GPT2BPETokenizer", vocab_file=vocab, merge_file=merges)
    for text in TEXTS:
        ids = tok.tokenize(text)
        assert all(0 <= i < tok.vocab_size for i in ids)
        assert tok.detokenize(ids) == text


def test_gpt2_bad_files(tmp_path, gpt2_files):
    vocab, merges = gpt2_files
    with pytest.raises(TokenizerError, match="needs --vocab-file and --merge-file"):
        build_tokenizer("GPT2BPETokenizer", vocab_file=vocab)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(TokenizerError, match="not a JSON"):
        build_tokenizer("GPT2BPETokenizer", vocab_file=str(bad), merge_file=merges)
    small = tmp_path / "small.json"
    small.write_text('{"a": 0, "<|endoftext|>": 1}')
    with pytest.raises(TokenizerError, match="byte symbols are missing"):
        build_tokenizer("GPT2BPETokenizer", vocab_file=str(small), merge_file=merges)
    m = tmp_path / "m.txt"
    m.write_text("#version: 0.2\nq z\n")
    with pytest.raises(TokenizerError, match=r"m.txt:2: merge result 'qz'"):
        build_tokenizer("GPT2BPETokenizer", vocab_file=vocab, merge_file=str(m))
    with pytest.raises(TokenizerError, match="no such file"):
        build_tokenizer("GPT2BPETokenizer", vocab_file=vocab, merge_file=str(tmp_path / "none.txt"))


def test_sentencepiece_round_trip(spm_model):
    tok = build_tokenizer("SentencePieceTokenizer", tokenizer_model=spm_model, tensor_model_parallel_size=2)
    assert tok.vocab_size == 400 and tok.eod == 2 and tok.padded_vocab_size == 512
    for text in ["The quick brown fox jumps over the lazy dog.", "quartz wizards", "unseen: ÆØÅ 😀"]:
        ids = tok.tokenize(text)
        assert all(0 <= i < 400 for i in ids)
        assert tok.detokenize(ids) == text  # byte fallback makes unseen characters round-trip
    assert len(tok.tokenize("The quick brown fox")) < len("The quick brown fox")  # it learned merges
    alias = build_tokenizer("GPTSentencePieceTokenizer", tokenizer_model=spm_model)
    assert alias.tokenize("fox") == tok.tokenize("fox")


def test_sentencepiece_bad_model(tmp_path):
    with pytest.raises(TokenizerError, match="needs --tokenizer-model"):
        build_tokenizer("SentencePieceTokenizer")
    with pytest.raises(TokenizerError, match="no such file"):
        build_tokenizer("SentencePieceTokenizer", tokenizer_model=str(tmp_path / "x.model"))
    junk = tmp_path / "junk.model"
    junk.write_bytes(b"definitely not a protobuf")
    with pytest.raises(TokenizerError, match="not a SentencePiece model"):
        build_tokenizer("SentencePieceTokenizer", tokenizer_model=str(junk))


def test_unknown_type():
    with pytest.raises(TokenizerError, match="unknown --tokenizer-type 'Bert'"):
        build_tokenizer("Bert")
