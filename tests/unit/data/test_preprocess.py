"""preprocess_data end to end: every tokenizer, .gz, --workers 2, several keys, and each kind of bad input."""
import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from megatron_ls.data.indexed_dataset import IndexedDataset
from megatron_ls.data.preprocess import PreprocessError, main
from megatron_ls.data.tokenizers import build_tokenizer

REPO = Path(__file__).resolve().parents[3]
DOCS = [
    {"text": "First document.\nWith two lines.", "title": "one"},
    {"text": "Zweites Dokument — mit Umlauten: äöü. 😀", "title": "two"},
    {"text": "", "title": "empty text"},
    {"text": "the theory of the other worlds " * 40, "title": "four"},
]


def write_jsonl(path, docs, compress=False, blank_lines=False):
    lines = [json.dumps(d, ensure_ascii=False) for d in docs]
    if blank_lines:
        lines.insert(1, "   ")
    data = ("\n".join(lines) + "\n").encode("utf-8")
    with (gzip.open(path, "wb") if compress else open(path, "wb")) as f:
        f.write(data)
    return str(path)


def read_docs(prefix):
    ds = IndexedDataset(prefix)
    return ds, [ds.get_document(d).tolist() for d in range(ds.num_documents)]


def run(tmp_path, *extra, input_path=None, name="out"):
    input_path = input_path or write_jsonl(tmp_path / "in.jsonl", DOCS)
    prefix = str(tmp_path / name)
    return main(["--input", input_path, "--output-prefix", prefix, "--log-interval", "1", *extra]), prefix


def test_byte_level_end_to_end(tmp_path, capsys):
    summary, prefix = run(tmp_path, "--tokenizer-type", "ByteTokenizer", "--append-eod")
    out = capsys.readouterr()
    assert "documents/s" in out.out and "MB/s" in out.out and "Processed 4 documents (" in out.err
    assert summary.documents == 4 and summary.prefixes == {"text": prefix + "_text_document"}
    ds, docs = read_docs(prefix + "_text_document")
    assert ds.dtype == np.uint16 and ds.num_documents == 4
    for d, got in zip(DOCS, docs):
        want = list(d["text"].encode("utf-8")) + ([256] if d["text"] else [])  # Megatron: no EOD on empty text
        assert got == want
    assert sorted(os.listdir(tmp_path)) == ["in.jsonl", "out_text_document.bin", "out_text_document.idx"]


def test_gzip_workers_and_several_keys_give_identical_files(tmp_path):
    plain = write_jsonl(tmp_path / "a.jsonl", DOCS * 300, blank_lines=True)
    packed = write_jsonl(tmp_path / "a.jsonl.gz", DOCS * 300, compress=True)
    keys = ["--json-keys", "text", "title", "--tokenizer-type", "ByteTokenizer", "--append-eod"]
    _, p1 = run(tmp_path, *keys, input_path=plain, name="one")
    _, p2 = run(tmp_path, *keys, "--workers", "2", input_path=packed, name="two")
    for key in ("text", "title"):
        for ext in (".bin", ".idx"):
            a = Path(f"{p1}_{key}_document{ext}").read_bytes()
            b = Path(f"{p2}_{key}_document{ext}").read_bytes()
            assert a == b, (key, ext)
    ds, docs = read_docs(p2 + "_title_document")
    assert ds.num_documents == 1200 and bytes(docs[1][:-1]).decode() == "two"


@pytest.mark.parametrize("kind", ["gpt2", "sentencepiece", "null"])
def test_other_tokenizers(tmp_path, kind, gpt2_files, spm_model):
    if kind == "gpt2":
        flags = ["--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", gpt2_files[0], "--merge-file", gpt2_files[1]]
        tok = build_tokenizer("GPT2BPETokenizer", vocab_file=gpt2_files[0], merge_file=gpt2_files[1])
        docs = DOCS
    elif kind == "sentencepiece":
        flags = ["--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", spm_model]
        tok = build_tokenizer("SentencePieceTokenizer", tokenizer_model=spm_model)
        docs = DOCS
    else:
        flags = ["--tokenizer-type", "NullTokenizer", "--vocab-size", "70000"]
        tok = build_tokenizer("NullTokenizer", vocab_size=70000)
        docs = [{"text": "1 2 3"}, {"text": "69999 0"}]
    source = write_jsonl(tmp_path / "in.jsonl", docs)
    _, prefix = run(tmp_path, *flags, "--append-eod", "--workers", "2", input_path=source)
    ds, got = read_docs(prefix + "_text_document")
    assert ds.dtype == (np.int32 if kind == "null" else np.uint16)  # 70001 ids do not fit uint16
    for d, ids in zip(docs, got):
        want = tok.tokenize(d["text"])
        assert ids == (want + [tok.eod] if want else [])
        assert tok.detokenize(ids[:-1]) == (d["text"] if kind != "sentencepiece" else tok.detokenize(want))


@pytest.mark.parametrize("workers", ["1", "2"])
def test_text_lists_are_multi_sequence_documents(tmp_path, workers):
    """Megatron-LM's rule: one sequence per non-empty item, EOD on the document's last sequence."""
    docs = [{"text": ["Hello ", "", "world"]}, {"text": []}, {"text": ["", ""]}, {"text": "plain"}, {"text": ["x"]}]
    _, prefix = run(tmp_path, "--tokenizer-type", "ByteTokenizer", "--append-eod", "--workers", workers,
                    input_path=write_jsonl(tmp_path / "lists.jsonl", docs * 700))
    ds = IndexedDataset(prefix + "_text_document")
    want_seqs = [list(b"Hello "), list(b"world") + [256], list(b"plain") + [256], list(b"x") + [256]]
    assert [ds[i].tolist() for i in range(4)] == want_seqs and len(ds) == 4 * 700
    np.testing.assert_array_equal(ds.document_indices[:6], [0, 2, 2, 2, 3, 4])  # [] and ["", ""]: empty documents
    assert ds.num_documents == 5 * 700


