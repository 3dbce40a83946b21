"""Argument validation shared by the attention ops.

Every check raises ``ValueError`` or ``TypeError`` naming the offending argument and its value, so a wrong call
from the model layer fails at the op boundary instead of deep inside a matmul.
"""
from __future__ import annotations

from typing import Optional

import torch

FLOAT_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
BACKENDS = ("auto", "torch", "flex")
WINDOW_EXTENSIONS = ("floor", "ceil")


def window_extension(window: int, rule: str) -> int:
    """Keys a bidirectional window segment sees beyond each side: ``floor`` = max(w // 2, 1) (the authors'
    released code), ``ceil`` = ceil(w / 2) (this project's first build); equal for even ``w``. 0 without a window."""
    if rule not in WINDOW_EXTENSIONS:
        raise ValueError(f"window_extension must be one of {WINDOW_EXTENSIONS}, got {rule!r}")
    if window <= 0:
        return 0
    return max(window // 2, 1) if rule == "floor" else (window + 1) // 2


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """q, k, v must be 4-D (B, H, N, D) floating tensors of one shape, dtype and device."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must have shape (B, H, N, D), got shape {tuple(t.shape)}")
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name} must be float64/float32/float16/bfloat16, got dtype {t.dtype}")
    for name, t in (("k", k), ("v", v)):
        if t.shape != q.shape:
            raise ValueError(f"{name} shape {tuple(t.shape)} does not match q shape {tuple(q.shape)}")
        if t.dtype != q.dtype:
            raise TypeError(f"{name} dtype {t.dtype} does not match q dtype {q.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name} is on device {t.device} but q is on {q.device}")
    if q.shape[2] < 1:
        raise ValueError(f"sequence length N (q.shape[2]) must be >= 1, got {q.shape[2]}")
    if q.shape[3] < 1:
        raise ValueError(f"head dim D (q.shape[3]) must be >= 1, got {q.shape[3]}")


def check_proj_logits(proj_logits: Optional[torch.Tensor], q: torch.Tensor) -> int:
    """Validate ``proj_logits`` against q; return the projection rank r (0 when None)."""
    if proj_logits is None:
        return 0
    if not isinstance(proj_logits, torch.Tensor):
        raise TypeError(f"proj_logits must be a torch.Tensor or None, got {type(proj_logits).__name__}")
    b, h, n, _ = q.shape
    if proj_logits.dim() != 4 or tuple(proj_logits.shape[:3]) != (b, h, n):
        raise ValueError(
            f"proj_logits must have shape (B, H, N, r) = ({b}, {h}, {n}, r), got {tuple(proj_logits.shape)}")
    if proj_logits.dtype != q.dtype:
        raise TypeError(f"proj_logits dtype {proj_logits.dtype} does not match q dtype {q.dtype}")
    if proj_logits.device != q.device:
        raise ValueError(f"proj_logits is on device {proj_logits.device} but q is on {q.device}")
    return int(proj_logits.shape[3])


def check_int(name: str, value, minimum: int) -> int:
    """An int (not bool) >= minimum."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r} ({type(value).__name__})")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def check_padding_mask(mask: Optional[torch.Tensor], q: torch.Tensor) -> Optional[torch.Tensor]:
    """key_padding_mask must be a (B, N) bool tensor on q's device (True = padding)."""
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"key_padding_mask must be a torch.Tensor or None, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(f"key_padding_mask must have dtype torch.bool (True = padding), got {mask.dtype}")
    b, _, n, _ = q.shape
    if tuple(mask.shape) != (b, n):
        raise ValueError(f"key_padding_mask must have shape (B, N) = ({b}, {n}), got {tuple(mask.shape)}")
    if mask.device != q.device:
        raise ValueError(f"key_padding_mask is on device {mask.device} but q is on {q.device}")
    return mask


def check_dropout(dropout_p) -> float:
    """dropout_p must be a number in [0, 1)."""
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)):
        raise TypeError(f"dropout_p must be a float, got {dropout_p!r}")
    if not 0.0 <= float(dropout_p) < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    return float(dropout_p)


def resolve_scale(scale, head_dim: int) -> float:
    """``scale`` or the default ``D ** -0.5``; must be a finite positive-or-negative non-zero number."""
    if scale is None:
        return head_dim ** -0.5
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a float or None, got {scale!r}")
    if not torch.isfinite(torch.tensor(float(scale))) or scale == 0:
        raise ValueError(f"scale must be finite and non-zero, got {scale}")
    return float(scale)


def check_backend(backend) -> str:
    """backend must be one of 'auto', 'torch', 'flex'."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return backend


def check_norm(name: str, norm) -> None:
    """A norm is None or a callable applied to the last dimension."""
    if norm is not None and not callable(norm):
        raise TypeError(f"{name} must be callable (e.g. nn.LayerNorm(D)) or None, got {type(norm).__name__}")
