"""Train a SentencePiece model from a JSONL corpus, offline (``tools/train_sentencepiece.py``).

Each non-empty line of each document's text is one SentencePiece training sentence. The model is
trained into a temporary directory and renamed to ``{model_prefix}.model/.vocab`` when complete.
"""
from __future__ import annotations

import argparse
import os
import shutil
import tempfile
from typing import Iterator, Sequence

from megatron_ls.data.jsonl import JsonlError, iter_line_batches, parse_document

__all__ = ["SentencePieceTrainError", "iter_sentences", "main", "train"]


class SentencePieceTrainError(ValueError):
    """Bad flags, bad input, or SentencePiece refused to train."""


def iter_sentences(path: str, keys: Sequence[str]) -> Iterator[str]:
    """Non-empty text lines of the ``keys`` of every document in a JSONL file."""
    for start, lines in iter_line_batches(path):
        for i, line in enumerate(lines):
            doc = parse_document(line, keys, path, start + i)
            if doc is None:
                continue
            for key in keys:
                for sentence in doc[key].splitlines():
                    if sentence.strip():
                        yield sentence


def train(input_path: str, model_prefix: str, vocab_size: int, *, json_keys: Sequence[str] = ("text",),
          model_type: str = "unigram", character_coverage: float = 1.0, byte_fallback: bool = True,
          input_sentence_size: int = 0, seed_sentencepiece_size: int = 1_000_000,
          extra: dict | None = None) -> str:
    """Train and return the path of ``{model_prefix}.model``. ``</s>`` (id 2) is the EOD piece."""
    import sentencepiece as spm

    if vocab_size < 8:
        raise SentencePieceTrainError(f"--vocab-size must be >= 8, got {vocab_size}")
    out_dir = os.path.dirname(os.path.abspath(model_prefix))
    if not os.path.isdir(out_dir):
        raise SentencePieceTrainError(f"--model-prefix {model_prefix}: directory {out_dir} does not exist")
    # Count first so an empty corpus (or a bad line anywhere) fails before the trainer starts.
    count = 0
    try:
        for _ in iter_sentences(input_path, json_keys):
            count += 1
    except JsonlError as exc:
        raise SentencePieceTrainError(str(exc)) from None
    if count == 0:
        raise SentencePieceTrainError(f"--input {input_path}: no text to train on (the corpus is empty)")
    tmp = tempfile.mkdtemp(prefix=".spm-", dir=out_dir)
    try:
        options = dict(
            sentence_iterator=iter_sentences(input_path, json_keys),
            model_prefix=os.path.join(tmp, "m"),
            vocab_size=vocab_size,
            model_type=model_type,
            character_coverage=character_coverage,
            byte_fallback=byte_fallback,
            input_sentence_size=input_sentence_size,
            shuffle_input_sentence=True,
            seed_sentencepiece_size=seed_sentencepiece_size,
            unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
            minloglevel=2,
        )
        options.update(extra or {})
        try:
            spm.SentencePieceTrainer.train(**options)
        except RuntimeError as exc:
            raise SentencePieceTrainError(f"SentencePiece could not train on {input_path}: {exc}") from None
        # .vocab first: the .model file appearing is what marks a finished run.
        os.replace(os.path.join(tmp, "m.vocab"), model_prefix + ".vocab")
        os.replace(os.path.join(tmp, "m.model"), model_prefix + ".model")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return model_prefix + ".model"


def main(argv: Sequence[str] | None = None) -> str:
    """Command-line entry point; returns the model path."""
    p = argparse.ArgumentParser(description="Train a SentencePiece tokenizer model from a JSONL corpus.")
    p.add_argument("--input", required=True, help="JSONL corpus (may be gzip-compressed)")
    p.add_argument("--json-keys", nargs="+", default=["text"])
    p.add_argument("--model-prefix", required=True, help="writes {prefix}.model and {prefix}.vocab")
    p.add_argument("--vocab-size", type=int, default=32000)
    p.add_argument("--model-type", choices=("unigram", "bpe", "char", "word"), default="unigram")
    p.add_argument("--character-coverage", type=float, default=1.0)
    p.add_argument("--no-byte-fallback", action="store_true", help="map unknown characters to <unk>")
    p.add_argument("--input-sentence-size", type=int, default=0, help="sample this many sentences (0 = all)")
    args = p.parse_args(argv)
    path = train(args.input, args.model_prefix, args.vocab_size, json_keys=args.json_keys,
                 model_type=args.model_type, character_coverage=args.character_coverage,
                 byte_fallback=not args.no_byte_fallback, input_sentence_size=args.input_sentence_size)
    print(f"Wrote {path} (use --tokenizer-type SentencePieceTokenizer --tokenizer-model {path})")
    return path
