"""Command line built from the config dataclasses (Megatron flag names), and the DeepSpeed config built from it."""
from __future__ import annotations

import argparse
import copy
import dataclasses
import difflib
import json
import math
import os
import sys
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

from megatron_ls.config import (
    CONFIG_GROUPS,
    CheckpointConfig,
    ConfigError,
    DataConfig,
    LoggingConfig,
    ParallelConfig,
    TrainingConfig,
    TransformerConfig,
)
from megatron_ls.parallel.launch_env import launcher_world_size


@dataclass
class Arguments:
    """Parsed command line: one config object per concern."""

    model: TransformerConfig
    parallel: ParallelConfig
    training: TrainingConfig
    data: DataConfig
    checkpoint: CheckpointConfig
    logging: LoggingConfig
    extra: argparse.Namespace


def _flag_name(f: dataclasses.Field) -> str:
    return f.metadata.get("flag", "--" + f.name.replace("_", "-"))


def _nearest(word: str, candidates: Sequence[str]) -> Optional[str]:
    close = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.6)
    if not close:  # case slips ('wsd' for 'WSD')
        close = [c for c in candidates if c.lower() == word.lower()]
    return close[0] if close else None


class FriendlyArgumentParser(argparse.ArgumentParser):
    """argparse with one-line errors: an unknown flag or a wrong choice names the nearest supported one."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n")

    def option_names(self) -> list[str]:
        return [name for action in self._actions for name in action.option_strings]

    def parse_args(self, args: Optional[Sequence[str]] = None, namespace: Any = None) -> argparse.Namespace:
        namespace, unknown = self.parse_known_args(args, namespace)
        if unknown:
            word = unknown[0]
            if not word.startswith("-"):
                self.error(f"unexpected argument {word!r} (every value belongs to the flag before it)")
            flag = word.split("=", 1)[0]
            nearest = _nearest(flag, self.option_names())
            hint = f"; did you mean {nearest}?" if nearest else ""
            self.error(f"unrecognized argument {flag}{hint or ' (--help lists every flag)'}")
        return namespace

    def _check_value(self, action: argparse.Action, value: Any) -> None:
        if action.choices is not None and value not in action.choices:
            choices = [str(c) for c in action.choices]
            nearest = _nearest(str(value), choices)
            hint = f"; did you mean {nearest}?" if nearest else ""
            raise argparse.ArgumentError(action, f"invalid choice: {value!r} (choose from {', '.join(choices)})"
                                                 f"{hint}")


def _add_field(group: argparse._ArgumentGroup, f: dataclasses.Field, dest: str) -> None:
    meta = f.metadata
    help_text = meta["help"].replace("%", "%%")  # argparse formats help with %-substitution
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    flag = _flag_name(f)
    if f.type in ("bool", bool):
        # Default-False booleans are switches; default-True ones are turned off by a --no-... flag.
        action = "store_false" if default else "store_true"
        group.add_argument(flag, dest=dest, action=action, default=default, help=help_text)
        return
    kwargs: dict = {"dest": dest, "default": copy.copy(default), "help": help_text,
                    "metavar": flag.lstrip("-").replace("-", "_").upper() if "choices" not in meta else None}
    if "choices" in meta:
        kwargs["choices"] = meta["choices"]
    if "nargs" in meta:
        kwargs["nargs"] = meta["nargs"]
        kwargs["type"] = meta.get("type", str)
    else:
        base = str(f.type).replace("Optional[", "").rstrip("]")
        kwargs["type"] = {"int": int, "float": float, "str": str}.get(base, str)
    if "choices" in meta and "type" in kwargs and kwargs["type"] is str and isinstance(meta["choices"][0], int):
        kwargs["type"] = int
    if default is not None and "nargs" not in meta:
        # Formatted by argparse at --help time, so an entry point's set_defaults (vision: no dropout) shows.
        kwargs["help"] += " Default: %(default)s."
    group.add_argument(flag, **kwargs)


class _PositionEmbeddingFlag(argparse.Action):
    """Megatron-LM's older spellings of ``--position-embedding-type``: ``--use-rotary-position-embeddings`` means
    rope; ``--no-position-embedding`` drops the learned table (none), but never overrides rope, in either order."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        current = getattr(namespace, self.dest, None)
        if self.const == "rope" or current != "rope":
            setattr(namespace, self.dest, self.const)


def _add_legacy_position_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("Megatron-LM's older position flags")
    group.add_argument("--use-rotary-position-embeddings", dest="model.position_embedding_type", nargs=0,
                       action=_PositionEmbeddingFlag, const="rope", help="= --position-embedding-type rope.")
    group.add_argument("--no-position-embedding", dest="model.position_embedding_type", nargs=0,
                       action=_PositionEmbeddingFlag, const="none",
                       help="No learned position table: --position-embedding-type none (rope stays rope).")


