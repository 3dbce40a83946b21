"""Sequence-classification data on disk: Megatron ``.bin/.idx`` tokens plus a labels ``.npy`` per split.

For a prefix ``P`` (e.g. ``data/listops/listops``)::

    P_meta.json            {"format": "megatron_ls.classification", "version": 1, "task", "vocab": [...],
                            "pad_id", "cls_id", "num_classes", "splits": {"train": n, ...}, "generator": {...}}
    P_train.bin / .idx     one document per example, each one sequence of token ids (Megatron mmap format)
    P_train_labels.npy     int64[n]: label of document i
    P_train.jsonl          optional, human-readable: {"text": "tokens joined by spaces", "label": k}

and the same for ``valid`` and ``test``. Examples carry no padding and no classification token; the model adds
those. The meta file is written last, so a prefix with a meta file is complete.
"""
from __future__ import annotations

import json
import os
from typing import Iterable, Optional, Sequence

import numpy as np

from megatron_ls.data.atomic import atomic_save_npy, atomic_write_text
from megatron_ls.data.indexed_dataset import IndexedDataset, IndexedDatasetBuilder, best_fitting_dtype

__all__ = ["FORMAT", "SPLITS", "ClassificationDataError", "ClassificationDataset", "ClassificationWriter",
           "read_meta", "split_prefix", "write_meta", "collate_classification", "EpochShuffledView"]

FORMAT = "megatron_ls.classification"
VERSION = 1
SPLITS = ("train", "valid", "test")


class ClassificationDataError(ValueError):
    """Missing or inconsistent classification data files."""


def split_prefix(prefix: str, split: str) -> str:
    return f"{prefix}_{split}"


def read_meta(prefix: str) -> dict:
    """The ``P_meta.json`` of a prefix, checked for format and required keys."""
    path = f"{prefix}_meta.json"
    if not os.path.isfile(path):
        raise ClassificationDataError(f"--data-path {prefix}: no {path} (generate the data first, e.g. "
                                      f"tools/generate_task_data.py --task LISTOPS --output-prefix {prefix})")
    with open(path) as fh:
        meta = json.load(fh)
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise ClassificationDataError(f"{path}: not {FORMAT} version {VERSION} data")
    missing = [k for k in ("task", "vocab", "pad_id", "cls_id", "num_classes", "splits") if k not in meta]
    if missing:
        raise ClassificationDataError(f"{path}: missing keys {missing}")
    return meta


def write_meta(prefix: str, *, task: str, vocab: Sequence[str], pad_id: int, cls_id: int, num_classes: int,
               splits: dict, generator: Optional[dict] = None) -> None:
    """Write ``P_meta.json`` (last, after every split)."""
    meta = {"format": FORMAT, "version": VERSION, "task": task, "vocab": list(vocab), "pad_id": pad_id,
            "cls_id": cls_id, "num_classes": num_classes, "splits": dict(splits), "generator": generator or {}}
    atomic_write_text(f"{prefix}_meta.json", json.dumps(meta, indent=1) + "\n")


class ClassificationWriter:
    """Writes one split: ``add(token_ids, label, text)`` per example, then ``finalize()``."""

    def __init__(self, prefix: str, split: str, vocab_size: int, jsonl: bool = True) -> None:
        self.base = split_prefix(prefix, split)
        os.makedirs(os.path.dirname(os.path.abspath(self.base)), exist_ok=True)
        self.builder = IndexedDatasetBuilder(self.base + ".bin", dtype=best_fitting_dtype(vocab_size))
        self.labels: list[int] = []
        self._jsonl = open(self.base + ".jsonl.tmp", "w") if jsonl else None

    def add(self, token_ids: np.ndarray, label: int, text: Optional[str] = None) -> None:
        self.builder.add_item(token_ids)
        self.builder.end_document()
        self.labels.append(int(label))
        if self._jsonl is not None:
            self._jsonl.write(json.dumps({"text": text, "label": int(label)}) + "\n")

    def finalize(self) -> int:
        self.builder.finalize(self.base + ".idx")
        atomic_save_npy(self.base + "_labels.npy", np.asarray(self.labels, dtype=np.int64))
        if self._jsonl is not None:
            self._jsonl.close()
            os.replace(self.base + ".jsonl.tmp", self.base + ".jsonl")
        return len(self.labels)

    def abort(self) -> None:
        self.builder.abort()
        if self._jsonl is not None:
            self._jsonl.close()
            os.remove(self.base + ".jsonl.tmp")


