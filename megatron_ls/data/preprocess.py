"""JSONL -> Megatron ``.bin/.idx`` (``tools/preprocess_data.py``), with Megatron's flags.

One output pair per JSON key: ``{output_prefix}_{key}_document.{bin,idx}``, one document per input line: a
string is one sequence, a list of strings one sequence per non-empty item (Megatron-LM's pre-split sentences).
Work is split into ~1 MB batches of lines; ``--workers N`` tokenizes them in ``N`` processes (results come back in input order, already encoded to bytes). Outputs are written to
temporary names and renamed only after the whole input succeeded.
"""
from __future__ import annotations

import argparse
import multiprocessing
import sys
import time
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from megatron_ls.data.indexed_dataset import (
    DTYPE_CODES,
    IndexedDatasetBuilder,
    best_fitting_dtype,
    data_file_path,
    index_file_path,
)
from megatron_ls.data.jsonl import JsonlError, iter_line_batches, open_text_source, parse_document
from megatron_ls.data.tokenizers import TOKENIZER_TYPES, ByteTokenizer, TokenizerError, build_tokenizer

__all__ = ["PreprocessError", "PreprocessSummary", "get_args", "main", "output_prefix_for"]

_DTYPE_NAMES = {np.dtype(t).name: t for t in DTYPE_CODES.values() if np.dtype(t).kind in "iu"}


class PreprocessError(ValueError):
    """Bad flags or bad input; the message names the file (and line)."""


@dataclass
class PreprocessSummary:
    """What a run produced."""

    documents: int = 0
    input_bytes: int = 0
    tokens: dict = field(default_factory=dict)
    seconds: float = 0.0
    prefixes: dict = field(default_factory=dict)

    @property
    def docs_per_second(self) -> float:
        return self.documents / max(self.seconds, 1e-9)

    @property
    def mb_per_second(self) -> float:
        return self.input_bytes / 1e6 / max(self.seconds, 1e-9)


