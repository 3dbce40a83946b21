"""Same samples, same order as megatron-core: every index array and the first samples' tokens and loss masks.

megatron-core (pinned in the ``dev`` extra) builds each case in one subprocess (``megatron_reference.py``); our
``build_gpt_datasets`` builds the same case here. Cases: one epoch, many epochs (both final-epoch shuffles),
empty documents and zero-length sequences, multi-sequence documents, blends with and without weights, a single
weighted prefix, per-split data paths, ``--eod-mask-loss``, and ``--mock-data`` (megatron-core's
``MockGPTDataset``).
"""
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from megatron_ls.data.blended_dataset import BlendedDataset
from megatron_ls.data.dataset_builder import build_gpt_datasets
from megatron_ls.data.indexed_dataset import IndexedDatasetBuilder

HERE = Path(__file__).resolve().parent
SPLITS = ("train", "valid", "test")
SAMPLES = 300  # tokens compared for the first samples of each split (the index arrays are compared whole)

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("megatron") is None or importlib.util.find_spec("megatron.core") is None,
    reason="megatron-core is not installed (pip install -c constraints.txt 'megatron-core==0.16.1', part of the "
           "dev extra); the parity tests need it as the reference")


def _write(prefix: str, documents: list) -> str:
    """``documents``: lists of sequence lengths (an empty list is an empty document)."""
    rng = np.random.default_rng(len(prefix))
    builder = IndexedDatasetBuilder(prefix + ".bin", np.uint16)
    for lengths in documents:
        for n in lengths:
            builder.add_item(rng.integers(0, 1000, n))
        builder.end_document()
    builder.finalize(prefix + ".idx")
    return prefix


@pytest.fixture(scope="session")
def corpora(tmp_path_factory):
    d = tmp_path_factory.mktemp("parity")
    rng = np.random.default_rng(11)
    a = _write(str(d / "a"), [[int(n)] for n in rng.integers(1, 400, 300)])
    tiny = _write(str(d / "tiny"), [[int(n)] for n in rng.integers(5, 60, 12)])
    empty = _write(str(d / "empty"), [[], [30], [0], [45], [], [12], [0, 20]] * 9)  # empty documents and sequences
    multi = _write(str(d / "multi"), [list(rng.integers(0, 50, rng.integers(1, 5))) for _ in range(80)])
    eod = str(d / "eod")  # small ids so the EOD id (3) is frequent
    builder = IndexedDatasetBuilder(eod + ".bin", np.uint16)
    for n in rng.integers(10, 90, 60):
        builder.add_item(np.append(rng.integers(4, 9, n), 3))
        builder.end_document()
    builder.finalize(eod + ".idx")
    return {"a": a, "tiny": tiny, "empty": empty, "multi": multi, "eod": eod}


def _cases(c: dict) -> list:
    def case(name, sizes, seq_length=64, split="90,8,2", data_path=None, per_split=None, **extra):
        return dict(name=name, sizes=sizes, seq_length=seq_length, split=split, data_path=data_path,
                    per_split=per_split, seed=1234, samples=SAMPLES, **extra)

    return [
        case("one_epoch", [400, 40, 10], data_path=[c["a"]]),
        case("many_epochs", [700, 90, 40], seq_length=16, split="6,3,3", data_path=[c["tiny"]]),
        case("many_epochs_whole", [64, 30, 19], seq_length=16, split="6,3,3", data_path=[c["tiny"]]),
        case("empty_documents", [300, 60, 30], seq_length=16, split="80,10,10", data_path=[c["empty"]]),
        case("multi_sequence", [300, 60, 30], seq_length=32, split="80,12,8", data_path=[c["multi"]]),
        case("blend_weights", [700, 60, 20], data_path=["0.7", c["a"], "0.3", c["multi"]]),
        case("blend_three", [500, 50, 20], seq_length=16, split="80,10,10",
             data_path=["3", c["a"], "1", c["empty"], "2", c["multi"]]),
        case("single_weighted", [300, 30, 10], data_path=["1", c["a"]]),
        case("blend_no_weights", [250, 20, 5], seq_length=16, split="80,10,10",
             data_path=[c["a"], c["empty"], c["multi"]]),
        case("per_split", [300, 40, 20], seq_length=32, split=None,
             per_split=[["0.6", c["a"], "0.4", c["multi"]], [c["empty"]], [c["tiny"], c["multi"]]]),
        case("per_split_single_weighted", [200, 30, 0], seq_length=32, split=None,
             per_split=[["0.5", c["multi"]], ["2", c["a"], "1", c["tiny"]], None]),
        case("eod_mask_loss", [200, 20, 10], seq_length=32, data_path=[c["eod"]], eod=3, eod_mask_loss=True),
        # --mock-data: megatron-core's MockGPTDataset (its --split is ignored: 1,1,1); ids wrap at a small vocab
        case("mock_data", [300, 40, 20], seq_length=512, eod=256, mock_vocab_size=257, eod_mask_loss=True),
    ]


