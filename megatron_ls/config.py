"""Configuration dataclasses, one per concern, with Megatron-LM field names.

The command line (``megatron_ls.arguments``) is generated from these fields: every field becomes the flag
``--field-name`` (underscores to dashes) unless its metadata names another flag. Validation lives here too, so a
config built in Python gets the same clear errors as one built from the CLI.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Optional


class ConfigError(ValueError):
    """A configuration problem, phrased in terms of the command-line flag that causes it."""


def _f(default: Any, help: str, **meta: Any) -> Any:
    """A dataclass field with CLI metadata (help text, optional flag name / choices / nargs)."""
    meta["help"] = help
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


# Megatron-LM's --attention-backend values: its fused kernels map to the fastest here, its reference ones to torch.
MEGATRON_ATTENTION_BACKENDS = {"flash": "auto", "fused": "auto", "unfused": "torch", "local": "torch"}


@dataclass
class TransformerConfig:
    """Model shape and the Long-Short attention method (Transformer-LS / MASFormer)."""

    num_layers: int = _f(2, "Number of transformer layers.")
    hidden_size: int = _f(128, "Transformer hidden size.")
    num_attention_heads: int = _f(4, "Number of attention heads.")
    ffn_hidden_size: Optional[int] = _f(None, "MLP hidden size (default 4 * hidden size).")
    vocab_size: int = _f(256, "Padded vocabulary size (set from the tokenizer when training).", cli=False)
    seq_length: int = _f(512, "Maximum sequence length to process.")
    max_position_embeddings: Optional[int] = _f(None, "Size of the learned position table (default seq length).")
    position_embedding_type: str = _f("learned", "Position embedding: a learned absolute table, rotary (RoPE on "
                                                 "queries and keys; no length limit), or none.",
                                      choices=("learned", "rope", "none", "learned_absolute"))
    rotary_base: float = _f(10000.0, "RoPE base (with --position-embedding-type rope).")
    rotary_percent: float = _f(1.0, "Fraction of each head's channels that RoPE rotates.")
    hidden_dropout: float = _f(0.1, "Dropout on the residual branches and embeddings.")
    attention_dropout: float = _f(0.1, "Dropout on attention probabilities.")
    layernorm_epsilon: float = _f(1e-5, "LayerNorm epsilon.")
    normalization: str = _f("LayerNorm", "The block and final norms: LayerNorm (GPT-LS as published) or RMSNorm. "
                                         "DualLN stays LayerNorm.", choices=("LayerNorm", "RMSNorm"))
    swiglu: bool = _f(False, "SwiGLU MLP (silu(x W_gate) * x W_up) instead of GELU; the default --ffn-hidden-size "
                             "becomes Megatron's int(8h/3 / 64) * 64.")
    add_bias_linear: bool = _f(True, "Drop the biases of the attention (QKV and projection logits, output) and MLP "
                                     "linear layers.", flag="--disable-bias-linear")
    untie_embeddings_and_output_weights: bool = _f(False, "A separate output matrix instead of the input "
                                                          "embedding as LM head.")
    init_method_std: float = _f(0.02, "Standard deviation of the normal weight initialisation.")
    window_size: int = _f(128, "Long-Short sliding-window size w (0 = projection-only attention).")
    segment_length: int = _f(16, "Chunk length l of the causal dynamic projection.")
    projection_rank: int = _f(1, "Dynamic projection rank r per chunk (0 = window-only attention).")
    full_attention_layers: tuple = _f((), "Layer indices (0-based) that use full attention (MASFormer).",
                                      nargs="*", type=int)
    dual_ln: bool = _f(True, "Turn DualLN off (by default LayerNorms align the window and the projected "
                             "keys/values).", flag="--no-dual-ln")
    dual_ln_scope: str = _f("full", "DualLN statistics over all heads' width together (full, the released code) "
                                    "or per head.", choices=("full", "head"))
    window_extension: str = _f("floor", "Bidirectional window: keys seen beyond each side of a segment, "
                                        "max(w // 2, 1) (floor, the released code) or ceil(w / 2).",
                               choices=("floor", "ceil"))
    projection_input: str = _f("normed", "Bidirectional layers project the LN_L-normalised keys/values (normed, "
                                         "the released code) or the raw ones; causal layers always project raw.",
                               choices=("normed", "raw"))
    causal: bool = _f(True, "Autoregressive attention (GPT-LS); ViT-LS sets it False.", cli=False)
    attention_backend: str = _f("auto", "Long-short attention kernel (Megatron-LM's flash/fused mean auto, "
                                        "unfused/local mean torch).",
                                choices=("auto", "torch", "flex", "flash", "fused", "unfused", "local"))
    use_flash_attn: bool = _f(False, "Megatron's flag: the fastest attention kernels of this device (= "
                                     "--attention-backend auto: FlexAttention for LS layers and SDPA's flash kernel "
                                     "for full layers on CUDA; the blockwise torch kernel on CPU).")
    recompute_activations: bool = _f(False, "Recompute each transformer layer in the backward pass (= "
                                            "--recompute-granularity full; in Megatron-LM this flag means selective).")
    recompute_granularity: Optional[str] = _f(None, "Activation recomputation: full (whole transformer layers) or "
                                                    "selective (the attention core only: softmax and dropout "
                                                    "intermediates recomputed, linear outputs kept).",
                                              choices=("full", "selective"))
    recompute_method: Optional[str] = _f(None, "Which layers full recomputation covers: uniform (groups of "
                                               "--recompute-num-layers layers, default) or block (the first "
                                               "--recompute-num-layers layers of each pipeline stage).",
                                         choices=("uniform", "block"))
    recompute_num_layers: Optional[int] = _f(None, "Layers per recompute group (uniform, default 1) or recomputed "
                                                   "layers per pipeline stage (block).")
    sequence_parallel: bool = _f(False, "Set from --sequence-parallel when TP > 1.", cli=False)
    seed: int = _f(1234, "Random seed (weights, dropout, data order).")

    def __post_init__(self) -> None:
        if self.ffn_hidden_size is None:  # Megatron-LM's defaults (SwiGLU: about 8h/3, a multiple of 64)
            self.ffn_hidden_size = int(4 * self.hidden_size * 2 / 3 / 64) * 64 if self.swiglu else 4 * self.hidden_size
        if self.max_position_embeddings is None:
            self.max_position_embeddings = self.seq_length
        self.full_attention_layers = tuple(int(i) for i in self.full_attention_layers)
        self.attention_backend = MEGATRON_ATTENTION_BACKENDS.get(self.attention_backend, self.attention_backend)
        if self.position_embedding_type == "learned_absolute":  # Megatron-LM's name for the learned table
            self.position_embedding_type = "learned"
        if self.recompute_activations and self.recompute_granularity is None:
            self.recompute_granularity = "full"

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def layer_uses_full_attention(self, layer_index: int) -> bool:
        """True when layer ``layer_index`` (0-based) is a MASFormer full-attention layer."""
        return layer_index in self.full_attention_layers

    def validate(self, tensor_model_parallel_size: int = 1) -> None:
        """Raise ConfigError with one message per problem found."""
        problems = []
        for name in ("num_layers", "hidden_size", "num_attention_heads", "seq_length"):
            if getattr(self, name) <= 0:
                problems.append(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if self.num_attention_heads > 0 and self.hidden_size % self.num_attention_heads:
            problems.append(f"--hidden-size {self.hidden_size} is not divisible by --num-attention-heads "
                            f"{self.num_attention_heads}")
        if self.num_attention_heads > 0 and self.num_attention_heads % tensor_model_parallel_size:
            problems.append(f"--num-attention-heads {self.num_attention_heads} is not divisible by "
                            f"--tensor-model-parallel-size {tensor_model_parallel_size}")
        if self.ffn_hidden_size <= 0:
            problems.append(f"--ffn-hidden-size must be positive, got {self.ffn_hidden_size}"
                            + (" (the --swiglu default for this --hidden-size; set it)" if self.swiglu else ""))
        elif self.ffn_hidden_size % tensor_model_parallel_size:
            problems.append(f"--ffn-hidden-size {self.ffn_hidden_size} is not divisible by "
                            f"--tensor-model-parallel-size {tensor_model_parallel_size}")
        if self.window_size < 0:
            problems.append(f"--window-size must be >= 0, got {self.window_size}")
        if self.projection_rank < 0:
            problems.append(f"--projection-rank must be >= 0, got {self.projection_rank}")
        ls_layers = [i for i in range(self.num_layers) if i not in self.full_attention_layers]
        if ls_layers and self.window_size == 0 and self.projection_rank == 0:
            problems.append("--window-size 0 and --projection-rank 0 leave long-short layers no keys; "
                            "turn one of them on or list every layer in --full-attention-layers")
        if self.causal and ls_layers and self.projection_rank > 0:
            if self.segment_length <= 0:
                problems.append(f"--segment-length must be positive with --projection-rank > 0, "
                                f"got {self.segment_length}")
            elif 0 < self.window_size < self.segment_length:
                problems.append(f"causal long-short attention needs --window-size >= --segment-length "
                                f"(the window covers the query's own chunk), got w={self.window_size}, "
                                f"l={self.segment_length}")
        bad = [i for i in self.full_attention_layers if not 0 <= i < self.num_layers]
        if bad:
            problems.append(f"--full-attention-layers {bad} out of range for --num-layers {self.num_layers}")
        if self.position_embedding_type == "learned" and self.max_position_embeddings < self.seq_length:
            problems.append(f"--max-position-embeddings {self.max_position_embeddings} is smaller than "
                            f"--seq-length {self.seq_length}")
        if self.position_embedding_type == "rope":
            if not self.causal:
                problems.append("--position-embedding-type rope is supported for causal models only (the "
                                "bidirectional projection keys have no position)")
            if not 0.0 < self.rotary_percent <= 1.0:
                problems.append(f"--rotary-percent must be in (0, 1], got {self.rotary_percent}")
            elif self.hidden_size % max(self.num_attention_heads, 1) == 0 and int(
                    self.head_dim * self.rotary_percent) < 2:
                problems.append(f"--rotary-percent {self.rotary_percent} rotates no channel of a "
                                f"{self.head_dim}-channel head")
            if self.rotary_base <= 1:
                problems.append(f"--rotary-base must be > 1, got {self.rotary_base}")
        for name in ("hidden_dropout", "attention_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                problems.append(f"--{name.replace('_', '-')} must be in [0, 1), got {getattr(self, name)}")
        problems += self._recompute_problems()
        if self.use_flash_attn and self.attention_backend == "torch":
            problems.append("--use-flash-attn asks for the fastest attention kernel but --attention-backend torch "
                            "pins the reference kernel; drop one of them")
        if problems:
            raise ConfigError("; ".join(problems))

    def _recompute_problems(self) -> list[str]:
        if self.recompute_granularity != "full":
            if self.recompute_method is not None or self.recompute_num_layers is not None:
                return ["--recompute-method / --recompute-num-layers apply to --recompute-granularity full only"]
            return []
        if self.recompute_num_layers is not None and not 1 <= self.recompute_num_layers <= self.num_layers:
            return [f"--recompute-num-layers must be in [1, --num-layers {self.num_layers}], "
                    f"got {self.recompute_num_layers}"]
        return []

    def recomputed_layer_groups(self, num_layers: int) -> list[tuple[int, int, bool]]:
        """``(start, end, recompute)`` runs of this stage's ``num_layers`` layers under full recomputation."""
        if self.recompute_granularity != "full":
            return [(0, num_layers, False)]
        n = self.recompute_num_layers
        if self.recompute_method == "block":
            n = min(num_layers, num_layers if n is None else n)
            return [(0, n, True)] + ([(n, num_layers, False)] if n < num_layers else [])
        n = n or 1
        return [(i, min(i + n, num_layers), True) for i in range(0, num_layers, n)]


