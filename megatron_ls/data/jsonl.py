"""Reading JSONL corpora (plain or gzip) with line numbers and clear errors."""
from __future__ import annotations

import gzip
import json
import os
from typing import IO, Iterator, Sequence

__all__ = ["JsonlError", "open_text_source", "iter_line_batches", "parse_document"]

_GZIP_MAGIC = b"\x1f\x8b"


class JsonlError(ValueError):
    """A corpus file is missing, unreadable, not JSON, or lacks a key."""


def open_text_source(path: str) -> IO[bytes]:
    """Open ``path`` for binary reading, transparently decompressing gzip (by content, not extension)."""
    if not os.path.isfile(path):
        raise JsonlError(f"--input {path}: no such file")
    with open(path, "rb") as f:
        magic = f.read(2)
    if magic == _GZIP_MAGIC:
        return gzip.open(path, "rb")
    if path.endswith(".gz"):
        raise JsonlError(f"--input {path}: named .gz but is not gzip data")
    return open(path, "rb", buffering=1 << 20)


def iter_line_batches(path: str, batch_bytes: int = 1 << 20, batch_lines: int = 4096
                      ) -> Iterator[tuple[int, list[bytes]]]:
    """Yield ``(first_line_number, raw_lines)`` batches of about ``batch_bytes`` each (1-based numbers)."""
    lineno = 0
    batch: list[bytes] = []
    size = 0
    start = 1
    try:
        with open_text_source(path) as f:
            for line in f:
                lineno += 1
                batch.append(line)
                size += len(line)
                if size >= batch_bytes or len(batch) >= batch_lines:
                    yield start, batch
                    start, batch, size = lineno + 1, [], 0
    except (OSError, EOFError) as exc:  # gzip raises these on truncated/corrupt streams
        raise JsonlError(f"--input {path}: read error after line {lineno}: {exc}") from exc
    if batch:
        yield start, batch


def parse_document(line: bytes, keys: Sequence[str], path: str,
                   lineno: int) -> dict[str, str | list[str]] | None:
    """The ``keys`` of one JSONL line: a string, or a list of strings (one sequence each, as Megatron-LM
    accepts); None for a blank line. Raises ``JsonlError`` naming the line."""
    if not line.strip():
        return None
    try:
        obj = json.loads(line)
    except UnicodeDecodeError as exc:
        raise JsonlError(f"{path}:{lineno}: not UTF-8 ({exc.reason} at byte {exc.start})") from None
    except json.JSONDecodeError as exc:
        raise JsonlError(f"{path}:{lineno}: not valid JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(obj, dict):
        raise JsonlError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
    out = {}
    for key in keys:
        if key not in obj:
            have = ", ".join(sorted(obj)[:10]) or "none"
            raise JsonlError(f"{path}:{lineno}: no key {key!r} (keys present: {have}); check --json-keys")
        value = obj[key]
        if isinstance(value, list):
            bad = next((v for v in value if not isinstance(v, str)), None)
            if bad is not None:
                raise JsonlError(f"{path}:{lineno}: key {key!r} is a list holding a {type(bad).__name__}, "
                                 "expected strings")
        elif not isinstance(value, str):
            raise JsonlError(f"{path}:{lineno}: key {key!r} is {type(value).__name__}, expected a string or a list "
                             "of strings")
        out[key] = value
    return out
