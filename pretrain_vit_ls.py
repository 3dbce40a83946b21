#!/usr/bin/env python
"""Train a ViT-LS (single-scale) or ViL-LS (multi-scale) image classifier with Long-Short attention.

    python pretrain_vit_ls.py --data-path /usr/share/datasets/fashion-mnist --img-h 28 --img-w 28 \\
        --num-channels 1 --patch-dim 4 --num-classes 10 --num-layers 6 --hidden-size 128 \\
        --num-attention-heads 4 --window-size 2 --projection-rank 4 --micro-batch-size 128 --train-iters 4000 ...

``--data-path`` is an ImageFolder root (``train/<class>/*``, ``val/<class>/*``, optional ``test/``) or an
IDX directory (Fashion-MNIST). Same engine, layouts (TP, PP, DP with ZeRO 0-3 for ViT-LS; DP with ZeRO 0-3 for
ViL-LS), checkpoints and log line as ``pretrain_gpt_ls.py`` (``loss`` instead of ``lm loss``); evaluation prints
``top-1 accuracy`` and ``top-5 accuracy``. Runs as plain ``python``, under ``torchrun`` or ``deepspeed``.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time

import numpy as np

from megatron_ls.arguments import Arguments, _add_field, parse_args
from megatron_ls.config import ConfigError, TransformerConfig
from megatron_ls.model.vit_config import ImageDataConfig, VisionConfig, vision_config_to_dict
from megatron_ls.training.initialize import select_accelerator

# Flags whose GPT defaults do not suit vision (the released ViL-LS settings where there is one).
VISION_DEFAULTS = {"model.causal": False, "model.window_size": 7, "model.projection_rank": 8,
                   "model.position_embedding_type": "none", "model.hidden_dropout": 0.0,
                   "model.attention_dropout": 0.0, "model.layernorm_epsilon": 1e-6, "training.weight_decay": 0.05}
GROUPS = (("Vision model", VisionConfig), ("Image data and augmentation", ImageDataConfig))


def vision_args(parser: argparse.ArgumentParser) -> None:
    """Add the ``VisionConfig`` and ``ImageDataConfig`` flags (they land in ``args.extra``)."""
    for title, cls in GROUPS:
        group = parser.add_argument_group(title)
        for f in dataclasses.fields(cls):
            _add_field(group, f, dest=f"vision.{f.name}")
    parser.add_argument("--dry-run", dest="extra.dry_run", action="store_true",
                        help="Check every flag, build the model in this one process and run one batch forward and "
                             "backward (random images if --data-path does not exist), then exit. No DeepSpeed.")
    parser.add_argument("--results-json", dest="extra.results_json", default=None,
                        help="Write the run summary (losses, validation/test accuracy, wall time) here (rank 0).")


def vision_configs(args: Arguments) -> tuple[VisionConfig, ImageDataConfig]:
    """The two vision configs from the parsed flags."""
    built = []
    for _, cls in GROUPS:
        built.append(cls(**{f.name: getattr(args.extra, f.name) for f in dataclasses.fields(cls)}))
    return built[0], built[1]


def check_vision_arguments(args: Arguments, vision: VisionConfig) -> None:
    """Layouts and flags a vision run cannot use, as one ConfigError; sets the sequence length (tokens/image)."""
    vision.validate()
    p, problems = args.parallel, []
    if p.context_parallel_size > 1:
        problems.append("--context-parallel-size > 1 is not supported for vision models")
    if args.model.position_embedding_type == "rope":
        problems.append("--position-embedding-type rope is not supported for vision (learned = the absolute "
                        "position embedding, none = relative position bias only)")
    m = args.model
    llama = [flag for flag, on in (("--normalization RMSNorm", m.normalization == "RMSNorm"), ("--swiglu", m.swiglu),
                                   ("--disable-bias-linear", not m.add_bias_linear),
                                   ("--untie-embeddings-and-output-weights", m.untie_embeddings_and_output_weights))
             if on]
    if args.data.mock_data:
        problems.append("--mock-data is GPT-LS's synthetic text; for a vision run without images use --dry-run "
                        "(random images)")
    if llama:
        problems.append(f"{', '.join(llama)}: GPT-LS options, not built for the vision models (LayerNorm, GELU, "
                        f"biases as the released ViL)")
    if vision.vil_stages:
        if p.tensor_model_parallel_size > 1 or p.pipeline_model_parallel_size > 1:
            problems.append("--vil-stages (multi-scale ViL-LS) runs with data parallelism and ZeRO 0-3 only; "
                            "use --tensor-model-parallel-size 1 --pipeline-model-parallel-size 1")
        first = vision.stages()[0]
        tokens = first.cls_tokens + (vision.img_h // first.patch) * (vision.img_w // first.patch)
    else:
        tokens = vision.cls_tokens + vision.grid[0] * vision.grid[1]
    if problems:
        raise ConfigError("; ".join(problems))
    args.model.seq_length = args.model.max_position_embeddings = tokens


def check_resume(args: Arguments, vision: VisionConfig) -> None:
    """Refuse a ``--load`` checkpoint whose vision settings differ, naming the flags."""
    from megatron_ls.checkpoint_files import CheckpointError, read_latest_tag, read_metadata

    saved = read_metadata(args.checkpoint.load, read_latest_tag(args.checkpoint.load)).get("vision")
    if saved is None:
        raise CheckpointError(f"--load {args.checkpoint.load}: not a vision checkpoint (no vision settings)")
    now = vision_config_to_dict(vision)
    diffs = [f"--{k.replace('_', '-')} is {now[k]} here but {saved[k]} in the checkpoint"
             for k in ("img_h", "img_w", "num_channels", "patch_dim", "patch_embed_kernel", "conv_stem_channels",
                       "num_classes", "pooling", "vil_stages", "relative_position_bias")
             if k in saved and saved[k] != now[k]]
    if diffs:
        raise CheckpointError(f"--load {args.checkpoint.load}: " + "; ".join(diffs))


def make_model_provider(vision: VisionConfig):
    def model_provider(config: TransformerConfig, pipeline: bool):
        """ViT-LS (a PipelineModule under pipeline parallelism) or the multi-scale ViL-LS."""
        if vision.vil_stages:
            from megatron_ls.model.vil import ViLModel

            return ViLModel(config, vision)
        if pipeline:
            from megatron_ls.model.vit_pipeline import build_vit_pipeline

            return build_vit_pipeline(config, vision)
        from megatron_ls.model.vit import ViTModel

        return ViTModel(config, vision)

    return model_provider


def image_transforms(vision: VisionConfig, data: ImageDataConfig):
    """(training transform, evaluation transform)."""
    from megatron_ls.data.image_transforms import ImageTransform, default_normalisation

    mean, std = default_normalisation(vision.num_channels)
    mean, std = tuple(data.image_mean) or mean, tuple(data.image_std) or std
    common = dict(size=(vision.img_h, vision.img_w), mean=mean, std=std, eval_crop_fraction=data.eval_crop_fraction,
                  interpolation=data.interpolation)
    train = ImageTransform(train=True, crop_scale=tuple(data.crop_scale), hflip_prob=data.hflip_prob,
                           augment=data.data_augmentation, crop_padding=data.crop_padding,
                           auto_augment=data.auto_augment, color_jitter=data.color_jitter,
                           random_erase_prob=data.random_erase_prob, **common)
    return train, ImageTransform(train=False, **common)


def make_datasets_provider(vision: VisionConfig, data: ImageDataConfig):
    def datasets_provider(args: Arguments, num_samples: tuple):
        """Train (seeded epochs, augmented), validation and test splits of ``--data-path``."""
        from megatron_ls.data.image_dataset import ImageClassificationDataset, open_sources

        if len(args.data.data_path) != 1:
            raise ConfigError(f"--data-path takes one image directory, got {args.data.data_path}")
        train_src, valid_src, test_src = open_sources(args.data.data_path[0], num_classes=vision.num_classes,
                                                      num_channels=vision.num_channels, bad_image=data.bad_image)
        train_tf, eval_tf = image_transforms(vision, data)
        seed = args.model.seed
        return (ImageClassificationDataset(train_src, train_tf, seed, num_samples=num_samples[0]),
                ImageClassificationDataset(valid_src, eval_tf, seed),
                ImageClassificationDataset(test_src, eval_tf, seed), False)

    return datasets_provider


def vision_task(args: Arguments, vision: VisionConfig, data: ImageDataConfig):
    """The pretrain() hooks: image collation (with mixing), accuracy evaluation, FLOPs, checkpoint metadata."""
    from megatron_ls.data.image_dataset import ImageCollator
    from megatron_ls.data.image_mix import MixConfig
    from megatron_ls.model.vil import training_flops_per_image
    from megatron_ls.training.image_eval import evaluate_classifier
    from megatron_ls.training.task import Task

    mix = MixConfig(vision.num_classes, data.mixup_alpha, data.cutmix_alpha, data.mix_prob, data.mix_switch_prob,
                    data.label_smoothing)
    eval_collate = ImageCollator()
    return Task(loss_name="loss", collate_fn=ImageCollator(mix if mix.soft_targets else None, args.model.seed),
                evaluate=lambda steps, dataset, iters: evaluate_classifier(steps, dataset, iters, eval_collate),
                flops_per_token=training_flops_per_image(args.model, vision) / args.model.seq_length,
                metadata={"vision": vision_config_to_dict(vision), "image_data": dataclasses.asdict(data)})


def main(argv=None) -> dict:
    args = parse_args(argv, description="Train a ViT-LS / ViL-LS image classifier (Long-Short attention).",
                      extra_args_provider=vision_args, defaults=VISION_DEFAULTS)
    vision, data = vision_configs(args)
    check_vision_arguments(args, vision)
    try:
        image_transforms(vision, data)  # bad augmentation flags fail here, before any process group or model
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if args.extra.dry_run:
        return dry_run(args, vision, data)
    if args.checkpoint.load:
        check_resume(args, vision)
    from megatron_ls.training.pretrain import pretrain

    start = time.time()
    summary = pretrain(args, make_model_provider(vision), make_datasets_provider(vision, data), byte_level=False,
                       task=vision_task(args, vision, data))
    summary["wall_time_s"] = time.time() - start
    if args.extra.results_json:
        write_results(args, summary)
    return summary


def dry_run(args: Arguments, vision: VisionConfig, data: ImageDataConfig) -> dict:
    """Validate a recipe without its data or cluster: flags, DeepSpeed config, model, one micro-batch."""
    import torch

    from megatron_ls.arguments import build_deepspeed_config
    from megatron_ls.inference.vit_checkpoint import build_vision_model

    from megatron_ls.parallel.launch_env import launcher_world_size

    dp = args.parallel.data_parallel_size(launcher_world_size())  # WORLD_SIZE emulates the cluster
    ds_config = build_deepspeed_config(args, dp)
    model = build_vision_model(args.model, vision)
    train_tf, _ = image_transforms(vision, data)
    images = torch.randint(0, 256, (1, vision.num_channels, vision.img_h + 7, vision.img_w + 5), dtype=torch.uint8)
    batch = torch.stack([train_tf(img.numpy(), np.random.default_rng(i)) for i, img in enumerate(images)])
    loss = model(batch, torch.zeros(len(batch), dtype=torch.long)).mean()
    loss.backward()
    params = sum(p.numel() for p in model.parameters())
    print(f" dry run: {type(model).__name__} {params / 1e6:.2f}M parameters, batch {tuple(batch.shape)}, loss "
          f"{loss.item():.4f}, DeepSpeed train_batch_size {ds_config['train_batch_size']} (DP={dp}), ZeRO "
          f"{ds_config.get('zero_optimization', {}).get('stage')}", flush=True)
    return {"parameters": params, "loss": loss.item(), "ds_config": ds_config}


def write_results(args: Arguments, summary: dict) -> None:
    """The summary and every flag as JSON (rank 0)."""
    import json
    import os

    import torch.distributed as dist

    if dist.is_initialized() and dist.get_rank() != 0:
        return
    from megatron_ls.checkpoint_files import atomic_write_text
    from megatron_ls.training.pretrain import _args_dict

    payload = {"summary": summary, "args": _args_dict(args),
               "vision_flags": {k: v for k, v in vars(args.extra).items() if k != "local_rank"}}
    os.makedirs(os.path.dirname(os.path.abspath(args.extra.results_json)), exist_ok=True)
    atomic_write_text(args.extra.results_json, json.dumps(payload, indent=1, default=str))


def cli() -> None:
    """Console-script entry: clean shutdown and clear one-line errors."""
    select_accelerator()
    from megatron_ls.training.pretrain import run_main

    run_main(lambda: main(sys.argv[1:]))


if __name__ == "__main__":
    cli()