@dataclass
class ParallelConfig:
    """How ranks are laid out: tensor x context x data x pipeline, and ZeRO."""

    tensor_model_parallel_size: int = _f(1, "Tensor model parallel size (heads and MLP columns split).")
    pipeline_model_parallel_size: int = _f(1, "Pipeline model parallel size (layers split into stages).")
    context_parallel_size: int = _f(1, "Context parallel size: every sample's sequence is split over this many "
                                       "ranks, which hold the same weights (gradients reduce over DP x CP).")
    context_parallel_layout: str = _f("balanced", "Which tokens each context-parallel rank holds: 'balanced' "
                                      "(2 x CP pieces, rank i holds pieces i and 2CP-1-i: even causal work, "
                                      "Megatron's layout) or 'contiguous' (rank i: the i-th of CP pieces).",
                                      choices=("contiguous", "balanced"))
    sequence_parallel: bool = _f(False, "Megatron sequence parallelism (needs TP > 1): LayerNorms, dropout and "
                                        "residuals hold a 1/TP slice of the sequence; all-gather before and "
                                        "reduce-scatter after the tensor-parallel blocks instead of all-reduce.")
    zero_stage: int = _f(0, "DeepSpeed ZeRO stage (0-3; at most 1 with pipeline parallelism).",
                         choices=(0, 1, 2, 3))
    use_distributed_optimizer: bool = _f(False, "Megatron's distributed optimizer: optimizer state sharded over "
                                                "data-parallel ranks (= ZeRO-1 unless --zero-stage is higher).")
    overlap_grad_reduce: bool = _f(False, "Overlap the data-parallel gradient reduction with the backward pass "
                                          "(DeepSpeed ZeRO's overlap_comm; needs --zero-stage >= 1 or "
                                          "--use-distributed-optimizer).")
    distributed_backend: Optional[str] = _f(None, "torch.distributed backend (default nccl on GPU, gloo on CPU).",
                                            choices=("nccl", "gloo"))
    distributed_timeout_minutes: float = _f(10.0, "Timeout for rendezvous and collectives.")

    def __post_init__(self) -> None:
        if self.use_distributed_optimizer and self.zero_stage == 0:
            self.zero_stage = 1

    def validate(self, world_size: int) -> None:
        problems = []
        for name in ("tensor_model_parallel_size", "pipeline_model_parallel_size", "context_parallel_size"):
            if getattr(self, name) < 1:
                problems.append(f"--{name.replace('_', '-')} must be >= 1")
        model_parallel = (self.tensor_model_parallel_size * self.pipeline_model_parallel_size
                          * self.context_parallel_size)
        if model_parallel >= 1 and world_size % model_parallel:
            problems.append(f"world size {world_size} is not divisible by tensor ({self.tensor_model_parallel_size})"
                            f" x pipeline ({self.pipeline_model_parallel_size}) x context "
                            f"({self.context_parallel_size}) parallel sizes")
        if self.overlap_grad_reduce and self.zero_stage == 0:
            problems.append("--overlap-grad-reduce overlaps ZeRO's gradient reduction: use it with --zero-stage >= 1 "
                            "or --use-distributed-optimizer")
        if self.pipeline_model_parallel_size > 1 and self.zero_stage > 1:
            problems.append(f"--zero-stage {self.zero_stage} cannot be combined with pipeline parallelism "
                            f"(DeepSpeed supports ZeRO-0/1 with --pipeline-model-parallel-size > 1)")
        if problems:
            raise ConfigError("; ".join(problems))

    def data_parallel_size(self, world_size: int) -> int:
        return world_size // (self.tensor_model_parallel_size * self.pipeline_model_parallel_size
                              * self.context_parallel_size)


