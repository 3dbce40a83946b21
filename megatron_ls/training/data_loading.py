"""From datasets to per-rank micro-batch iterators (resumable by consumed samples)."""
from __future__ import annotations

from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np
import torch

from megatron_ls.data.sampler import PretrainingSampler
from megatron_ls.parallel.cp_layout import ContextLayout


def collate_tokens(samples: Sequence[dict]) -> dict:
    """Stack ``{"tokens": int64[s+1], "loss_mask"?: float[s]}`` samples into model inputs and labels."""
    tokens = torch.from_numpy(np.stack([np.asarray(s["tokens"], dtype=np.int64) for s in samples]))
    batch = {"tokens": tokens[:, :-1].contiguous(), "labels": tokens[:, 1:].contiguous()}
    if "loss_mask" in samples[0]:
        batch["loss_mask"] = torch.from_numpy(np.stack([np.asarray(s["loss_mask"], dtype=np.float32)
                                                        for s in samples]))
    else:
        batch["loss_mask"] = torch.ones_like(batch["labels"], dtype=torch.float32)
    return batch


class _IndexedView(torch.utils.data.Dataset):
    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        return self.dataset[index]


def slice_for_context_parallel(batch: dict, layout: Optional[ContextLayout]) -> dict:
    """This context-parallel rank's tokens of every ``(B, seq)`` tensor of ``batch`` (tokens, labels, loss mask)."""
    if layout is None or layout.cp == 1:
        return batch
    return {name: layout.slice_sequence(value, dim=1) for name, value in batch.items()}


def _sliced(batches: Iterator[dict], layout: ContextLayout) -> Iterator[dict]:
    for batch in batches:
        yield slice_for_context_parallel(batch, layout)


def build_data_iterator(dataset: Any, consumed_samples: int, micro_batch_size: int, data_parallel_rank: int,
                        data_parallel_size: int, num_workers: int = 0,
                        context_layout: Optional[ContextLayout] = None,
                        collate_fn: Optional[Callable[[list], dict]] = None,
                        worker_init_fn: Optional[Callable[[int], None]] = None) -> Optional[Iterator[dict]]:
    """An endless-enough iterator of this rank's micro-batches, starting after ``consumed_samples``.

    The sampler hands each data-parallel rank its slice of every global batch, so a restart with the saved
    ``consumed_samples`` continues with exactly the batch the uninterrupted run would have used. Sharding is over
    data-parallel ranks only: the context-parallel ranks of one DP rank read the same samples, and with
    ``context_layout`` (CP > 1) each keeps its own tokens of them. ``collate_fn`` defaults to
    :func:`collate_tokens`; ``worker_init_fn`` runs in each worker process (``worker_signal_init``).
    """
    if dataset is None or len(dataset) == 0:
        return None
    sampler = PretrainingSampler(total_samples=len(dataset), consumed_samples=consumed_samples,
                                 micro_batch_size=micro_batch_size, data_parallel_rank=data_parallel_rank,
                                 data_parallel_size=data_parallel_size)
    # A private generator: creating a loader iterator draws a seed, and drawing it from the global RNG would shift
    # every dropout mask after a resume (the resumed run creates its iterator at a different point).
    loader = torch.utils.data.DataLoader(_IndexedView(dataset), batch_sampler=sampler, num_workers=num_workers,
                                         collate_fn=collate_fn or collate_tokens, pin_memory=torch.cuda.is_available(),
                                         persistent_workers=num_workers > 0, generator=torch.Generator(),
                                         worker_init_fn=worker_init_fn)
    if context_layout is not None and context_layout.cp > 1:
        return _sliced(iter(loader), context_layout)
    return iter(loader)


def check_dataset_vocabulary(data_path: Sequence[str], vocab_size: int, what: str,
                             cache_dir: Optional[str] = None) -> None:
    """Refuse (``TokenIdError`` naming the file, the id and the size) data with ids outside the vocabulary.

    ``data_path`` is Megatron's ``--data-path`` (prefixes, optionally weighted). Rank 0 scans each ``.bin`` once
    (cached next to the index caches); every rank then checks the cached range, so all fail alike.
    """
    import torch.distributed as dist

    from megatron_ls.data.token_check import check_token_ids, data_path_prefixes

    prefixes = data_path_prefixes(data_path)
    distributed = dist.is_available() and dist.is_initialized()
    check_token_ids(prefixes, vocab_size, what, cache_dir, is_builder=not distributed or dist.get_rank() == 0,
                    barrier=dist.barrier if distributed else None)