class ClassificationDataset:
    """One split: ``ds[i] -> {"tokens": int64 array (unpadded), "label": int}``."""

    def __init__(self, prefix: str, split: str, meta: Optional[dict] = None) -> None:
        self.meta = meta or read_meta(prefix)
        base = split_prefix(prefix, split)
        if not IndexedDataset.exists(base):
            raise ClassificationDataError(f"--data-path {prefix}: split {split!r} missing ({base}.bin/.idx)")
        self.tokens = IndexedDataset(base)
        labels_path = base + "_labels.npy"
        if not os.path.isfile(labels_path):
            raise ClassificationDataError(f"--data-path {prefix}: no labels file {labels_path}")
        self.labels = np.load(labels_path, allow_pickle=False)
        if self.labels.shape != (self.tokens.num_documents,):
            raise ClassificationDataError(f"{labels_path}: {self.labels.shape[0]} labels for "
                                          f"{self.tokens.num_documents} documents in {base}.idx")
        if len(self.tokens) != self.tokens.num_documents:
            raise ClassificationDataError(f"{base}.idx: expected one sequence per document")
        classes = int(self.meta["num_classes"])
        if self.labels.size and not 0 <= int(self.labels.min()) <= int(self.labels.max()) < classes:
            bad = int(self.labels.max()) if int(self.labels.max()) >= classes else int(self.labels.min())
            raise ClassificationDataError(f"{labels_path} holds label {bad}, outside the {classes} classes of "
                                          f"{prefix}_meta.json (num_classes); regenerate the data or fix its labels")

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict:
        return {"tokens": self.tokens.get(int(index)).astype(np.int64), "label": int(self.labels[index])}

    @property
    def lengths(self) -> np.ndarray:
        return self.tokens.sequence_lengths


class EpochShuffledView:
    """``num_samples`` indices over ``dataset``: epoch after epoch, each a fresh seeded permutation.

    With ``bucket_batches = K > 0`` and ``batch_size = B``: every run of ``K·B`` consecutive indices is sorted by
    length, cut into ``K`` batches of ``B``, and those batches are shuffled (seeded), so a batch holds examples
    of similar length and pads less (a global batch still sees a random sample of the data).
    """

    def __init__(self, dataset: ClassificationDataset, num_samples: int, seed: int, bucket_batches: int = 0,
                 batch_size: int = 1) -> None:
        n = len(dataset)
        if n == 0:
            raise ClassificationDataError("training split is empty")
        epochs = -(-max(num_samples, 1) // n)
        rng = np.random.default_rng(seed)
        index = np.concatenate([rng.permutation(n) for _ in range(epochs)])[:num_samples]
        if bucket_batches > 0:
            lengths = np.asarray(dataset.lengths)
            span = bucket_batches * batch_size
            for start in range(0, len(index) - span + 1, span):
                piece = index[start:start + span]
                piece = piece[np.argsort(lengths[piece], kind="stable")].reshape(bucket_batches, batch_size)
                index[start:start + span] = piece[rng.permutation(bucket_batches)].reshape(-1)
        self.index = index
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> dict:
        return self.dataset[int(self.index[i])]


def collate_classification(samples: Iterable[dict], pad_id: int, max_tokens: int, multiple: int = 1) -> dict:
    """Pad a micro-batch to its longest example (rounded up to ``multiple``), truncating at ``max_tokens``.

    Returns ``tokens (B, N)`` int64 (padding = ``pad_id``), ``labels (B,)`` and ``loss_mask (B,)`` of ones,
    the keys the training steps read.
    """
    samples = list(samples)
    rows = [s["tokens"][:max_tokens] for s in samples]
    longest = max(len(r) for r in rows)
    n = min(-(-longest // multiple) * multiple, max(max_tokens, longest))
    tokens = np.full((len(rows), n), pad_id, dtype=np.int64)
    for i, row in enumerate(rows):
        tokens[i, :len(row)] = row
    import torch

    labels = torch.tensor([s["label"] for s in samples], dtype=torch.int64)
    return {"tokens": torch.from_numpy(tokens), "labels": labels,
            "loss_mask": torch.ones(len(rows), dtype=torch.float32)}
