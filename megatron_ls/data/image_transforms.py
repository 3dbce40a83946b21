"""Image transforms in torch: random resized crop or padded random crop, horizontal flip, RandAugment or colour
jitter, resize + center crop, normalisation, random erasing (the released ViL-LS / DeiT training order).

Randomness comes from a numpy generator made from ``(seed, sample number)``, never from a global stream, so an
augmented sample is the same whichever DataLoader worker, data-parallel rank or resumed run produces it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from megatron_ls.data.image_randaugment import parse_rand_augment, rand_augment

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_GRAY = torch.tensor([0.299, 0.587, 0.114])  # ITU-R 601 luma, as PIL and torchvision


def sample_rng(seed: int, number: int) -> np.random.Generator:
    """The generator of one sample's augmentation."""
    return np.random.default_rng([int(seed), int(number), 0x5EED])


def resized_crop_box(height: int, width: int, scale: Sequence[float], ratio: Sequence[float],
                     rng: np.random.Generator) -> tuple[int, int, int, int]:
    """``(top, left, h, w)`` of a random crop of area fraction in ``scale`` and aspect in ``ratio`` (10 tries,
    then the largest centered crop with an aspect inside ``ratio``), as the usual RandomResizedCrop."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        h, w = height, width
    return (height - h) // 2, (width - w) // 2, h, w


def resize(image: torch.Tensor, size: tuple[int, int], interpolation: str = "bilinear") -> torch.Tensor:
    """Antialiased bilinear or bicubic resize of a ``(C, H, W)`` float image in [0, 1]; a no-op at the same size.
    Bicubic overshoots at edges, so it is clamped to [0, 1] as an 8-bit image would be."""
    if tuple(image.shape[-2:]) == tuple(size):
        return image
    out = F.interpolate(image[None], size=size, mode=interpolation, align_corners=False, antialias=True)[0]
    return out.clamp_(0.0, 1.0) if interpolation == "bicubic" else out


def color_jitter(x: torch.Tensor, strength: float, rng: np.random.Generator) -> torch.Tensor:
    """Brightness, contrast and saturation, each by a factor uniform in ``[max(0, 1 - s), 1 + s]``, in a random
    order (torchvision's ColorJitter(s, s, s) on a float image; saturation is a no-op for one channel)."""
    factors = rng.uniform(max(0.0, 1.0 - strength), 1.0 + strength, size=3)
    for which in rng.permutation(3):
        f = float(factors[which])
        if which == 0:
            x = x * f
        else:
            gray = x if x.shape[0] == 1 else (x * _GRAY[:, None, None]).sum(0, keepdim=True)
            x = f * x + (1.0 - f) * (gray.mean() if which == 1 else gray)
        x = x.clamp(0.0, 1.0)
    return x


def random_erase(x: torch.Tensor, rng: np.random.Generator, area: tuple[float, float] = (0.02, 1 / 3),
                 log_aspect: tuple[float, float] = (math.log(0.3), math.log(1 / 0.3))) -> torch.Tensor:
    """Random erasing (Zhong et al., 2020) in the released recipe's "pixel" mode: one rectangle of the normalised
    image, area fraction in ``area``, aspect ratio log-uniform, gets per-pixel standard normal values (10 tries)."""
    height, width = x.shape[-2:]
    for _ in range(10):
        target = height * width * rng.uniform(*area)
        aspect = math.exp(rng.uniform(*log_aspect))
        h, w = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        if h < height and w < width:
            top, left = int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1))
            x = x.clone()
            x[:, top:top + h, left:left + w] = torch.from_numpy(rng.standard_normal((x.shape[0], h, w))).to(x.dtype)
            return x
    return x


