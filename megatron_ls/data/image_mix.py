"""Mixup, CutMix and label smoothing on a micro-batch (the DeiT / released ViL-LS training recipe).

Per micro-batch, with probability ``prob``: CutMix (with probability ``switch_prob`` when both are on) pastes a
box of the batch-reversed images, Mixup blends them; ``lam ~ Beta(alpha, alpha)`` (CutMix's ``lam`` is then
the exact unpasted area). Targets become ``lam * smooth(y) + (1 - lam) * smooth(y reversed)`` with
``smooth(y) = (1 - s) * onehot(y) + s / classes``. Randomness comes from ``(seed, first sample number)``, so a
micro-batch is mixed the same way at any data-parallel layout, in any worker, after any resume.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class MixConfig:
    num_classes: int
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    prob: float = 1.0
    switch_prob: float = 0.5
    label_smoothing: float = 0.0

    def __post_init__(self) -> None:
        problems = []
        for name in ("mixup_alpha", "cutmix_alpha"):
            if getattr(self, name) < 0:
                problems.append(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        for name, flag in (("prob", "--mix-prob"), ("switch_prob", "--mix-switch-prob")):
            if not 0 <= getattr(self, name) <= 1:
                problems.append(f"{flag} must be in [0, 1], got {getattr(self, name)}")
        if not 0 <= self.label_smoothing < 1:
            problems.append(f"--label-smoothing must be in [0, 1), got {self.label_smoothing}")
        if problems:
            raise ValueError("; ".join(problems))

    @property
    def soft_targets(self) -> bool:
        """True when targets are probability rows rather than class indices."""
        return self.mixup_alpha > 0 or self.cutmix_alpha > 0 or self.label_smoothing > 0


def smooth_one_hot(labels: torch.Tensor, num_classes: int, smoothing: float) -> torch.Tensor:
    off = smoothing / num_classes
    out = torch.full((labels.shape[0], num_classes), off)
    return out.scatter_(1, labels[:, None], 1.0 - smoothing + off)


def cutmix_box(height: int, width: int, lam: float, rng: np.random.Generator) -> tuple[int, int, int, int]:
    """``(y0, y1, x0, x1)``: a box of area about ``1 - lam`` centred at a uniform point, clipped to the image."""
    cut = np.sqrt(1.0 - lam)
    ch, cw = int(height * cut), int(width * cut)
    cy, cx = int(rng.integers(0, height)), int(rng.integers(0, width))
    return (int(np.clip(cy - ch // 2, 0, height)), int(np.clip(cy + ch // 2, 0, height)),
            int(np.clip(cx - cw // 2, 0, width)), int(np.clip(cx + cw // 2, 0, width)))


def mix_batch(images: torch.Tensor, labels: torch.Tensor, config: MixConfig, seed: int, first_sample: int
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(images, targets)``: mixed images and soft targets ``(B, classes)`` (or the inputs when nothing applies)."""
    if not config.soft_targets:
        return images, labels
    rng = np.random.default_rng([int(seed), int(first_sample), 0x313C])
    lam = 1.0
    use_mix = (config.mixup_alpha > 0 or config.cutmix_alpha > 0) and rng.uniform() < config.prob
    if use_mix:
        cutmix = config.cutmix_alpha > 0 and (config.mixup_alpha <= 0 or rng.uniform() < config.switch_prob)
        if cutmix:
            lam = float(rng.beta(config.cutmix_alpha, config.cutmix_alpha))
            y0, y1, x0, x1 = cutmix_box(images.shape[-2], images.shape[-1], lam, rng)
            images = images.clone()
            images[..., y0:y1, x0:x1] = images.flip(0)[..., y0:y1, x0:x1]
            lam = 1.0 - (y1 - y0) * (x1 - x0) / (images.shape[-2] * images.shape[-1])
        else:
            lam = float(rng.beta(config.mixup_alpha, config.mixup_alpha))
            images = images * lam + images.flip(0) * (1.0 - lam)
    targets = smooth_one_hot(labels, config.num_classes, config.label_smoothing)
    if lam < 1.0:
        targets = targets * lam + targets.flip(0) * (1.0 - lam)
    return images, targets
