"""The ImageFolder layout (``<root>/<split>/<class>/<image>``), decoded with Pillow.

Classes are the sorted folder names of the training split; other splits must use the same names (a class may be
missing there). Files are listed sorted, so the sample numbering — and with it the training order — is the same
on every machine. Decoding happens where ``load`` is called: in the DataLoader workers.
"""
from __future__ import annotations

import os
import sys
from typing import Optional

import numpy as np

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".ppm", ".pgm", ".tif", ".tiff")
BAD_IMAGE_POLICIES = ("fail", "skip")


class ImageDataError(ValueError):
    """A problem with an image data set; the message names the path or flag."""


def list_classes(split_dir: str) -> list[str]:
    """Sorted class folder names of a split directory."""
    if not os.path.isdir(split_dir):
        raise FileNotFoundError(f"image folder {split_dir} does not exist (expected <data-path>/train/<class>/...)")
    classes = sorted(e.name for e in os.scandir(split_dir) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise ImageDataError(f"{split_dir}: no class folders (expected {split_dir}/<class>/<image>)")
    return classes


def list_images(split_dir: str, classes: list[str], *, require_all: bool) -> tuple[list[str], np.ndarray]:
    """(relative paths, labels) of every image file under ``split_dir/<class>``, sorted."""
    index = {name: i for i, name in enumerate(classes)}
    found = list_classes(split_dir)
    unknown = [c for c in found if c not in index]
    if unknown:
        raise ImageDataError(f"{split_dir}: class folders {unknown[:5]} are not classes of the training split")
    paths, labels = [], []
    for name in (classes if require_all else found):
        folder = os.path.join(split_dir, name)
        files = sorted(f for f in os.listdir(folder) if f.lower().endswith(IMAGE_EXTENSIONS)
                       and os.path.isfile(os.path.join(folder, f)))
        if not files:
            raise ImageDataError(f"{folder}: class folder has no images ({', '.join(IMAGE_EXTENSIONS)})")
        paths += [os.path.join(name, f) for f in files]
        labels += [index[name]] * len(files)
    return paths, np.asarray(labels, dtype=np.int64)


class ImageFolderSource:
    """Random access to one split: ``load(i) -> (uint8 array (C, H, W), label)``.

    ``bad_image='fail'`` raises ``ImageDataError`` naming an unreadable file; ``'skip'`` uses the next readable
    image of the split instead and counts the skipped files (``skipped``; a warning names each, per process).
    """

    def __init__(self, root: str, split: str, classes: Optional[list[str]] = None, *, num_channels: int = 3,
                 bad_image: str = "fail") -> None:
        if bad_image not in BAD_IMAGE_POLICIES:
            raise ValueError(f"--bad-image must be one of {BAD_IMAGE_POLICIES}, got {bad_image!r}")
        if num_channels not in (1, 3):
            raise ImageDataError(f"--num-channels {num_channels}: image folders decode to 1 (L) or 3 (RGB) channels")
        self.split_dir = os.path.join(root, split)
        self.classes = classes if classes is not None else list_classes(self.split_dir)
        self.paths, self.labels = list_images(self.split_dir, self.classes, require_all=classes is None)
        self.mode = "RGB" if num_channels == 3 else "L"
        self.bad_image = bad_image
        self.skipped = 0

    def __len__(self) -> int:
        return len(self.paths)

    def decode(self, index: int) -> np.ndarray:
        from PIL import Image

        path = os.path.join(self.split_dir, self.paths[index])
        with Image.open(path) as img:
            array = np.asarray(img.convert(self.mode), dtype=np.uint8)
        return array[None] if array.ndim == 2 else array.transpose(2, 0, 1)

    def load(self, index: int) -> tuple[np.ndarray, int]:
        for step in range(len(self.paths)):
            i = (index + step) % len(self.paths)
            try:
                return self.decode(i), int(self.labels[i])
            except (OSError, ValueError, SyntaxError) as exc:
                path = os.path.join(self.split_dir, self.paths[i])
                if self.bad_image == "fail":
                    raise ImageDataError(f"unreadable image {path}: {exc} (--bad-image skip uses the next image "
                                         f"instead)") from exc
                self.skipped += 1
                print(f"warning: skipped unreadable image {path} ({self.skipped} skipped in this process)",
                      file=sys.stderr, flush=True)
        raise ImageDataError(f"{self.split_dir}: no readable image at all")
