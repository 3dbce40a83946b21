#!/usr/bin/env python
"""ViT-LS against the same model with full attention at growing image sides: training images/s and peak memory.

Each point runs in a fresh subprocess: one warm-up step, then ``--repeats`` timed AdamW steps (forward, backward,
update) on random images, timed in wall-clock and in process CPU time (with one thread the CPU time is far less
sensitive to other jobs on a shared machine than the wall clock); peak extra memory is the process's peak RSS
growth over one step (``VmHWM`` reset via ``/proc/self/clear_refs``; on CUDA ``max_memory_allocated``). Both
models have the same weights shapes except the projection logits; the relative position bias is off in both (the
full model's would be an N x N table), so the only difference is the attention. The JSON records the device,
torch version, git commit and load average.

  OMP_NUM_THREADS=1 python tools/bench_vision.py --sides 64,128,256 --json benchmarks/results/bench_vision_cpu.json

``--kinds`` picks the models: ``long-short`` (the op's default ``implementation="auto"``), ``ls-fused`` /
``ls-dense`` (the 2D op's patch queries forced through the fused kernel / the dense-masked path), ``full``:

  OMP_NUM_THREADS=1 python tools/bench_vision.py --kinds ls-fused,ls-dense --sides 64,96,128,192 --batch 2
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tools.bench_common import device_name, git_commit, parse_int_list, reset_peak_rss, rss_kb, write_json_atomic  # noqa: E402


KINDS = ("long-short", "ls-fused", "ls-dense", "full")


def build(kind: str, side: int, args: argparse.Namespace):
    import megatron_ls.model.vit_attention as vit_attention
    import megatron_ls.ops.long_short_2d as ls2d
    from megatron_ls.config import TransformerConfig
    from megatron_ls.model.vit import ViTModel
    from megatron_ls.model.vit_config import VisionConfig

    layers = args.layers
    config = TransformerConfig(num_layers=layers, hidden_size=args.hidden, num_attention_heads=args.heads,
                               window_size=args.window, projection_rank=args.rank, causal=False,
                               position_embedding_type="none", hidden_dropout=0.0, attention_dropout=0.0,
                               full_attention_layers=tuple(range(layers)) if kind == "full" else ())
    if kind in ("ls-fused", "ls-dense"):  # this child process only: the layers call the op with that path
        vit_attention.long_short_attention_2d = functools.partial(ls2d.long_short_attention_2d,
                                                                  implementation=kind[3:])
    vision = VisionConfig(img_h=side, img_w=side, num_channels=3, patch_dim=args.patch, num_classes=10,
                          relative_position_bias=False)
    return ViTModel(config, vision)


def measure_point(kind: str, side: int, args: argparse.Namespace) -> dict:
    """Run in the child: time and peak memory of training steps."""
    import torch

    torch.manual_seed(0)
    device = torch.device(args.device)
    model = build(kind, side, args).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    images = torch.randn(args.batch, 3, side, side, device=device)
    labels = torch.randint(0, 10, (args.batch,), device=device)

    def step() -> None:
        model(images, labels).mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = reset_peak_rss()
    times, cpu_times = [], []
    for _ in range(args.repeats):
        start, cpu_start = time.perf_counter(), time.process_time()
        step()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
    peak = (torch.cuda.max_memory_allocated() - before) / 2 ** 20 if cuda else (rss_kb("VmHWM") - before) / 1024
    best = min(times)
    return {"kind": kind, "side": side, "patches": (side // args.patch) ** 2, "step_s": best,
            "images_per_s": args.batch / best, "cpu_step_s": min(cpu_times),
            "images_per_cpu_s": args.batch / min(cpu_times), "peak_extra_mib": peak, "load_avg": os.getloadavg()[0]}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sides", default="64,128,256", help="image sides in pixels (comma-separated)")
    p.add_argument("--kinds", default="long-short,full", help=f"models to compare, comma-separated, of {KINDS}")
    p.add_argument("--patch", type=int, default=4)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--window", type=int, default=8)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", default=None)
    p.add_argument("--point", nargs=2, metavar=("KIND", "SIDE"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.point:
        print(json.dumps(measure_point(args.point[0], int(args.point[1]), args)))
        return
    import torch

    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    bad = [k for k in kinds if k not in KINDS]
    if bad or not kinds:
        p.error(f"--kinds: {bad or args.kinds!r} not among {KINDS}")
    rows: list = []
    payload = {"device": device_name(args.device), "torch": torch.__version__, "git_commit": git_commit(),
               "threads": torch.get_num_threads(), "config": {k: v for k, v in vars(args).items()
                                                              if k not in ("json", "point")},
               "rows": rows, "complete": False}
    forwarded = [a for a in (argv if argv is not None else sys.argv[1:]) if a != "--json"]
    if args.json in forwarded:
        forwarded.remove(args.json)
    for side in parse_int_list(args.sides, "--sides"):
        for kind in kinds:
            out = subprocess.run([sys.executable, __file__, *forwarded, "--point", kind, str(side)],
                                 capture_output=True, text=True, check=True)
            row = json.loads(out.stdout.strip().splitlines()[-1])
            rows.append(row)
            print(f" {kind:10s} side {side:4d} ({row['patches']:5d} patches): {row['images_per_s']:8.2f} images/s, "
                  f"{row['images_per_cpu_s']:8.2f} images/CPU-s, peak extra {row['peak_extra_mib']:8.1f} MiB "
                  f"(load {row['load_avg']:.1f})", flush=True)
            if args.json:  # after every point: an interrupted run keeps what it measured
                write_json_atomic(args.json, payload)
    payload["complete"] = True
    if args.json:
        write_json_atomic(args.json, payload)


if __name__ == "__main__":
    main()