def build_parser(description: str = "megatron_ls",
                 extra_args_provider: Optional[Callable[[argparse.ArgumentParser], None]] = None,
                 ) -> argparse.ArgumentParser:
    """An argparse parser with one group per config dataclass (Megatron flag names)."""
    parser = FriendlyArgumentParser(description=description, allow_abbrev=False)
    for prefix, title, cls in CONFIG_GROUPS:
        group = parser.add_argument_group(title)
        for f in dataclasses.fields(cls):
            if f.metadata.get("cli", True):
                _add_field(group, f, dest=f"{prefix}.{f.name}")
    _add_legacy_position_flags(parser)
    launcher = parser.add_argument_group("Launcher")
    # The deepspeed launcher passes --local_rank; torchrun uses LOCAL_RANK. Accept both spellings.
    launcher.add_argument("--local-rank", "--local_rank", dest="extra.local_rank", type=int, metavar="N",
                          default=int(os.environ.get("LOCAL_RANK", 0)), help="Set by the launcher.")
    if extra_args_provider is not None:
        extra_args_provider(parser)
        for action in parser._actions:  # an entry's own flags: FLAG_NAME in --help, not the EXTRA.x dest
            if action.option_strings and action.metavar is None and action.nargs != 0 and not action.choices:
                action.metavar = action.option_strings[0].lstrip("-").replace("-", "_").upper()
    return parser


def parse_args(argv: Optional[Sequence[str]] = None, description: str = "megatron_ls",
               extra_args_provider: Optional[Callable[[argparse.ArgumentParser], None]] = None,
               defaults: Optional[dict] = None, world_size: Optional[int] = None) -> Arguments:
    """Parse and validate the command line; a bad flag exits with status 2 and one clear message."""
    parser = build_parser(description, extra_args_provider)
    if defaults:
        parser.set_defaults(**defaults)
    namespace = parser.parse_args(argv)
    if getattr(namespace, "checkpoint.use_checkpoint_args", False):
        apply_checkpoint_args(parser, namespace, sys.argv[1:] if argv is None else list(argv))
    args = arguments_from_namespace(namespace)
    first_run_of_requeued_job(args)
    if world_size is None:
        world_size = launcher_world_size()  # WORLD_SIZE, or mpirun's process count
    try:
        validate_arguments(args, world_size)
    except ConfigError as exc:
        parser.error(str(exc))
    t = args.training
    if t.train_samples is not None:  # Megatron: iterations = samples // global batch size
        t.train_iters = t.train_samples // (t.global_batch_size or
                                            t.micro_batch_size * args.parallel.data_parallel_size(world_size))
    return args


def _fresh_requeue_dir(load: Optional[str], save: Optional[str]) -> bool:
    """``--load`` is the ``--save`` directory and holds no checkpoint yet (no ``latest``, no ``iter_*``)."""
    if not (load and save) or os.path.realpath(load) != os.path.realpath(save):
        return False
    from megatron_ls.checkpoint_files import LATEST_FILE

    entries = os.listdir(load) if os.path.isdir(load) else []
    return LATEST_FILE not in entries and not any(e.startswith("iter_") for e in entries)


def first_run_of_requeued_job(args: Arguments) -> None:
    """Megatron's requeue habit: every submission passes ``--load X --save X``, and the first finds nothing to
    load. When ``--load`` is the ``--save`` directory and holds no checkpoint yet (no ``latest``, no ``iter_*``),
    the run starts from scratch (``args.extra.load_note`` says so) unless ``--exit-on-missing-checkpoint``. A
    ``--load`` of any other directory is left to fail naming it: a typo must not silently restart training."""
    ck = args.checkpoint
    if ck.exit_on_missing_checkpoint or not _fresh_requeue_dir(ck.load, ck.save):
        return
    args.extra.load_note = (f" no checkpoint in --load {ck.load} yet (it is the --save directory): starting from "
                            f"scratch (--exit-on-missing-checkpoint makes this an error)")
    ck.load = None


# Model settings --use-checkpoint-args leaves to the command line: regularisation, kernels, recomputation and
# the seed are choices of the run, not of the weights (as in Megatron-LM's load_args_from_checkpoint).
_RUN_CHOICES = {"hidden_dropout", "attention_dropout", "attention_backend", "use_flash_attn", "recompute_activations",
                "recompute_granularity", "recompute_method", "recompute_num_layers", "sequence_parallel", "seed"}
