"""The no-download sample corpus: real prose from CPython, turned into a trainable data prefix."""
import json
import os

import numpy as np
import pytest

from megatron_ls.data.dataset_builder import build_gpt_datasets
from megatron_ls.data.indexed_dataset import IndexedDataset
from megatron_ls.data.sample_corpus import collect_documents, main


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    out = tmp_path_factory.mktemp("sample")
    prefix = main(["--output-dir", str(out)])
    return out, prefix


def test_corpus_is_large_real_prose(prepared):
    docs = collect_documents()
    text = sum(len(d["text"].encode("utf-8")) for d in docs)
    assert text >= 500_000 and len(docs) >= 1000
    sources = {d["source"] for d in docs}
    assert sources == {"pydoc-topics", "stdlib-docstring"}
    assert any(d["title"] == "if" and 'The "if" statement' in d["text"] for d in docs)


def test_prepare_writes_jsonl_and_byte_level_dataset(prepared, capsys):
    out, prefix = prepared
    assert prefix == os.path.join(str(out), "python_docs_text_document")
    with open(os.path.join(out, "python_docs.jsonl"), encoding="utf-8") as f:
        docs = [json.loads(line) for line in f]
    ds = IndexedDataset(prefix)
    assert ds.num_documents == len(docs) and ds.dtype == np.uint16
    for d in (0, len(docs) // 2, len(docs) - 1):
        tokens = ds.get_document(d)
        assert tokens[-1] == 256 and bytes(tokens[:-1].tolist()).decode("utf-8") == docs[d]["text"]


def test_default_split_trains(prepared, tmp_path):
    _, prefix = prepared
    train, valid, test = build_gpt_datasets([prefix], "949,50,1", 512, (64, 8, 8), 1234, cache_dir=str(tmp_path))
    assert len(train) >= 64 and len(valid) >= 8 and len(test) >= 8  # every sample of one epoch (Megatron)
    text = bytes(t for t in train[0]["tokens"].tolist() if t < 256).decode("utf-8", errors="replace")
    assert sum(c.isalpha() for c in text) > 200  # prose, not noise
