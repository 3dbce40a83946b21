#!/usr/bin/env python3
"""Tokenize a JSONL corpus into Megatron .bin/.idx files (see docs/data.md; logic in megatron_ls.data.preprocess)."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_ls.data.preprocess import PreprocessError, main  # noqa: E402

if __name__ == "__main__":
    try:
        main()
    except PreprocessError as exc:
        sys.exit(f"error: {exc}")
