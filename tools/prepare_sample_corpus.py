#!/usr/bin/env python3
"""Build the no-download sample corpus (CPython's own documentation prose) as JSONL and .bin/.idx.

Usage: python tools/prepare_sample_corpus.py --output-dir data/sample   (prints the --data-path prefix)
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_ls.data.sample_corpus import main  # noqa: E402
from megatron_ls.training.faults import run_tool  # noqa: E402

if __name__ == "__main__":
    run_tool(main)  # bad flags, data or output directory: one line "error: ...", exit status 1
