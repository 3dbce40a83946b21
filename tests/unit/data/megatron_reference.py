"""Builds datasets with megatron-core itself and saves what they hold; run as a script by test_megatron_parity.py.

``python megatron_reference.py CASES.json OUT_DIR``: for every case (data path or per-split paths, split, sequence
length, sizes, seed, EOD masking) builds megatron-core's train/valid/test with ``BlendedMegatronDatasetBuilder``
and ``GPTDatasetConfig`` and writes ``OUT_DIR/{name}.npz``: each split's length, index arrays (the blend's and each
part's) and the tokens and loss masks of its first samples. A separate process keeps megatron-core's imports and
warnings out of the test process.
"""
import json
import logging
import sys
import warnings

import numpy as np

warnings.filterwarnings("ignore")
logging.disable(logging.WARNING)

from megatron.core.datasets.blended_dataset import BlendedDataset  # noqa: E402
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder  # noqa: E402
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig, MockGPTDataset  # noqa: E402
from megatron.core.datasets.utils import get_blend_from_list  # noqa: E402

SPLITS = ("train", "valid", "test")


class Tokenizer:
    """What GPTDatasetConfig reads of a tokenizer: the vocabulary size and the EOD id (no pad id)."""

    def __init__(self, eod: int, vocab_size: int = 65000) -> None:
        self.vocab_size, self.eod = vocab_size, eod
        self.unique_identifiers = {"class": "Tokenizer", "eod": eod}


def build(case: dict) -> list:
    if case.get("mock_vocab_size"):  # --mock-data: no blend at all
        blends = {}
    elif case.get("per_split"):
        blends = {"blend_per_split": [get_blend_from_list(p) if p else None for p in case["per_split"]]}
    else:
        blends = {"blend": get_blend_from_list(case["data_path"]), "split": case["split"]}
    config = GPTDatasetConfig(random_seed=case["seed"], sequence_length=case["seq_length"],
                              tokenizer=Tokenizer(case.get("eod", 0), case.get("mock_vocab_size") or 65000),
                              reset_position_ids=False,
                              reset_attention_mask=False, eod_mask_loss=case.get("eod_mask_loss", False),
                              create_attention_mask=False, **blends)
    cls = MockGPTDataset if case.get("mock_vocab_size") else GPTDataset
    return BlendedMegatronDatasetBuilder(cls, case["sizes"], lambda: True, config).build()


def save(case: dict, datasets: list, out_dir: str) -> None:
    arrays = {}
    for name, ds in zip(SPLITS, datasets):
        arrays[f"{name}_len"] = np.array(-1 if ds is None else len(ds))
        if ds is None or len(ds) == 0:
            continue
        parts = [ds] if isinstance(ds, GPTDataset) else ds.datasets  # MockGPTDataset is a GPTDataset
        if isinstance(ds, BlendedDataset):
            arrays[f"{name}_dataset_index"] = np.asarray(ds.dataset_index)
            arrays[f"{name}_dataset_sample_index"] = np.asarray(ds.dataset_sample_index)
        for d, part in enumerate(parts):
            for key in ("document_index", "sample_index", "shuffle_index"):
                arrays[f"{name}_part{d}_{key}"] = np.asarray(getattr(part, key))
        n = min(len(ds), case["samples"])
        items = [ds[i] for i in range(n)]
        arrays[f"{name}_tokens"] = np.stack([np.append(x["tokens"].numpy(), x["labels"].numpy()[-1]) for x in items])
        arrays[f"{name}_loss_mask"] = np.stack([x["loss_mask"].numpy() for x in items])
    np.savez(f"{out_dir}/{case['name']}.npz", **arrays)


def main(cases_path: str, out_dir: str) -> None:
    with open(cases_path) as f:
        cases = json.load(f)
    for case in cases:
        save(case, build(case), out_dir)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
