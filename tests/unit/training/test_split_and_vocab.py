"""Empty validation/test parts are skipped as in Megatron-LM; a checkpoint's padded vocabulary is adopted on load."""
import json

import numpy as np

from megatron_ls.data.indexed_dataset import IndexedDatasetBuilder
from megatron_ls.data.split_parts import empty_eval_parts
from megatron_ls.training.checkpoint_vocab import checkpoint_padded_vocab


def _corpus(path, documents: int) -> str:
    prefix = str(path / f"c{documents}")
    builder = IndexedDatasetBuilder(prefix + ".bin", np.uint16)
    for i in range(documents):
        builder.add_item(np.arange(10) + i)
        builder.end_document()
    builder.finalize(prefix + ".idx")
    return prefix


def test_default_split_on_55_documents_leaves_only_the_test_part_empty(tmp_path):
    prefix = _corpus(tmp_path, 55)
    # bounds round(55 x [0.969, 0.999, 1.0]) = 53, 55, 55: train 53, valid 2, test 0
    assert empty_eval_parts([prefix], "969,30,1") == {2: f"--split 969,30,1: the test part gets 0 of the 55 "
                                                         f"documents of {prefix}: no test evaluation (as in "
                                                         f"Megatron-LM; give it a larger share to have one)"}
    assert empty_eval_parts([prefix], "90,5,5") == {}
    assert empty_eval_parts([prefix], "100,0,0") == {}  # a zero share asks for nothing
    other = _corpus(tmp_path, 1000)
    assert set(empty_eval_parts(["0.5", other, "0.5", prefix], "969,30,1")) == {2}  # any prefix short of data


def _checkpoint(path, vocab: int) -> str:
    (path / "iter_0000004").mkdir(parents=True)
    metadata = {"iteration": 4, "consumed_samples": 16, "args": {"model": {"vocab_size": vocab}}}
    (path / "iter_0000004" / "megatron_ls.json").write_text(json.dumps(metadata))
    (path / "latest").write_text("iter_0000004\n")
    return str(path)


def test_checkpoint_padded_vocab_is_adopted_when_it_fits(tmp_path):
    ckpt = _checkpoint(tmp_path / "a", 384)  # ByteTokenizer (257 ids) padded at TP1 by 128
    notes = []
    assert checkpoint_padded_vocab(ckpt, 512, 257, 2, notice=notes.append) == 384  # TP2 would pad to 512
    assert notes == [f" padded vocab size 384 taken from --load {ckpt} (this run's --make-vocab-size-divisible-by x "
                     f"--tensor-model-parallel-size 2 would give 512)"]
    assert checkpoint_padded_vocab(ckpt, 384, 257, 1) == 384
    assert checkpoint_padded_vocab(ckpt, 1024, 257, 256) == 1024  # 384 does not split over 256 ranks
    assert checkpoint_padded_vocab(ckpt, 512, 400, 2) == 512  # too small for the tokenizer: reported later
    assert checkpoint_padded_vocab(str(tmp_path / "missing"), 512, 257, 2) == 512