@dataclass
class TrainingConfig:
    """Optimisation: batch sizes, schedule, optimizer, precision."""

    micro_batch_size: int = _f(1, "Batch size per model instance (per data-parallel rank) per step.")
    global_batch_size: Optional[int] = _f(None, "Training batch size across all data-parallel ranks "
                                                "(default micro batch x data-parallel size).")
    train_iters: Optional[int] = _f(None, "Total number of iterations to train (default 100, or --train-samples "
                                          "// global batch size).")
    train_samples: Optional[int] = _f(None, "Sample-based training (Megatron): total samples; iterations = "
                                            "samples // global batch size, the schedule counts samples.")
    lr: float = _f(1e-3, "Peak learning rate.")
    min_lr: float = _f(0.0, "Minimum learning rate at the end of decay.")
    lr_decay_style: str = _f("cosine", "Learning rate decay after warmup (WSD: constant, then an anneal over the "
                                       "last --lr-wsd-decay-iters/-samples).",
                             choices=("constant", "linear", "cosine", "inverse-square-root", "WSD"))
    lr_wsd_decay_style: str = _f("exponential", "Shape of the WSD anneal.",
                                 choices=("exponential", "linear", "cosine", "minus_sqrt"))
    lr_warmup_iters: int = _f(0, "Linear warmup iterations.")
    lr_warmup_samples: int = _f(0, "Linear warmup samples (sample-based training).")
    lr_warmup_fraction: Optional[float] = _f(None, "Warmup as a fraction of the decay length (instead of "
                                                   "--lr-warmup-iters/-samples).")
    lr_warmup_init: float = _f(0.0, "Learning rate the warmup starts from.")
    lr_decay_iters: Optional[int] = _f(None, "Iterations to decay over (default --train-iters).")
    lr_decay_samples: Optional[int] = _f(None, "Samples to decay over (default --train-samples).")
    lr_wsd_decay_iters: Optional[int] = _f(None, "WSD: iterations of the final anneal.")
    lr_wsd_decay_samples: Optional[int] = _f(None, "WSD: samples of the final anneal (sample-based training).")
    weight_decay: float = _f(0.01, "AdamW weight decay (not applied to biases and norms).")
    start_weight_decay: Optional[float] = _f(None, "Weight decay at the start of an incrementing schedule "
                                                   "(--weight-decay-incr-style linear|cosine).")
    end_weight_decay: Optional[float] = _f(None, "Weight decay at the end of training (linear|cosine schedule).")
    weight_decay_incr_style: str = _f("constant", "Weight decay over training: constant (--weight-decay), or "
                                                  "from --start-weight-decay to --end-weight-decay, linear or "
                                                  "cosine (Megatron-LM's schedule).",
                                      choices=("constant", "linear", "cosine"))
    adam_beta1: float = _f(0.9, "AdamW beta1.")
    adam_beta2: float = _f(0.999, "AdamW beta2.")
    adam_eps: float = _f(1e-8, "AdamW epsilon.")
    clip_grad: float = _f(1.0, "Gradient clipping by global norm (0 disables).")
    bf16: bool = _f(False, "bfloat16 mixed precision.")
    fp16: bool = _f(False, "float16 mixed precision with dynamic loss scaling.")
    loss_scale: Optional[float] = _f(None, "Static loss scale for fp16 (default dynamic).")
    initial_loss_scale: float = _f(2.0 ** 16, "Initial dynamic loss scale for fp16.")
    loss_scale_window: int = _f(1000, "Iterations without overflow before the loss scale grows.")
    hysteresis: int = _f(2, "fp16: overflows in a row tolerated before the dynamic loss scale shrinks.")
    min_loss_scale: float = _f(1.0, "fp16: the smallest dynamic loss scale.")
    nonfinite_steps_limit: int = _f(1, "Stop with an error after this many consecutive iterations whose loss or "
                                       "gradient norm is not finite (each is skipped: weights and LR schedule "
                                       "unchanged, counted as skipped); fp16 loss-scale overflows do not count.")
    deepspeed_config: Optional[str] = _f(None, "DeepSpeed JSON merged over the config built from these flags.")
    skip_train: bool = _f(False, "Evaluate only (Megatron's flag): no training iterations and no saving; the "
                                 "validation and test evaluations of the --load checkpoint (or of the fresh "
                                 "weights) run and the program exits.")
    manual_gc: bool = _f(False, "Switch Python's automatic garbage collector off during training and collect at "
                                "the same points on every rank (--manual-gc-interval, around evaluation).")
    manual_gc_interval: int = _f(0, "With --manual-gc: collect every this many iterations (0 = only around "
                                    "evaluation).")
    manual_gc_eval: bool = _f(True, "With --manual-gc: do not collect before and after each evaluation.",
                              flag="--no-manual-gc-eval")

    def __post_init__(self) -> None:
        if self.train_iters is None and self.train_samples is None:
            self.train_iters = 100

    def validate(self, data_parallel_size: int) -> None:
        problems = []
        if self.hysteresis < 1:
            problems.append(f"--hysteresis must be >= 1, got {self.hysteresis}")
        if not self.min_loss_scale > 0:
            problems.append(f"--min-loss-scale must be positive, got {self.min_loss_scale}")
        if self.manual_gc_interval < 0:
            problems.append(f"--manual-gc-interval must be >= 0, got {self.manual_gc_interval}")
        if self.micro_batch_size <= 0:
            problems.append(f"--micro-batch-size must be positive, got {self.micro_batch_size}")
        gbs = self.global_batch_size
        if gbs is not None and self.micro_batch_size > 0 and gbs % (self.micro_batch_size * data_parallel_size):
            problems.append(f"--global-batch-size {gbs} is not divisible by --micro-batch-size "
                            f"{self.micro_batch_size} x data-parallel size {data_parallel_size}")
        if self.bf16 and self.fp16:
            problems.append("--bf16 and --fp16 are mutually exclusive")
        if self.nonfinite_steps_limit < 1:
            problems.append(f"--nonfinite-steps-limit must be >= 1, got {self.nonfinite_steps_limit}")
        problems += schedule_problems(self, self.global_batch_size or self.micro_batch_size * data_parallel_size)
        if self.min_lr > self.lr:
            problems.append(f"--min-lr {self.min_lr} is larger than --lr {self.lr}")
        if problems:
            raise ConfigError("; ".join(problems))

    def resolve_global_batch_size(self, data_parallel_size: int) -> int:
        """Fill in the global batch size (and the iterations of sample-based training); returns it."""
        if self.global_batch_size is None:
            self.global_batch_size = self.micro_batch_size * data_parallel_size
        if self.train_samples is not None:
            self.train_iters = self.train_samples // self.global_batch_size
        return self.global_batch_size


