"""Megatron mmap .bin/.idx: round trips, hand-built golden bytes, merging, and every kind of bad file."""
import os
import struct

import numpy as np
import pytest

from megatron_ls.data.indexed_dataset import (
    IndexedDataset,
    IndexedDatasetBuilder,
    IndexedDatasetError,
    best_fitting_dtype,
)

# Megatron's DType codes, written out independently of the module under test.
CODES = {np.uint8: 1, np.int8: 2, np.int16: 3, np.int32: 4, np.int64: 5, np.float64: 6, np.float32: 7, np.uint16: 8}


def golden_idx(dtype, lengths, doc_idx, version=1, magic=b"MMIDIDX\x00\x00", code=None):
    """An .idx built by hand from the documented layout (struct.pack, little-endian)."""
    itemsize = np.dtype(dtype).itemsize
    pointers, pos = [], 0
    for n in lengths:
        pointers.append(pos)
        pos += n * itemsize
    out = magic + struct.pack("<Q", version) + struct.pack("<B", CODES[dtype] if code is None else code)
    out += struct.pack("<Q", len(lengths)) + struct.pack("<Q", len(doc_idx))
    out += struct.pack(f"<{len(lengths)}i", *lengths)
    out += struct.pack(f"<{len(pointers)}q", *pointers)
    out += struct.pack(f"<{len(doc_idx)}q", *doc_idx)
    return out


def write_pair(prefix, idx_bytes, bin_bytes):
    with open(prefix + ".idx", "wb") as f:
        f.write(idx_bytes)
    with open(prefix + ".bin", "wb") as f:
        f.write(bin_bytes)


SEQS = [[3, 1, 4], [1, 5], [9, 2, 6, 5], [], [3, 5, 8, 9, 7]]
DOCS = [0, 2, 4, 5]  # documents: seqs {0,1}, {2,3}, {4}


def build(prefix, dtype, seqs=SEQS, docs=DOCS):
    b = IndexedDatasetBuilder(prefix + ".bin", dtype)
    ends = set(docs[1:])
    for i, s in enumerate(seqs):
        b.add_item(np.array(s, dtype=np.int64))
        if i + 1 in ends:
            b.end_document()
    b.finalize(prefix + ".idx")
    return prefix


@pytest.mark.parametrize("dtype", list(CODES))
def test_writer_produces_golden_bytes(tmp_path, dtype):
    prefix = build(str(tmp_path / "d"), dtype)
    with open(prefix + ".idx", "rb") as f:
        assert f.read() == golden_idx(dtype, [len(s) for s in SEQS], DOCS)
    with open(prefix + ".bin", "rb") as f:
        assert f.read() == np.concatenate([np.array(s, dtype=dtype) for s in SEQS]).tobytes()


@pytest.mark.parametrize("dtype", [np.uint16, np.int32, np.float32])
def test_reader_accepts_hand_built_golden_files(tmp_path, dtype):
    prefix = str(tmp_path / "g")
    data = b"".join(np.array(s, dtype=dtype).tobytes() for s in SEQS)
    write_pair(prefix, golden_idx(dtype, [len(s) for s in SEQS], DOCS), data)
    ds = IndexedDataset(prefix)
    assert len(ds) == len(SEQS) and ds.num_documents == 3 and ds.dtype == np.dtype(dtype)
    for i, s in enumerate(SEQS):
        np.testing.assert_array_equal(ds[i], np.array(s, dtype=dtype))
    np.testing.assert_array_equal(ds.document_indices, DOCS)
    np.testing.assert_array_equal(ds.sequence_lengths, [3, 2, 4, 0, 5])
    np.testing.assert_array_equal(ds.document_lengths, [5, 4, 5])
    np.testing.assert_array_equal(ds.get_document(1), [9, 2, 6, 5])
    np.testing.assert_array_equal(ds.get_document(0, 2, 2), [4, 1])


