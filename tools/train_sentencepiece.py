#!/usr/bin/env python3
"""Train a SentencePiece tokenizer model from a JSONL corpus (logic in megatron_ls.data.spm_train)."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_ls.data.spm_train import SentencePieceTrainError, main  # noqa: E402

if __name__ == "__main__":
    try:
        main()
    except SentencePieceTrainError as exc:
        sys.exit(f"error: {exc}")