def schedule_problems(t: TrainingConfig, global_batch_size: int) -> list[str]:
    """Megatron's rules for iteration- vs sample-based training and the LR schedule flags."""
    problems = []
    iteration_flags = {"--lr-decay-iters": t.lr_decay_iters, "--lr-wsd-decay-iters": t.lr_wsd_decay_iters,
                       "--lr-warmup-iters": t.lr_warmup_iters or None}
    sample_flags = {"--lr-decay-samples": t.lr_decay_samples, "--lr-wsd-decay-samples": t.lr_wsd_decay_samples,
                    "--lr-warmup-samples": t.lr_warmup_samples or None}
    if t.train_samples is not None:
        iters = t.train_samples // max(global_batch_size, 1)
        if t.train_iters is not None and t.train_iters != iters:
            problems.append("--train-iters and --train-samples are exclusive (iteration- or sample-based training)")
        elif iters <= 0:
            problems.append(f"--train-samples {t.train_samples} is less than one global batch ({global_batch_size})")
        mixed = [flag for flag, value in iteration_flags.items() if value is not None]
        if mixed:
            problems.append(f"{', '.join(mixed)}: sample-based training (--train-samples) takes the -samples flags")
        length, warmup, wsd, unit = (t.lr_decay_samples or t.train_samples, t.lr_warmup_samples,
                                     t.lr_wsd_decay_samples, "samples")
    else:
        if t.train_iters is None or t.train_iters <= 0:
            problems.append(f"--train-iters must be positive, got {t.train_iters}")
        mixed = [flag for flag, value in sample_flags.items() if value is not None]
        if mixed:
            problems.append(f"{', '.join(mixed)}: iteration-based training takes the -iters flags (or give "
                            f"--train-samples)")
        length, warmup, wsd, unit = (t.lr_decay_iters or t.train_iters or 0, t.lr_warmup_iters,
                                     t.lr_wsd_decay_iters, "iters")
    if t.lr_warmup_fraction is not None:
        if not 0.0 <= t.lr_warmup_fraction < 1.0:
            problems.append(f"--lr-warmup-fraction must be in [0, 1), got {t.lr_warmup_fraction}")
        if t.lr_warmup_iters or t.lr_warmup_samples:
            problems.append("--lr-warmup-fraction and --lr-warmup-iters/--lr-warmup-samples are exclusive")
    elif not 0 <= warmup <= length:
        problems.append(f"--lr-warmup-{unit} {warmup} must be within [0, the decay length {length} "
                        f"(--lr-decay-{unit} or --train-{unit})]")
    if t.lr_decay_style == "WSD":
        if wsd is None:
            problems.append(f"--lr-decay-style WSD needs --lr-wsd-decay-{unit} (the length of the final anneal)")
        elif not 0 < wsd <= length:
            problems.append(f"--lr-wsd-decay-{unit} {wsd} must be in [1, the decay length {length}]")
    if t.lr_warmup_init > t.lr:
        problems.append(f"--lr-warmup-init {t.lr_warmup_init} is larger than --lr {t.lr}")
    if t.weight_decay_incr_style == "constant":
        given = [f for f, v in (("--start-weight-decay", t.start_weight_decay),
                                ("--end-weight-decay", t.end_weight_decay)) if v is not None and v != t.weight_decay]
        if given:
            problems.append(f"{', '.join(given)}: a changing weight decay needs --weight-decay-incr-style linear or "
                            f"cosine")
    elif t.start_weight_decay is None or t.end_weight_decay is None:
        problems.append(f"--weight-decay-incr-style {t.weight_decay_incr_style} needs --start-weight-decay and "
                        f"--end-weight-decay")
    return problems


