#!/usr/bin/env python
"""Top-1 / top-5 accuracy of a ViT-LS / ViL-LS checkpoint on an image split (one process, no DeepSpeed).

  python tools/eval_image_classifier.py --load checkpoints/fashion_mnist_vit_ls \\
      --data-path /usr/share/datasets/fashion-mnist --split test

``--load`` is a training checkpoint of any TP x PP layout (merged on load) or a consolidated directory
(``tools/convert_checkpoint.py --consolidated-dir``). The image size, channels, classes and the evaluation
transform (normalisation, center crop) are the checkpoint's unless given here. ``--hflip-tta`` averages the class
probabilities of each image and its horizontal mirror (test-time augmentation; the result says so).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None) -> dict:
    from megatron_ls.arguments import FriendlyArgumentParser

    p = FriendlyArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--load", required=True, help="training checkpoint directory or consolidated directory")
    p.add_argument("--data-path", required=True, help="ImageFolder root or IDX (Fashion-MNIST) directory")
    p.add_argument("--split", default="test", choices=("valid", "test"),
                   help="ImageFolder: val/ or test/ (test/ falls back to val/); IDX: t10k for both")
    p.add_argument("--micro-batch-size", type=int, default=256)
    p.add_argument("--max-images", type=int, default=None, help="evaluate only the first N images")
    p.add_argument("--bad-image", default=None, choices=("fail", "skip"))
    p.add_argument("--hflip-tta", action="store_true",
                   help="test-time augmentation: average the class probabilities of each image and its horizontal "
                        "mirror (two forward passes; recorded as hflip_tta in the result)")
    p.add_argument("--results-json", default=None, help="also write the numbers here")
    args = p.parse_args(argv)
    import torch

    from megatron_ls.data.image_dataset import ImageClassificationDataset, ImageCollator, open_sources
    from megatron_ls.data.image_transforms import ImageTransform, default_normalisation
    from megatron_ls.inference.cli_common import check_at_least, check_output_file
    from megatron_ls.inference.vit_checkpoint import load_vision_model
    from megatron_ls.training.image_eval import classification_stats

    check_at_least("--micro-batch-size", args.micro_batch_size, 1)
    check_at_least("--max-images", args.max_images, 1)
    check_output_file("--results-json", args.results_json)
    model, vision, metadata = load_vision_model(args.load)
    data = metadata.get("image_data", {})
    _, valid, test = open_sources(args.data_path, num_classes=vision.num_classes, num_channels=vision.num_channels,
                                  bad_image=args.bad_image or data.get("bad_image", "fail"))
    mean, std = default_normalisation(vision.num_channels)
    transform = ImageTransform(size=(vision.img_h, vision.img_w), train=False,
                               mean=tuple(data.get("image_mean") or mean), std=tuple(data.get("image_std") or std),
                               eval_crop_fraction=data.get("eval_crop_fraction", 0.875),
                               interpolation=data.get("interpolation", "bilinear"))
    dataset = ImageClassificationDataset(valid if args.split == "valid" else test, transform, seed=0)
    total = min(len(dataset), args.max_images or len(dataset))
    if total == 0:
        raise ValueError(f"--data-path {args.data_path}: the {args.split} split holds no images")
    collate = ImageCollator()

    def predict(images: torch.Tensor) -> torch.Tensor:
        if not args.hflip_tta:
            return model(images)
        views = [model(images).float().softmax(-1), model(images.flip(-1)).float().softmax(-1)]
        return (0.5 * (views[0] + views[1])).log()  # log-probabilities: the loss is the averaged prediction's
    stats = torch.zeros(4, dtype=torch.float64)
    start = time.time()
    with torch.no_grad():
        for first in range(0, total, args.micro_batch_size):
            batch = collate([dataset[i] for i in range(first, min(first + args.micro_batch_size, total))])
            stats += classification_stats(predict(batch["tokens"]), batch["labels"])
    loss_sum, top1, top5, count = stats.tolist()
    result = {"checkpoint": os.path.abspath(args.load), "data_path": args.data_path, "split": args.split,
              "images": int(count), "loss": loss_sum / count, "top1": 100 * top1 / count, "top5": 100 * top5 / count,
              "iteration": metadata.get("iteration"), "hflip_tta": args.hflip_tta, "seconds": time.time() - start}
    views = " | views: image + mirror (hflip TTA)" if args.hflip_tta else ""
    print(f" {args.split}{views} | images: {result['images']} | loss: {result['loss']:.6E} | top-1 accuracy: "
          f"{result['top1']:.2f}% | top-5 accuracy: {result['top5']:.2f}% |")
    if args.results_json:
        with open(args.results_json, "w") as fh:
            json.dump(result, fh, indent=1)
    return result


def cli() -> None:
    """Command-line entry: known failures end in one line ``error: ...`` and exit status 1."""
    from megatron_ls.training.faults import run_tool

    run_tool(main)


if __name__ == "__main__":
    cli()