_TOKENIZER_SETTINGS = ("tokenizer_type", "tokenizer_model", "vocab_file", "merge_file", "null_vocab_size",
                       "make_vocab_size_divisible_by")


def apply_checkpoint_args(parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                          argv: Sequence[str]) -> list[str]:
    """Megatron-LM's ``--use-checkpoint-args``: set the model, tokenizer and vision settings of ``namespace`` from
    the ``--load`` checkpoint's metadata, except those whose flag ``argv`` gives. Returns the destinations set."""
    from megatron_ls.checkpoint_files import CheckpointError, read_latest_tag, read_metadata

    load = getattr(namespace, "checkpoint.load", None)
    if not load:
        parser.error("--use-checkpoint-args needs --load DIR (the checkpoint to take the settings from)")
    if _fresh_requeue_dir(load, getattr(namespace, "checkpoint.save", None)):
        return []  # the first run of a requeued job: nothing saved yet, the flags describe the model
    try:
        metadata = read_metadata(load, read_latest_tag(load))
    except (CheckpointError, OSError, ValueError) as exc:
        parser.error(f"--use-checkpoint-args: {exc}")
    saved_args = metadata.get("args", {})
    saved = {f"model.{k}": v for k, v in saved_args.get("model", {}).items() if k not in _RUN_CHOICES}
    saved.update({f"data.{k}": saved_args.get("data", {})[k] for k in _TOKENIZER_SETTINGS
                  if k in saved_args.get("data", {})})
    saved.update({f"vision.{k}": v for k, v in metadata.get("vision", {}).items()})
    given = {action.dest for action in parser._actions
             if any(token == opt or token.startswith(opt + "=") for opt in action.option_strings for token in argv)}
    taken = []
    for dest, value in saved.items():
        if dest not in given and hasattr(namespace, dest):
            setattr(namespace, dest, value)
            taken.append(dest)
    return taken


def arguments_from_namespace(namespace: argparse.Namespace) -> Arguments:
    values: dict = {prefix: {} for prefix, _, _ in CONFIG_GROUPS}
    extra = argparse.Namespace()
    for key, value in vars(namespace).items():
        prefix, _, name = key.partition(".")
        if prefix in values and name:
            values[prefix][name] = value
        else:
            setattr(extra, name or key, value)
    built = {prefix: cls(**values[prefix]) for prefix, _, cls in CONFIG_GROUPS}
    return Arguments(extra=extra, **built)


def validate_arguments(args: Arguments, world_size: int, require_data: bool = True) -> None:
    """Cross-check every config; raises ConfigError naming the flags involved."""
    problems = []
    checks = [
        lambda: args.parallel.validate(world_size),
        lambda: args.model.validate(args.parallel.tensor_model_parallel_size),
        lambda: args.training.validate(args.parallel.data_parallel_size(world_size) or 1),
        lambda: args.data.validate(require_data),
    ]
    for check in checks:
        try:
            check()
        except ConfigError as exc:
            problems.append(str(exc))
    pp = args.parallel.pipeline_model_parallel_size
    if pp > 1 and args.model.num_layers % pp:
        problems.append(f"--num-layers {args.model.num_layers} is not divisible by "
                        f"--pipeline-model-parallel-size {pp}")
    problems += context_parallel_problems(args)
    problems += sequence_parallel_problems(args)
    if pp > 1 and args.model.recompute_granularity == "full" and args.model.recompute_method == "block":
        problems.append("--recompute-method block is not available with pipeline parallelism (DeepSpeed's "
                        "pipeline recomputes uniform groups of layers); use --recompute-method uniform")
    if args.logging.exit_interval is not None and args.logging.exit_interval <= 0:
        problems.append("--exit-interval must be positive")
    if args.checkpoint.no_save_optim and args.parallel.zero_stage == 3:
        problems.append("--no-save-optim with --zero-stage 3: ZeRO-3 keeps the weights themselves only in its "
                        "optimizer partitions, so nothing loadable would be left; save with the optimizer state")
    if args.checkpoint.save_retain_interval is not None and args.checkpoint.save_retain_interval <= 0:
        problems.append(f"--save-retain-interval must be positive, got {args.checkpoint.save_retain_interval}")
    lg = args.logging
    if lg.profile:
        if not 0 <= lg.profile_step_start < lg.profile_step_end:
            problems.append(f"--profile-step-start {lg.profile_step_start} and --profile-step-end "
                            f"{lg.profile_step_end}: need 0 <= start < end")
        if lg.use_pytorch_profiler and not lg.tensorboard_dir:
            problems.append("--use-pytorch-profiler writes its trace into --tensorboard-dir: give one")
        if not lg.use_pytorch_profiler:
            import torch

            if not torch.cuda.is_available():
                problems.append("--profile without --use-pytorch-profiler drives nsys through CUDA's profiler API "
                                "and needs a GPU; add --use-pytorch-profiler (CPU and CUDA)")
    if args.logging.exit_duration_in_mins is not None and not args.logging.exit_duration_in_mins > 0:
        problems.append(f"--exit-duration-in-mins must be positive, got {args.logging.exit_duration_in_mins}")
    if args.checkpoint.save_interval is not None and args.checkpoint.save_interval <= 0:
        problems.append("--save-interval must be positive")
    if args.training.deepspeed_config and not os.path.isfile(args.training.deepspeed_config):
        problems.append(f"--deepspeed-config {args.training.deepspeed_config}: no such file")
    if problems:
        raise ConfigError("; ".join(problems))


