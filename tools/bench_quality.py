"""The paper's ablation as a benchmark: validation bits per byte of attention variants at equal steps and seeds,
and the paper's Figure 2 (left): the norm ratio of window to projected keys/values at initialisation.

Variants (same model otherwise; one process each, one after the other, on the bundled corpus):
``ls`` (window + projection + DualLN), ``window`` (r = 0; its keys/values still go through LN_L),
``window-no-ln`` (r = 0 without LN_L: the plain sliding-window baseline for ``ls-no-dualln``), ``projection``
(w = 0), ``full`` (every layer full attention), ``masformer-ls`` / ``masformer-window`` (full attention in the
last layer, the rest LS / window-only), ``ls-no-dualln``, ``ls-dualln-head`` (DualLN per head instead of over the
full width).

``--save-dir DIR`` keeps each checkpoint and adds validation loss by token position (inside the first window,
the next three windows, the rest): where in the context a variant gains or loses.

Example (about 1.5 h on one CPU core with the defaults): ``python tools/bench_quality.py``; a quick look:
``python tools/bench_quality.py --train-iters 100 --variants ls window``.
"""
from __future__ import annotations

import argparse
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tools.bench_common import REPO, device_name, git_commit, git_dirty, write_json_atomic  # noqa: E402

VARIANTS = {
    "ls": [],
    "window": ["--projection-rank", "0"],
    "window-no-ln": ["--projection-rank", "0", "--no-dual-ln"],  # a plain sliding-window transformer (no LN_L)
    "projection": ["--window-size", "0"],
    "full": ["--full-attention-layers", "ALL"],
    "masformer-ls": ["--full-attention-layers", "LAST"],
    "masformer-window": ["--full-attention-layers", "LAST", "--projection-rank", "0"],
    "ls-no-dualln": ["--no-dual-ln"],
    "ls-dualln-head": ["--dual-ln-scope", "head"],
}
MEASURED = ["megatron_ls", "tools/bench_quality.py"]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--data-dir", default=os.path.join(REPO, "data", "sample"))
    p.add_argument("--num-layers", type=int, default=4)
    p.add_argument("--hidden-size", type=int, default=128)
    p.add_argument("--num-attention-heads", type=int, default=4)
    p.add_argument("--seq-length", type=int, default=1024)
    p.add_argument("--window-size", type=int, default=32)
    p.add_argument("--segment-length", type=int, default=16)
    p.add_argument("--projection-rank", type=int, default=1)
    p.add_argument("--micro-batch-size", type=int, default=4)
    p.add_argument("--train-iters", type=int, default=600)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--eval-iters", type=int, default=20)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--save-dir", default=None,
                   help="keep each variant's checkpoint in DIR/<variant> and report its validation loss by token "
                        "position (positions < w, w..4w, >= 4w): where in the context a variant gains or loses")
    p.add_argument("--position-eval-sequences", type=int, default=32,
                   help="validation sequences of --seq-length for the per-position losses (with --save-dir)")
    p.add_argument("--output", default=os.path.join(REPO, "benchmarks", "results", "bench_quality_cpu.json"))
    return p.parse_args(argv)


def _variant_flags(args, name: str) -> list:
    flags = []
    for f in VARIANTS[name]:
        if f == "ALL":
            flags += [str(i) for i in range(args.num_layers)]
        elif f == "LAST":
            flags.append(str(args.num_layers - 1))
        else:
            flags.append(f)
    return flags


def attention_keys_per_query(args, name: str) -> float:
    """Average keys a query scores in one layer stack (causal), averaged over layers: the attention cost."""
    n, w, l = args.seq_length, args.window_size, args.segment_length
    flags = _variant_flags(args, name)
    r = 0 if "--projection-rank" in flags else args.projection_rank
    w = 0 if "--window-size" in flags else w
    full_layers = 0
    if "--full-attention-layers" in flags:  # the layer numbers that follow the flag (other flags may come after)
        for item in flags[flags.index("--full-attention-layers") + 1:]:
            if not item.isdigit():
                break
            full_layers += 1
    ls_cost = min(w, n) / 1.0 + r * (n / 2) / l  # window + on average half the chunks
    full_cost = (n + 1) / 2
    return (full_layers * full_cost + (args.num_layers - full_layers) * ls_cost) / args.num_layers


