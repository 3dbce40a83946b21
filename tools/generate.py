#!/usr/bin/env python
"""Generate continuations of prompts with a GPT-LS checkpoint, using the Long-Short decoding cache.

  python tools/generate.py --load model_dir --prompt "The Python" --max-new-tokens 100 --top-p 0.9 --seed 1
  python tools/generate.py --load ckpt_tp2pp2 --prompt-file prompts.txt --greedy --json out.json

``--load`` takes a consolidated directory or a training checkpoint of any TP/PP layout (merged on load).
``--prompt-file``: one prompt per line (``\\n`` in a line is a newline), or JSON lines with a "prompt" or "text"
field. Each result is printed as a header line and then the prompt followed by its continuation.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse_args(argv=None) -> argparse.Namespace:
    from megatron_ls.arguments import FriendlyArgumentParser
    from megatron_ls.inference.cli_common import add_model_args

    p = FriendlyArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    g = p.add_argument_group("prompts and sampling")
    g.add_argument("--prompt", action="append", default=[], help="a prompt (repeat the flag for several)")
    g.add_argument("--prompt-file", default=None, help="text file (one prompt a line) or .jsonl")
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--greedy", action="store_true", help="always take the most likely token")
    g.add_argument("--temperature", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (1 = greedy)")
    g.add_argument("--top-p", type=float, default=0.0, help="nucleus sampling mass (0 = off)")
    g.add_argument("--seed", type=int, default=None, help="makes sampling reproducible")
    g.add_argument("--stop", action="append", default=[], help="stop a continuation after this string (repeat)")
    g.add_argument("--no-stop-at-eod", action="store_true", help="keep generating after an end-of-document token")
    g.add_argument("--add-bos", action="store_true", help="prepend the end-of-document token to every prompt")
    g.add_argument("--batch-size", type=int, default=8, help="prompts generated together")
    g.add_argument("--logprobs", action="store_true", help="also report per-token log-probabilities")
    g.add_argument("--json", default=None, help="write the results here as JSON")
    return p.parse_args(argv)


def read_prompts(args: argparse.Namespace) -> list[str]:
    """Prompts from --prompt flags, then --prompt-file."""
    prompts = list(args.prompt)
    if args.prompt_file:
        if not os.path.isfile(args.prompt_file):
            raise ValueError(f"--prompt-file {args.prompt_file}: no such file")
        try:
            with open(args.prompt_file, encoding="utf-8") as fh:
                lines = [line.rstrip("\n") for line in fh]
        except UnicodeDecodeError as exc:
            raise ValueError(f"--prompt-file {args.prompt_file}: not UTF-8 text (byte {exc.start})") from None
        if args.prompt_file.endswith(".jsonl"):
            for n, line in enumerate(lines, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                    prompts.append(obj["prompt"] if "prompt" in obj else obj["text"])
                except (ValueError, KeyError, TypeError):
                    raise ValueError(f"--prompt-file {args.prompt_file} line {n}: expected a JSON object with a "
                                     f"'prompt' or 'text' field") from None
        else:
            prompts.extend(line.replace("\\n", "\n") for line in lines if line.strip())
    if not prompts:
        raise ValueError("no prompts: give --prompt TEXT or --prompt-file FILE")
    return prompts


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    from megatron_ls.inference.cli_common import check_at_least, check_output_file, load_from_args
    from megatron_ls.inference.generation import generate

    check_at_least("--batch-size", args.batch_size, 1)
    check_at_least("--max-new-tokens", args.max_new_tokens, 0)
    check_output_file("--json", args.json)
    prompts = read_prompts(args)
    model, config, tok = load_from_args(args)
    rows = [([tok.eod] if args.add_bos else []) + tok.tokenize(p) for p in prompts]
    results = []
    for start in range(0, len(rows), args.batch_size):
        t0 = time.perf_counter()
        out = generate(model, rows[start:start + args.batch_size], args.max_new_tokens,
                       temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                       greedy=args.greedy, seed=args.seed, eod_id=None if args.no_stop_at_eod else tok.eod,
                       stop_strings=args.stop, detokenize=tok.detokenize, return_logprobs=args.logprobs,
                       vocab_size=tok.vocab_size)
        seconds = time.perf_counter() - t0
        for j, gen in enumerate(out.generated):
            i = start + j
            text = tok.detokenize(gen)
            print(f"--- prompt {i + 1}/{len(prompts)} | {out.prompt_lengths[j]} prompt + {len(gen)} new tokens "
                  f"| stop: {out.finish_reasons[j]} | batch {seconds:.2f} s")
            print(prompts[i] + text, flush=True)
            entry = {"prompt": prompts[i], "continuation": text, "tokens": out.tokens[j],
                     "prompt_tokens": out.prompt_lengths[j], "finish_reason": out.finish_reasons[j]}
            if args.logprobs:
                entry["logprobs"] = out.logprobs[j]
            results.append(entry)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=2)
    return results


def cli() -> None:
    """Command-line entry: known failures end in one line ``error: ...`` and exit status 1."""
    from megatron_ls.training.faults import run_tool

    run_tool(main)


if __name__ == "__main__":
    cli()
