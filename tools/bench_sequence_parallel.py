"""Sequence-parallel benchmark: per-rank activation memory, peak memory and time of one transformer layer's
forward + backward at TP = 2 (or ``--tp``), with and without ``--sequence-parallel``.

Per rank and setting: bytes saved for backward (the activations: every tensor autograd keeps, parameters
excluded, each storage once), peak bytes allocated during forward + backward (CPU: the profiler's allocation
timeline; CUDA: ``max_memory_allocated``), and the best-of-``--repeats`` step time. Runs itself under
``torchrun`` (gloo on CPU, NCCL on CUDA); a table on stdout and JSON under ``benchmarks/results/``.

Example: ``python tools/bench_sequence_parallel.py --device cpu`` (about a minute on 2 CPU cores).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Iterable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tools.bench_common import REPO, device_name, git_commit, git_dirty, parse_int_list, write_json_atomic  # noqa: E402

MEASURED = ["megatron_ls/parallel", "megatron_ls/model", "tools/bench_sequence_parallel.py"]


def saved_tensor_bytes(forward: Callable[[], object], exclude: Iterable[torch.Tensor] = (),
                       where: Callable[[torch.Tensor], bool] = lambda t: True) -> int:
    """Bytes of the distinct storages autograd saves for backward while ``forward()`` runs (``exclude``:
    parameters, which are not activations; ``where``: count only the saved tensors it accepts)."""
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in skip and where(t):
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = forward()
    del out
    return sum(seen.values())


def peak_allocated_bytes(step: Callable[[], object], device: str = "cpu") -> int:
    """Peak bytes allocated (above what was live before) while ``step()`` runs."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]" and e.device_type() == DeviceType.CPU)
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--tp", type=int, default=2, help="tensor-parallel size (processes)")
    p.add_argument("--seq-lengths", default="1024,4096", help="comma-separated sequence lengths")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--hidden-size", type=int, default=256)
    p.add_argument("--num-attention-heads", type=int, default=8)
    p.add_argument("--window-size", type=int, default=128)
    p.add_argument("--segment-length", type=int, default=16)
    p.add_argument("--projection-rank", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--output", default=None, help="JSON path (default benchmarks/results/"
                                                  "bench_sequence_parallel_<device>.json)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def measure(args: argparse.Namespace, seq: int, sp: bool) -> dict:
    """This rank's numbers for one layer forward + backward."""
    from megatron_ls.config import TransformerConfig
    from megatron_ls.model.transformer import TransformerLayer

    device = "cuda" if args.device == "cuda" else "cpu"
    cfg = TransformerConfig(num_layers=2, hidden_size=args.hidden_size, num_attention_heads=args.num_attention_heads,
                            seq_length=seq, window_size=args.window_size, segment_length=args.segment_length,
                            projection_rank=args.projection_rank, hidden_dropout=0.1, attention_dropout=0.0,
                            sequence_parallel=sp)
    layer = TransformerLayer(cfg, 0).to(device)
    tokens = seq // args.tp if sp else seq
    x = torch.randn(args.batch_size, tokens, args.hidden_size, device=device, requires_grad=True)
    saved = saved_tensor_bytes(lambda: layer(x), layer.parameters())
    peak = peak_allocated_bytes(lambda: layer(x).sum().backward(), device)
    best = float("inf")
    for _ in range(args.repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        layer(x).sum().backward()
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return {"seq_length": seq, "sequence_parallel": sp, "saved_activation_bytes": saved, "peak_bytes": peak,
            "seconds": best}


def worker(args: argparse.Namespace) -> None:
    import torch.distributed as dist

    from megatron_ls.parallel import state
    from megatron_ls.parallel.random import model_parallel_manual_seed

    state.initialize_distributed()
    state.initialize_model_parallel(tensor_model_parallel_size=args.tp)
    model_parallel_manual_seed(1)
    rows = [measure(args, seq, sp) for seq in parse_int_list(args.seq_lengths, "--seq-lengths")
            for sp in (False, True)]
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, rows)
    if dist.get_rank() == 0:
        print("RESULT " + json.dumps(gathered), flush=True)
    state.shutdown_distributed()


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker:
        worker(args)
        return
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"),
               PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(args.tp),
           __file__, "--worker", *(argv if argv is not None else sys.argv[1:])]
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
    if out.returncode != 0 or line is None:
        sys.exit(f"error: the torchrun workers failed (exit {out.returncode}):\n{out.stderr[-3000:]}")
    per_rank = json.loads(line[len("RESULT "):])
    print(f"one LS transformer layer, forward + backward, TP={args.tp}, B={args.batch_size}, h={args.hidden_size}, "
          f"{args.num_attention_heads} heads, w={args.window_size}, fp32 (rank 0; all ranks in the JSON)")
    print(f"{'seq':>7} {'SP':>4} {'saved activations MiB':>22} {'peak MiB':>9} {'ms':>8}")
    for row in per_rank[0]:
        print(f"{row['seq_length']:>7} {'on' if row['sequence_parallel'] else 'off':>4} "
              f"{row['saved_activation_bytes'] / 2 ** 20:>22.2f} {row['peak_bytes'] / 2 ** 20:>9.2f} "
              f"{row['seconds'] * 1000:>8.1f}")
    payload = {"benchmark": "bench_sequence_parallel", "device": device_name(args.device),
               "torch": torch.__version__, "git_commit": git_commit(), "git_dirty": git_dirty(MEASURED),
               "config": {k: v for k, v in vars(args).items() if k not in ("worker", "output")},
               "per_rank": per_rank}
    path = args.output or os.path.join(REPO, "benchmarks", "results", f"bench_sequence_parallel_{args.device}.json")
    write_json_atomic(path, payload)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