@dataclass
class ImageTransform:
    """uint8 ``(C, H, W)`` -> normalised float ``(C, img_h, img_w)``; ``train`` turns augmentation on."""

    size: tuple[int, int]
    train: bool
    mean: Sequence[float]
    std: Sequence[float]
    crop_scale: tuple[float, float] = (0.08, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip_prob: float = 0.5
    augment: bool = True
    eval_crop_fraction: float = 0.875
    crop_padding: int = 0  # > 0: pad-and-crop (random translation) instead of the random resized crop
    interpolation: str = "bilinear"  # or "bicubic" (the released recipe), for every resize
    auto_augment: str = ""  # a RandAugment spec, "rand-m9-mstd0.5-inc1"; "" = off
    color_jitter: float = 0.0  # used only without auto_augment, as in the released (timm) recipe
    random_erase_prob: float = 0.0

    def __post_init__(self) -> None:
        if self.crop_padding < 0:
            raise ValueError(f"--crop-padding must be >= 0, got {self.crop_padding}")
        if not 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1:
            raise ValueError(f"--crop-scale must satisfy 0 < min <= max <= 1, got {self.crop_scale}")
        if not 0 < self.eval_crop_fraction <= 1:
            raise ValueError(f"--eval-crop-fraction must be in (0, 1], got {self.eval_crop_fraction}")
        if not 0 <= self.hflip_prob <= 1:
            raise ValueError(f"--hflip-prob must be in [0, 1], got {self.hflip_prob}")
        if self.interpolation not in ("bilinear", "bicubic"):
            raise ValueError(f"--interpolation must be bilinear or bicubic, got {self.interpolation!r}")
        if self.color_jitter < 0:
            raise ValueError(f"--color-jitter must be >= 0, got {self.color_jitter}")
        if not 0 <= self.random_erase_prob <= 1:
            raise ValueError(f"--random-erase-prob must be in [0, 1], got {self.random_erase_prob}")
        self._rand_augment = parse_rand_augment(self.auto_augment) if self.auto_augment else None

    def __call__(self, image: np.ndarray, rng: Optional[np.random.Generator] = None) -> torch.Tensor:
        x = torch.from_numpy(np.array(image, dtype=np.float32)).div_(255.0)
        if len(self.mean) != x.shape[0] or len(self.std) != x.shape[0]:
            raise ValueError(f"--image-mean/--image-std have {len(self.mean)}/{len(self.std)} values for "
                             f"{x.shape[0]}-channel images")
        if self.train and self.augment:
            if rng is None:
                raise ValueError("training transforms need the sample's generator")
            if self.crop_padding:
                x = self.padded_crop(x, rng)
            else:
                top, left, h, w = resized_crop_box(x.shape[1], x.shape[2], self.crop_scale, self.crop_ratio, rng)
                x = resize(x[:, top:top + h, left:left + w], self.size, self.interpolation)
            if rng.uniform() < self.hflip_prob:
                x = x.flip(-1)
            # Draws below happen only when their option is on, so turning them on later leaves runs without
            # them bit-identical.
            if self._rand_augment is not None:
                x = self.rand_augmented(x, rng)
            elif self.color_jitter > 0:
                x = color_jitter(x, self.color_jitter, rng)
        else:
            x = self.center(x)
        mean = torch.tensor(self.mean, dtype=x.dtype)[:, None, None]
        std = torch.tensor(self.std, dtype=x.dtype)[:, None, None]
        x = (x - mean) / std
        if self.train and self.augment and self.random_erase_prob > 0 and rng.uniform() < self.random_erase_prob:
            x = random_erase(x, rng)
        return x

    def rand_augmented(self, x: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        """RandAugment on the 8-bit image (its operations are Pillow's, as in the released recipe)."""
        from PIL import Image

        pixels = x.mul(255.0).round_().clamp_(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
        image = Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels)
        image = rand_augment(image, self._rand_augment, rng, self.mean)
        out = torch.from_numpy(np.array(image, dtype=np.float32)).div_(255.0)
        return out[None] if out.ndim == 2 else out.permute(2, 0, 1).contiguous()

    def padded_crop(self, x: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        """Resize to ``size``, pad ``crop_padding`` zero (black, before normalisation) pixels on each side, take a
        random ``size`` crop: a shift of up to ``crop_padding`` pixels each way, with no change of scale."""
        th, tw, p = self.size[0], self.size[1], self.crop_padding
        x = F.pad(resize(x, self.size, self.interpolation), (p, p, p, p))
        top, left = int(rng.integers(0, 2 * p + 1)), int(rng.integers(0, 2 * p + 1))
        return x[:, top:top + th, left:left + tw]

    def center(self, x: torch.Tensor) -> torch.Tensor:
        """Resize so the crop of ``eval_crop_fraction`` of the shorter side is ``size``, then center-crop."""
        th, tw = self.size
        h, w = x.shape[-2:]
        if self.eval_crop_fraction < 1.0 or (h, w) != (th, tw):
            shorter = min(h, w)
            want = int(round(max(th, tw) / self.eval_crop_fraction))
            size = (max(th, round(h * want / shorter)), max(tw, round(w * want / shorter)))
            x = resize(x, size, self.interpolation)
            h, w = x.shape[-2:]
        top, left = (h - th) // 2, (w - tw) // 2
        return x[:, top:top + th, left:left + tw]


def default_normalisation(num_channels: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """ImageNet's statistics for RGB, 0.5 / 0.5 otherwise (override with --image-mean / --image-std)."""
    if num_channels == 3:
        return IMAGENET_MEAN, IMAGENET_STD
    return (0.5,) * num_channels, (0.5,) * num_channels
