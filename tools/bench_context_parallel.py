"""Context-parallel benchmark: per-rank memory and step time, exchange volume, load balance, longest sequence.

Sections (each a table on stdout; everything in one JSON under benchmarks/results/):

* ``scaling``: a small GPT-LS (no position table) trains one step on one sequence of ``--scaling-length``
  tokens at CP = 1, 2, 4 (``torchrun`` workers, gloo or NCCL); per rank: step time (forward + backward) and peak
  resident memory added by the step (CPU: ``VmHWM`` after a reset minus RSS before; CUDA: max allocated).
* ``volume``: bytes one LS layer and one full-attention layer (all-gather K/V) exchange per step at CP = 4,
  counted with ``CommCounter``, at two lengths (the LS halo part must not grow with n), next to ring
  attention's volume (each rank's K/V pass once around the ring forward, dK/dV backward; computed).
* ``balance``: the attention compute of each CP rank's share of a causal sequence, timed one rank after the
  other in one process (no communication, no contention), for the contiguous and the balanced layout.
* ``longest``: one forward + backward of a tiny GPT-LS on ``--longest-length`` tokens (default 1,048,576) over
  ``--longest-cp`` ranks; wall time and per-rank peak memory.

Example: ``python tools/bench_context_parallel.py --device cpu`` (about 10 minutes on 2 CPU cores).
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

from tools.bench_common import REPO, device_name, git_commit, git_dirty  # noqa: E402

MEASURED = ["megatron_ls/parallel", "megatron_ls/ops", "megatron_ls/model", "tools/bench_context_parallel.py"]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--sections", nargs="*", default=["scaling", "volume", "balance", "longest"],
                   choices=["scaling", "volume", "balance", "longest"])
    p.add_argument("--scaling-length", type=int, default=65536, help="tokens per sequence for 'scaling'")
    p.add_argument("--cp-sizes", type=int, nargs="*", default=[1, 2, 4])
    p.add_argument("--balance-length", type=int, default=131072, help="sequence length for 'balance'")
    p.add_argument("--repeats", type=int, default=5, help="timing rounds for 'balance' (best of)")
    p.add_argument("--longest-length", type=int, default=1 << 20)
    p.add_argument("--longest-cp", type=int, default=4)
    p.add_argument("--layout", default="balanced", choices=("contiguous", "balanced"),
                   help="CP layout for 'scaling' and 'longest'")
    p.add_argument("--hidden-size", type=int, default=64)
    p.add_argument("--num-attention-heads", type=int, default=2)
    p.add_argument("--num-layers", type=int, default=2)
    p.add_argument("--window-size", type=int, default=128)
    p.add_argument("--segment-length", type=int, default=64)
    p.add_argument("--projection-rank", type=int, default=1)
    p.add_argument("--output", default=None, help="JSON path (default benchmarks/results/bench_context_parallel_"
                                                  "<device>.json)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # internal: run one section under torchrun
    p.add_argument("--length", type=int, default=0, help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ------------------------------------------------------------------------------------------- measurement
def _rss_kb(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


class PeakMemory:
    """Peak memory a block adds, in MiB: CUDA max-allocated, or the CPU resident-set high-water mark."""

    def __init__(self, device: str) -> None:
        self.device, self.mib = device, 0.0

    def __enter__(self) -> "PeakMemory":
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")  # reset VmHWM to the current RSS
            self.base = _rss_kb("VmRSS") * 1024
        return self

    def __exit__(self, *exc) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()
            self.mib = (torch.cuda.max_memory_allocated() - self.base) / 2 ** 20
        else:
            self.mib = (_rss_kb("VmHWM") * 1024 - self.base) / 2 ** 20


def _model_config(args, seq_length: int):
    from megatron_ls.config import TransformerConfig

    return TransformerConfig(num_layers=args.num_layers, hidden_size=args.hidden_size,
                             num_attention_heads=args.num_attention_heads, seq_length=seq_length,
                             position_embedding_type="none", hidden_dropout=0.0, attention_dropout=0.0,
                             window_size=args.window_size, segment_length=args.segment_length,
                             projection_rank=args.projection_rank, vocab_size=256)


def worker_train_step(args) -> dict:
    """Under torchrun: one training step of a tiny GPT-LS on one sequence split over all ranks (CP = world)."""
    import torch.distributed as dist

    from megatron_ls.model import GPTModel
    from megatron_ls.parallel import state as ps
    from megatron_ls.parallel.context_parallel import get_context_layout, set_context_layout_kind

    ps.initialize_distributed(timeout_s=1800)
    cp = dist.get_world_size()
    ps.initialize_model_parallel(context_parallel_size=cp)
    set_context_layout_kind(args.layout)
    dev = torch.device("cuda", torch.cuda.current_device()) if args.device == "cuda" else torch.device("cpu")
    torch.manual_seed(0)
    model = GPTModel(_model_config(args, args.length)).to(dev)
    layout = get_context_layout(args.length)
    tokens = torch.randint(0, 256, (1, args.length + 1), generator=torch.Generator().manual_seed(1))
    inputs = layout.slice_sequence(tokens[:, :-1]).to(dev)
    labels = layout.slice_sequence(tokens[:, 1:]).to(dev)
    warm = min(args.length, 2048 * cp)  # first calls allocate and pick kernels: keep that out of the timing
    warm_layout = get_context_layout(warm)
    model(warm_layout.slice_sequence(tokens[:, :warm]).to(dev),
          warm_layout.slice_sequence(tokens[:, 1:warm + 1]).to(dev)).sum().backward()
    model.zero_grad(set_to_none=True)
    dist.barrier()
    with PeakMemory(args.device) as mem:
        t0 = time.perf_counter()
        losses = model(inputs, labels)
        loss = losses.sum() / args.length  # this rank's share of the sequence mean
        loss.backward()
        if args.device == "cuda":
            torch.cuda.synchronize()
        step_s = time.perf_counter() - t0
    total = loss.detach().clone()
    dist.all_reduce(total)
    rows = [None] * cp
    dist.all_gather_object(rows, {"rank": dist.get_rank(), "step_s": step_s, "peak_mib": mem.mib,
                                  "local_tokens": layout.local_length})
    ps.destroy_model_parallel()
    ps.shutdown_distributed()
    return {"cp": cp, "length": args.length, "loss": float(total), "ranks": rows}


def worker_volume(args) -> dict:
    """Under torchrun: CP bytes of one LS layer and one full-attention layer (fwd + bwd) at two lengths."""
    import torch.distributed as dist

    from megatron_ls.model.attention import SelfAttention
    from megatron_ls.parallel import CommCounter
    from megatron_ls.parallel import state as ps

    ps.initialize_distributed(timeout_s=600)
    cp = dist.get_world_size()
    ps.initialize_model_parallel(context_parallel_size=cp)
    out = []
    for n in (args.length // 4, args.length):
        cfg = _model_config(args, n)
        for full in (False, True):
            layer = SelfAttention(cfg, 0, full=full)
            x = torch.randn(1, n // cp, cfg.hidden_size, requires_grad=True)
            with CommCounter() as cc:
                layer(x).sum().backward()
            sent = cc.total_bytes("send") + cc.total_bytes("all_gather") + cc.total_bytes("all_reduce")
            sent += cc.total_bytes("reduce_scatter") // cp  # a reduce-scatter moves 1/cp of its input per rank
            out.append({"n": n, "kind": "full (all-gather K/V)" if full else "long-short", "cp": cp,
                        "bytes_per_rank": sent, "halo_bytes": cc.total_bytes("send"),
                        "detail": cc.summary()})
        d = cfg.hidden_size  # all heads' K and V
        ring = 2 * (cp - 1) * (n // cp) * 2 * d * 4  # K|V around the ring forward, dK|dV backward, fp32
        out.append({"n": n, "kind": "ring attention (computed)", "cp": cp, "bytes_per_rank": ring,
                    "halo_bytes": None, "detail": None})
    rows = [None] * cp
    dist.all_gather_object(rows, out)
    ps.destroy_model_parallel()
    ps.shutdown_distributed()
    return {"cp": cp, "per_rank": rows}


def balance(args) -> list:
    """Attention compute per CP rank (one process, one rank at a time): causal LS fwd + bwd on its pieces."""
    from megatron_ls.parallel.cp_layout import ContextLayout

    n, cp = args.balance_length, 4
    h, d = args.num_attention_heads, args.hidden_size // args.num_attention_heads
    dev = torch.device(args.device)
    kinds = ("contiguous", "balanced")
    best = {(kind, rank): float("inf") for kind in kinds for rank in range(cp)}
    for _ in range(args.repeats):  # interleaved rounds, best of each: load changes hit every rank alike
        for kind in kinds:
            for rank in range(cp):
                seconds = _rank_attention_seconds(args, ContextLayout(n, cp, rank, kind), n, h, d, dev)
                best[kind, rank] = min(best[kind, rank], seconds)
    rows = []
    for kind in kinds:
        times = [best[kind, rank] for rank in range(cp)]
        mean = sum(times) / cp
        rows.append({"layout": kind, "length": n, "cp": cp, "rank_seconds": times,
                     "imbalance_pct": 100.0 * (max(times) - mean) / mean})
    return rows


def _rank_attention_seconds(args, layout, n: int, h: int, d: int, dev: torch.device) -> float:
    """Seconds of one causal LS forward + backward over one rank's pieces (halo and global keys random)."""
    from megatron_ls.ops import long_short_attention_shard

    w, l, r = args.window_size, args.segment_length, args.projection_rank
    elapsed = 0.0
    for start, length in layout.pieces():
        hl = min(w - 1, start)
        q = torch.randn(1, h, length, d, device=dev, requires_grad=True)
        kl = torch.randn(1, h, hl + length, d, device=dev, requires_grad=True)
        vl = torch.randn_like(kl, requires_grad=True)
        kg = torch.randn(1, h, n // l * r, d, device=dev, requires_grad=True)
        vg = torch.randn_like(kg, requires_grad=True)
        t0 = time.perf_counter()
        o = long_short_attention_shard(q, kl, vl, kg, vg, window=w, causal=True, segment_len=l,
                                       projection_rank=r, q_offset=start, halo_left=hl)
        o.sum().backward()
        if args.device == "cuda":
            torch.cuda.synchronize()
        elapsed += time.perf_counter() - t0
    return elapsed


# ------------------------------------------------------------------------------------------------ driver
def _torchrun(args, section: str, nproc: int, length: int, timeout: int = 3600) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           __file__, "--worker", section, "--length", str(length), "--device", args.device, "--layout", args.layout,
           "--hidden-size", str(args.hidden_size), "--num-attention-heads", str(args.num_attention_heads),
           "--num-layers", str(args.num_layers), "--window-size", str(args.window_size),
           "--segment-length", str(args.segment_length), "--projection-rank", str(args.projection_rank)]
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{section} at CP={nproc}, n={length} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            result = json.loads(line[len("RESULT "):])
            result["wall_s"] = time.perf_counter() - t0
            return result
    raise RuntimeError(f"{section}: no RESULT line in\n{proc.stdout[-3000:]}")


