"""Megatron-LM compatible memory-mapped indexed dataset (``.bin`` + ``.idx``).

The ``.idx`` layout (all little-endian, see docs/data.md):

=========  =====================  ==================================================
offset     type                   meaning
=========  =====================  ==================================================
0          9 bytes                magic ``b"MMIDIDX\\x00\\x00"``
9          ``<Q``                 version, always 1
17         ``<B``                 dtype code (1 uint8, 2 int8, 3 int16, 4 int32,
                                  5 int64, 6 float64, 7 float32, 8 uint16)
18         ``<Q``                 sequence count ``S``
26         ``<Q``                 document-index length ``D`` (documents + 1)
34         ``int32[S]``           sequence lengths (in elements)
34+4S      ``int64[S]``           byte offset of each sequence in ``.bin``
34+12S     ``int64[D]``           document index: 0, then ``S`` so far at each
                                  document end
=========  =====================  ==================================================

The ``.bin`` file is the plain concatenation of all sequences in the dtype.
"""
from __future__ import annotations

import os
import shutil
import struct
from typing import Iterable, Sequence

import numpy as np

from megatron_ls.data.atomic import AtomicFile, atomic_write_bytes

__all__ = [
    "DTYPE_CODES",
    "IndexedDataset",
    "IndexedDatasetBuilder",
    "IndexedDatasetError",
    "best_fitting_dtype",
    "data_file_path",
    "index_file_path",
]

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
HEADER_SIZE = len(MAGIC) + 8 + 1 + 8 + 8  # = 34 bytes

# Megatron-LM's DType enum values; the on-disk code identifies the token dtype.
DTYPE_CODES: dict[int, type] = {
    1: np.uint8,
    2: np.int8,
    3: np.int16,
    4: np.int32,
    5: np.int64,
    6: np.float64,
    7: np.float32,
    8: np.uint16,
}
_CODE_OF_DTYPE = {np.dtype(t): c for c, t in DTYPE_CODES.items()}


class IndexedDatasetError(ValueError):
    """A ``.bin``/``.idx`` pair is missing, truncated, corrupt or inconsistent."""


def index_file_path(path_prefix: str) -> str:
    """Path of the ``.idx`` file for ``path_prefix``."""
    return path_prefix + ".idx"


def data_file_path(path_prefix: str) -> str:
    """Path of the ``.bin`` file for ``path_prefix``."""
    return path_prefix + ".bin"


def dtype_code(dtype: np.dtype | type) -> int:
    """Megatron dtype code of ``dtype``; raises for dtypes the format cannot store."""
    dt = np.dtype(dtype)
    if dt not in _CODE_OF_DTYPE:
        names = ", ".join(np.dtype(t).name for t in DTYPE_CODES.values())
        raise IndexedDatasetError(f"dtype {dt.name} cannot be stored in a Megatron .idx (supported: {names})")
    return _CODE_OF_DTYPE[dt]


def best_fitting_dtype(vocab_size: int | None) -> type:
    """Smallest token dtype for ``vocab_size`` ids, following Megatron (uint16 below 65500, else int32)."""
    if vocab_size is not None and vocab_size < 65500:
        return np.uint16
    return np.int32


