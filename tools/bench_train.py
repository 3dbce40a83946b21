#!/usr/bin/env python
"""Training throughput of GPT-LS against the same model with full attention in every layer.

For every ``--seq-lengths`` entry and every variant (``ls`` = Long-Short attention in every layer, ``full`` = the
same GPT with ``full_attention_layers = all layers``) this builds ``GPTModel(TransformerConfig(...))`` in one
process (no DeepSpeed, no torch.distributed), runs ``--warmup`` untimed and ``--steps`` timed training steps
(forward + backward + torch AdamW step) on random tokens, and reports:

- tokens per second (from the median step time over all timed steps of all ``--repeats``) and model TFLOP/s
  per device (``megatron_ls.training.metrics.model_flops_per_token`` of each
  variant's own config, i.e. the FLOPs that variant actually needs, so ``full`` is credited with its O(N^2)
  attention work and ``ls`` only with its window + projection work);
- peak memory: on CUDA the allocator's ``max_memory_allocated`` for the point; on CPU the peak resident set
  size (``ru_maxrss``) of a fresh child process that runs only that point, together with its RSS just before
  the model was built (the difference is what the model, optimizer and activations added);
- the speedup ``ls tokens/s / full tokens/s`` per sequence length.

Every point runs in its own child process by default on CPU (``--isolate auto``) so that peak RSS is honest and
one point's allocator state cannot slow another; on CUDA points run in this process with the peak counter reset.
A point that runs out of memory is reported as ``oom`` instead of ending the run.

Example (CPU, a few minutes)::

    python tools/bench_train.py --num-layers 2 --hidden-size 128 --num-attention-heads 4 --window-size 128 \\
        --segment-length 16 --projection-rank 1 --micro-batch-size 1 --seq-lengths 1024 2048 4096 \\
        --json benchmarks/results/bench_train_cpu.json
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from typing import Any, Optional, Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from megatron_ls.config import TransformerConfig  # noqa: E402
from megatron_ls.training.metrics import model_flops_per_token  # noqa: E402
from tools.bench_common import device_name, git_commit  # noqa: E402

VARIANTS = ("ls", "full")
_RESULT_MARKER = "BENCH_TRAIN_POINT "
_CPU_DEFAULT_SEQS = (1024, 2048, 4096)
_GPU_DEFAULT_SEQS = (4096, 8192, 16384, 32768)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Command-line flags (model shape with megatron_ls names, benchmark controls)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    m = p.add_argument_group("model")
    m.add_argument("--num-layers", type=int, default=2)
    m.add_argument("--hidden-size", type=int, default=128)
    m.add_argument("--num-attention-heads", type=int, default=4)
    m.add_argument("--ffn-hidden-size", type=int, default=None, help="default 4 x hidden size")
    m.add_argument("--vocab-size", type=int, default=256, help="padded vocabulary (256 = byte level)")
    m.add_argument("--window-size", type=int, default=128, help="LS sliding window w")
    m.add_argument("--segment-length", type=int, default=16, help="LS projection chunk length l")
    m.add_argument("--projection-rank", type=int, default=1, help="LS projection rank r per chunk")
    m.add_argument("--no-dual-ln", action="store_true", help="turn DualLN off in the LS variant")
    m.add_argument("--attention-backend", default="auto", choices=("auto", "torch", "flex"))
    m.add_argument("--hidden-dropout", type=float, default=0.0,
                   help="0 by default: attention dropout would push full attention off the fused SDPA kernel "
                        "and LS off FlexAttention, which measures dropout, not attention")
    m.add_argument("--attention-dropout", type=float, default=0.0)
    m.add_argument("--recompute-activations", action="store_true")
    b = p.add_argument_group("benchmark")
    b.add_argument("--micro-batch-size", type=int, default=1)
    b.add_argument("--seq-lengths", type=int, nargs="+", default=None,
                   help=f"default {' '.join(map(str, _CPU_DEFAULT_SEQS))} on CPU, "
                        f"{' '.join(map(str, _GPU_DEFAULT_SEQS))} on CUDA")
    b.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    b.add_argument("--steps", type=int, default=5, help="timed training steps per point")
    b.add_argument("--warmup", type=int, default=2, help="untimed steps before timing")
    b.add_argument("--repeats", type=int, default=1,
                   help="rounds over all points, variants interleaved (each round a fresh model / process); the "
                        "step times of all rounds are pooled, so a burst of load from other processes hits both "
                        "variants alike")
    b.add_argument("--device", default=None, help="cpu or cuda[:i] (default cuda when available)")
    b.add_argument("--bf16", action="store_true", help="bfloat16 autocast (weights and optimizer stay fp32)")
    b.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    b.add_argument("--isolate", default="auto", choices=("auto", "on", "off"),
                   help="run each point in a fresh child process (auto: on for CPU, off for CUDA)")
    b.add_argument("--seed", type=int, default=1234)
    b.add_argument("--json", default=None, metavar="PATH", help="write parameters and results here")
    # Internal: a child process runs one point and prints its result.
    p.add_argument("--_point", nargs=2, metavar=("SEQ", "VARIANT"), default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.seq_lengths is None:
        args.seq_lengths = list(_GPU_DEFAULT_SEQS if args.device.startswith("cuda") else _CPU_DEFAULT_SEQS)
    if args.steps < 1 or args.warmup < 0 or args.micro_batch_size < 1 or args.repeats < 1:
        p.error("--steps and --repeats must be >= 1, --warmup >= 0 and --micro-batch-size >= 1")
    return args


def build_config(args: argparse.Namespace, seq_length: int, variant: str) -> TransformerConfig:
    """The TransformerConfig of one point; ``full`` lists every layer in ``full_attention_layers``."""
    full_layers = tuple(range(args.num_layers)) if variant == "full" else ()
    config = TransformerConfig(
        num_layers=args.num_layers, hidden_size=args.hidden_size, num_attention_heads=args.num_attention_heads,
        ffn_hidden_size=args.ffn_hidden_size, vocab_size=args.vocab_size, seq_length=seq_length,
        max_position_embeddings=seq_length, hidden_dropout=args.hidden_dropout,
        attention_dropout=args.attention_dropout, window_size=args.window_size,
        segment_length=args.segment_length, projection_rank=args.projection_rank,
        full_attention_layers=full_layers, dual_ln=not args.no_dual_ln, attention_backend=args.attention_backend,
        recompute_activations=args.recompute_activations, seed=args.seed)
    config.validate()
    return config


def _current_rss_mb() -> float:
    """Resident set size of this process now (Linux /proc), in MB; falls back to the peak elsewhere."""
    try:
        with open("/proc/self/statm") as fh:
            resident_pages = int(fh.read().split()[1])
        return resident_pages * os.sysconf("SC_PAGE_SIZE") / 2 ** 20
    except (OSError, ValueError, IndexError):
        return _peak_rss_mb()


def _peak_rss_mb() -> float:
    """Peak resident set size of this process (ru_maxrss is KiB on Linux, bytes on macOS), in MB."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2 ** 20 if sys.platform == "darwin" else peak / 1024