@dataclass
class DataConfig:
    """Datasets and tokenizer."""

    data_path: list = _f([], "Dataset prefix(es), optionally weighted: 'PREFIX' or 'W1 P1 W2 P2 ...'.",
                         nargs="*", type=str)
    split: str = _f("969,30,1", "Train/valid/test split proportions, by sequences (as Megatron-LM).")
    train_data_path: list = _f([], "Train blend of its own (Megatron's per-split paths; not with --data-path).",
                               nargs="*", type=str)
    valid_data_path: list = _f([], "Validation blend of its own (not with --data-path).", nargs="*", type=str)
    test_data_path: list = _f([], "Test blend of its own (not with --data-path).", nargs="*", type=str)
    data_cache_path: Optional[str] = _f(None, "Where index caches are written (default next to the data).")
    mock_data: bool = _f(False, "Synthetic data instead of --data-path (megatron-core's mock GPT sequences; "
                                "split 1,1,1): throughput runs and smoke tests without files.")
    mid_level_dataset_surplus: float = _f(0.005, "Extra share of samples each blended dataset is built with.")
    eod_mask_loss: bool = _f(False, "No loss where the input token is the end-of-document token.")
    reset_position_ids: bool = _f(False, "Megatron's position reset at EOD: not supported by GPT-LS (refused).")
    reset_attention_mask: bool = _f(False, "Megatron's per-document attention: not supported by GPT-LS (refused).")
    tokenizer_type: str = _f("ByteTokenizer", "Tokenizer.",
                             choices=("ByteTokenizer", "SentencePieceTokenizer", "GPT2BPETokenizer",
                                      "HuggingFaceTokenizer", "NullTokenizer"))
    tokenizer_model: Optional[str] = _f(None, "SentencePiece model file, or the local directory of a Hugging Face "
                                              "tokenizer (HuggingFaceTokenizer).")
    vocab_file: Optional[str] = _f(None, "GPT-2 BPE vocab JSON.")
    merge_file: Optional[str] = _f(None, "GPT-2 BPE merges file.")
    null_vocab_size: Optional[int] = _f(None, "Vocabulary size for NullTokenizer.", flag="--vocab-size")
    make_vocab_size_divisible_by: int = _f(128, "Pad the vocabulary to a multiple of this x tensor parallel.")
    num_workers: int = _f(0, "DataLoader worker processes.")

    def validate(self, require_data: bool = True) -> None:
        problems = []
        per_split = self.train_data_path or self.valid_data_path or self.test_data_path
        if self.mock_data and (self.data_path or per_split):
            problems.append("--mock-data replaces --data-path / --train/valid/test-data-path: give one or the other")
        elif require_data and not self.data_path and not per_split and not self.mock_data:
            problems.append("--data-path is required (a dataset prefix built by tools/preprocess_data.py, or "
                            "--mock-data for synthetic data)")
        if self.data_path and per_split:
            problems.append("--data-path and --train/valid/test-data-path cannot be used together (Megatron-LM)")
        for flag, on in (("--reset-position-ids", self.reset_position_ids),
                         ("--reset-attention-mask", self.reset_attention_mask)):
            if on:
                problems.append(f"{flag} is not supported: GPT-LS takes tokens only (no position ids or attention "
                                "mask input; see docs/data.md)")
        if self.mid_level_dataset_surplus < 0:
            problems.append(f"--mid-level-dataset-surplus must be >= 0, got {self.mid_level_dataset_surplus}")
        parts = self.split.replace("/", ",").split(",")
        try:
            values = [float(p) for p in parts]
            if not values or len(values) > 3 or any(v < 0 for v in values) or sum(values) <= 0:
                raise ValueError
        except ValueError:
            problems.append(f"--split {self.split!r} must be up to three non-negative numbers, e.g. 969,30,1")
        if self.tokenizer_type in ("SentencePieceTokenizer", "HuggingFaceTokenizer") and not self.tokenizer_model:
            problems.append(f"--tokenizer-type {self.tokenizer_type} needs --tokenizer-model")
        if self.tokenizer_type == "GPT2BPETokenizer" and not (self.vocab_file and self.merge_file):
            problems.append("--tokenizer-type GPT2BPETokenizer needs --vocab-file and --merge-file")
        if self.tokenizer_type == "NullTokenizer" and not self.null_vocab_size:
            problems.append("--tokenizer-type NullTokenizer needs --vocab-size")
        if problems:
            raise ConfigError("; ".join(problems))