def _read_index(idx_path: str) -> tuple[np.dtype, np.ndarray, np.ndarray, np.ndarray]:
    """Validate ``idx_path`` and return (dtype, lengths, pointers, document_indices) as memmap views."""
    try:
        file_size = os.path.getsize(idx_path)
    except OSError as exc:
        raise IndexedDatasetError(f"cannot open index file {idx_path}: {exc.strerror}") from exc
    if file_size < HEADER_SIZE:
        raise IndexedDatasetError(
            f"{idx_path}: truncated index ({file_size} bytes, the header alone is {HEADER_SIZE} bytes)"
        )
    with open(idx_path, "rb") as f:
        header = f.read(HEADER_SIZE)
    if header[: len(MAGIC)] != MAGIC:
        raise IndexedDatasetError(
            f"{idx_path}: not a Megatron mmap index (magic {header[:len(MAGIC)]!r}, expected {MAGIC!r})"
        )
    (version,) = struct.unpack_from("<Q", header, 9)
    if version != VERSION:
        raise IndexedDatasetError(f"{idx_path}: unsupported index version {version} (only {VERSION} is known)")
    (code,) = struct.unpack_from("<B", header, 17)
    if code not in DTYPE_CODES:
        raise IndexedDatasetError(
            f"{idx_path}: unknown dtype code {code} (known codes: {sorted(DTYPE_CODES)})"
        )
    dtype = np.dtype(DTYPE_CODES[code])
    seq_count, doc_count = struct.unpack_from("<QQ", header, 18)
    expected = HEADER_SIZE + 12 * seq_count + 8 * doc_count
    if file_size != expected:
        raise IndexedDatasetError(
            f"{idx_path}: sizes do not add up: header says {seq_count} sequences and {doc_count} "
            f"document-index entries, which need {expected} bytes, but the file has {file_size}"
        )
    if doc_count < 1:
        raise IndexedDatasetError(f"{idx_path}: the document index is empty (it must start with 0)")
    mm = np.memmap(idx_path, mode="r", dtype=np.uint8)
    lengths = np.frombuffer(mm, dtype="<i4", count=seq_count, offset=HEADER_SIZE)
    pointers = np.frombuffer(mm, dtype="<i8", count=seq_count, offset=HEADER_SIZE + 4 * seq_count)
    doc_idx = np.frombuffer(mm, dtype="<i8", count=doc_count, offset=HEADER_SIZE + 12 * seq_count)
    _check_index_arrays(idx_path, dtype, lengths, pointers, doc_idx)
    return dtype, lengths, pointers, doc_idx


def _check_index_arrays(idx_path: str, dtype: np.dtype, lengths, pointers, doc_idx) -> None:
    """Reject an index whose arrays contradict each other (vectorised, one pass each)."""
    if doc_idx[0] != 0:
        raise IndexedDatasetError(f"{idx_path}: document index starts with {doc_idx[0]}, expected 0")
    if doc_idx[-1] != len(lengths):
        raise IndexedDatasetError(
            f"{idx_path}: document index ends at {doc_idx[-1]} but there are {len(lengths)} sequences"
        )
    if len(doc_idx) > 1 and np.any(np.diff(doc_idx) < 0):
        raise IndexedDatasetError(f"{idx_path}: document index is not non-decreasing")
    if len(lengths) == 0:
        return
    if np.any(lengths < 0):
        raise IndexedDatasetError(f"{idx_path}: negative sequence length at {int(np.argmax(lengths < 0))}")
    if pointers[0] != 0:
        raise IndexedDatasetError(f"{idx_path}: first sequence pointer is {pointers[0]}, expected 0")
    nbytes = lengths[:-1].astype(np.int64) * dtype.itemsize
    bad = np.flatnonzero(pointers[1:] != pointers[:-1] + nbytes)
    if bad.size:
        i = int(bad[0]) + 1
        raise IndexedDatasetError(
            f"{idx_path}: sequence pointer {i} is {pointers[i]}, but the lengths before it say "
            f"{int(pointers[i - 1] + nbytes[i - 1])}"
        )


