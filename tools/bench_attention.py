#!/usr/bin/env python
"""Benchmark long-short attention against F.scaled_dot_product_attention (full attention), forward + backward.

For every sequence length and mode (causal / bidirectional) it times, in this process, LS (``megatron_ls.ops``)
and SDPA side by side (best of ``--repeats`` after a warm-up), and measures each one's peak extra memory:

* CUDA: ``torch.cuda.max_memory_allocated`` growth over the inputs, in this process;
* CPU: a fresh subprocess per point (no allocator state carried over from other points) that allocates the
  inputs, resets the kernel's peak-RSS counter (``/proc/self/clear_refs``), runs one forward + backward and
  reports ``VmHWM`` minus the RSS just before the run: the peak resident memory the op added, gradients of
  q/k/v included.

Useful FLOPs count only visible (query, key) pairs: forward ``4·B·H·D·pairs`` (QKᵀ and PV), forward + backward
3.5× that (the flash-attention convention); TFLOP/s is reported on GPU. Prints a table and writes JSON.

Example: ``python tools/bench_attention.py --seq-lens 1024,2048,4096,8192,16384,32768 --causal --json out.json``
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
import torch.nn.functional as F  # noqa: E402

from megatron_ls.ops import long_short_attention  # noqa: E402
from tools.bench_common import device_name, git_commit, git_dirty  # noqa: E402

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "fp64": torch.float64}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seq-lens", default="1024,2048,4096,8192,16384,32768",
                   help="comma-separated sequence lengths N")
    p.add_argument("--batch", type=int, default=1, help="B")
    p.add_argument("--heads", type=int, default=4, help="H")
    p.add_argument("--head-dim", type=int, default=64, help="D")
    p.add_argument("--window", type=int, default=256, help="w, the window / segment size")
    p.add_argument("--segment-len", type=int, default=16, help="l, the causal projection chunk length")
    p.add_argument("--rank", type=int, default=1, help="r, projected keys (per chunk in causal mode)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--backend", default="auto", choices=["auto", "torch", "flex"], help="LS backend")
    p.add_argument("--causal", action="store_true", help="benchmark causal mode (default: both modes)")
    p.add_argument("--bidirectional", action="store_true", help="benchmark bidirectional mode")
    p.add_argument("--repeats", type=int, default=3, help="timed repetitions per point (best is kept)")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch CPU threads")
    p.add_argument("--sdpa-max-len", type=int, default=1 << 30, help="skip SDPA above this N (too slow/big)")
    p.add_argument("--no-memory", action="store_true", help="skip the memory measurement")
    p.add_argument("--json", default=None, help="write results to this JSON file")
    p.add_argument("--_child", default=None, help=argparse.SUPPRESS)  # internal: one memory point
    args = p.parse_args(argv)
    try:
        args.seq_lens = [int(x) for x in str(args.seq_lens).split(",") if x.strip()]
    except ValueError:
        p.error(f"--seq-lens must be comma-separated ints, got {args.seq_lens!r}")
    if not args.seq_lens or min(args.seq_lens) < 1:
        p.error(f"--seq-lens must list positive lengths, got {args.seq_lens}")
    for name in ("batch", "heads", "head_dim", "repeats", "threads"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.window < 0 or args.rank < 0 or args.segment_len < 1:
        p.error(f"need --window >= 0, --rank >= 0, --segment-len >= 1; got {args.window}, {args.rank}, "
                f"{args.segment_len}")
    modes = [m for m, on in (("causal", args.causal), ("bidirectional", args.bidirectional)) if on]
    args.modes = modes or ["causal", "bidirectional"]
    return args


def make_inputs(args, n: int, causal: bool, impl: str):
    """Random q, k, v (and projection logits for LS), requiring grad, plus the output gradient."""
    dt, dev = DTYPES[args.dtype], torch.device(args.device)
    shape = (args.batch, args.heads, n, args.head_dim)
    q, k, v = (torch.randn(shape, dtype=dt, device=dev, requires_grad=True) for _ in range(3))
    pl = None
    if impl == "ls" and args.rank > 0:
        pl = torch.randn(args.batch, args.heads, n, args.rank, dtype=dt, device=dev, requires_grad=True)
    return q, k, v, pl, torch.randn(shape, dtype=dt, device=dev)


def run_once(args, impl: str, causal: bool, q, k, v, pl):
    """One forward of the chosen implementation."""
    if impl == "sdpa":
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    return long_short_attention(q, k, v, pl, window=args.window, causal=causal,
                                segment_len=args.segment_len if causal else None, backend=args.backend)


def _sync(dev: str) -> None:
    if dev.startswith("cuda"):
        torch.cuda.synchronize()


def _time_once(args, impl: str, causal: bool, inputs):
    q, k, v, pl, g = inputs
    for x in (q, k, v, pl):
        if x is not None:
            x.grad = None
    _sync(args.device)
    t0 = time.perf_counter()
    out = run_once(args, impl, causal, q, k, v, pl)
    _sync(args.device)
    t1 = time.perf_counter()
    out.backward(g)
    _sync(args.device)
    return t1 - t0, time.perf_counter() - t0


def time_points(args, impls, causal: bool, n: int):
    """Best forward and forward+backward wall time (s) per implementation.

    After one warm-up each, the implementations are timed in alternating rounds (order flipped every round),
    so a burst of load from other processes hits both alike; the best of ``--repeats`` rounds is kept.
    """
    inputs = {impl: make_inputs(args, n, causal, impl) for impl in impls}
    best = {impl: [float("inf"), float("inf")] for impl in impls}
    for impl in impls:
        _time_once(args, impl, causal, inputs[impl])  # warm-up: kernels, thread pools, allocator
    for rnd in range(args.repeats):
        for impl in (impls if rnd % 2 == 0 else impls[::-1]):
            fwd, total = _time_once(args, impl, causal, inputs[impl])
            best[impl] = [min(best[impl][0], fwd), min(best[impl][1], total)]
    return best


def _rss_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not found in /proc/self/status")


def measure_memory_here(args, impl: str, causal: bool, n: int) -> float:
    """Peak extra memory (MiB) of one forward+backward, measured in this process (see module docstring)."""
    if args.device.startswith("cuda"):
        q, k, v, pl, g = make_inputs(args, n, causal, impl)
        run_once(args, impl, causal, q, k, v, pl).backward(g)  # warm-up (workspace, kernels)
        for x in (q, k, v, pl):
            if x is not None:
                x.grad = None
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        run_once(args, impl, causal, q, k, v, pl).backward(g)
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2 ** 20
    # CPU: warm up the libraries on a tiny problem, then reset the peak-RSS counter around the real run
    wq, wk, wv, wpl, wg = make_inputs(args, min(n, 256), causal, impl)
    run_once(args, impl, causal, wq, wk, wv, wpl).backward(wg)
    del wq, wk, wv, wpl, wg
    q, k, v, pl, g = make_inputs(args, n, causal, impl)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS
    base = _rss_kb("VmRSS")
    run_once(args, impl, causal, q, k, v, pl).backward(g)
    return (_rss_kb("VmHWM") - base) / 1024


def measure_memory(args, impl: str, causal: bool, n: int) -> float:
    """Peak extra MiB: in-process on CUDA, a fresh subprocess per point on CPU."""
    if args.device.startswith("cuda"):
        return measure_memory_here(args, impl, causal, n)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--_child", f"{impl}:{int(causal)}:{n}",
           "--batch", str(args.batch), "--heads", str(args.heads), "--head-dim", str(args.head_dim),
           "--window", str(args.window), "--segment-len", str(args.segment_len), "--rank", str(args.rank),
           "--dtype", args.dtype, "--device", args.device, "--backend", args.backend,
           "--threads", str(args.threads), "--seq-lens", str(n)]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if res.returncode != 0:
        raise RuntimeError(f"memory subprocess for {impl} N={n} failed:\n{res.stderr[-2000:]}")
    return float(json.loads(res.stdout.strip().splitlines()[-1])["peak_extra_mib"])


def visible_pairs(args, n: int, causal: bool, impl: str) -> int:
    """Number of visible (query, key) pairs per (batch, head): the useful work of one forward."""
    if impl == "sdpa":
        return n * (n + 1) // 2 if causal else n * n
    w, r, l = args.window, args.rank, args.segment_len
    pairs = 0
    if causal:
        if w:
            pairs += sum(min(w, t + 1) for t in range(n))
        if r:
            chunks = (n - 1) // l
            pairs += r * sum(min(t // l, chunks) for t in range(n))
    else:
        if w:
            e = (w + 1) // 2
            for s in range(-(-n // w)):
                rows = min(w, n - s * w)
                pairs += rows * (min(n, (s + 1) * w + e) - max(0, s * w - e))
        pairs += r * n
    return pairs


def _fmt(x, spec):
    return "-" if x is None else format(x, spec)


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args._child:
        impl, causal, n = args._child.split(":")
        torch.manual_seed(0)
        peak = measure_memory_here(args, impl, bool(int(causal)), int(n))
        print(json.dumps({"peak_extra_mib": peak}))
        return 0
    on_gpu = args.device.startswith("cuda")
    rows = []
    for mode in args.modes:
        causal = mode == "causal"
        for n in args.seq_lens:
            point = {}
            impls = ["ls"] if n > args.sdpa_max_len else ["sdpa", "ls"]
            torch.manual_seed(0)
            load = os.getloadavg()[0]  # a shared machine's load makes wall times noisy: keep it on record
            times = time_points(args, impls, causal, n)
            for impl in impls:
                fwd, total = times[impl]
                flops = 3.5 * 4 * args.batch * args.heads * args.head_dim * visible_pairs(args, n, causal, impl)
                row = {"mode": mode, "impl": impl, "n": n, "fwd_ms": fwd * 1e3, "fwd_bwd_ms": total * 1e3,
                       "useful_fwd_bwd_gflop": flops / 1e9,
                       "tflops": flops / total / 1e12 if on_gpu else None,
                       "peak_extra_mib": None if args.no_memory else measure_memory(args, impl, causal, n),
                       "loadavg_1min": load}
                point[impl] = row
                rows.append(row)
            if "sdpa" in point:
                point["ls"]["speedup_vs_sdpa"] = point["sdpa"]["fwd_bwd_ms"] / point["ls"]["fwd_bwd_ms"]
                if point["ls"]["peak_extra_mib"] is not None and point["sdpa"]["peak_extra_mib"]:
                    ls_mib, sdpa_mib = point["ls"]["peak_extra_mib"], point["sdpa"]["peak_extra_mib"]
                    point["ls"]["memory_vs_sdpa"] = ls_mib / sdpa_mib
            print_row(point, on_gpu)
    result = {
        "device": device_name(args.device), "device_type": args.device, "torch": torch.__version__,
        "git_commit": git_commit() or "unknown",
        "git_dirty": git_dirty(["megatron_ls/ops", "tools/bench_attention.py"]), "threads": args.threads,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "config": {k: getattr(args, k) for k in ("batch", "heads", "head_dim", "window", "segment_len", "rank",
                                                 "dtype", "backend", "repeats", "modes")},
        "memory_method": ("cuda max_memory_allocated growth" if on_gpu else
                          "fresh subprocess per point: VmHWM after one fwd+bwd minus VmRSS before it "
                          "(peak counter reset via /proc/self/clear_refs)"),
        "results": rows,
        "summary": summarize(rows),
    }
    for line in result["summary"]:
        print(line)
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(json.dumps(result, indent=2) + "\n")
        os.replace(tmp, path)  # atomic: a reader never sees a half-written file
        print(f"wrote {path}")
    return 0


_HEADER_DONE = []


def print_row(point, on_gpu: bool) -> None:
    if not _HEADER_DONE:
        print(f"{'mode':>13} {'N':>7} | {'SDPA fwd+bwd ms':>15} {'MiB':>8} | {'LS fwd ms':>9} {'fwd+bwd ms':>10} "
              f"{'MiB':>8} | {'speedup':>7}" + (f" | {'TFLOP/s SDPA':>12} {'LS':>6}" if on_gpu else ""))
        _HEADER_DONE.append(True)
    s, l = point.get("sdpa", {}), point["ls"]
    line = (f"{l['mode']:>13} {l['n']:>7} | {_fmt(s.get('fwd_bwd_ms'), '15.1f')} "
            f"{_fmt(s.get('peak_extra_mib'), '8.1f')} | {l['fwd_ms']:9.1f} {l['fwd_bwd_ms']:10.1f} "
            f"{_fmt(l['peak_extra_mib'], '8.1f')} | "
            f"{_fmt(l.get('speedup_vs_sdpa'), '6.2f')}x")
    if on_gpu:
        line += f" | {_fmt(s.get('tflops'), '12.1f')} {_fmt(l['tflops'], '6.1f')}"
    print(line, flush=True)


def summarize(rows):
    """Plain-language lines: speedup at each N and LS memory growth between consecutive lengths."""
    out = []
    for mode in sorted({r["mode"] for r in rows}):
        ls = sorted((r for r in rows if r["mode"] == mode and r["impl"] == "ls"), key=lambda r: r["n"])
        for r in ls:
            if "speedup_vs_sdpa" in r:
                out.append(f"{mode} N={r['n']}: LS fwd+bwd {r['speedup_vs_sdpa']:.2f}x faster than SDPA")
        for a, b in zip(ls, ls[1:]):
            if a["peak_extra_mib"] and b["peak_extra_mib"] is not None:
                out.append(f"{mode} LS memory N={a['n']}->{b['n']} ({b['n'] / a['n']:.1f}x tokens): "
                           f"{b['peak_extra_mib'] / a['peak_extra_mib']:.2f}x")
    return out


if __name__ == "__main__":
    sys.exit(main())