def test_access_is_zero_copy_and_slices(tmp_path):
    ds = IndexedDataset(build(str(tmp_path / "d"), np.uint16))
    item = ds[2]
    assert not item.flags.writeable and not item.flags.owndata  # a view of the read-only mapping
    assert np.shares_memory(item, ds[2:3][0])
    np.testing.assert_array_equal(ds.get(2, 1, 2), [2, 6])
    np.testing.assert_array_equal(ds.get(2, 3), [5])
    np.testing.assert_array_equal(ds[-1], SEQS[-1])
    parts = ds[1:4]
    assert [p.tolist() for p in parts] == SEQS[1:4]
    assert [p.tolist() for p in ds[0:5:2]] == SEQS[0:5:2]
    with pytest.raises(IndexError):
        ds[5]
    with pytest.raises(IndexError):
        ds.get(0, 2, 2)
    with pytest.raises(IndexError):
        ds.get_document(3)


def test_add_document_and_empty_documents(tmp_path):
    p = str(tmp_path / "a")
    b = IndexedDatasetBuilder(p + ".bin", np.int32)
    b.add_document([1, 2, 3, 4, 5], [2, 3])
    b.end_document()  # an empty document, as Megatron writes for empty text
    b.add_raw_documents(np.array([7, 8, 9], dtype=np.int32).tobytes(), [0, 3])
    b.finalize(p + ".idx")
    ds = IndexedDataset(p)
    np.testing.assert_array_equal(ds.document_indices, [0, 2, 2, 2, 3])
    np.testing.assert_array_equal(ds.document_lengths, [5, 0, 0, 3])
    np.testing.assert_array_equal(ds.get_document(0), [1, 2, 3, 4, 5])
    np.testing.assert_array_equal(ds.get_document(3), [7, 8, 9])
    with pytest.raises(IndexedDatasetError, match="sum to"):
        IndexedDatasetBuilder(str(tmp_path / "x.bin"), np.int32).add_document([1, 2], [3])


def test_empty_dataset_round_trip(tmp_path):
    p = str(tmp_path / "e")
    IndexedDatasetBuilder(p + ".bin", np.uint8).finalize(p + ".idx")
    ds = IndexedDataset(p)
    assert len(ds) == 0 and ds.num_documents == 0 and ds[0:0] == []


def test_merge_shards_with_add_index(tmp_path):
    a = build(str(tmp_path / "a"), np.uint16)
    b = build(str(tmp_path / "b"), np.uint16, seqs=[[10], [11, 12]], docs=[0, 1, 2])
    m = str(tmp_path / "m")
    builder = IndexedDatasetBuilder(m + ".bin", np.uint16)
    builder.add_index(a)
    builder.add_item([99])
    builder.end_document()
    builder.add_index(b)
    builder.finalize(m + ".idx")
    ds = IndexedDataset(m)
    assert [x.tolist() for x in ds[0 : len(ds)]] == SEQS + [[99], [10], [11, 12]]
    np.testing.assert_array_equal(ds.document_indices, [0, 2, 4, 5, 6, 7, 8])
    with open(m + ".idx", "rb") as f:  # the merged index is itself exactly Megatron's bytes
        assert f.read() == golden_idx(np.uint16, [3, 2, 4, 0, 5, 1, 1, 2], [0, 2, 4, 5, 6, 7, 8])
    c = build(str(tmp_path / "c"), np.int32)
    with pytest.raises(IndexedDatasetError, match="dtype int32"):
        IndexedDatasetBuilder(str(tmp_path / "n.bin"), np.uint16).add_index(c)


def test_builder_writes_atomically(tmp_path):
    p = str(tmp_path / "x")
    with pytest.raises(RuntimeError):
        with IndexedDatasetBuilder(p + ".bin", np.uint16) as b:
            b.add_item([1, 2, 3])
            raise RuntimeError("interrupted")
    assert os.listdir(tmp_path) == []  # nothing left behind, not even a temporary file
    b = IndexedDatasetBuilder(p + ".bin", np.uint16)
    b.add_item([1, 2, 3])
    assert not os.path.exists(p + ".bin") and not os.path.exists(p + ".idx")  # invisible until finalize
    b.end_document()
    b.finalize(p + ".idx")
    assert sorted(os.listdir(tmp_path)) == ["x.bin", "x.idx"]


def test_value_out_of_dtype_range_is_rejected(tmp_path):
    b = IndexedDatasetBuilder(str(tmp_path / "v.bin"), np.uint16)
    with pytest.raises(IndexedDatasetError, match="70000 does not fit in uint16"):
        b.add_item(np.array([1, 70000]))
    with pytest.raises(IndexedDatasetError, match="-1 does not fit"):
        b.add_item([-1])
    with pytest.raises(IndexedDatasetError, match="cannot be stored"):
        IndexedDatasetBuilder(str(tmp_path / "w.bin"), np.complex64)
    b.abort()