def context_parallel_problems(args: Arguments) -> list[str]:
    """What stops ``--context-parallel-size`` from splitting this model's sequences (empty when nothing)."""
    from megatron_ls.parallel.cp_layout import ContextLayout

    p, m = args.parallel, args.model
    if p.context_parallel_size <= 1 or m.seq_length <= 0:
        return []
    try:
        layout = ContextLayout(m.seq_length, p.context_parallel_size, 0, p.context_parallel_layout)
        if any(not m.layer_uses_full_attention(i) for i in range(m.num_layers)):
            layout.check_attention(causal=m.causal, window=m.window_size, segment_length=m.segment_length,
                                   projection_rank=m.projection_rank)
    except ValueError as exc:
        return [str(exc)]
    return []


def sequence_parallel_problems(args: Arguments) -> list[str]:
    """What stops ``--sequence-parallel`` from splitting each rank's tokens over the TP group."""
    p, m = args.parallel, args.model
    tp, cp = p.tensor_model_parallel_size, p.context_parallel_size
    if not p.sequence_parallel or tp <= 1 or m.seq_length <= 0 or m.seq_length % cp:
        return []
    if (m.seq_length // cp) % tp:
        return [f"--sequence-parallel splits each rank's {m.seq_length // cp} tokens (--seq-length / "
                f"--context-parallel-size) over --tensor-model-parallel-size {tp}, which must divide them"]
    return []


def _deep_merge(base: dict, override: dict) -> dict:
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def build_deepspeed_config(args: Arguments, data_parallel_size: int, context_parallel_size: int = 1) -> dict:
    """The DeepSpeed JSON implied by the flags, with ``--deepspeed-config`` merged over it.

    DeepSpeed counts every rank holding the same weights as a data-parallel replica, context-parallel ones
    included, so its ``train_batch_size`` is ``--global-batch-size x CP`` (each sample is fed CP times, a slice
    to each CP rank); the accumulation steps are the same as without CP.
    """
    t = args.training
    gbs = t.resolve_global_batch_size(data_parallel_size)
    config: dict[str, Any] = {
        "train_batch_size": gbs * context_parallel_size,
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": gbs // (t.micro_batch_size * data_parallel_size),
        "gradient_clipping": t.clip_grad,
        "zero_optimization": {"stage": args.parallel.zero_stage,
                              **({"overlap_comm": True} if args.parallel.overlap_grad_reduce else {})},
        # Our optimizer is torch AdamW; ZeRO accepts it once told so.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10 ** 9,
        "wall_clock_breakdown": False,
        "checkpoint": {"use_node_local_storage": False},
    }
    p = args.parallel
    if p.sequence_parallel and p.tensor_model_parallel_size > 1 and p.pipeline_model_parallel_size > 1:
        # DeepSpeed's pipeline sends 1/TP of an activation per TP rank and all-gathers it on arrival, which
        # assumes TP ranks hold the same activation; under sequence parallelism each holds its own slice.
        config["pipeline"] = {"pipe_partitioned": False, "grad_partitioned": False}
    if t.bf16:
        config["bf16"] = {"enabled": True}
    if t.fp16:
        fp16: dict[str, Any] = {"enabled": True, "initial_scale_power": int(round(math.log2(t.initial_loss_scale))),
                                "loss_scale_window": t.loss_scale_window, "hysteresis": t.hysteresis,
                                "min_loss_scale": t.min_loss_scale}
        fp16["loss_scale"] = t.loss_scale if t.loss_scale is not None else 0
        config["fp16"] = fp16
    if t.deepspeed_config:
        try:
            with open(t.deepspeed_config) as fh:
                user = json.load(fh)
        except (OSError, json.JSONDecodeError) as exc:
            raise ConfigError(f"--deepspeed-config {t.deepspeed_config}: {exc}") from exc
        config = _deep_merge(config, user)
    return config
