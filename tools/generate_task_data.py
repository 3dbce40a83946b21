#!/usr/bin/env python3
"""Generate classification data (LRA ListOps, or the FAR_RECALL long-range probe) in the tasks/ format.

    python tools/generate_task_data.py --task LISTOPS --output-prefix data/listops/listops          # 96K/2K/2K
    python tools/generate_task_data.py --task LISTOPS --output-prefix data/lo/lo --train-samples 5000
    python tools/generate_task_data.py --task FAR_RECALL --output-prefix data/far/far --length 512

Writes ``PREFIX_{train,valid,test}.{bin,idx,jsonl}``, ``PREFIX_{split}_labels.npy`` and ``PREFIX_meta.json``
(format: megatron_ls/data/classification_dataset.py). Deterministic for a given ``--seed`` and sizes. ListOps
draws validation, then test, then training examples from one stream without duplicates, so a smaller
``--train-samples`` keeps the same validation and test sets.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from collections import Counter
from dataclasses import asdict

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_ls.data import far_recall, listops  # noqa: E402
from megatron_ls.data.classification_dataset import ClassificationWriter, write_meta  # noqa: E402

SPLIT_ORDER = ("valid", "test", "train")


def parse_args(argv=None) -> argparse.Namespace:
    from megatron_ls.arguments import FriendlyArgumentParser

    parser = FriendlyArgumentParser(description=__doc__.split("\n")[1], allow_abbrev=False)
    parser.add_argument("--task", required=True, choices=("LISTOPS", "FAR_RECALL"))
    parser.add_argument("--output-prefix", required=True, help="e.g. data/listops/listops")
    parser.add_argument("--train-samples", type=int, default=None, help="default 96000 (ListOps), 20000 (probe)")
    parser.add_argument("--valid-samples", type=int, default=None, help="default 2000 (ListOps), 1000 (probe)")
    parser.add_argument("--test-samples", type=int, default=None, help="default 2000 (ListOps), 1000 (probe)")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--no-jsonl", action="store_true", help="skip the human-readable .jsonl copies")
    lo = parser.add_argument_group("LISTOPS")
    lo.add_argument("--max-depth", type=int, default=10)
    lo.add_argument("--max-args", type=int, default=10)
    lo.add_argument("--min-length", type=int, default=500, help="keep lengths strictly above this")
    lo.add_argument("--max-length", type=int, default=2000, help="keep lengths strictly below this")
    lo.add_argument("--no-closing-brackets", action="store_true",
                    help="drop ']' tokens as LRA's released tokenizer did (ambiguous expressions)")
    fr = parser.add_argument_group("FAR_RECALL")
    fr.add_argument("--length", type=int, default=512)
    fr.add_argument("--min-distance", type=int, default=128)
    fr.add_argument("--num-symbols", type=int, default=32)
    fr.add_argument("--num-classes", type=int, default=10)
    fr.add_argument("--mode", choices=far_recall.MODES, default="needle",
                    help="needle: one far needle token names the label; pair: a far marker + value (two hops)")
    args = parser.parse_args(argv)
    big = args.task == "LISTOPS"
    for name, default in (("train_samples", 96000 if big else 20000), ("valid_samples", 2000 if big else 1000),
                          ("test_samples", 2000 if big else 1000)):
        if getattr(args, name) is None:
            setattr(args, name, default)
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


def _listops_splits(args: argparse.Namespace, sizes: dict):
    config = listops.ListOpsConfig(max_depth=args.max_depth, max_args=args.max_args, min_length=args.min_length,
                                   max_length=args.max_length, closing_brackets=not args.no_closing_brackets)
    stream = listops.generate_examples(sum(sizes.values()), args.seed, config)
    for split in SPLIT_ORDER:
        yield split, ((listops.encode(tokens), label, " ".join(tokens))
                      for _, (tokens, label) in zip(range(sizes[split]), stream))


def main(argv=None) -> None:
    args = parse_args(argv)
    sizes = {"train": args.train_samples, "valid": args.valid_samples, "test": args.test_samples}
    start = time.perf_counter()
    if args.task == "LISTOPS":
        vocab, num_classes = list(listops.VOCAB), 10
        splits = _listops_splits(args, sizes)
        generator = {"seed": args.seed, "max_depth": args.max_depth, "max_args": args.max_args,
                     "min_length": args.min_length, "max_length": args.max_length,
                     "closing_brackets": not args.no_closing_brackets, "split_order": list(SPLIT_ORDER)}
    else:
        config = far_recall.FarRecallConfig(length=args.length, min_distance=args.min_distance,
                                            num_symbols=args.num_symbols, num_classes=args.num_classes,
                                            mode=args.mode)
        config.validate()
        vocab, num_classes = far_recall.vocab(config), config.num_classes
        splits = ((split, ((ids, label, None) for ids, label in
                           far_recall.generate_examples(sizes[split], args.seed, config, stream=k)))
                  for k, split in enumerate(SPLIT_ORDER))
        generator = {"seed": args.seed, **asdict(config)}
    stats = {}
    for split, examples in splits:
        writer = ClassificationWriter(args.output_prefix, split, len(vocab), jsonl=not args.no_jsonl)
        lengths, labels = [], Counter()
        try:
            for ids, label, text in examples:
                if text is None:
                    text = " ".join(vocab[i] for i in ids)
                writer.add(ids, label, text)
                lengths.append(len(ids))
                labels[label] += 1
            count = writer.finalize()
        except BaseException:
            writer.abort()
            raise
        majority = max(labels.values()) / count
        stats[split] = {"examples": count, "mean_length": sum(lengths) / count, "min_length": min(lengths),
                        "max_length": max(lengths), "majority_class_fraction": majority}
        print(f" {split}: {count} examples, length {min(lengths)}-{max(lengths)} (mean {sum(lengths) / count:.0f}),"
              f" majority class {100 * majority:.1f}%", flush=True)
    write_meta(args.output_prefix, task=args.task, vocab=vocab, pad_id=0, cls_id=1, num_classes=num_classes,
               splits={s: stats[s]["examples"] for s in stats}, generator={**generator, "stats": stats})
    print(f" wrote {args.output_prefix}_{{train,valid,test}} and {args.output_prefix}_meta.json "
          f"in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    try:
        main()
    except (ValueError, RuntimeError, OSError) as exc:
        sys.exit(f"error: {exc}")