def get_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse the preprocessing flags (Megatron's names)."""
    from megatron_ls.arguments import FriendlyArgumentParser  # one-line flag errors, as the training entries

    p = FriendlyArgumentParser(description="Tokenize a JSONL corpus into Megatron .bin/.idx files.")
    g = p.add_argument_group("input data")
    g.add_argument("--input", required=True, help="JSONL file, one JSON object per line (may be gzip-compressed)")
    g.add_argument("--json-keys", nargs="+", default=["text"], help="keys to extract (default: text)")
    g = p.add_argument_group("tokenizer")
    g.add_argument("--tokenizer-type", required=True, choices=TOKENIZER_TYPES)
    g.add_argument("--tokenizer-model", default=None,
                   help="SentencePiece model file, or a Hugging Face tokenizer's local directory")
    g.add_argument("--vocab-file", default=None, help="GPT-2 vocab.json")
    g.add_argument("--merge-file", default=None, help="GPT-2 merges.txt")
    g.add_argument("--vocab-size", type=int, default=None, help="vocab size for NullTokenizer")
    g.add_argument("--append-eod", action="store_true", help="append the end-of-document token to each document")
    g = p.add_argument_group("output data")
    g.add_argument("--output-prefix", required=True, help="writes {prefix}_{key}_document.bin/.idx")
    g.add_argument("--dtype", default=None, choices=sorted(_DTYPE_NAMES),
                   help="token dtype (default: uint16 for vocabularies below 65500, else int32)")
    g = p.add_argument_group("runtime")
    g.add_argument("--workers", type=int, default=1, help="tokenizer processes (1 = in this process)")
    g.add_argument("--log-interval", type=int, default=1000, help="report progress every N documents")
    g.add_argument("--progress", choices=("auto", "on", "off"), default="auto",
                   help="progress bar on stderr (auto: when stderr is a terminal)")
    args = p.parse_args(argv)
    if args.workers < 1:
        p.error(f"--workers must be >= 1, got {args.workers}")
    if args.log_interval < 1:
        p.error(f"--log-interval must be >= 1, got {args.log_interval}")
    return args


def output_prefix_for(output_prefix: str, key: str) -> str:
    """Megatron's naming of the output pair for one JSON key."""
    return f"{output_prefix}_{key}_document"


def _make_tokenizer(args: argparse.Namespace):
    try:
        return build_tokenizer(args.tokenizer_type, tokenizer_model=args.tokenizer_model, vocab_file=args.vocab_file,
                               merge_file=args.merge_file, vocab_size=args.vocab_size)
    except TokenizerError as exc:
        raise PreprocessError(str(exc)) from None


def _choose_dtype(args: argparse.Namespace, vocab_size: int) -> np.dtype:
    if args.dtype is None:
        return np.dtype(best_fitting_dtype(vocab_size))
    dtype = np.dtype(_DTYPE_NAMES[args.dtype])
    if vocab_size - 1 > np.iinfo(dtype).max:
        raise PreprocessError(
            f"--dtype {args.dtype} holds ids up to {np.iinfo(dtype).max}, but the {args.tokenizer_type} "
            f"vocabulary has {vocab_size} ids"
        )
    return dtype


class _Encoder:
    """Turns a batch of raw JSONL lines into per-key (bytes, document lengths); lives in each worker."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.tokenizer = _make_tokenizer(args)
        self.dtype = _choose_dtype(args, self.tokenizer.vocab_size)
        self.byte_level = isinstance(self.tokenizer, ByteTokenizer)

    def _ids(self, text: str) -> np.ndarray:
        if self.byte_level:  # fast path: the UTF-8 bytes are the ids
            return np.frombuffer(text.encode("utf-8"), dtype=np.uint8)
        return np.asarray(self.tokenizer.tokenize(text), dtype=np.int64)

    def _encode_one(self, text: str | list[str]) -> list[np.ndarray]:
        """One document's sequences (Megatron: empty ones dropped, EOD appended to the last one)."""
        if isinstance(text, str):  # the common case: one sequence
            ids = self._ids(text)
            parts = [ids] if ids.size else []
        else:
            parts = [ids for ids in map(self._ids, text) if ids.size]
        seqs = []
        for j, ids in enumerate(parts):
            eod = self.args.append_eod and j == len(parts) - 1
            out = np.empty(ids.size + eod, dtype=self.dtype)
            out[: ids.size] = ids
            if eod:
                out[-1] = self.tokenizer.eod
            seqs.append(out)
        return seqs

    def encode_batch(self, batch: tuple[int, list[bytes]]):
        """Returns ``(error or None, documents, input bytes, {key: (bytes, sequence lengths, sequences per doc)})``."""
        start, lines = batch
        keys = self.args.json_keys
        chunks: dict[str, list[np.ndarray]] = {k: [] for k in keys}
        counts: dict[str, list[int]] = {k: [] for k in keys}
        docs = 0
        nbytes = 0
        for i, line in enumerate(lines):
            nbytes += len(line)
            try:
                doc = parse_document(line, keys, self.args.input, start + i)
                if doc is None:
                    continue
                for k in keys:
                    seqs = self._encode_one(doc[k])
                    chunks[k] += seqs
                    counts[k].append(len(seqs))
            except (JsonlError, TokenizerError) as exc:
                msg = str(exc) if isinstance(exc, JsonlError) else f"{self.args.input}:{start + i}: {exc}"
                return msg, docs, nbytes, None
            docs += 1
        out = {}
        for k in keys:
            data = np.concatenate(chunks[k]).tobytes() if chunks[k] else b""
            out[k] = (data, [a.size for a in chunks[k]], counts[k])
        return None, docs, nbytes, out


_worker_encoder: _Encoder | None = None


def _init_worker(args: argparse.Namespace) -> None:
    global _worker_encoder
    _worker_encoder = _Encoder(args)


def _encode_in_worker(batch):
    return _worker_encoder.encode_batch(batch)


def _progress_bar(args: argparse.Namespace):
    show = args.progress == "on" or (args.progress == "auto" and sys.stderr.isatty())
    if not show:
        return None
    from tqdm import tqdm

    return tqdm(unit="B", unit_scale=True, desc="preprocess", file=sys.stderr, mininterval=0.5)


def run(args: argparse.Namespace) -> PreprocessSummary:
    """Preprocess according to parsed ``args``; raises ``PreprocessError`` on bad input."""
    encoder = _Encoder(args)  # validates the tokenizer/dtype flags before any worker starts
    try:
        open_text_source(args.input).close()  # fail fast, before workers start, on a missing input
    except JsonlError as exc:
        raise PreprocessError(str(exc)) from None
    summary = PreprocessSummary(tokens={k: 0 for k in args.json_keys})
    builders: dict[str, IndexedDatasetBuilder] = {}
    pool = None
    bar = _progress_bar(args)
    t0 = time.perf_counter()
    try:
        for k in args.json_keys:
            prefix = output_prefix_for(args.output_prefix, k)
            try:
                builders[k] = IndexedDatasetBuilder(data_file_path(prefix), encoder.dtype)
            except FileNotFoundError as exc:
                raise PreprocessError(f"--output-prefix {args.output_prefix}: {exc}") from None
            summary.prefixes[k] = prefix
        batches = iter_line_batches(args.input)
        if args.workers > 1:
            pool = multiprocessing.Pool(args.workers, initializer=_init_worker, initargs=(args,))
            results = pool.imap(_encode_in_worker, batches, chunksize=1)
        else:
            results = map(encoder.encode_batch, batches)
        next_log = args.log_interval
        for error, docs, nbytes, out in results:
            if error is not None:
                raise PreprocessError(error)
            for k, (data, lengths, per_doc) in out.items():
                builders[k].add_raw_documents(data, lengths, per_doc)
                summary.tokens[k] += len(data) // encoder.dtype.itemsize
            summary.documents += docs
            summary.input_bytes += nbytes
            if bar is not None:
                bar.update(nbytes)
            if summary.documents >= next_log:
                elapsed = time.perf_counter() - t0
                print(f"Processed {summary.documents} documents ({summary.documents / elapsed:.1f} docs/s, "
                      f"{summary.input_bytes / 1e6 / elapsed:.2f} MB/s).", file=sys.stderr, flush=True)
                next_log = (summary.documents // args.log_interval + 1) * args.log_interval
        if summary.documents == 0:
            raise PreprocessError(f"--input {args.input}: no documents (the corpus is empty)")
        for k, b in builders.items():
            b.finalize(index_file_path(summary.prefixes[k]))
    except JsonlError as exc:
        raise PreprocessError(str(exc)) from None
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
        if bar is not None:
            bar.close()
        for b in builders.values():
            b.abort()  # no-op for finalized builders; removes temporary files otherwise
    summary.seconds = time.perf_counter() - t0
    return summary


def main(argv: Sequence[str] | None = None) -> PreprocessSummary:
    """Command-line entry point; prints a summary and returns it."""
    args = get_args(argv)
    summary = run(args)
    mb = summary.input_bytes / 1e6
    print(f"Processed {summary.documents} documents, {mb:.2f} MB in {summary.seconds:.2f} s: "
          f"{summary.docs_per_second:.1f} documents/s, {summary.mb_per_second:.2f} MB/s")
    for k, prefix in summary.prefixes.items():
        print(f"  {k}: {summary.tokens[k]} tokens -> {prefix}.bin/.idx")
    return summary
