"""A sample corpus that needs no download: prose that ships with every CPython installation.

Sources (both under the PSF License, see docs/data.md):

- ``pydoc_data.topics``: the Python Language Reference sections that ``help()`` shows (~460 KB);
- docstrings of the pure-Python standard library (``ast``-parsed, never imported), at least
  ``min_chars`` long (~1 MB at the default 300).

Each reference topic and each docstring is one document; documents are shuffled with a fixed seed so
contiguous train/valid/test splits all see both sources. The exact text depends on the Python version.
"""
from __future__ import annotations

import ast
import functools
import json
import os
import random
import sys
import sysconfig
from typing import Iterator, Sequence

from megatron_ls.data.atomic import atomic_write_text

__all__ = ["collect_documents", "main", "write_jsonl"]

# Directories of the stdlib that hold tests, demos, bundled third-party code or generated files.
_SKIP_DIRS = {"test", "tests", "idlelib", "site-packages", "dist-packages", "lib2to3", "turtledemo",
              "__pycache__", "ensurepip", "tkinter", "unittest"}


_SCOPES = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)


def _scopes(node: ast.AST) -> Iterator[ast.AST]:
    """Module/class/function nodes in source order, descending through statements only.

    (``ast.walk`` would also visit every expression node, which is most of the parsing time.)
    """
    if isinstance(node, _SCOPES):
        yield node
    for name in ("body", "orelse", "finalbody", "handlers"):
        for child in getattr(node, name, None) or ():
            if isinstance(child, ast.AST) and not isinstance(child, ast.expr):
                yield from _scopes(child)


def _stdlib_docstrings(min_chars: int) -> list[dict]:
    lib = sysconfig.get_paths()["stdlib"]
    docs = []
    for root, dirs, files in os.walk(lib):
        dirs[:] = sorted(d for d in dirs if d not in _SKIP_DIRS and not d.startswith("config-"))
        for name in sorted(files):
            if not name.endswith(".py"):
                continue
            path = os.path.join(root, name)
            module = os.path.relpath(path, lib)[:-3].replace(os.sep, ".")
            try:
                with open(path, encoding="utf-8") as f:
                    tree = ast.parse(f.read())
            except (SyntaxError, UnicodeDecodeError, OSError):
                continue  # a few files are intentionally not valid Python 3 source
            for node in _scopes(tree):
                text = ast.get_docstring(node)
                if text and len(text) >= min_chars:
                    title = module if isinstance(node, ast.Module) else f"{module}.{node.name}"
                    docs.append({"title": title, "source": "stdlib-docstring", "text": text})
    return docs


@functools.lru_cache(maxsize=4)
def _collect(min_chars: int, seed: int) -> tuple[tuple[str, str, str], ...]:
    import pydoc_data.topics as topics

    docs = [{"title": k, "source": "pydoc-topics", "text": v.strip()} for k, v in sorted(topics.topics.items())]
    docs += _stdlib_docstrings(min_chars)
    random.Random(seed).shuffle(docs)
    return tuple((d["title"], d["source"], d["text"]) for d in docs)


def collect_documents(min_chars: int = 300, seed: int = 0) -> list[dict]:
    """All sample documents as ``{"title", "source", "text"}`` dicts, in a seeded shuffled order.

    Parsing the standard library takes a few seconds, so the result is memoised per process.
    """
    return [{"title": t, "source": s, "text": x} for t, s, x in _collect(min_chars, seed)]


def write_jsonl(path: str, docs: Sequence[dict]) -> int:
    """Write ``docs`` as JSONL atomically; returns the number of bytes of text."""
    lines = [json.dumps(d, ensure_ascii=False) for d in docs]
    atomic_write_text(path, "\n".join(lines) + "\n")
    return sum(len(d["text"].encode("utf-8")) for d in docs)


def main(argv: Sequence[str] | None = None) -> str:
    """Build ``{output_dir}/python_docs.jsonl`` and its ``.bin/.idx``; prints and returns the data prefix."""
    from megatron_ls.data.preprocess import main as preprocess_main

    from megatron_ls.arguments import FriendlyArgumentParser  # one-line flag errors, as the training entries

    p = FriendlyArgumentParser(description="Write the no-download sample corpus (Python's own docs) and tokenize it.")
    p.add_argument("--output-dir", required=True, help="directory for python_docs.jsonl and the .bin/.idx")
    p.add_argument("--tokenizer-type", default="ByteTokenizer",
                   help="as for preprocess_data.py (default: ByteTokenizer)")
    p.add_argument("--tokenizer-model", default=None)
    p.add_argument("--vocab-file", default=None)
    p.add_argument("--merge-file", default=None)
    p.add_argument("--min-docstring-chars", type=int, default=300, help="shortest docstring kept (default 300)")
    p.add_argument("--workers", type=int, default=1)
    args = p.parse_args(argv)
    os.makedirs(args.output_dir, exist_ok=True)
    docs = collect_documents(args.min_docstring_chars)
    jsonl = os.path.join(args.output_dir, "python_docs.jsonl")
    nbytes = write_jsonl(jsonl, docs)
    print(f"Wrote {len(docs)} documents ({nbytes / 1e6:.2f} MB of text, Python {sys.version.split()[0]}) to {jsonl}")
    pre = ["--input", jsonl, "--output-prefix", os.path.join(args.output_dir, "python_docs"),
           "--tokenizer-type", args.tokenizer_type, "--append-eod", "--workers", str(args.workers),
           "--log-interval", str(10**9)]
    for flag, value in (("--tokenizer-model", args.tokenizer_model), ("--vocab-file", args.vocab_file),
                        ("--merge-file", args.merge_file)):
        if value is not None:
            pre += [flag, value]
    summary = preprocess_main(pre)
    prefix = summary.prefixes["text"]
    print(f"Data prefix: {prefix}")
    return prefix