def _load_average() -> Optional[list]:
    """The machine's 1/5/15-minute load averages (other processes competing for the cores), if known."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _is_oom(exc: BaseException) -> bool:
    if isinstance(exc, MemoryError):
        return True
    oom_type = getattr(torch.cuda, "OutOfMemoryError", None)
    if oom_type is not None and isinstance(exc, oom_type):
        return True
    text = str(exc).lower()
    return "out of memory" in text or "can't allocate memory" in text or "defaultcpuallocator" in text


def run_point(args: argparse.Namespace, seq_length: int, variant: str) -> dict:
    """Time ``--steps`` training steps of one (sequence length, variant) point; returns its result row."""
    from megatron_ls.model import GPTModel

    device = torch.device(args.device)
    config = build_config(args, seq_length, variant)
    flops_per_token = model_flops_per_token(config)
    row: dict[str, Any] = {"seq_length": seq_length, "variant": variant,
                           "full_attention_layers": list(config.full_attention_layers),
                           "model_flops_per_token": flops_per_token}
    baseline_rss = _current_rss_mb()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    model = optimizer = None
    try:
        torch.manual_seed(args.seed)
        model = GPTModel(config).to(device).train()
        row["parameters"] = sum(p.numel() for p in model.parameters())
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01,
                                      fused=device.type == "cuda")
        generator = torch.Generator().manual_seed(args.seed)
        tokens = torch.randint(0, args.vocab_size, (args.micro_batch_size, seq_length + 1), generator=generator)
        tokens = tokens.to(device)
        inputs, labels = tokens[:, :-1], tokens[:, 1:]
        autocast = torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=args.bf16)

        def step() -> float:
            optimizer.zero_grad(set_to_none=True)
            with autocast:
                loss = model(inputs, labels).mean()
            loss.backward()
            optimizer.step()
            return float(loss.detach())

        for _ in range(args.warmup):
            step()
        times = []
        for _ in range(args.steps):
            _sync(device)
            start = time.perf_counter()
            loss = step()  # float() of the loss synchronises with the device
            _sync(device)
            times.append(time.perf_counter() - start)
    except (RuntimeError, MemoryError) as exc:
        if not _is_oom(exc):
            raise
        row.update(status="oom", error=str(exc).splitlines()[0][:300])
        del model, optimizer
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return row
    row.update(status="ok", loss=loss, tokens_per_step=args.micro_batch_size * seq_length, step_times_s=times)
    if device.type == "cuda":
        row["memory_kind"] = "cuda_max_memory_allocated"
        row["peak_memory_mb"] = torch.cuda.max_memory_allocated(device) / 2 ** 20
    else:
        peak = _peak_rss_mb()
        row["memory_kind"] = "peak_rss_of_process" if args._isolated else "peak_rss_of_shared_process"
        row["peak_memory_mb"] = peak
        row["baseline_rss_mb"] = baseline_rss
        row["peak_memory_above_baseline_mb"] = peak - baseline_rss
    return row


def summarize(rows: Sequence[dict]) -> dict:
    """Pool the repeats of one point: throughput from the MEDIAN step time (robust to bursts of load)."""
    failed = [r for r in rows if r.get("status") != "ok"]
    if failed:
        return dict(failed[0], repeats=len(rows))
    row = dict(rows[0])
    times = [t for r in rows for t in r["step_times_s"]]
    median_s = statistics.median(times)
    row.update(repeats=len(rows), step_times_s=times, median_step_s=median_s, mean_step_s=statistics.fmean(times),
               min_step_s=min(times), max_step_s=max(times), tokens_per_s=row["tokens_per_step"] / median_s,
               tflops_per_device=row["model_flops_per_token"] * row["tokens_per_step"] / median_s / 1e12,
               loss=[r["loss"] for r in rows])
    if "peak_memory_mb" in row:
        worst = max(rows, key=lambda r: r["peak_memory_mb"])
        for key in ("peak_memory_mb", "baseline_rss_mb", "peak_memory_above_baseline_mb"):
            if key in worst:
                row[key] = worst[key]
    return row


def run_point_in_child(argv: Sequence[str], seq_length: int, variant: str) -> dict:
    """Run one point in a fresh interpreter (same flags) and parse the result line it prints."""
    command = [sys.executable, os.path.abspath(__file__), *argv, "--_point", str(seq_length), variant]
    proc = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith(_RESULT_MARKER):
            return json.loads(line[len(_RESULT_MARKER):])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
    status = "oom" if proc.returncode in (-9, 137) else "error"  # the kernel's OOM killer sends SIGKILL
    return {"seq_length": seq_length, "variant": variant, "status": status, "returncode": proc.returncode,
            "error": " | ".join(tail)[-500:]}


def speedups(rows: Sequence[dict]) -> dict:
    """``{seq_length: ls tokens/s / full tokens/s}`` for every length where both variants finished."""
    by_key = {(r["seq_length"], r["variant"]): r for r in rows}
    out = {}
    for (seq, variant), row in sorted(by_key.items()):
        other = by_key.get((seq, "full"))
        if variant == "ls" and row.get("status") == "ok" and other and other.get("status") == "ok":
            out[str(seq)] = row["tokens_per_s"] / other["tokens_per_s"]
    return out


def format_table(rows: Sequence[dict], ratio: dict, device: str) -> str:
    """The results as a fixed-width text table, one line per point."""
    mem_label = "peak mem MB" if device.startswith("cuda") else "peak RSS MB (+model)"
    header = (f"{'seq':>7} {'variant':>7} {'median ms':>9} {'tokens/s':>10} {'TFLOP/s':>8} "
              f"{mem_label:>22} {'LS/full':>8}")
    lines = [header, "-" * len(header)]
    for r in rows:
        if r.get("status") != "ok":
            lines.append(f"{r['seq_length']:>7} {r['variant']:>7} {r.get('status', '?'):>9}  {r.get('error', '')[:60]}")
            continue
        if "peak_memory_above_baseline_mb" in r:
            mem = f"{r['peak_memory_mb']:.0f} (+{r['peak_memory_above_baseline_mb']:.0f})"
        else:
            mem = f"{r['peak_memory_mb']:.0f}"
        speed = ratio.get(str(r["seq_length"])) if r["variant"] == "ls" else None
        speed_text = f"{speed:.2f}x" if speed is not None else ""
        lines.append(f"{r['seq_length']:>7} {r['variant']:>7} {r['median_step_s'] * 1e3:>9.1f} "
                     f"{r['tokens_per_s']:>10.0f} {r['tflops_per_device']:>8.4f} {mem:>22} {speed_text:>8}")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> dict:
    """Run every point, print the table, write the JSON report; returns the report."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    isolate = args.isolate == "on" or (args.isolate == "auto" and not args.device.startswith("cuda"))
    if args._point is not None:  # child: one point, one result line
        args._isolated = True
        row = run_point(args, int(args._point[0]), args._point[1])
        print(_RESULT_MARKER + json.dumps(row), flush=True)
        return row
    args._isolated = isolate
    load_before = _load_average()
    raw: dict[tuple[int, str], list[dict]] = {(s, v): [] for s in args.seq_lengths for v in args.variants}
    for repeat in range(args.repeats):
        for seq in args.seq_lengths:
            for variant in args.variants:
                if raw[(seq, variant)] and raw[(seq, variant)][-1].get("status") != "ok":
                    continue  # an OOM does not get better by trying again
                row = run_point_in_child(argv, seq, variant) if isolate else run_point(args, seq, variant)
                raw[(seq, variant)].append(row)
                status = row.get("status")
                detail = (f"median step {statistics.median(row['step_times_s']) * 1e3:.1f} ms"
                          if status == "ok" else f"{status}: {row.get('error', '')[:200]}")
                print(f" round {repeat + 1}/{args.repeats} seq {seq:>6} {variant:>4}: {detail}", flush=True)
    rows = [summarize(raw[(s, v)]) for s in args.seq_lengths for v in args.variants]
    ratio = speedups(rows)
    print(format_table(rows, ratio, args.device))
    parameters = {k: v for k, v in vars(args).items() if not k.startswith("_")}
    report = {
        "tool": "tools/bench_train.py",
        "command": " ".join([os.path.relpath(os.path.abspath(__file__), os.getcwd()), *argv]),
        "timestamp_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": device_name(args.device),
        "device_type": "cuda" if args.device.startswith("cuda") else "cpu",
        "torch_version": torch.__version__,
        "torch_num_threads": torch.get_num_threads(),
        "python_version": platform.python_version(),
        "git_commit": git_commit(),
        "isolated_processes": isolate,
        "load_average_1_5_15min": {"before": load_before, "after": _load_average()},
        "memory_measure": ("torch.cuda.max_memory_allocated per point" if args.device.startswith("cuda") else
                           "ru_maxrss of the process that ran the point" + (
                               " (a fresh child per point); baseline_rss_mb = RSS before the model was built"
                               if isolate else " (shared by all points: only a running maximum)")),
        "parameters": parameters,
        "results": rows,
        "speedup_ls_over_full": ratio,
    }
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as fh:
            json.dump(report, fh, indent=2)
            fh.write("\n")
        print(f" wrote {args.json}")
    return report


if __name__ == "__main__":
    main()