@dataclass
class CheckpointConfig:
    """Saving and resuming."""

    save: Optional[str] = _f(None, "Directory to save checkpoints to.")
    load: Optional[str] = _f(None, "Directory to load a checkpoint from (its 'latest' marker).")
    save_interval: Optional[int] = _f(None, "Save every this many iterations (and at the end).")
    save_retain_interval: Optional[int] = _f(None, "Keep only the checkpoints whose iteration is a multiple of "
                                                   "this, plus the newest; the others are deleted after each save.")
    no_save_optim: bool = _f(False, "Save weights, counters and LR schedule but no optimizer state (smaller; "
                                    "resume with --no-load-optim or --finetune).")
    no_save_rng: bool = _f(False, "Save no RNG states (a resume then draws other dropout masks).")
    no_load_optim: bool = _f(False, "Do not load optimizer state when loading a checkpoint.")
    no_load_rng: bool = _f(False, "Do not load RNG states when loading a checkpoint.")
    finetune: bool = _f(False, "Load weights only and restart iteration / data counters at 0.")
    allow_attention_change: bool = _f(False, "Resume although the checkpoint was trained with other attention "
                                             "settings (--window-size, --segment-length, --dual-ln-scope, ...); "
                                             "without it such a resume is refused.")
    exit_on_missing_checkpoint: bool = _f(False, "Fail when --load names the --save directory and it holds no "
                                                 "checkpoint yet (by default that first run of a requeued job "
                                                 "starts from scratch; a --load elsewhere without one always "
                                                 "fails).")
    use_checkpoint_args: bool = _f(False, "Take the model architecture, attention and tokenizer settings (and a "
                                          "vision model's settings) from the --load checkpoint; flags given on "
                                          "the command line still win.")


