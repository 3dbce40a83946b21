"""GPT samples: exact token content, splits, epochs, caches (reuse/invalidation/corruption), blending.

Equality with megatron-core itself is in test_megatron_parity.py; these check the contracts from first principles.
"""
import multiprocessing
import os
import sys
from pathlib import Path

import numpy as np
import pytest

from megatron_ls.data.blend_config import parse_data_path, parse_split, split_ranges
from megatron_ls.data.blended_dataset import blending_indices
from megatron_ls.data.dataset_builder import build_gpt_datasets
from megatron_ls.data.gpt_dataset import GPTDatasetError
from megatron_ls.data.index_cache import IndexCacheError

sys.path.insert(0, str(Path(__file__).resolve().parent))
from data_helpers import make_indexed  # noqa: E402

LENGTHS = [37, 5, 120, 0, 64, 9, 250, 18, 77, 3] * 10  # 100 documents, one of them empty per ten


@pytest.fixture
def corpus(tmp_path):
    prefix = str(tmp_path / "corpus")
    docs = make_indexed(prefix, LENGTHS)
    return prefix, docs


def reference_tokens(ds, seqs, i):
    """Sample i recomputed from first principles: concatenate the document index's sequences and cut."""
    stream = np.concatenate([seqs[d] for d in np.asarray(ds.document_index)])
    j = int(ds.shuffle_index[i])
    return stream[j * ds.seq_length : (j + 1) * ds.seq_length + 1]


def sequences(docs):
    """The sequences of make_indexed's documents (an empty document has none)."""
    return [d for d in docs if len(d)]


