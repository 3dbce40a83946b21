"""Helpers shared by the data tests (imported by path: the test dirs are not packages)."""
import numpy as np

from megatron_ls.data.indexed_dataset import IndexedDatasetBuilder


def make_indexed(prefix, doc_lengths, dtype=np.uint16, seed=0, vocab=250, low=0):
    """Write an indexed dataset with one sequence per document of the given lengths; returns its docs."""
    rng = np.random.default_rng(seed)
    docs = [rng.integers(low, vocab, n) for n in doc_lengths]
    b = IndexedDatasetBuilder(prefix + ".bin", dtype)
    for doc in docs:
        if len(doc):
            b.add_item(doc)
        b.end_document()
    b.finalize(prefix + ".idx")
    return docs
