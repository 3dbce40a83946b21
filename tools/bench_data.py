#!/usr/bin/env python3
"""Data-pipeline benchmark: preprocessing throughput (MB/s) and GPT-dataset random access (samples/s).

Preprocessing tokenizes a JSONL file built from the sample corpus (CPython's documentation prose,
repeated to ``--preprocess-mb``) with the byte-level tokenizer, once per ``--workers`` value.
Random access builds a synthetic uint16 dataset (``--dataset-tokens`` tokens, document lengths drawn
from a log-normal), a GPT dataset of ``--seq-length + 1``-token samples, reads every sample once to
warm the page cache, then times ``--access-samples`` reads in the shuffled order a training run uses.

    python tools/bench_data.py --json benchmarks/results/bench_data_cpu.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from megatron_ls.data.atomic import atomic_write_text  # noqa: E402
from megatron_ls.data.dataset_builder import build_gpt_datasets  # noqa: E402
from megatron_ls.data.indexed_dataset import IndexedDatasetBuilder  # noqa: E402
from megatron_ls.data.preprocess import main as preprocess_main  # noqa: E402
from megatron_ls.data.sample_corpus import collect_documents  # noqa: E402
from tools.bench_common import git_commit, git_dirty  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cpu_seconds() -> float:
    """CPU time of this process plus its finished children (worker pools), user + system."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def make_jsonl(path: str, megabytes: float) -> int:
    """Write about ``megabytes`` of JSONL from the sample corpus; returns the file size."""
    docs = [json.dumps({"text": d["text"]}, ensure_ascii=False) + "\n" for d in collect_documents()]
    block = "".join(docs).encode("utf-8")
    target = int(megabytes * 1e6)
    with open(path, "wb") as f:
        written = 0
        while written < target:
            f.write(block)
            written += len(block)
    return written


def bench_preprocess(tmp: str, megabytes: float, workers: list[int], repeats: int) -> list[dict]:
    """Byte-level preprocessing MB/s (best of ``repeats``) for each worker count."""
    src = os.path.join(tmp, "bench.jsonl")
    size = make_jsonl(src, megabytes)
    rows = []
    for w in workers:
        best = None
        for _ in range(repeats):
            cpu0 = _cpu_seconds()
            summary = preprocess_main(["--input", src, "--output-prefix", os.path.join(tmp, f"pre{w}"),
                                       "--tokenizer-type", "ByteTokenizer", "--append-eod", "--workers", str(w),
                                       "--log-interval", str(10**12), "--progress", "off"])
            summary.cpu_seconds = _cpu_seconds() - cpu0
            if best is None or summary.seconds < best.seconds:
                best = summary
        rows.append({"workers": w, "input_mb": size / 1e6, "documents": best.documents, "seconds": best.seconds,
                     "mb_per_s": best.mb_per_second, "docs_per_s": best.docs_per_second,
                     "cpu_seconds_all_processes": best.cpu_seconds})
    return rows


def bench_preprocess_spm(tmp: str, megabytes: float, workers: list[int], vocab_size: int) -> list[dict]:
    """SentencePiece preprocessing MB/s per worker count (tokenization-bound, so workers should help)."""
    from megatron_ls.data.spm_train import train

    src = os.path.join(tmp, "bench_spm.jsonl")
    size = make_jsonl(src, megabytes)
    model = train(src, os.path.join(tmp, "bench_sp"), vocab_size, input_sentence_size=200_000)
    rows = []
    for w in workers:
        summary = preprocess_main(["--input", src, "--output-prefix", os.path.join(tmp, f"sp{w}"),
                                   "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", model,
                                   "--append-eod", "--workers", str(w), "--log-interval", str(10**12),
                                   "--progress", "off"])
        rows.append({"workers": w, "input_mb": size / 1e6, "documents": summary.documents,
                     "seconds": summary.seconds, "mb_per_s": summary.mb_per_second,
                     "docs_per_s": summary.docs_per_second, "vocab_size": vocab_size})
    return rows