class IndexedDataset:
    """Read-only, memory-mapped view of a Megatron ``.bin``/``.idx`` pair.

    ``ds[i]`` returns sequence ``i`` as a numpy array that views the mapped ``.bin`` (no copy);
    ``ds[a:b]`` returns a list of such arrays.
    """

    def __init__(self, path_prefix: str) -> None:
        self.path_prefix = path_prefix
        idx_path, bin_path = index_file_path(path_prefix), data_file_path(path_prefix)
        self._dtype, self._lengths, self._pointers, self._doc_idx = _read_index(idx_path)
        try:
            bin_size = os.path.getsize(bin_path)
        except OSError as exc:
            raise IndexedDatasetError(f"cannot open data file {bin_path}: {exc.strerror}") from exc
        need = int(self._pointers[-1]) + int(self._lengths[-1]) * self._dtype.itemsize if len(self._lengths) else 0
        if bin_size < need:
            raise IndexedDatasetError(
                f"{bin_path}: data file is truncated: {bin_size} bytes, but {idx_path} points to {need} bytes"
            )
        if bin_size != need:
            raise IndexedDatasetError(
                f"{bin_path}: data file has {bin_size} bytes, but {idx_path} accounts for {need}; "
                "the pair does not belong together"
            )
        # np.memmap refuses empty files; an empty dataset simply has an empty buffer.
        self._bin = np.memmap(bin_path, mode="r", dtype=np.uint8) if bin_size else np.zeros(0, np.uint8)
        # Plain Python ints for the hot path (numpy scalar arithmetic is several times slower).
        self._itemsize = self._dtype.itemsize
        # The whole .bin as one token array (a view): slicing it is the cheapest way to read tokens.
        self._tokens = np.frombuffer(self._bin, self._dtype)
        self._doc_lengths: np.ndarray | None = None
        self._doc_offsets: np.ndarray | None = None

    # -- metadata ---------------------------------------------------------------------------
    @property
    def dtype(self) -> np.dtype:
        """Element dtype of the stored sequences."""
        return self._dtype

    @property
    def sequence_lengths(self) -> np.ndarray:
        """int32 array, the length (in elements) of every sequence."""
        return self._lengths

    @property
    def sequence_pointers(self) -> np.ndarray:
        """int64 array, the byte offset of every sequence in the ``.bin`` file."""
        return self._pointers

    @property
    def document_indices(self) -> np.ndarray:
        """int64 array: 0 followed by the sequence count at each document end."""
        return self._doc_idx

    @property
    def num_documents(self) -> int:
        """Number of documents (``len(document_indices) - 1``)."""
        return len(self._doc_idx) - 1

    @property
    def document_lengths(self) -> np.ndarray:
        """int64 array, the token count of every document (sum of its sequences)."""
        if self._doc_lengths is None:
            cum = np.zeros(len(self._lengths) + 1, dtype=np.int64)
            np.cumsum(self._lengths, dtype=np.int64, out=cum[1:])
            self._doc_lengths = np.diff(cum[self._doc_idx])
            # A document's sequences are contiguous in .bin (checked at open), so one offset locates it.
            self._doc_offsets = cum[self._doc_idx[:-1]]
        return self._doc_lengths

    @property
    def document_offsets(self) -> np.ndarray:
        """int64 array, the token offset of every document's first token within ``tokens``."""
        self.document_lengths  # computes both
        return self._doc_offsets

    @property
    def tokens(self) -> np.ndarray:
        """Every token of the ``.bin`` as one read-only array view (sequences back to back)."""
        return self._tokens

    def get_document(self, doc: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        """Tokens ``[offset, offset + length)`` of document ``doc`` (all its sequences, concatenated)."""
        lengths = self.document_lengths
        d = int(doc)
        if not 0 <= d < len(lengths):
            raise IndexError(f"document {doc} out of range for {self.path_prefix} ({len(lengths)} documents)")
        doc_len = int(lengths[d])
        if length is None:
            length = doc_len - offset
        if offset < 0 or length < 0 or offset + length > doc_len:
            raise IndexError(
                f"slice [{offset}, {offset + length}) outside document {d} of length {doc_len} in {self.path_prefix}"
            )
        start = int(self._doc_offsets[d]) + offset
        return self._tokens[start : start + length]

    @staticmethod
    def exists(path_prefix: str) -> bool:
        """True when both ``{prefix}.idx`` and ``{prefix}.bin`` exist."""
        return os.path.isfile(index_file_path(path_prefix)) and os.path.isfile(data_file_path(path_prefix))

    # -- access -----------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._lengths)

    def __getitem__(self, idx: int | slice | np.integer) -> np.ndarray | list[np.ndarray]:
        if isinstance(idx, slice):
            start, stop, step = idx.indices(len(self))
            if step != 1:
                return [self.get(i) for i in range(start, stop, step)]
            if start >= stop:
                return []
            total = int(self._lengths[start:stop].sum(dtype=np.int64))
            flat = np.frombuffer(self._bin, self._dtype, total, int(self._pointers[start]))
            return np.split(flat, np.cumsum(self._lengths[start : stop - 1], dtype=np.int64))
        return self.get(idx)

    def get(self, idx: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        """Elements ``[offset, offset + length)`` of sequence ``idx`` as a view of the mapped file."""
        n = len(self._lengths)
        i = int(idx)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"sequence index {idx} out of range for {self.path_prefix} ({n} sequences)")
        seq_len = int(self._lengths[i])
        if length is None:
            length = seq_len - offset
        if offset < 0 or length < 0 or offset + length > seq_len:
            raise IndexError(
                f"slice [{offset}, {offset + length}) outside sequence {i} of length {seq_len} in {self.path_prefix}"
            )
        return np.frombuffer(self._bin, self._dtype, length, int(self._pointers[i]) + offset * self._itemsize)

    # Pickling (e.g. DataLoader workers under the "spawn" start method) must not copy the mapped
    # files into the pickle: only the path travels, and the receiver maps the files again.
    def __getstate__(self) -> dict:
        return {"path_prefix": self.path_prefix}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["path_prefix"])

    def __repr__(self) -> str:
        return (
            f"IndexedDataset({self.path_prefix!r}, sequences={len(self)}, documents={self.num_documents}, "
            f"dtype={self._dtype.name})"
        )