@pytest.mark.parametrize(
    "bad_line, message",
    [
        ("{not json}", "not valid JSON"),
        ('{"body": "x"}', r"no key 'text' \(keys present: body\)"),
        ('{"text": 5}', "key 'text' is int, expected a string"),
        ('{"text": ["a", 5]}', "key 'text' is a list holding a int, expected strings"),
        ('["text"]', "expected a JSON object, got list"),
        (b'{"text": "\xff\xfe"}', "not UTF-8"),
    ],
)
@pytest.mark.parametrize("workers", ["1", "2"])
def test_bad_line_names_file_and_line_and_leaves_nothing(tmp_path, bad_line, message, workers):
    # 5000 good lines first (several batches), so the failure comes after output has been written.
    good = (json.dumps({"text": "x" * 300}) + "\n").encode() * 5000
    bad = bad_line if isinstance(bad_line, bytes) else bad_line.encode()
    source = tmp_path / "in.jsonl"
    source.write_bytes(good + bad + b"\n" + good)
    with pytest.raises(PreprocessError, match=rf"in.jsonl:5001: {message}"):
        run(tmp_path, "--tokenizer-type", "ByteTokenizer", "--workers", workers, input_path=str(source))
    assert sorted(os.listdir(tmp_path)) == ["in.jsonl"]  # no output, no temporary files


@pytest.mark.parametrize("workers", ["1", "2"])
def test_empty_corpus(tmp_path, workers):
    source = tmp_path / "in.jsonl"
    source.write_text("\n   \n")
    with pytest.raises(PreprocessError, match=r"in.jsonl: no documents \(the corpus is empty\)"):
        run(tmp_path, "--tokenizer-type", "ByteTokenizer", "--workers", workers, input_path=str(source))
    assert sorted(os.listdir(tmp_path)) == ["in.jsonl"]


def test_failed_run_keeps_previous_output(tmp_path):
    _, prefix = run(tmp_path, "--tokenizer-type", "ByteTokenizer")
    before = Path(prefix + "_text_document.bin").read_bytes()
    bad = write_jsonl(tmp_path / "bad.jsonl", DOCS)
    with open(bad, "a") as f:
        f.write("{broken\n")
    with pytest.raises(PreprocessError, match="bad.jsonl:5"):
        run(tmp_path, "--tokenizer-type", "ByteTokenizer", input_path=bad)
    assert Path(prefix + "_text_document.bin").read_bytes() == before
    IndexedDataset(prefix + "_text_document")


def test_bad_flags(tmp_path):
    with pytest.raises(PreprocessError, match="no such file"):
        run(tmp_path, "--tokenizer-type", "ByteTokenizer", input_path=str(tmp_path / "missing.jsonl"))
    fake = tmp_path / "fake.jsonl.gz"
    fake.write_text('{"text": "not compressed"}\n')
    with pytest.raises(PreprocessError, match="not gzip"):
        run(tmp_path, "--tokenizer-type", "ByteTokenizer", input_path=str(fake))
    with pytest.raises(PreprocessError, match="--dtype uint8 holds ids up to 255, but the ByteTokenizer vocab"):
        run(tmp_path, "--tokenizer-type", "ByteTokenizer", "--dtype", "uint8")
    with pytest.raises(PreprocessError, match="needs --vocab-size"):
        run(tmp_path, "--tokenizer-type", "NullTokenizer")
    with pytest.raises(PreprocessError, match="directory"):
        main(["--input", write_jsonl(tmp_path / "x.jsonl", DOCS), "--output-prefix", str(tmp_path / "no" / "dir" / "p"),
              "--tokenizer-type", "ByteTokenizer"])
    with pytest.raises(SystemExit):
        run(tmp_path, "--tokenizer-type", "ByteTokenizer", "--workers", "0")


@pytest.mark.parametrize("workers", ["1", "2"])
def test_truncated_gzip(tmp_path, workers):
    packed = write_jsonl(tmp_path / "t.jsonl.gz", DOCS * 2000, compress=True)
    data = Path(packed).read_bytes()
    Path(packed).write_bytes(data[: len(data) // 2])
    with pytest.raises(PreprocessError, match="read error"):
        run(tmp_path, "--tokenizer-type", "ByteTokenizer", "--workers", workers, input_path=packed)


def test_tool_wrapper_runs(tmp_path):
    source = write_jsonl(tmp_path / "in.jsonl", DOCS)
    cmd = [sys.executable, str(REPO / "tools" / "preprocess_data.py"), "--input", source, "--output-prefix",
           str(tmp_path / "cli"), "--tokenizer-type", "ByteTokenizer", "--append-eod"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert IndexedDataset(str(tmp_path / "cli_text_document")).num_documents == 4
    missing = cmd[:3] + [str(tmp_path / "nope.jsonl")] + cmd[4:]
    bad = subprocess.run(missing, capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "error: --input" in bad.stderr and "Traceback" not in bad.stderr