def test_best_fitting_dtype():
    assert best_fitting_dtype(257) is np.uint16 and best_fitting_dtype(65499) is np.uint16
    assert best_fitting_dtype(65500) is np.int32 and best_fitting_dtype(None) is np.int32


# ---- bad files: each must give one clear IndexedDatasetError naming the file ------------------

def good(tmp_path):
    return build(str(tmp_path / "d"), np.uint16)


def corrupt_idx(prefix, fn):
    with open(prefix + ".idx", "rb") as f:
        data = bytearray(f.read())
    with open(prefix + ".idx", "wb") as f:
        f.write(fn(data))


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda d: b"MMIDIDY\x00\x00" + d[9:], "not a Megatron mmap index"),
        (lambda d: d[:9] + struct.pack("<Q", 2) + d[17:], "unsupported index version 2"),
        (lambda d: d[:17] + bytes([9]) + d[18:], "unknown dtype code 9"),
        (lambda d: d[:20], "truncated index"),
        (lambda d: d[:-8], "sizes do not add up"),
        (lambda d: d + b"\x00" * 8, "sizes do not add up"),
        (lambda d: d[:18] + struct.pack("<Q", 6) + d[26:], "sizes do not add up"),
    ],
)
def test_corrupt_index_headers(tmp_path, mutate, message):
    p = good(tmp_path)
    corrupt_idx(p, mutate)
    with pytest.raises(IndexedDatasetError, match=message) as info:
        IndexedDataset(p)
    assert p + ".idx" in str(info.value)


def test_inconsistent_index_arrays(tmp_path):
    lengths = [len(s) for s in SEQS]
    cases = [
        (golden_idx(np.uint16, lengths, [1, 2, 4, 5]), "starts with 1"),
        (golden_idx(np.uint16, lengths, [0, 2, 4, 4]), "ends at 4"),
        (golden_idx(np.uint16, lengths, [0, 4, 2, 5]), "non-decreasing"),
        (golden_idx(np.uint16, [3, 2, 4, -1, 6], DOCS), "negative sequence length"),
    ]
    data = np.zeros(14, np.uint16).tobytes()
    for i, (idx, message) in enumerate(cases):
        p = str(tmp_path / f"c{i}")
        write_pair(p, idx, data)
        with pytest.raises(IndexedDatasetError, match=message):
            IndexedDataset(p)
    # Pointers that skip bytes: rewrite one pointer by hand.
    p = str(tmp_path / "ptr")
    idx = bytearray(golden_idx(np.uint16, lengths, DOCS))
    struct.pack_into("<q", idx, 34 + 4 * 5 + 8 * 2, 12)  # pointer of sequence 2 should be 10
    write_pair(p, bytes(idx), data)
    with pytest.raises(IndexedDatasetError, match="sequence pointer 2 is 12"):
        IndexedDataset(p)


def test_bin_size_must_match(tmp_path):
    p = good(tmp_path)
    size = os.path.getsize(p + ".bin")
    with open(p + ".bin", "r+b") as f:
        f.truncate(size - 2)
    with pytest.raises(IndexedDatasetError, match="truncated") as info:
        IndexedDataset(p)
    assert p + ".bin" in str(info.value)
    with open(p + ".bin", "r+b") as f:
        f.truncate(size + 2)
    with pytest.raises(IndexedDatasetError, match="does not belong together"):
        IndexedDataset(p)


def test_missing_files(tmp_path):
    with pytest.raises(IndexedDatasetError, match="cannot open index file"):
        IndexedDataset(str(tmp_path / "nope"))
    p = good(tmp_path)
    os.remove(p + ".bin")
    assert not IndexedDataset.exists(p)
    with pytest.raises(IndexedDatasetError, match="cannot open data file"):
        IndexedDataset(p)


def test_finalize_replaces_stale_index(tmp_path):
    p = build(str(tmp_path / "d"), np.uint16)
    build(p, np.uint16, seqs=[[1]], docs=[0, 1])
    ds = IndexedDataset(p)
    assert len(ds) == 1 and ds[0].tolist() == [1]