def test_samples_match_first_principles(corpus, tmp_path):
    prefix, docs = corpus
    seqs = sequences(docs)  # 90 sequences: the empty documents hold none
    train, valid, test = build_gpt_datasets([prefix], "80,10,10", 32, (500, 40, 0), seed=7,
                                            cache_dir=str(tmp_path / "cache"))
    assert test is None and len(train) >= 500 and len(valid) >= 40
    for ds in (train, valid):
        for i in range(len(ds)):
            sample = ds[i]
            assert sample["tokens"].dtype == np.int64 and sample["tokens"].shape == (33,)
            assert sample["loss_mask"].dtype == np.float32 and sample["loss_mask"].shape == (32,)
            assert np.all(sample["loss_mask"] == 1)
            np.testing.assert_array_equal(sample["tokens"], reference_tokens(ds, seqs, i))
    # Splits are contiguous *sequence* ranges (Megatron's GPT split): round(90 x [0.8, 0.9]) = 72, 81.
    assert set(np.asarray(train.document_index)) == set(range(0, 72))
    assert set(np.asarray(valid.document_index)) == set(range(72, 81))
    per_epoch = sum(len(x) for x in seqs[:72])
    epochs = len(train.document_index) // 72
    assert epochs == -(-(500 * 32 + 1) // per_epoch) and len(train.document_index) == epochs * 72
    # The dataset holds every sample of the epochs it built, not only the 500 asked for.
    assert len(train) == (epochs * per_epoch - 1) // 32


def test_unshuffled_samples_overlap_by_one_token(corpus, tmp_path):
    prefix, _ = corpus
    (train, _, _) = build_gpt_datasets([prefix], "1", 16, (100, 0, 0), seed=1, cache_dir=str(tmp_path / "c"))
    order = np.argsort(np.asarray(train.shuffle_index))  # dataset positions of samples 0, 1, 2, ...
    for a, b in zip(order[:-1], order[1:]):
        assert train[int(a)]["tokens"][-1] == train[int(b)]["tokens"][0]


def test_seed_determinism_and_difference(corpus, tmp_path):
    prefix, _ = corpus
    a = build_gpt_datasets([prefix], "1", 16, (50, 0, 0), seed=3, cache_dir=str(tmp_path / "a"))[0]
    b = build_gpt_datasets([prefix], "1", 16, (50, 0, 0), seed=3, cache_dir=str(tmp_path / "b"))[0]
    c = build_gpt_datasets([prefix], "1", 16, (50, 0, 0), seed=4, cache_dir=str(tmp_path / "a"))[0]
    assert len(a) == len(b) and all(np.array_equal(a[i]["tokens"], b[i]["tokens"]) for i in range(len(a)))
    assert not all(np.array_equal(a[i]["tokens"], c[i]["tokens"]) for i in range(50))


def test_eod_loss_mask(tmp_path):
    prefix = str(tmp_path / "e")
    make_indexed(prefix, [10, 10, 10], vocab=5)  # ids 0..4; call 4 the EOD token
    ds = build_gpt_datasets([prefix], "1", 8, (3, 0, 0), 0, cache_dir=str(tmp_path / "c"), eod_token=4,
                            eod_mask_loss=True)[0]
    for i in range(3):
        s = ds[i]
        np.testing.assert_array_equal(s["loss_mask"] == 0, s["tokens"][:-1] == 4)
    with pytest.raises(GPTDatasetError, match="needs eod_token"):
        build_gpt_datasets([prefix], "1", 8, (3, 0, 0), 0, eod_mask_loss=True)


def cache_files(d):
    return sorted(f for f in os.listdir(d) if f.endswith(".npy") or f.endswith(".json"))


def test_cache_reuse_and_invalidation(tmp_path):
    prefix = str(tmp_path / "d")
    make_indexed(prefix, LENGTHS)
    cache = str(tmp_path / "cache")
    ds = build_gpt_datasets([prefix], "1", 16, (64, 0, 0), 5, cache_dir=cache)[0]
    files = cache_files(cache)
    assert len(files) == 4  # doc/sample/shuffle index + description
    mtimes = {f: os.stat(os.path.join(cache, f)).st_mtime_ns for f in files}
    first = [ds[i]["tokens"] for i in range(len(ds))]
    assert not ds.ensure_index()  # a complete matching entry is reused, not rebuilt
    again = build_gpt_datasets([prefix], "1", 16, (64, 0, 0), 5, cache_dir=cache)[0]
    assert {f: os.stat(os.path.join(cache, f)).st_mtime_ns for f in files} == mtimes
    assert all(np.array_equal(x, again[i]["tokens"]) for i, x in enumerate(first))
    # Anything that shapes the index selects a new entry: seq length, sample count, seed...
    build_gpt_datasets([prefix], "1", 17, (64, 0, 0), 5, cache_dir=cache)
    build_gpt_datasets([prefix], "1", 16, (65, 0, 0), 5, cache_dir=cache)
    build_gpt_datasets([prefix], "1", 16, (64, 0, 0), 6, cache_dir=cache)
    assert len(cache_files(cache)) == 16
    # ... and so does changed data under the same prefix (stale caches are never used).
    make_indexed(prefix, LENGTHS[::-1])
    changed = build_gpt_datasets([prefix], "1", 16, (64, 0, 0), 5, cache_dir=cache)[0]
    assert len(cache_files(cache)) == 20
    assert changed.cache.stem != ds.cache.stem


def test_corrupt_cache_is_rebuilt_by_builder_and_rejected_by_others(tmp_path):
    prefix = str(tmp_path / "d")
    make_indexed(prefix, LENGTHS)
    cache = str(tmp_path / "cache")
    ds = build_gpt_datasets([prefix], "1", 16, (64, 0, 0), 5, cache_dir=cache)[0]
    expected = [ds[i]["tokens"] for i in range(len(ds))]
    sample_file = ds.cache.path("sample_index")
    with open(sample_file, "r+b") as f:
        f.truncate(100)
    with pytest.raises((IndexCacheError, GPTDatasetError), match="sample_index"):
        build_gpt_datasets([prefix], "1", 16, (64, 0, 0), 5, cache_dir=cache, is_builder=False)
    rebuilt = build_gpt_datasets([prefix], "1", 16, (64, 0, 0), 5, cache_dir=cache)[0]
    assert all(np.array_equal(x, rebuilt[i]["tokens"]) for i, x in enumerate(expected))


def test_non_builder_without_cache_fails_clearly(tmp_path):
    prefix = str(tmp_path / "d")
    make_indexed(prefix, LENGTHS)
    with pytest.raises(IndexCacheError, match="is_builder=True"):
        build_gpt_datasets([prefix], "1", 16, (64, 0, 0), 5, cache_dir=str(tmp_path / "c"), is_builder=False)


def _rank(rank, prefix, cache, barrier, queue):
    train = build_gpt_datasets([prefix], "90,10", 16, (200, 20, 0), 11, cache_dir=cache,
                               is_builder=(rank == 0), barrier=barrier.wait)[0]
    queue.put((rank, np.stack([train[i]["tokens"] for i in range(200)]).sum(axis=1).tolist()))


def test_one_builder_others_memory_map(tmp_path):
    """Three processes: rank 0 builds, all meet at the barrier, all read identical samples."""
    prefix = str(tmp_path / "d")
    make_indexed(prefix, LENGTHS)
    cache = str(tmp_path / "cache")
    ctx = multiprocessing.get_context("fork")
    barrier, queue = ctx.Barrier(3), ctx.Queue()
    procs = [ctx.Process(target=_rank, args=(r, prefix, cache, barrier, queue)) for r in range(3)]
    for p in procs:
        p.start()
    results = dict(queue.get(timeout=60) for _ in procs)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert results[0] == results[1] == results[2]
    assert len(cache_files(cache)) == 8  # built once: train + valid


def test_barrier_called_once_on_every_rank(corpus, tmp_path):
    prefix, _ = corpus
    calls = []
    build_gpt_datasets([prefix], "80,10,10", 16, (10, 10, 10), 1, cache_dir=str(tmp_path / "c"),
                       barrier=lambda: calls.append(1))
    assert calls == [1]


def test_parse_data_path():
    assert parse_data_path(["a"]) == (["a"], None)
    assert parse_data_path("0.7 a 0.3 b") == (["a", "b"], [0.7, 0.3])
    assert parse_data_path(["2", "x", "6", "y"]) == (["x", "y"], [2.0, 6.0])
    assert parse_data_path(["a", "b"]) == (["a", "b"], None)  # Megatron weights these by their sample counts
    assert parse_data_path(["1", "a"]) == (["a"], [1.0])
    for bad, msg in [([], "empty"), (["0.5", "a", "0.5"], "pairs"), (["0.5", "a", "x", "b"], "'x'"),
                     (["0", "a"], "not a positive number"), (["-1", "a", "2", "b"], "not a positive")]:
        with pytest.raises(GPTDatasetError, match=msg):
            parse_data_path(bad)


def test_parse_split_and_ranges():
    assert parse_split("949,50,1") == pytest.approx([0.949, 0.05, 0.001])
    assert parse_split("9/1") == pytest.approx([0.9, 0.1, 0.0])
    assert split_ranges(1000, parse_split("949,50,1")) == [(0, 949), (949, 999), (999, 1000)]
    assert split_ranges(7, [1 / 3] * 3) == [(0, 2), (2, 5), (5, 7)]
    assert split_ranges(10, parse_split("1,0,1")) == [(0, 5), None, (5, 10)]  # a zero share is no part at all
    assert split_ranges(20, parse_split("949,50,1"))[2] == (20, 20)  # a share too small for any sequence
    assert split_ranges(10, parse_split("25,50,25")) == [(0, 2), (2, 8), (8, 10)]  # round half to even, as Python
    for bad in ["", "a,b", "1,2,3,4", "0,0,0", "-1,2", "nan"]:
        with pytest.raises(GPTDatasetError, match="--split"):
            parse_split(bad)


def test_empty_split_part_and_tiny_inputs(tmp_path):
    prefix = str(tmp_path / "d")
    make_indexed(prefix, [50] * 20)
    with pytest.raises(GPTDatasetError, match="the test part gets 0 of the 20 sequences"):
        build_gpt_datasets([prefix], "949,50,1", 16, (10, 10, 10), 1, cache_dir=str(tmp_path / "c"))
    # An empty part that nobody asks samples from is fine.
    train, valid, test = build_gpt_datasets([prefix], "949,50,1", 16, (10, 10, 0), 1, cache_dir=str(tmp_path / "c"))
    assert test is None and len(valid) >= 10
    from megatron_ls.data.indexed_dataset import IndexedDatasetBuilder

    empty = str(tmp_path / "empty")
    builder = IndexedDatasetBuilder(empty + ".bin", np.uint16)
    for _ in range(3):  # zero-length sequences (Megatron loops forever on a part without tokens)
        builder.add_item([])
        builder.end_document()
    builder.finalize(empty + ".idx")
    with pytest.raises(GPTDatasetError, match="contains no tokens"):
        build_gpt_datasets([empty], "1", 16, (10, 0, 0), 1, cache_dir=str(tmp_path / "c"))
    none = str(tmp_path / "none")
    make_indexed(none, [0, 0])  # empty documents hold no sequence at all
    with pytest.raises(GPTDatasetError, match="no sequences"):
        build_gpt_datasets([none], "1", 16, (10, 0, 0), 1, cache_dir=str(tmp_path / "c"))
    with pytest.raises(GPTDatasetError, match="seq-length"):
        build_gpt_datasets([prefix], "1", 0, (10, 0, 0), 1, cache_dir=str(tmp_path / "c"))


def test_blending_indices_follow_the_largest_shortfall_rule():
    weights = [0.5, 0.3, 0.15, 0.05]
    dataset_index, sample_index = blending_indices(weights, 20000)
    counts = np.zeros(4, dtype=np.int64)
    for n, d in enumerate(dataset_index):
        shortfall = np.array(weights) * max(n, 1) - counts
        assert d == int(np.argmax(shortfall))  # the largest shortfall, the first dataset on a tie
        assert sample_index[n] == counts[d]  # each dataset's samples are taken in order 0, 1, 2...
        counts[d] += 1
        assert np.all(np.abs(counts - np.array(weights) * (n + 1)) <= 1.0), (n, counts)
    assert counts.tolist() == [10000, 6000, 3000, 1000]
    for few in ([0.7, 0.3], [1 / 3] * 3, [0.2] * 5):  # the two-dataset fast path and exact float ties
        di, _ = blending_indices(few, 999)
        c = np.zeros(len(few))
        for n, d in enumerate(di):
            assert d == int(np.argmax(np.array(few) * max(n, 1) - c))
            c[d] += 1


def test_blended_datasets(tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    make_indexed(a, [40] * 50, seed=1, vocab=100)
    make_indexed(b, [30] * 50, seed=2, vocab=1000, low=500)  # b's tokens are all >= 500
    cache = str(tmp_path / "cache")
    train, valid, _ = build_gpt_datasets(["0.7", a, "0.3", b], "90,10,0", 16, (1000, 100, 0), 3, cache_dir=cache)
    assert len(train) == 1000 and len(valid) == 100  # sum of ceil(n x w)
    which = np.array([train.dataset_of(i) for i in range(1000)])
    assert np.bincount(which).tolist() == [700, 300]
    assert np.bincount([valid.dataset_of(i) for i in range(100)]).tolist() == [70, 30]
    for i in range(1000):
        tokens = train[i]["tokens"]
        assert tokens.shape == (17,) and bool(tokens.min() >= 500) == bool(which[i] == 1)
    # Each part is built with Megatron's 0.5% surplus and yields its first samples, each once.
    for d, (part, n) in enumerate(zip(train.parts, (700, 300))):
        assert len(part) >= int(np.ceil(n * 1.005))
        seen = sorted(int(train.dataset_sample_index[i]) for i in np.flatnonzero(which == d))
        assert seen == list(range(n))
    # Reloading from the cache gives the same blend.
    again = build_gpt_datasets(["0.7", a, "0.3", b], "90,10,0", 16, (1000, 100, 0), 3, cache_dir=cache,
                               is_builder=False)[0]
    assert all(np.array_equal(train[i]["tokens"], again[i]["tokens"]) for i in range(0, 1000, 37))


def test_unweighted_prefixes_blend_one_epoch_each_by_length(tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    make_indexed(a, [40] * 30, seed=1)
    make_indexed(b, [40] * 10, seed=2)
    train = build_gpt_datasets([a, b], "1", 16, (90, 0, 0), 3, cache_dir=str(tmp_path / "c"))[0]
    sizes = [len(p) for p in train.parts]
    assert sizes == [(30 * 40 - 1) // 16, (10 * 40 - 1) // 16]  # one epoch each
    assert np.bincount([train.dataset_of(i) for i in range(90)]).tolist() == [68, 22]  # ~ 74 : 24
    with pytest.raises(GPTDatasetError, match="without weights has 98 samples .* but 200 are needed"):
        build_gpt_datasets([a, b], "1", 16, (200, 0, 0), 3, cache_dir=str(tmp_path / "c"))


def test_sequences_not_documents_are_the_unit(tmp_path):
    """Sentence-split data (several sequences per document): Megatron's GPT dataset shuffles sequences."""
    from megatron_ls.data.indexed_dataset import IndexedDatasetBuilder

    rng = np.random.default_rng(5)
    prefix = str(tmp_path / "s")
    b = IndexedDatasetBuilder(prefix + ".bin", np.int32)
    seqs = []
    for _ in range(30):
        lens = rng.integers(0, 20, rng.integers(1, 4)).tolist()
        tokens = rng.integers(0, 10**6, sum(lens))
        b.add_document(tokens, lens)
        seqs += np.split(tokens, np.cumsum(lens)[:-1])
    b.finalize(prefix + ".idx")
    ds = build_gpt_datasets([prefix], "1", 8, (60, 0, 0), 2, cache_dir=str(tmp_path / "c"))[0]
    assert sorted(set(np.asarray(ds.document_index).tolist())) == list(range(len(seqs)))
    for i in range(len(ds)):
        np.testing.assert_array_equal(ds[i]["tokens"], reference_tokens(ds, seqs, i))


def test_pickling_is_small_and_remaps(tmp_path):
    """DataLoader workers under "spawn" pickle the dataset: only paths may travel, not the data."""
    import pickle

    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    make_indexed(a, [5000] * 40, seed=1)
    make_indexed(b, [3000] * 40, seed=2)
    single = build_gpt_datasets([a], "1", 64, (2000, 0, 0), 3, cache_dir=str(tmp_path / "c"))[0]
    blend = build_gpt_datasets(["0.6", a, "0.4", b], "1", 64, (2000, 0, 0), 3, cache_dir=str(tmp_path / "c"))[0]
    for ds in (single, blend, single.indexed):
        data = pickle.dumps(ds)
        assert len(data) < 20_000  # the .bin alone is 400 KB
        copy = pickle.loads(data)
        for i in (0, 7, len(ds) - 1):
            x, y = ds[i], copy[i]
            if isinstance(x, dict):
                x, y = x["tokens"], y["tokens"]
            np.testing.assert_array_equal(x, y)
