"""Atomic file writes: write to a temporary name in the same directory, then ``os.replace``."""
from __future__ import annotations

import os
import tempfile
from typing import BinaryIO

import numpy as np

__all__ = ["AtomicFile", "atomic_save_npy", "atomic_write_bytes", "atomic_write_text"]


class AtomicFile:
    """A binary file that appears at ``path`` only when ``commit()`` is called.

    Until then the data lives in ``{path}.tmp-XXXX`` next to it (same filesystem, so the final
    rename is atomic). ``discard()`` removes the temporary file.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        directory = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(directory):
            raise FileNotFoundError(f"output directory {directory} does not exist (for {path})")
        fd, self.tmp_path = tempfile.mkstemp(prefix=os.path.basename(path) + ".tmp-", dir=directory)
        self.file: BinaryIO = os.fdopen(fd, "wb", buffering=4 << 20)
        self._done = False

    def write(self, data: bytes | memoryview) -> None:
        """Append ``data``."""
        self.file.write(data)

    def commit(self) -> None:
        """Flush, fsync and rename the temporary file to its final name."""
        if self._done:
            raise RuntimeError(f"{self.path}: commit() after commit/discard")
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        # mkstemp creates 0600 files; give the result ordinary permissions (umask applies).
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(self.tmp_path, 0o666 & ~umask)
        os.replace(self.tmp_path, self.path)
        self._done = True

    def discard(self) -> None:
        """Close and delete the temporary file (idempotent)."""
        if self._done:
            return
        self.file.close()
        try:
            os.remove(self.tmp_path)
        except FileNotFoundError:
            pass
        self._done = True


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    f = AtomicFile(path)
    try:
        f.write(data)
        f.commit()
    except BaseException:
        f.discard()
        raise


def atomic_write_text(path: str, text: str) -> None:
    """Write UTF-8 ``text`` to ``path`` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_save_npy(path: str, array: np.ndarray) -> None:
    """``np.save`` to ``path`` atomically (``path`` should end in ``.npy``)."""
    f = AtomicFile(path)
    try:
        np.save(f.file, array, allow_pickle=False)
        f.commit()
    except BaseException:
        f.discard()
        raise