def train_variant(args, name: str) -> dict:
    prefix = os.path.join(args.data_dir, "python_docs_text_document")
    cmd = [sys.executable, os.path.join(REPO, "pretrain_gpt_ls.py"), "--data-path", prefix,
           "--tokenizer-type", "ByteTokenizer", "--split", "949,50,1",
           "--num-layers", str(args.num_layers), "--hidden-size", str(args.hidden_size),
           "--num-attention-heads", str(args.num_attention_heads), "--seq-length", str(args.seq_length),
           "--window-size", str(args.window_size), "--segment-length", str(args.segment_length),
           "--projection-rank", str(args.projection_rank), "--micro-batch-size", str(args.micro_batch_size),
           "--train-iters", str(args.train_iters), "--lr", str(args.lr), "--min-lr", str(args.lr / 10),
           "--lr-warmup-iters", str(max(1, args.train_iters // 20)), "--lr-decay-style", "cosine",
           "--hidden-dropout", "0.0", "--attention-dropout", "0.0", "--seed", str(args.seed),
           "--log-interval", str(max(1, args.train_iters // 10)), "--eval-interval", str(args.train_iters),
           "--eval-iters", str(args.eval_iters)] + _variant_flags(args, name)
    if args.save_dir:
        cmd += ["--save", os.path.join(args.save_dir, name), "--save-interval", str(args.train_iters)]
    env = dict(os.environ, DS_ACCELERATOR=os.environ.get("DS_ACCELERATOR", "cpu"))
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"variant {name} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    found = re.findall(r"validation loss at iteration (\d+) \| lm loss value: ([0-9.E+-]+)", proc.stdout)
    if not found:
        raise RuntimeError(f"variant {name}: no validation line in\n{proc.stdout[-2000:]}")
    loss = float(found[-1][1])
    extra = {"position_losses": position_losses(args, os.path.join(args.save_dir, name))} if args.save_dir else {}
    return {**extra, "variant": name, "flags": _variant_flags(args, name), "validation_loss": loss,
            "bits_per_byte": loss / math.log(2), "seconds": time.perf_counter() - t0,
            "keys_per_query": attention_keys_per_query(args, name)}


def position_buckets(args) -> list:
    """Token-position ranges of one sequence: inside the first window, the next 3 windows, the rest."""
    n, w = args.seq_length, max(1, args.window_size)
    edges = sorted({0, min(w, n), min(4 * w, n), n})
    return [(a, b) for a, b in zip(edges, edges[1:]) if b > a]


@torch.no_grad()
def position_losses(args, checkpoint: str) -> list:
    """Mean validation loss (nats) per position bucket of ``--seq-length`` sequences of the validation split."""
    from megatron_ls.inference.loading import load_model_for_inference
    from tools.evaluate import split_token_stream

    model, _, _ = load_model_for_inference(checkpoint)
    prefix = os.path.join(args.data_dir, "python_docs_text_document")
    stream = torch.as_tensor(split_token_stream(prefix, "949,50,1", "valid").astype("int64"))
    n = args.seq_length
    count = min(args.position_eval_sequences, (len(stream) - 1) // n)
    sums = torch.zeros(n, dtype=torch.float64)
    for i in range(count):
        chunk = stream[i * n: i * n + n + 1]
        logits = model(chunk[None, :-1])[0].float()
        sums += torch.nn.functional.cross_entropy(logits, chunk[1:], reduction="none").double()
    return [{"positions": [a, b], "loss": float(sums[a:b].mean() / count), "sequences": count}
            for a, b in position_buckets(args)]


@torch.no_grad()
def norm_ratios(args, dual_ln: bool) -> list:
    """Figure 2 (left): per layer, mean L2 norm of the window keys over that of the projected keys, at init."""
    from megatron_ls.config import TransformerConfig
    from megatron_ls.data.indexed_dataset import IndexedDataset
    from megatron_ls.model import GPTModel
    from megatron_ls.ops.projection import project_causal

    cfg = TransformerConfig(num_layers=args.num_layers, hidden_size=args.hidden_size,
                            num_attention_heads=args.num_attention_heads, seq_length=args.seq_length,
                            window_size=args.window_size, segment_length=args.segment_length,
                            projection_rank=max(1, args.projection_rank), dual_ln=dual_ln, hidden_dropout=0.0,
                            attention_dropout=0.0, vocab_size=256, seed=args.seed)
    model = GPTModel(cfg).eval()
    ds = IndexedDataset(os.path.join(args.data_dir, "python_docs_text_document"))
    flat = torch.cat([torch.as_tensor(ds[i].astype("int64")) for i in range(min(len(ds), 200))])
    tokens = flat[: 4 * args.seq_length].view(4, args.seq_length)
    inputs = {}
    hooks = [layer.self_attention.register_forward_pre_hook(
        lambda mod, a, i=i: inputs.__setitem__(i, a[0])) for i, layer in enumerate(model.layers)]
    model(tokens)
    for h in hooks:
        h.remove()
    ratios = []
    for i, layer in enumerate(model.layers):
        att, x = layer.self_attention, inputs[i]
        b, n, _ = x.shape
        mixed = att.qkvp(x).view(b, n, att.num_heads, att.per_head).transpose(1, 2)
        d = att.head_dim
        k, v, logits = mixed[..., d:2 * d], mixed[..., 2 * d:3 * d], mixed[..., 3 * d:]
        kg, vg, _ = project_causal(k, v, logits, None, cfg.segment_length)
        kl, vl = k, v
        if att.local_norm is not None:
            kl, vl, kg, vg = att.local_norm(k), att.local_norm(v), att.global_norm(kg), att.global_norm(vg)

        def width_norm(t):  # per token over all heads
            return t.transpose(1, 2).reshape(t.shape[0], t.shape[2], -1).norm(dim=-1).mean()

        ratios.append({"layer": i, "key_ratio": float(width_norm(kl) / width_norm(kg)),
                       "value_ratio": float(width_norm(vl) / width_norm(vg))})
    return ratios


def main(argv=None) -> int:
    args = parse_args(argv)
    if not os.path.exists(os.path.join(args.data_dir, "python_docs_text_document.bin")):
        subprocess.run([sys.executable, os.path.join(REPO, "tools", "prepare_sample_corpus.py"), "--output-dir",
                        args.data_dir], check=True)
    record = {"device": device_name("cpu"), "torch": torch.__version__, "commit": git_commit(),
              "dirty": git_dirty(MEASURED), "config": vars(args)}
    record["norm_ratio_at_init"] = {"dual_ln": norm_ratios(args, True), "no_dual_ln": norm_ratios(args, False)}
    print("\n## Figure 2 (left): window / projected norm ratio at init (keys, values)")
    print("| layer | DualLN keys | DualLN values | no DualLN keys | no DualLN values |\n|---|---|---|---|---|")
    for a, b in zip(*record["norm_ratio_at_init"].values()):
        print(f"| {a['layer']} | {a['key_ratio']:.3f} | {a['value_ratio']:.3f} | {b['key_ratio']:.3f} | "
              f"{b['value_ratio']:.3f} |")
    record["runs"], record["complete"] = [], False
    for name in args.variants:
        res = train_variant(args, name)
        record["runs"].append(res)
        write_json_atomic(args.output, record)  # after every variant: a crash later keeps the finished ones
        print(f"{name}: validation {res['validation_loss']:.4f} nats, {res['bits_per_byte']:.4f} bits/byte, "
              f"{res['seconds']:.0f} s", flush=True)
    record["complete"] = True
    print(f"\n## validation after {args.train_iters} iterations (seq {args.seq_length}, w={args.window_size}, "
          f"l={args.segment_length}, r={args.projection_rank}, seed {args.seed})")
    print("| variant | bits per byte | loss (nats) | keys per query | seconds |\n|---|---|---|---|---|")
    for r in sorted(record["runs"], key=lambda r: r["bits_per_byte"]):
        print(f"| {r['variant']} | {r['bits_per_byte']:.4f} | {r['validation_loss']:.4f} | "
              f"{r['keys_per_query']:.0f} | {r['seconds']:.0f} |")
    if args.save_dir:
        buckets = position_buckets(args)
        print("\n## validation loss (nats) by token position")
        print("| variant | " + " | ".join(f"positions {a}-{b - 1}" for a, b in buckets) + " |")
        print("|---|" + "---|" * len(buckets))
        for r in record["runs"]:
            print(f"| {r['variant']} | " + " | ".join(f"{b['loss']:.4f}" for b in r["position_losses"]) + " |")
    write_json_atomic(args.output, record)
    print(f"\nwrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