@dataclass
class LoggingConfig:
    """Logging, evaluation and exit."""

    log_interval: int = _f(10, "Iterations between log lines.")
    eval_interval: Optional[int] = _f(None, "Iterations between validation runs (default: only at the end).")
    eval_iters: int = _f(10, "Validation iterations per evaluation.")
    exit_interval: Optional[int] = _f(None, "Exit (after saving) when the iteration is a multiple of this.")
    exit_duration_in_mins: Optional[float] = _f(None, "Exit (after saving) after the first iteration that ends "
                                                      "this many minutes after the process started; all ranks "
                                                      "agree after every iteration. Resume with --load.")
    exit_signal_handler: bool = _f(False, "On --exit-signal (e.g. from SLURM before its time limit, or on "
                                          "preemption) finish the iteration, save (with --save) and exit with "
                                          "status 0; one rank receiving it is enough. Resume with --load.")
    exit_signal: str = _f("SIGTERM", "The signal --exit-signal-handler catches.",
                          choices=("SIGTERM", "SIGINT", "SIGUSR1", "SIGUSR2"))
    profile: bool = _f(False, "Profile iterations --profile-step-start + 1 .. --profile-step-end on --profile-ranks: "
                              "with --use-pytorch-profiler a torch profiler trace in --tensorboard-dir, otherwise "
                              "CUDA profiler API + NVTX ranges for nsys (--capture-range=cudaProfilerApi; GPU).")
    use_pytorch_profiler: bool = _f(False, "With --profile: the torch profiler (CPU and CUDA) instead of nsys.")
    profile_step_start: int = _f(10, "With --profile: iterations completed before profiling starts.")
    profile_step_end: int = _f(12, "With --profile: iterations completed when profiling stops.")
    profile_ranks: list = _f([0], "With --profile: global ranks that profile.", nargs="+", type=int)
    log_params_norm: bool = _f(False, "Also log the weights' global L2 norm ('params norm' in the iteration line, "
                                      "'params-norm' in tensorboard), counted once whatever the layout.")
    tensorboard_dir: Optional[str] = _f(None, "Write tensorboard scalars here.")
    tensorboard_log_interval: int = _f(1, "Iterations between tensorboard writes.")


