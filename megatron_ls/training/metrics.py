"""Megatron-shaped log lines, model FLOP counts, and tensorboard scalars."""
from __future__ import annotations

import math
from typing import Optional

import torch

from megatron_ls.config import TransformerConfig, ls_attention_flops_per_token


def model_flops_per_token(config: TransformerConfig) -> float:
    """Training FLOPs per token (forward + backward = 3x forward), counting the LS attention cost exactly."""
    h, ffn, v = config.hidden_size, config.ffn_hidden_size, config.vocab_size
    forward = 2.0 * h * v  # tied LM head
    for i in range(config.num_layers):
        full = config.layer_uses_full_attention(i)
        r = 0 if full else config.projection_rank
        forward += 2.0 * h * (3 * h + config.num_attention_heads * r)  # q, k, v and projection logits
        forward += 2.0 * h * h  # output projection
        forward += 4.0 * h * ffn  # MLP
        if r:
            forward += 4.0 * r * h  # P^T K and P^T V
        forward += ls_attention_flops_per_token(config, i)
    return 3.0 * forward


def format_iteration_line(*, iteration: int, train_iters: int, consumed_samples: int, elapsed_ms: float,
                          tflops: float, tokens_per_sec: float, lr: float, global_batch_size: int,
                          loss: float, loss_scale: float, grad_norm: Optional[float], skipped: int,
                          loss_name: str = "lm loss", params_norm: Optional[float] = None) -> str:
    """The per-interval line, in Megatron-LM's shape (see DESIGN.md); ``loss_name`` is "loss" for vision;
    ``params_norm`` (``--log-params-norm``) goes after the grad norm, as in Megatron-LM."""
    tflops_text = f"{tflops:.1f}" if tflops >= 1 else f"{tflops:.3f}"
    grad = "nan" if grad_norm is None or not math.isfinite(grad_norm) else f"{grad_norm:.3f}"
    if params_norm is not None:
        grad += f" | params norm: {params_norm:.3f}"
    return (f" iteration {iteration:8d}/{train_iters:8d} | consumed samples: {consumed_samples} | "
            f"elapsed time per iteration (ms): {elapsed_ms:.1f} | throughput per GPU (TFLOP/s/GPU): {tflops_text} | "
            f"tokens per second per GPU: {tokens_per_sec:.0f} | learning rate: {lr:.6E} | "
            f"global batch size: {global_batch_size} | {loss_name}: {loss:.6E} | loss scale: {loss_scale:.1f} | "
            f"grad norm: {grad} | number of skipped iterations: {skipped} |")


def format_eval_line(prefix: str, loss: float, byte_level: bool) -> str:
    """Validation summary; byte-level tokenizers also report bits per byte (= bits per character on enwik8)."""
    ppl = math.exp(min(20.0, loss))
    line = f" {prefix} | lm loss value: {loss:.6E} | lm loss PPL: {ppl:.6E} |"
    if byte_level:
        line += f" bits per byte: {loss / math.log(2):.4f} |"
    return line


class TensorboardWriter:
    """Thin wrapper over SummaryWriter that does nothing when no directory is given or on non-logging ranks."""

    def __init__(self, log_dir: Optional[str], enabled: bool) -> None:
        self.writer = None
        if log_dir and enabled:
            from torch.utils.tensorboard import SummaryWriter

            try:
                self.writer = SummaryWriter(log_dir=log_dir, max_queue=100)
            except OSError as exc:
                raise ValueError(f"--tensorboard-dir {log_dir}: cannot create it: {exc.strerror or exc}") from None

    def scalars(self, values: dict, step: int) -> None:
        if self.writer is None:
            return
        for name, value in values.items():
            if value is not None and math.isfinite(float(value)):
                self.writer.add_scalar(name, float(value), step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()


def memory_stats_mb() -> dict:
    """Allocator statistics (CUDA) or resident set size (CPU), in MB."""
    if torch.cuda.is_available():
        return {"mem-allocated-mb": torch.cuda.memory_allocated() / 2 ** 20,
                "mem-max-allocated-mb": torch.cuda.max_memory_allocated() / 2 ** 20}
    try:
        import resource

        return {"mem-max-rss-mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    except ImportError:  # pragma: no cover - non-POSIX
        return {}
