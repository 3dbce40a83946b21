"""Small generated image data sets for the vision tests: an IDX directory and an ImageFolder tree."""
from __future__ import annotations

import os

import numpy as np

from megatron_ls.data.image_idx import write_idx


def class_images(labels: np.ndarray, size: int, channels: int, seed: int) -> np.ndarray:
    """uint8 images ``(N, size, size)`` (or ``(N, size, size, 3)``): a bright square whose position is the class,
    plus noise, so a tiny model can learn them."""
    rng = np.random.default_rng(seed)
    shape = (len(labels), size, size) + ((3,) if channels == 3 else ())
    images = rng.integers(0, 60, size=shape, dtype=np.uint8)
    half = size // 2
    for i, label in enumerate(labels):
        y, x = divmod(int(label) % 4, 2)
        images[i, y * half:(y + 1) * half, x * half:(x + 1) * half] += 150
    return images


def make_idx_dataset(root: str, *, train: int = 64, test: int = 22, classes: int = 4, size: int = 16,
                     gz: bool = True) -> str:
    """Fashion-MNIST-layout files (train-* and t10k-*) under ``root``."""
    os.makedirs(root, exist_ok=True)
    suffix = ".gz" if gz else ""
    for split, count, seed in (("train", train, 0), ("t10k", test, 1)):
        labels = (np.arange(count) % classes).astype(np.uint8)
        write_idx(os.path.join(root, f"{split}-images-idx3-ubyte{suffix}"), class_images(labels, size, 1, seed))
        write_idx(os.path.join(root, f"{split}-labels-idx1-ubyte{suffix}"), labels)
    return root


def make_image_folder(root: str, *, per_class: dict, size: int = 16, channels: int = 3,
                      splits=("train", "val")) -> str:
    """``root/<split>/<class>/<n>.png|jpg`` with ``per_class[split] = images per class`` for classes c0..c3."""
    from PIL import Image

    for s, split in enumerate(splits):
        for c in range(4):
            folder = os.path.join(root, split, f"c{c}")
            os.makedirs(folder, exist_ok=True)
            images = class_images(np.full(per_class[split], c), size, channels, seed=10 * s + c)
            for i, img in enumerate(images):
                ext = "png" if i % 2 == 0 else "jpg"
                Image.fromarray(img).save(os.path.join(folder, f"{i:03d}.{ext}"))
    return root
