"""RandAugment (Cubuk et al., 2020) as the released ViL-LS recipe configures it: ``rand-m9-mstd0.5-inc1``.

The spec string follows the timm grammar the released recipe passes (``AUG.TIMM_AUG.AUTO_AUGMENT``): ``rand``
then dash-separated options, ``m`` magnitude (0-10), ``n`` operations per image, ``mstd`` the standard deviation
of a per-operation Gaussian draw of the magnitude, ``mmax`` its upper clip, ``inc1`` the "increasing" operation
set (a larger magnitude is always a stronger change), ``p`` the probability each chosen operation applies.
Operations are drawn with replacement and act on 8-bit Pillow images; affine ones fill with the mean colour and
resample bicubically, as in that recipe. All randomness comes from the sample's numpy generator, so an
augmented image is the same in any DataLoader worker, rank or resumed run.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

__all__ = ["RandAugmentSpec", "parse_rand_augment", "rand_augment", "OPERATIONS"]

_MAX_LEVEL = 10.0


@dataclass(frozen=True)
class RandAugmentSpec:
    """Parsed ``--auto-augment`` options."""

    num_ops: int = 2
    magnitude: float = 9.0
    magnitude_std: float = 0.0
    magnitude_max: float = _MAX_LEVEL
    increasing: bool = False
    prob: float = 0.5


def parse_rand_augment(spec: str) -> RandAugmentSpec:
    """``rand-m9-mstd0.5-inc1`` -> RandAugmentSpec; ValueError naming ``--auto-augment`` on anything else."""
    parts = spec.split("-")
    if parts[0] != "rand":
        raise ValueError(f"--auto-augment {spec!r}: only RandAugment specs ('rand-m9-mstd0.5-inc1') are supported")
    values: dict = {}
    keys = {"mstd": ("magnitude_std", float), "mmax": ("magnitude_max", float), "inc": ("increasing", int),
            "m": ("magnitude", float), "n": ("num_ops", int), "p": ("prob", float)}
    for part in parts[1:]:
        key = next((k for k in keys if part.startswith(k)), None)  # longest keys first: "mstd" before "m"
        if key is None:
            raise ValueError(f"--auto-augment {spec!r}: unknown option {part!r} (expected m, n, mstd, mmax, inc, p)")
        name, kind = keys[key]
        try:
            values[name] = kind(part[len(key):])
        except ValueError:
            raise ValueError(f"--auto-augment {spec!r}: option {part!r} needs a number after {key!r}") from None
    out = RandAugmentSpec(**{**values, "increasing": bool(values.get("increasing", 0))})
    if out.num_ops < 1 or not 0 <= out.prob <= 1 or out.magnitude_std < 0 or not 0 < out.magnitude_max:
        raise ValueError(f"--auto-augment {spec!r}: needs n >= 1, 0 <= p <= 1, mstd >= 0, mmax > 0")
    return out


def _signed(value: float, rng: np.random.Generator) -> float:
    return -value if rng.uniform() > 0.5 else value


def _fill(image: Image.Image, mean: Sequence[float]):
    colour = tuple(min(255, round(255 * m)) for m in mean)
    return colour[0] if image.mode == "L" else colour


def _affine(image: Image.Image, matrix: tuple, mean: Sequence[float]) -> Image.Image:
    return image.transform(image.size, Image.Transform.AFFINE, matrix, resample=Image.Resampling.BICUBIC,
                           fillcolor=_fill(image, mean))


def _posterize(image: Image.Image, bits: int) -> Image.Image:
    return image if bits >= 8 else ImageOps.posterize(image, max(bits, 0))


def _solarize_add(image: Image.Image, add: int, threshold: int = 128) -> Image.Image:
    table = [min(255, i + add) if i < threshold else i for i in range(256)]
    return image.point(table * len(image.getbands()))


def _rotate(image: Image.Image, degrees: float, mean: Sequence[float]) -> Image.Image:
    return image.rotate(degrees, resample=Image.Resampling.BICUBIC, fillcolor=_fill(image, mean))


def _enhancer(kind) -> Callable:
    return lambda image, factor, _mean: kind(image).enhance(factor)


# name -> operation(image, argument, mean colour). The draw indexes this fixed order.
OPERATIONS: dict[str, Callable] = {
    "AutoContrast": lambda image, _arg, _mean: ImageOps.autocontrast(image),
    "Equalize": lambda image, _arg, _mean: ImageOps.equalize(image),
    "Invert": lambda image, _arg, _mean: ImageOps.invert(image),
    "Rotate": _rotate,
    "Posterize": lambda image, bits, _mean: _posterize(image, bits),
    "Solarize": lambda image, threshold, _mean: ImageOps.solarize(image, threshold),
    "SolarizeAdd": lambda image, add, _mean: _solarize_add(image, add),
    "Color": _enhancer(ImageEnhance.Color),
    "Contrast": _enhancer(ImageEnhance.Contrast),
    "Brightness": _enhancer(ImageEnhance.Brightness),
    "Sharpness": _enhancer(ImageEnhance.Sharpness),
    "ShearX": lambda image, shear, mean: _affine(image, (1, shear, 0, 0, 1, 0), mean),
    "ShearY": lambda image, shear, mean: _affine(image, (1, 0, 0, shear, 1, 0), mean),
    "TranslateXRel": lambda image, frac, mean: _affine(image, (1, 0, frac * image.size[0], 0, 1, 0), mean),
    "TranslateYRel": lambda image, frac, mean: _affine(image, (1, 0, 0, 0, 1, frac * image.size[1]), mean),
}
_ORDER = tuple(OPERATIONS)
_ENHANCERS = ("Color", "Contrast", "Brightness", "Sharpness")


def _argument(name: str, level: float, increasing: bool, rng: np.random.Generator):
    """The operation's argument at ``level`` (0..10). The increasing set changes Posterize, Solarize and the
    enhancers so that a larger level is always a stronger change (fewer bits, lower threshold, a factor further
    from 1 in a random direction); the others are shared by both sets."""
    frac = level / _MAX_LEVEL
    if name == "Rotate":
        return _signed(frac * 30.0, rng)
    if name in ("ShearX", "ShearY"):
        return _signed(frac * 0.3, rng)
    if name in ("TranslateXRel", "TranslateYRel"):
        return _signed(frac * 0.45, rng)
    if name == "SolarizeAdd":
        return int(frac * 110)
    if name == "Posterize":
        return 4 - int(frac * 4) if increasing else int(frac * 4)
    if name == "Solarize":
        return 256 - int(frac * 256) if increasing else int(frac * 256)
    if name in _ENHANCERS:
        return 1.0 + _signed(frac * 0.9, rng) if increasing else frac * 1.8 + 0.1
    return None  # AutoContrast, Equalize, Invert take no argument


def rand_augment(image: Image.Image, spec: RandAugmentSpec, rng: np.random.Generator,
                 mean: Sequence[float]) -> Image.Image:
    """Apply ``spec.num_ops`` operations drawn with replacement, each with probability ``spec.prob``."""
    for index in rng.integers(0, len(_ORDER), size=spec.num_ops):
        if spec.prob < 1.0 and rng.uniform() > spec.prob:
            continue
        level = spec.magnitude
        if spec.magnitude_std > 0:
            level = rng.uniform(0, level) if math.isinf(spec.magnitude_std) else rng.normal(level, spec.magnitude_std)
        level = max(0.0, min(level, spec.magnitude_max))
        name = _ORDER[int(index)]
        image = OPERATIONS[name](image, _argument(name, level, spec.increasing, rng), mean)
    return image
