"""IDX files (the MNIST / Fashion-MNIST format), plain or gzipped, and the Fashion-MNIST split layout.

An IDX file is: two zero bytes, a type code (0x08 unsigned byte, 0x09 signed byte, 0x0B int16, 0x0C int32,
0x0D float32, 0x0E float64), the number of dimensions, one big-endian uint32 per dimension, then the data
big-endian, row-major. Debian's ``dataset-fashion-mnist`` installs the four gzipped files under
``/usr/share/datasets/fashion-mnist`` (offline; nothing is ever downloaded here).
"""
from __future__ import annotations

import gzip
import os
from typing import Optional

import numpy as np

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                         "Bag", "Ankle boot")
_TYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"), 0x0D: np.dtype(">f4"),
          0x0E: np.dtype(">f8")}
# split -> (images stem, labels stem)
IDX_SPLITS = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
              "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


class IdxFormatError(ValueError):
    """A file that is not a well-formed IDX file; the message names it."""


def read_idx(path: str) -> np.ndarray:
    """The array stored in an IDX file (``.gz`` decompressed in memory; otherwise memory-mapped)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"IDX file {path} does not exist")
    if path.endswith(".gz"):
        with gzip.open(path, "rb") as fh:
            try:
                raw = fh.read()
            except (OSError, EOFError) as exc:
                raise IdxFormatError(f"{path}: damaged gzip stream ({exc})") from exc
        buffer: np.ndarray = np.frombuffer(raw, dtype=np.uint8)
    else:
        buffer = np.memmap(path, dtype=np.uint8, mode="r")
    if len(buffer) < 4 or buffer[0] != 0 or buffer[1] != 0 or int(buffer[2]) not in _TYPES:
        raise IdxFormatError(f"{path}: not an IDX file (bad magic number)")
    dtype, ndim = np.dtype(_TYPES[int(buffer[2])]), int(buffer[3])
    header = 4 + 4 * ndim
    if ndim == 0 or len(buffer) < header:
        raise IdxFormatError(f"{path}: truncated IDX header")
    shape = tuple(int(d) for d in buffer[4:header].view(">u4"))
    count = int(np.prod(shape))
    if len(buffer) - header != count * dtype.itemsize:
        raise IdxFormatError(f"{path}: header says {shape} x {dtype.itemsize} bytes, file holds "
                             f"{len(buffer) - header} bytes of data")
    return buffer[header:].view(dtype).reshape(shape)


def write_idx(path: str, array: np.ndarray) -> None:
    """Write ``array`` as an IDX file (gzipped when ``path`` ends in ``.gz``); used by tests and tools."""
    codes = {np.dtype(v).newbyteorder(">") if np.dtype(v).itemsize > 1 else np.dtype(v): k for k, v in _TYPES.items()}
    big = array.astype(array.dtype.newbyteorder(">")) if array.dtype.itemsize > 1 else array
    code = codes.get(big.dtype)
    if code is None:
        raise ValueError(f"IDX cannot store dtype {array.dtype}")
    payload = bytes([0, 0, code, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes() + big.tobytes()
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "wb") as fh:
        fh.write(payload)


def _find(directory: str, stem: str) -> Optional[str]:
    for name in (stem, stem + ".gz"):
        if os.path.isfile(os.path.join(directory, name)):
            return os.path.join(directory, name)
    return None


def is_idx_directory(directory: str) -> bool:
    """True when ``directory`` holds the training images of the MNIST/Fashion-MNIST layout."""
    return _find(directory, IDX_SPLITS["train"][0]) is not None


def load_idx_split(directory: str, split: str, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """``(images uint8 (N, H, W), labels int64 (N,))`` of ``split`` ('train' or 'test'), checked."""
    if split not in IDX_SPLITS:
        raise ValueError(f"IDX split must be one of {sorted(IDX_SPLITS)}, got {split!r}")
    paths = [_find(directory, stem) for stem in IDX_SPLITS[split]]
    missing = [stem for stem, p in zip(IDX_SPLITS[split], paths) if p is None]
    if missing:
        raise FileNotFoundError(f"--data-path {directory}: missing {', '.join(missing)}[.gz] (the MNIST/Fashion-"
                                f"MNIST layout; Debian: apt-get install dataset-fashion-mnist)")
    images, labels = read_idx(paths[0]), read_idx(paths[1])
    if images.ndim != 3 or images.dtype != np.uint8:
        raise IdxFormatError(f"{paths[0]}: expected uint8 images (N, H, W), got {images.dtype} {images.shape}")
    if labels.ndim != 1 or len(labels) != len(images):
        raise IdxFormatError(f"{paths[1]}: {labels.shape} labels for {len(images)} images in {paths[0]}")
    labels = labels.astype(np.int64)
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"--num-classes {num_classes}: {paths[1]} has labels {int(labels.min())}.."
                         f"{int(labels.max())} ({int(labels.max()) + 1} classes)")
    if split == "train" and len(np.unique(labels)) != num_classes:
        raise ValueError(f"--num-classes {num_classes}: {paths[1]} has {len(np.unique(labels))} classes")
    return images, labels