def make_dataset(prefix: str, tokens: int, seed: int = 0) -> int:
    """A synthetic uint16 dataset of about ``tokens`` tokens; returns the document count."""
    rng = np.random.default_rng(seed)
    lengths = np.maximum(1, rng.lognormal(mean=6.5, sigma=1.0, size=tokens // 500)).astype(np.int64)
    lengths = lengths[: np.searchsorted(np.cumsum(lengths), tokens) + 1]
    data = rng.integers(0, 50000, size=int(lengths.sum()), dtype=np.uint16)
    b = IndexedDatasetBuilder(prefix + ".bin", np.uint16)
    b.add_raw_documents(data.tobytes(), lengths.tolist())
    b.finalize(prefix + ".idx")
    return len(lengths)


def bench_access(tmp: str, dataset_tokens: int, seq_length: int, num_samples: int, access: int) -> dict:
    """Random-access samples/s of a GPT dataset from the page cache."""
    prefix = os.path.join(tmp, "synthetic")
    docs = make_dataset(prefix, dataset_tokens)
    t0 = time.perf_counter()
    cache = os.path.join(tmp, "c")
    train = build_gpt_datasets([prefix], "1", seq_length, (num_samples, 0, 0), 1234, cache_dir=cache)[0]
    build_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    build_gpt_datasets([prefix], "1", seq_length, (num_samples, 0, 0), 1234, cache_dir=cache)
    reuse_s = time.perf_counter() - t0
    for i in range(len(train)):  # warm the page cache (and the index memmaps)
        train.get_tokens(i)
    order = np.random.default_rng(1).integers(0, len(train), size=access).tolist()
    t0, c0 = time.perf_counter(), time.process_time()
    checksum = 0
    for i in order:
        checksum += int(train[i]["tokens"][0])
    seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
    t0 = time.perf_counter()
    for i in range(access):
        train[i % len(train)]
    seq_seconds = time.perf_counter() - t0
    return {"dataset_tokens": dataset_tokens, "documents": docs, "seq_length": seq_length, "num_samples": num_samples,
            "index_build_s": build_s, "index_reuse_s": reuse_s, "access_samples": access,
            "random_samples_per_s": access / seconds, "random_samples_per_cpu_s": access / cpu_seconds,
            "in_order_samples_per_s": access / seq_seconds,
            "random_tokens_per_s": access * (seq_length + 1) / seconds, "checksum": checksum}


def main(argv=None) -> dict:
    """Run both benchmarks, print a table, optionally write JSON."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preprocess-mb", type=float, default=64.0)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--spm-mb", type=float, default=8.0, help="input size for the SentencePiece run (0 = skip)")
    p.add_argument("--dataset-tokens", type=int, default=100_000_000)
    p.add_argument("--seq-length", type=int, default=2048)
    p.add_argument("--num-samples", type=int, default=40_000)
    p.add_argument("--access-samples", type=int, default=200_000)
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--tmp-dir", default=None, help="scratch directory (default: a new temporary one)")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(dir=args.tmp_dir) as tmp:
        pre = bench_preprocess(tmp, args.preprocess_mb, args.workers, args.repeats)
        spm_rows = bench_preprocess_spm(tmp, args.spm_mb, args.workers, 8000) if args.spm_mb > 0 else []
        acc = bench_access(tmp, args.dataset_tokens, args.seq_length, args.num_samples, args.access_samples)
    result = {
        "benchmark": "bench_data",
        "git_commit": (git_commit() or "unknown")
        + ("-dirty" if git_dirty(["megatron_ls/data", "tools/bench_data.py"]) else ""),
        "numpy": np.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "load_average_1min": os.getloadavg()[0],
        "preprocess_byte_level": pre,
        "preprocess_sentencepiece": spm_rows,
        "gpt_dataset_access": acc,
        "targets": {"preprocess_mb_per_s": 20.0, "random_samples_per_s_2048": 50_000},
    }
    print(f"{'benchmark':<44}{'value':>14}  unit")
    for row in pre:
        print(f"{'preprocess ByteTokenizer, workers=' + str(row['workers']):<44}{row['mb_per_s']:>14.1f}  MB/s"
              f"  ({row['docs_per_s']:.0f} docs/s, {row['input_mb']:.0f} MB)")
    for row in spm_rows:
        print(f"{'preprocess SentencePiece, workers=' + str(row['workers']):<44}{row['mb_per_s']:>14.1f}  MB/s"
              f"  ({row['docs_per_s']:.0f} docs/s, {row['input_mb']:.0f} MB)")
    label = f"GPT dataset random access, seq {acc['seq_length']}"
    print(f"{label:<44}{acc['random_samples_per_s']:>14.0f}  samples/s  ({acc['random_tokens_per_s'] / 1e6:.0f} "
          f"M tokens/s; {acc['random_samples_per_cpu_s']:.0f} per CPU-second)")
    print(f"{'GPT dataset in-order access':<44}{acc['in_order_samples_per_s']:>14.0f}  samples/s")
    print(f"{'index build (' + str(acc['num_samples']) + ' samples)':<44}{acc['index_build_s']:>14.3f}  s"
          f"  (reuse from cache: {acc['index_reuse_s']:.3f} s)")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        atomic_write_text(args.json, json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
