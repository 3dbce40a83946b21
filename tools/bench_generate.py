#!/usr/bin/env python
"""Benchmark generation: decode speed and cache size of GPT-LS against its full-attention twin.

For every context length and model (``ls``: every layer Long-Short; ``full``: the same width and depth with
every layer full attention, i.e. an ordinary KV cache) one point:

1. builds the model (fixed seed, fp32 or bf16) and a random prompt of ``n`` tokens;
2. prefills the prompt in one pass, timing it and measuring its peak extra memory (CPU: ``VmHWM`` growth after
   resetting the kernel's peak counter through ``/proc/self/clear_refs``, in a fresh subprocess per point; CUDA:
   ``max_memory_allocated`` growth) -- the cache it leaves included;
3. records the cache's bytes (``DecodingCache.used_bytes``: content of every layer; the twin's is ``2·L·t·h``);
4. decodes ``--decode-steps`` tokens one at a time (greedy, after two warm-up steps) and reports the mean step
   time and tokens/s.

Prints a table and writes JSON (device, torch version, git commit, load average per point).
Example: ``python tools/bench_generate.py --contexts 2048,8192,32768 --json benchmarks/results/bench_generate_cpu.json``
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from tools.bench_common import (device_name, git_commit, git_dirty, parse_int_list, reset_peak_rss,  # noqa: E402
                                rss_kb, write_json_atomic)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--contexts", default="2048,8192,32768", help="comma-separated context lengths (tokens)")
    p.add_argument("--models", default="ls,full", help="ls, full or both")
    p.add_argument("--num-layers", type=int, default=8)
    p.add_argument("--hidden-size", type=int, default=512)
    p.add_argument("--num-attention-heads", type=int, default=8)
    p.add_argument("--window-size", type=int, default=512)
    p.add_argument("--segment-length", type=int, default=16)
    p.add_argument("--projection-rank", type=int, default=1)
    p.add_argument("--vocab-size", type=int, default=256)
    p.add_argument("--position-embedding-type", default="learned", choices=("learned", "rope", "none"))
    p.add_argument("--decode-steps", type=int, default=16, help="timed one-token steps after the prefill")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch CPU threads")
    p.add_argument("--json", default=None, help="write results to this JSON file")
    p.add_argument("--_child", default=None, help=argparse.SUPPRESS)  # internal: "model:n", one point
    args = p.parse_args(argv)
    try:
        args.contexts = parse_int_list(args.contexts, "--contexts")
    except ValueError as exc:
        p.error(str(exc))
    args.models = [m for m in str(args.models).split(",") if m]
    if not args.models or any(m not in ("ls", "full") for m in args.models):
        p.error(f"--models must list ls and/or full, got {args.models}")
    if args.decode_steps < 1 or args.threads < 1:
        p.error("--decode-steps and --threads must be >= 1")
    return args


def build_model(args, kind: str, max_length: int):
    """The benchmarked GPTModel: every layer LS (``ls``) or every layer full attention (``full``)."""
    from megatron_ls.config import TransformerConfig
    from megatron_ls.model import GPTModel

    config = TransformerConfig(
        num_layers=args.num_layers, hidden_size=args.hidden_size, num_attention_heads=args.num_attention_heads,
        vocab_size=args.vocab_size, seq_length=max_length, max_position_embeddings=max_length,
        position_embedding_type=args.position_embedding_type, hidden_dropout=0.0, attention_dropout=0.0,
        window_size=args.window_size, segment_length=args.segment_length, projection_rank=args.projection_rank,
        full_attention_layers=tuple(range(args.num_layers)) if kind == "full" else (), seed=1234)
    return GPTModel(config).to(device=args.device, dtype=DTYPES[args.dtype]).eval()


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run_point(args, kind: str, n: int) -> dict:
    """Prefill ``n`` tokens and decode ``--decode-steps`` more, in this process (see the module docstring)."""
    from megatron_ls.inference.cache import new_cache
    from megatron_ls.inference.incremental import forward_step, prefill

    steps = args.decode_steps + 2
    torch.manual_seed(0)
    model = build_model(args, kind, n + steps)
    prompt = torch.randint(0, args.vocab_size, (1, n), device=args.device)
    on_gpu = args.device.startswith("cuda")
    with torch.no_grad():
        prefill(model, prompt[:, :min(n, 64)], new_cache(model, 1))  # warm up kernels and thread pools
        cache = new_cache(model, 1, max_length=n + steps)
        _sync(args.device)
        if on_gpu:
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        else:
            base = reset_peak_rss()
        t0 = time.perf_counter()
        logits = prefill(model, prompt, cache)
        _sync(args.device)
        prefill_s = time.perf_counter() - t0
        peak_mib = ((torch.cuda.max_memory_allocated() - base) / 2 ** 20 if on_gpu
                    else (rss_kb("VmHWM") - base) / 1024)
        cache_bytes = cache.used_bytes()
        token = logits[:, -1].argmax(-1, keepdim=True)
        times = []
        for i in range(steps):
            _sync(args.device)
            t0 = time.perf_counter()
            token = forward_step(model, token, cache)[:, -1].argmax(-1, keepdim=True)
            _sync(args.device)
            if i >= 2:
                times.append(time.perf_counter() - t0)
    step_ms = 1e3 * sum(times) / len(times)
    return {"model": kind, "context": n, "prefill_s": prefill_s, "prefill_tokens_per_s": n / prefill_s,
            "prefill_peak_extra_mib": peak_mib, "cache_bytes": cache_bytes, "cache_mib": cache_bytes / 2 ** 20,
            "decode_step_ms": step_ms, "decode_step_ms_min": 1e3 * min(times),
            "decode_tokens_per_s": 1e3 / step_ms, "loadavg_1min": os.getloadavg()[0]}


def run_point_isolated(args, kind: str, n: int) -> dict:
    """CPU: a fresh subprocess per point, so no allocator state of another point inflates its memory."""
    if args.device.startswith("cuda"):
        return run_point(args, kind, n)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--_child", f"{kind}:{n}"]
    for name in ("num_layers", "hidden_size", "num_attention_heads", "window_size", "segment_length",
                 "projection_rank", "vocab_size", "position_embedding_type", "decode_steps", "dtype", "device",
                 "threads"):
        cmd += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if res.returncode != 0:
        raise RuntimeError(f"benchmark subprocess for {kind} n={n} failed:\n{res.stderr[-2000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def summarize(rows: list) -> list:
    """One line per context: cache ratio and decode speedup of LS over the twin."""
    out = []
    by = {(r["model"], r["context"]): r for r in rows}
    for n in sorted({r["context"] for r in rows}):
        ls, full = by.get(("ls", n)), by.get(("full", n))
        if ls and full:
            out.append(f"context {n}: LS cache {full['cache_bytes'] / ls['cache_bytes']:.1f}x smaller, decode step "
                       f"{full['decode_step_ms'] / ls['decode_step_ms']:.2f}x faster than the full-attention twin")
    ls_rows = sorted((r for r in rows if r["model"] == "ls"), key=lambda r: r["context"])
    for a, b in zip(ls_rows, ls_rows[1:]):
        out.append(f"LS prefill memory {a['context']}->{b['context']} ({b['context'] / a['context']:.0f}x tokens): "
                   f"{b['prefill_peak_extra_mib'] / max(a['prefill_peak_extra_mib'], 1e-9):.2f}x")
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args._child:
        kind, n = args._child.split(":")
        print(json.dumps(run_point(args, kind, int(n))))
        return 0
    rows = []
    print(f"{'model':>5} {'context':>8} | {'prefill s':>9} {'peak MiB':>9} | {'cache MiB':>9} | "
          f"{'step ms':>8} {'tok/s':>7}")
    for n in args.contexts:
        for kind in args.models:
            r = run_point_isolated(args, kind, n)
            rows.append(r)
            print(f"{kind:>5} {n:>8} | {r['prefill_s']:9.2f} {r['prefill_peak_extra_mib']:9.1f} | "
                  f"{r['cache_mib']:9.2f} | {r['decode_step_ms']:8.2f} {r['decode_tokens_per_s']:7.1f}", flush=True)
    result = {
        "device": device_name(args.device), "device_type": args.device, "torch": torch.__version__,
        "git_commit": git_commit() or "unknown",
        "git_dirty": git_dirty(["megatron_ls/inference", "megatron_ls/ops", "tools/bench_generate.py"]),
        "threads": args.threads, "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "config": {k: getattr(args, k) for k in ("num_layers", "hidden_size", "num_attention_heads", "window_size",
                                                 "segment_length", "projection_rank", "vocab_size",
                                                 "position_embedding_type", "decode_steps", "dtype")},
        "memory_method": ("cuda max_memory_allocated growth over the prefill" if args.device.startswith("cuda")
                          else "fresh subprocess per point: VmHWM after the prefill minus VmRSS before it"),
        "results": rows, "summary": summarize(rows),
    }
    for line in result["summary"]:
        print(line)
    if args.json:
        write_json_atomic(args.json, result)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
