"""Image classification data sets for training: a source (ImageFolder or IDX), an order, transforms, collation.

Training samples are numbered ``0, 1, 2, ...`` over as many epochs as the run needs; sample ``i`` is image
``perm_e[i mod n]`` of epoch ``e = i // n`` with a seeded permutation per epoch, augmented with the generator of
``(seed, i)``. So the order and every augmentation are a function of the sample number alone: the pretraining
sampler's ``consumed_samples`` resumes exactly, at any DP layout and worker count. Evaluation splits are in file
order, unaugmented.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np
import torch

from megatron_ls.data.image_folder import ImageDataError, ImageFolderSource, list_classes
from megatron_ls.data.image_idx import FASHION_MNIST_CLASSES, is_idx_directory, load_idx_split
from megatron_ls.data.image_mix import MixConfig, mix_batch
from megatron_ls.data.image_transforms import ImageTransform, sample_rng

VALID_DIR_NAMES = ("val", "valid", "validation")


class IdxSource:
    """One IDX split in memory: ``load(i) -> (uint8 (1, H, W), label)``."""

    def __init__(self, directory: str, split: str, num_classes: int) -> None:
        self.images, self.labels = load_idx_split(directory, split, num_classes)
        self.classes = list(FASHION_MNIST_CLASSES) if num_classes == 10 else [str(i) for i in range(num_classes)]
        self.skipped = 0

    def __len__(self) -> int:
        return len(self.images)

    def load(self, index: int) -> tuple[np.ndarray, int]:
        return self.images[index][None], int(self.labels[index])


class ImageClassificationDataset(torch.utils.data.Dataset):
    """``dataset[i] -> {"image": float (C, H, W), "label": int, "number": i}``.

    ``num_samples=None``: one pass in source order (evaluation). Otherwise ``num_samples`` samples over seeded
    per-epoch permutations (training).
    """

    def __init__(self, source: Any, transform: ImageTransform, seed: int, num_samples: Optional[int] = None
                 ) -> None:
        if len(source) == 0:
            raise ImageDataError("image split is empty")
        self.source, self.transform, self.seed = source, transform, int(seed)
        self.num_samples = len(source) if num_samples is None else int(num_samples)
        self.shuffle = num_samples is not None
        self._perm: tuple[int, Optional[np.ndarray]] = (-1, None)

    def __len__(self) -> int:
        return self.num_samples

    def source_index(self, number: int) -> int:
        """Which image of the source is sample ``number``."""
        if not self.shuffle:
            return number
        epoch, pos = divmod(number, len(self.source))
        if self._perm[0] != epoch:
            self._perm = (epoch, np.random.default_rng([self.seed, epoch, 0xE70C]).permutation(len(self.source)))
        return int(self._perm[1][pos])

    def __getitem__(self, number: int) -> dict:
        if not 0 <= number < self.num_samples:
            raise IndexError(f"sample {number} out of range [0, {self.num_samples})")
        image, label = self.source.load(self.source_index(number))
        rng = sample_rng(self.seed, number) if self.transform.train else None
        return {"image": self.transform(image, rng), "label": label, "number": number}


@dataclass
class ImageCollator:
    """Stack samples into the batch the training steps read: ``tokens`` (the images), ``labels`` (class indices,
    or soft targets with mixup/cutmix/smoothing), ``loss_mask`` (one per image)."""

    mix: Optional[MixConfig] = None
    seed: int = 0

    def __call__(self, samples: Sequence[dict]) -> dict:
        images = torch.stack([s["image"] for s in samples])
        labels = torch.tensor([s["label"] for s in samples], dtype=torch.int64)
        if self.mix is not None:
            images, labels = mix_batch(images, labels, self.mix, self.seed, samples[0]["number"])
        return {"tokens": images, "labels": labels, "loss_mask": torch.ones(len(samples))}


def _valid_dir(root: str) -> Optional[str]:
    for name in VALID_DIR_NAMES:
        if os.path.isdir(os.path.join(root, name)):
            return name
    return None


def open_sources(data_path: str, *, num_classes: int, num_channels: int, bad_image: str = "fail"
                 ) -> tuple[Any, Any, Any]:
    """``(train, valid, test)`` sources of an ImageFolder root or an IDX directory, with the flags checked.

    ImageFolder: ``train/``, a validation folder (``val``/``valid``/``validation``) and optionally ``test/``
    (default: the validation folder). IDX (Fashion-MNIST): ``train-*`` for training, ``t10k-*`` for both
    validation and test.
    """
    if not os.path.isdir(data_path):
        raise FileNotFoundError(f"--data-path {data_path}: no such directory")
    if is_idx_directory(data_path):
        if num_channels != 1:
            raise ImageDataError(f"--num-channels {num_channels}: the IDX images in {data_path} have 1 channel")
        train, test = IdxSource(data_path, "train", num_classes), IdxSource(data_path, "test", num_classes)
        return train, test, test
    classes = list_classes(os.path.join(data_path, "train"))
    if len(classes) != num_classes:
        raise ImageDataError(f"--num-classes {num_classes} but {os.path.join(data_path, 'train')} has "
                             f"{len(classes)} class folders")
    valid_name = _valid_dir(data_path)
    if valid_name is None:
        raise FileNotFoundError(f"--data-path {data_path}: no validation folder ({'/'.join(VALID_DIR_NAMES)})")
    kw = dict(num_channels=num_channels, bad_image=bad_image)
    train = ImageFolderSource(data_path, "train", **kw)
    valid = ImageFolderSource(data_path, valid_name, classes, **kw)
    test = ImageFolderSource(data_path, "test", classes, **kw) if os.path.isdir(
        os.path.join(data_path, "test")) else valid
    return train, valid, test