def _index_bytes(dtype: np.dtype, lengths: np.ndarray, doc_idx: np.ndarray) -> bytes:
    """Serialise an index in Megatron's layout."""
    lengths = np.asarray(lengths, dtype="<i4")
    doc_idx = np.asarray(doc_idx, dtype="<i8")
    pointers = np.zeros(len(lengths), dtype="<i8")
    if len(lengths) > 1:
        np.cumsum(lengths[:-1].astype(np.int64) * np.dtype(dtype).itemsize, out=pointers[1:])
    header = MAGIC + struct.pack("<Q", VERSION) + struct.pack("<B", dtype_code(dtype))
    header += struct.pack("<Q", len(lengths)) + struct.pack("<Q", len(doc_idx))
    return header + lengths.tobytes() + pointers.tobytes() + doc_idx.tobytes()


class IndexedDatasetBuilder:
    """Writes a Megatron ``.bin``/``.idx`` pair.

    Data goes to a temporary file next to ``bin_path``; ``finalize(idx_path)`` renames it into place
    and then writes the index atomically, so an interrupted run never leaves a pair that looks complete.
    Call ``abort()`` (or use the builder as a context manager) to discard a failed build.
    """

    def __init__(self, bin_path: str, dtype: np.dtype | type = np.int32) -> None:
        self.bin_path = bin_path
        self.dtype = np.dtype(dtype)
        dtype_code(self.dtype)  # validate early, before any file is created
        self._info = np.iinfo(self.dtype) if self.dtype.kind in "iu" else None
        self._file = AtomicFile(bin_path)
        self._lengths: list[int] = []
        self._doc_idx: list[int] = [0]
        self._finalized = False

    # -- adding data ------------------------------------------------------------------------
    def _as_array(self, tokens: Sequence[int] | np.ndarray) -> np.ndarray:
        if hasattr(tokens, "detach"):  # a torch tensor: avoid importing torch here
            tokens = tokens.detach().cpu().numpy()
        arr = np.asarray(tokens)
        if arr.ndim != 1:
            arr = arr.reshape(-1)
        if arr.dtype == self.dtype:
            return arr
        if arr.size and self._info is not None and arr.dtype.kind in "iub":
            lo, hi = int(arr.min()), int(arr.max())
            if lo < self._info.min or hi > self._info.max:
                raise IndexedDatasetError(
                    f"{self.bin_path}: token value {hi if hi > self._info.max else lo} does not fit in "
                    f"{self.dtype.name} (range {self._info.min}..{self._info.max}); use a wider dtype"
                )
        elif arr.size and self._info is not None and arr.dtype.kind == "f":
            raise IndexedDatasetError(f"{self.bin_path}: refusing to store float data as {self.dtype.name}")
        return arr.astype(self.dtype)

    def add_item(self, tokens: Sequence[int] | np.ndarray) -> None:
        """Append one sequence."""
        arr = self._as_array(tokens)
        self._file.write(arr.tobytes(order="C"))
        self._lengths.append(arr.size)

    def add_document(self, tokens: Sequence[int] | np.ndarray, lengths: Iterable[int]) -> None:
        """Append one document made of consecutive sequences of the given ``lengths``, then end it."""
        arr = self._as_array(tokens)
        lengths = [int(x) for x in lengths]
        if sum(lengths) != arr.size or any(x < 0 for x in lengths):
            raise IndexedDatasetError(
                f"{self.bin_path}: add_document got {arr.size} tokens but lengths {lengths[:8]}... sum to "
                f"{sum(lengths)}"
            )
        self._file.write(arr.tobytes(order="C"))
        self._lengths.extend(lengths)
        self.end_document()

    def add_raw_documents(self, data: bytes, doc_lengths: Sequence[int],
                          sequences_per_document: Sequence[int] | None = None) -> None:
        """Append documents from already-encoded ``data`` (in this builder's dtype).

        Without ``sequences_per_document`` each document is one sequence of ``doc_lengths[i]`` tokens and a zero
        length adds an empty document (no sequence), as Megatron does for empty text. With it, ``doc_lengths``
        are sequence lengths and document ``i`` is the next ``sequences_per_document[i]`` of them (0: empty).
        Used by the preprocessor, whose workers encode straight to bytes to keep inter-process traffic cheap.
        """
        if len(data) != sum(doc_lengths) * self.dtype.itemsize:
            raise IndexedDatasetError(
                f"{self.bin_path}: add_raw_documents got {len(data)} bytes for lengths summing to {sum(doc_lengths)}"
            )
        if sequences_per_document is not None and sum(sequences_per_document) != len(doc_lengths):
            raise IndexedDatasetError(f"{self.bin_path}: add_raw_documents got {len(doc_lengths)} sequences but "
                                      f"documents of {sum(sequences_per_document)}")
        self._file.write(data)
        if sequences_per_document is None:
            for n in doc_lengths:
                if n:
                    self._lengths.append(int(n))
                self._doc_idx.append(len(self._lengths))
            return
        self._lengths.extend(int(n) for n in doc_lengths)
        ends = np.cumsum(sequences_per_document, dtype=np.int64) + (len(self._lengths) - len(doc_lengths))
        self._doc_idx.extend(ends.tolist())

    def end_document(self) -> None:
        """Mark the end of a document (records the current sequence count)."""
        self._doc_idx.append(len(self._lengths))

    def add_index(self, path_prefix: str) -> None:
        """Append every sequence and document of the dataset at ``path_prefix`` (merging shards)."""
        other = IndexedDataset(path_prefix)
        if other.dtype != self.dtype:
            raise IndexedDatasetError(
                f"cannot merge {path_prefix} (dtype {other.dtype.name}) into {self.bin_path} "
                f"(dtype {self.dtype.name})"
            )
        offset = len(self._lengths)
        self._lengths.extend(other.sequence_lengths.tolist())
        self._doc_idx.extend((other.document_indices[1:] + offset).tolist())
        with open(data_file_path(path_prefix), "rb") as src:
            shutil.copyfileobj(src, self._file.file, length=16 << 20)

    # -- finishing --------------------------------------------------------------------------
    @property
    def num_sequences(self) -> int:
        """Sequences added so far."""
        return len(self._lengths)

    @property
    def num_documents(self) -> int:
        """Documents ended so far."""
        return len(self._doc_idx) - 1

    def finalize(self, idx_path: str) -> None:
        """Move the ``.bin`` into place and write the ``.idx`` (both atomically)."""
        if self._finalized:
            raise IndexedDatasetError(f"{self.bin_path}: finalize() called twice")
        if self._lengths and max(self._lengths) > np.iinfo(np.int32).max:
            raise IndexedDatasetError(f"{self.bin_path}: a sequence is longer than int32 allows")
        # A stale index from an earlier run must not pair with the new data for even a moment.
        if os.path.exists(idx_path):
            os.remove(idx_path)
        self._file.commit()
        atomic_write_bytes(idx_path, _index_bytes(self.dtype, np.asarray(self._lengths), np.asarray(self._doc_idx)))
        self._finalized = True

    def abort(self) -> None:
        """Discard the temporary data file (no-op after finalize)."""
        if not self._finalized:
            self._file.discard()

    def __enter__(self) -> "IndexedDatasetBuilder":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
