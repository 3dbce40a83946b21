"""Long-range probe: FAR_RECALL accuracy of window-only, long-short, projection-only and full attention.

Each variant is the same bidirectional classifier (CLS token pooling, same seed, data, steps and learning rate)
trained with ``tasks/main.py``, one process after the other. The marker and the value to recall sit at least
``--min-distance`` tokens from the CLS token, beyond the receptive field of ``--num-layers`` window-only layers
(``L·w + max(w // 2, 1)`` positions), so window-only attention is at chance by construction while long-short
(projected global keys) and full attention can learn the task (megatron_ls/data/far_recall.py).

Example (about 40 minutes on one free CPU core with the defaults): ``python tools/bench_long_range.py``; a quick
look: ``python tools/bench_long_range.py --train-iters 50 --variants window ls``.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_ls.data.far_recall import window_receptive_field  # noqa: E402
from tools.bench_common import REPO, device_name, git_commit, git_dirty  # noqa: E402

# Variants pool with a CLS token in front (--pooling cls) unless they say otherwise.
VARIANTS = {
    "window": ["--projection-rank", "0"],
    "ls": [],
    "projection": ["--window-size", "0"],
    "full": ["--full-attention-layers", "ALL"],
    "ls-post-cls": ["--cls-last-layer"],  # the released post-CLS instead of a CLS token
    "ls-post-cls-rand": ["--cls-last-layer", "--cls-init-std", "1.0"],  # ... with a random CLS vector at init
}
MEASURED = ["megatron_ls", "tasks", "tools/bench_long_range.py", "tools/generate_task_data.py"]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variants", nargs="*", default=["window", "ls", "projection", "full"], choices=list(VARIANTS))
    p.add_argument("--data-prefix", default=os.path.join(REPO, "data", "far_recall", "far_recall"),
                   help="generated here when missing")
    p.add_argument("--length", type=int, default=512)
    p.add_argument("--min-distance", type=int, default=128)
    p.add_argument("--mode", choices=("needle", "pair"), default="needle",
                   help="needle: one far token names the label (one hop); pair: far marker + value (two hops)")
    p.add_argument("--train-samples", type=int, default=20000)
    p.add_argument("--num-layers", type=int, default=2)
    p.add_argument("--hidden-size", type=int, default=64)
    p.add_argument("--num-attention-heads", type=int, default=2)
    p.add_argument("--window-size", type=int, default=16)
    p.add_argument("--projection-rank", type=int, default=2)
    p.add_argument("--train-iters", type=int, default=800)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--init-method-std", type=float, default=0.07,
                   help="0.07 is PyTorch's default linear scale at hidden 64; at Megatron's 0.02 no variant left "
                        "chance in 600 steps")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=os.path.join(REPO, "benchmarks", "results", "bench_long_range_cpu.json"))
    p.add_argument("--work-dir", default=os.path.join(REPO, "runs", "bench_long_range"))
    return p.parse_args(argv)


def ensure_data(args: argparse.Namespace) -> None:
    if os.path.isfile(args.data_prefix + "_meta.json"):
        meta = json.load(open(args.data_prefix + "_meta.json"))
        gen = meta.get("generator", {})
        if (gen.get("length"), gen.get("min_distance"), gen.get("mode"), meta["splits"].get("train")) == (
                args.length, args.min_distance, args.mode, args.train_samples):
            return
    subprocess.run([sys.executable, "tools/generate_task_data.py", "--task", "FAR_RECALL", "--output-prefix",
                    args.data_prefix, "--length", str(args.length), "--min-distance", str(args.min_distance),
                    "--train-samples", str(args.train_samples), "--seed", str(args.seed), "--mode", args.mode,
                    "--no-jsonl"],
                   cwd=REPO, check=True)


def run_variant(args: argparse.Namespace, name: str) -> dict:
    extra = list(VARIANTS[name])
    if extra and extra[-1] == "ALL":
        extra[-1:] = [str(i) for i in range(args.num_layers)]
    results = os.path.join(args.work_dir, f"{name}.json")
    cmd = [sys.executable, "tasks/main.py", "--task", "FAR_RECALL", "--data-path", args.data_prefix,
           "--num-layers", str(args.num_layers), "--hidden-size", str(args.hidden_size),
           "--num-attention-heads", str(args.num_attention_heads), "--ffn-hidden-size", str(2 * args.hidden_size),
           "--seq-length", str(args.length + 1), "--window-size", str(args.window_size),
           "--projection-rank", str(args.projection_rank), "--hidden-dropout", "0", "--attention-dropout", "0",
           "--micro-batch-size", str(args.batch_size), "--train-iters", str(args.train_iters), "--lr", str(args.lr),
           "--lr-warmup-iters", str(args.train_iters // 10), "--lr-decay-style", "linear", "--weight-decay", "0",
           "--init-method-std", str(args.init_method_std), "--seed", str(args.seed), "--log-interval", "50",
           "--eval-interval", str(max(args.train_iters // 4, 1)),
           "--eval-iters", "8", "--make-vocab-size-divisible-by", "8", "--results-json", results, *extra]
    if "--cls-last-layer" not in extra:
        cmd += ["--pooling", "cls"]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), DS_ACCELERATOR="cpu")
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    summary = json.load(open(results))
    w, r = args.window_size, args.projection_rank
    keys = {"window": 2 * w if w else 0, "ls": 2 * w + r, "projection": r, "full": args.length + 1,
            "ls-post-cls": 2 * w + r, "ls-post-cls-rand": 2 * w + r}[name]
    return {"variant": name, "flags": extra, "keys_per_query": keys, "test_accuracy": summary["test"]["accuracy"],
            "valid_accuracy": summary["valid"]["accuracy"], "final_train_loss": summary["train_losses"][-1],
            "valid_history": [(h["iteration"], h["accuracy"]) for h in summary["history"] if h["split"] == "valid"],
            "seconds": time.perf_counter() - start, "load_avg_1min": os.getloadavg()[0]}


def main(argv=None) -> None:
    args = parse_args(argv)
    os.makedirs(args.work_dir, exist_ok=True)
    ensure_data(args)
    field = window_receptive_field(args.window_size, args.num_layers)
    print(f"FAR_RECALL ({args.mode}): length {args.length}, label at >= {args.min_distance} tokens from the CLS token; "
          f"window-only receptive field of the CLS token: {field} positions; chance 10%", flush=True)
    rows = []
    for name in args.variants:
        rows.append(run_variant(args, name))
        row = rows[-1]
        print(f"  {name:10s} test accuracy {100 * row['test_accuracy']:5.1f}%  ({row['seconds']:.0f} s)", flush=True)
    header = "| variant | keys per query | valid acc. by step | test accuracy | final train loss | time (s) |"
    print("\n" + header + "\n|---|---:|---|---:|---:|---:|")
    for row in rows:
        hist = ", ".join(f"{it}: {100 * acc:.0f}%" for it, acc in row["valid_history"])
        print(f"| {row['variant']} | {row['keys_per_query']} | {hist} | {100 * row['test_accuracy']:.1f}% | "
              f"{row['final_train_loss']:.3f} | {row['seconds']:.0f} |")
    out = {"config": vars(args), "window_receptive_field": field, "device": device_name("cpu"),
           "torch": torch.__version__, "commit": git_commit(), "dirty": git_dirty(MEASURED), "rows": rows}
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as fh:
        json.dump(out, fh, indent=1)
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
