#!/usr/bin/env python
"""Pretrain a GPT-LS language model (Transformer-LS attention, optional MASFormer full layers).

Runs as plain ``python pretrain_gpt_ls.py ...`` (one process), under ``torchrun`` or under ``deepspeed``.
"""
from __future__ import annotations

import sys

from megatron_ls.arguments import Arguments, parse_args
from megatron_ls.config import TransformerConfig
from megatron_ls.training.initialize import select_accelerator


def model_provider(config: TransformerConfig, pipeline: bool):
    """GPT-LS as a plain module, or as a DeepSpeed PipelineModule when pipeline parallelism is on."""
    if pipeline:
        from megatron_ls.model.gpt_pipeline import build_gpt_pipeline

        return build_gpt_pipeline(config)
    from megatron_ls.model import GPTModel

    return GPTModel(config)


def datasets_provider(args: Arguments, num_samples: tuple):
    """Tokenizer (sets the padded vocab size) and the train/valid/test GPT datasets."""
    import torch.distributed as dist

    from megatron_ls.data.blend_config import parse_data_path
    from megatron_ls.data.dataset_builder import build_gpt_datasets
    from megatron_ls.data.split_parts import empty_eval_parts
    from megatron_ls.data.tokenizers import build_tokenizer
    from megatron_ls.training.checkpoint_vocab import checkpoint_padded_vocab
    from megatron_ls.training.data_loading import check_dataset_vocabulary

    d = args.data
    tokenizer = build_tokenizer(d.tokenizer_type, tokenizer_model=d.tokenizer_model, vocab_file=d.vocab_file,
                                merge_file=d.merge_file, vocab_size=d.null_vocab_size,
                                make_vocab_size_divisible_by=d.make_vocab_size_divisible_by,
                                tensor_model_parallel_size=args.parallel.tensor_model_parallel_size)
    say = print if dist.get_rank() == 0 else None
    args.model.vocab_size = tokenizer.padded_vocab_size
    if args.checkpoint.load:  # a re-sharded checkpoint keeps its padded vocab
        args.model.vocab_size = checkpoint_padded_vocab(args.checkpoint.load, tokenizer.padded_vocab_size,
                                                        tokenizer.vocab_size, args.parallel.tensor_model_parallel_size,
                                                        notice=say)
    mock = d.mock_data and not d.data_cache_path  # mock indices go to a local temp dir: every rank builds its own
    empty = empty_eval_parts(d.data_path, d.split) if d.data_path else {}
    for reason in empty.values():
        if say:
            say(f" warning: {reason}")
    num_samples = tuple(0 if s in empty else n for s, n in enumerate(num_samples))
    per_split = (d.train_data_path, d.valid_data_path, d.test_data_path)
    train, valid, test = build_gpt_datasets(d.data_path, d.split, args.model.seq_length, num_samples,
                                            seed=args.model.seed, cache_dir=d.data_cache_path,
                                            is_builder=mock or dist.get_rank() == 0, barrier=dist.barrier,
                                            eod_token=tokenizer.eod, eod_mask_loss=d.eod_mask_loss,
                                            per_split_data_paths=None if d.data_path else per_split,
                                            mid_level_dataset_surplus=d.mid_level_dataset_surplus,
                                            mock_vocab_size=tokenizer.vocab_size if d.mock_data else None)
    if not d.mock_data:  # mock ids are inside the vocabulary by construction
        prefixes = d.data_path or [p for paths in per_split if paths for p in parse_data_path(paths)[0]]
        check_dataset_vocabulary(prefixes, tokenizer.vocab_size, f"--tokenizer-type {d.tokenizer_type}",
                                 d.data_cache_path)
    return train, valid, test, tokenizer.is_byte_level


def main(argv=None) -> None:
    args = parse_args(argv, description="Pretrain a GPT-LS (Long-Short Transformer) language model.")
    from megatron_ls.training.pretrain import pretrain

    pretrain(args, model_provider, datasets_provider)


def cli() -> None:
    """Console-script entry (``megatron-ls-pretrain-gpt``): clean shutdown and clear errors."""
    select_accelerator()
    from megatron_ls.training.pretrain import run_main

    run_main(lambda: main(sys.argv[1:]))


if __name__ == "__main__":
    cli()