CONFIG_GROUPS = (
    ("model", "Model and Long-Short attention", TransformerConfig),
    ("parallel", "Distributed layout", ParallelConfig),
    ("training", "Training", TrainingConfig),
    ("data", "Data and tokenizer", DataConfig),
    ("checkpoint", "Checkpointing", CheckpointConfig),
    ("logging", "Logging and evaluation", LoggingConfig),
)


def config_to_dict(config: Any) -> dict:
    """Plain-dict view of a config dataclass (tuples become lists for JSON)."""
    out = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        out[f.name] = list(value) if isinstance(value, tuple) else value
    return out


def transformer_config_from_dict(values: dict) -> TransformerConfig:
    """Rebuild a TransformerConfig from ``config_to_dict`` output, ignoring unknown keys."""
    names = {f.name for f in dataclasses.fields(TransformerConfig)}
    # sequence parallelism is a property of a run's layout, not of the saved model
    kwargs = {k: v for k, v in values.items() if k in names and k != "sequence_parallel"}
    if "full_attention_layers" in kwargs:
        kwargs["full_attention_layers"] = tuple(kwargs["full_attention_layers"])
    return TransformerConfig(**kwargs)


def ls_attention_flops_per_token(config: TransformerConfig, layer_index: int) -> float:
    """Forward matmul FLOPs per token of one attention core (scores + weighted sum), causal-averaged."""
    n = config.seq_length
    d = config.hidden_size
    if config.layer_uses_full_attention(layer_index):
        keys = (n + 1) / 2 if config.causal else n
    else:
        keys = config.window_size if config.causal else 2 * config.window_size
        if config.projection_rank > 0:
            chunks = math.ceil(n / config.segment_length) if config.causal else 1
            keys += config.projection_rank * ((chunks - 1) / 2 if config.causal else 1)
    return 4.0 * keys * d