@pytest.fixture(scope="session")
def reference(corpora, tmp_path_factory):
    """megatron-core's datasets for every case, built in one subprocess."""
    out = tmp_path_factory.mktemp("megatron")
    cases = _cases(corpora)
    (out / "cases.json").write_text(json.dumps(cases))
    proc = subprocess.run([sys.executable, str(HERE / "megatron_reference.py"), str(out / "cases.json"), str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {case["name"]: (case, np.load(out / f"{case['name']}.npz")) for case in cases}


def _ours(case: dict, cache_dir: str) -> tuple:
    return build_gpt_datasets(case["data_path"], case["split"] or "", case["seq_length"], tuple(case["sizes"]),
                              case["seed"], cache_dir=cache_dir, per_split_data_paths=case["per_split"],
                              eod_token=case.get("eod"), eod_mask_loss=case.get("eod_mask_loss", False),
                              mock_vocab_size=case.get("mock_vocab_size"))


CASE_NAMES = ["one_epoch", "many_epochs", "many_epochs_whole", "empty_documents", "multi_sequence", "blend_weights",
              "blend_three", "single_weighted", "blend_no_weights", "per_split", "per_split_single_weighted",
              "eod_mask_loss", "mock_data"]


@pytest.mark.parametrize("name", CASE_NAMES)
def test_same_samples_same_order_as_megatron_core(name, reference, tmp_path):
    case, want = reference[name]
    ours = _ours(case, str(tmp_path / "cache"))
    for s, ds in zip(SPLITS, ours):
        if int(want[f"{s}_len"]) == -1:
            assert ds is None, s
            continue
        assert len(ds) == int(want[f"{s}_len"]), s
        parts = ds.parts if isinstance(ds, BlendedDataset) else [ds]
        if isinstance(ds, BlendedDataset):
            for key in ("dataset_index", "dataset_sample_index"):
                got = np.asarray(getattr(ds, key))
                assert got.dtype == want[f"{s}_{key}"].dtype and np.array_equal(got, want[f"{s}_{key}"]), (s, key)
        for d, part in enumerate(parts):
            for key in ("document_index", "sample_index", "shuffle_index"):
                ref = want[f"{s}_part{d}_{key}"]
                got = np.asarray(getattr(part, key))
                assert got.dtype == ref.dtype and np.array_equal(got, ref), (s, d, key)
        tokens = np.stack([ds[i]["tokens"] for i in range(len(want[f"{s}_tokens"]))])
        np.testing.assert_array_equal(tokens, want[f"{s}_tokens"], err_msg=s)
        masks = np.stack([ds[i]["loss_mask"] for i in range(len(tokens))])
        np.testing.assert_array_equal(masks, want[f"{s}_loss_mask"], err_msg=s)


def test_cases_cover_both_final_epoch_shuffles_and_masking(reference, tmp_path):
    """The many-epoch cases shuffle the last epoch apart in one part and together in another; EOD masks bite."""
    separate = set()
    for name in ("many_epochs", "many_epochs_whole"):
        case, _ = reference[name]
        for ds in _ours(case, str(tmp_path / "c")):
            if ds is not None and ds.plan.num_epochs > 1:
                separate.add(ds.plan.separate_final_epoch)
    assert separate == {True, False}
    case, want = reference["eod_mask_loss"]
    assert 0 < float(want["train_loss_mask"].mean()) < 1