def _print_table(title: str, header: list, rows: list) -> None:
    print(f"\n## {title}")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(str(c) for c in row) + " |")


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        fn = {"scaling": worker_train_step, "volume": worker_volume}[args.worker]
        result = fn(args)
        if int(os.environ.get("RANK", "0")) == 0:
            print("RESULT " + json.dumps(result), flush=True)
        return 0
    record = {"device": device_name(args.device), "torch": torch.__version__, "commit": git_commit(),
              "dirty": git_dirty(MEASURED), "config": {k: v for k, v in vars(args).items()
                                                       if k not in ("worker", "length", "output")}}
    if "scaling" in args.sections:
        record["scaling"] = [_torchrun(args, "scaling", cp, args.scaling_length) for cp in args.cp_sizes]
        _print_table(f"one training step, {args.scaling_length} tokens, per rank",
                     ["CP", "rank", "local tokens", "step s", "peak MiB"],
                     [(r["cp"], x["rank"], x["local_tokens"], f"{x['step_s']:.2f}", f"{x['peak_mib']:.0f}")
                      for r in record["scaling"] for x in r["ranks"]])
    if "volume" in args.sections:
        vol = _torchrun(args, "volume", 4, args.scaling_length)
        record["volume"] = vol
        rank1 = vol["per_rank"][1]
        _print_table("bytes exchanged per layer per step (fwd + bwd), CP rank 1 of 4",
                     ["n", "attention", "bytes", "of which halo"],
                     [(x["n"], x["kind"], x["bytes_per_rank"], x["halo_bytes"]) for x in rank1])
    if "balance" in args.sections:
        record["balance"] = balance(args)
        _print_table(f"causal LS attention compute per rank, n={args.balance_length}, CP=4 (seconds, fwd+bwd)",
                     ["layout", "rank 0", "rank 1", "rank 2", "rank 3", "imbalance %"],
                     [(b["layout"], *(f"{t:.2f}" for t in b["rank_seconds"]), f"{b['imbalance_pct']:.1f}")
                      for b in record["balance"]])
    if "longest" in args.sections:
        res = _torchrun(args, "scaling", args.longest_cp, args.longest_length, timeout=7200)
        record["longest"] = res
        _print_table(f"longest sequence: {args.longest_length} tokens on {args.longest_cp} ranks (one fwd+bwd)",
                     ["rank", "local tokens", "step s", "peak MiB", "wall s (incl. start-up)"],
                     [(x["rank"], x["local_tokens"], f"{x['step_s']:.1f}", f"{x['peak_mib']:.0f}",
                       f"{res['wall_s']:.0f}") for x in res["ranks"]])
    out = Path(args.output or Path(REPO) / "benchmarks" / "results" / f"bench_context_parallel_{args.device}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=2))
    os.replace(tmp, out)
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
