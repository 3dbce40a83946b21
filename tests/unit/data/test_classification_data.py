"""ListOps / FAR_RECALL generators and the classification data format (.bin/.idx + labels .npy + meta)."""
from __future__ import annotations

import json
import random
import statistics

import numpy as np
import pytest

from megatron_ls.data import far_recall, listops
from megatron_ls.data.classification_dataset import (ClassificationDataError, ClassificationDataset,
                                                     EpochShuffledView, collate_classification, read_meta)
from tools import generate_task_data

SMALL = listops.ListOpsConfig(max_depth=6, max_args=5, min_length=20, max_length=120)


def stack_value(tokens: list[str]) -> int:
    """Independent evaluator: scan tokens left to right with an explicit stack, no trees, no recursion."""
    stack: list = []
    for tok in tokens:
        if tok.startswith("["):
            stack.append((tok, []))
        elif tok == "]":
            op, args = stack.pop()
            if op == "[MIN":
                value = min(args)
            elif op == "[MAX":
                value = max(args)
            elif op == "[SM":
                value = sum(args) % 10
            elif op == "[MED":
                ordered = sorted(args)
                mid = len(ordered) // 2
                # the mean of the two middle values, rounded down, for an even count
                value = ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) // 2
            else:
                raise AssertionError(f"unknown operator {op}")
            if not stack:
                return value
            stack[-1][1].append(value)
        else:
            assert tok.isdigit() and len(tok) == 1, tok
            if not stack:
                return int(tok)
            stack[-1][1].append(int(tok))
    raise AssertionError("expression never closed")


def test_listops_is_deterministic_and_seed_dependent():
    a = list(listops.generate_examples(40, seed=3, config=SMALL))
    b = list(listops.generate_examples(40, seed=3, config=SMALL))
    c = list(listops.generate_examples(40, seed=4, config=SMALL))
    assert a == b
    assert a != c
    assert len({" ".join(t) for t, _ in a}) == 40  # distinct examples


def test_listops_labels_match_an_independent_evaluator_and_the_rules():
    examples = list(listops.generate_examples(300, seed=11, config=SMALL))
    ops = set()
    for tokens, label in examples:
        assert stack_value(tokens) == label
        assert SMALL.min_length < len(tokens) < SMALL.max_length
        ops.update(t for t in tokens if t.startswith("["))
        depth = max_depth = 0
        for t in tokens:  # nesting depth (the root operator is depth 1) and argument counts
            depth += t.startswith("[") - (t == "]")
            max_depth = max(max_depth, depth)
        assert depth == 0 and max_depth < SMALL.max_depth
        assert set(tokens) <= set(listops.VOCAB[2:])
    assert ops == set(listops.OPERATORS)
    # every label value occurs; no single class dominates
    counts = np.bincount([label for _, label in examples], minlength=10)
    assert (counts > 0).all() and counts.max() < 0.5 * len(examples)


def test_listops_argument_counts_and_med_of_even_count():
    for tokens, _ in listops.generate_examples(100, seed=5, config=SMALL):
        stack = []
        for t in tokens:
            if t.startswith("["):
                stack.append(0)
            elif t == "]":
                assert 2 <= stack.pop() <= SMALL.max_args
                if stack:
                    stack[-1] += 1
            elif stack:
                stack[-1] += 1
    assert listops.evaluate(("[MED", [1, 2, 3, 8])) == 2 == stack_value("[MED 1 2 3 8 ]".split())
    assert listops.evaluate(("[SM", [9, 9, ("[MIN", [4, 7])])) == 2


def test_listops_lra_defaults_give_lra_lengths():
    """The default rules keep 500 < length < 2000 (LRA's ListOps, ~1000 tokens on average with brackets)."""
    examples = list(listops.generate_examples(30, seed=0))
    lengths = [len(t) for t, _ in examples]
    assert min(lengths) > 500 and max(lengths) < 2000
    assert 700 < statistics.mean(lengths) < 1400
    assert all(stack_value(t) == y for t, y in examples)


def test_listops_without_closing_brackets_reproduces_lra_release_format():
    config = listops.ListOpsConfig(**{**SMALL.__dict__, "closing_brackets": False})
    with_b = list(listops.generate_examples(10, seed=2, config=SMALL))
    without = list(listops.generate_examples(10, seed=2, config=config))
    for (tb, yb), (tn, yn) in zip(with_b, without):
        assert yb == yn and tn == [t for t in tb if t != "]"]


def test_listops_same_draws_as_a_plain_random_stream():
    """The generator consumes a ``random.Random(seed)`` stream exactly as the LRA one: replay the draws."""
    rng = random.Random(7)
    tree, length = listops.generate_tree(rng, 1, 4, 3)
    replay = random.Random(7)

    def regrow(depth):
        if depth < 4 and replay.random() <= 0.25:
            n = replay.randint(2, 3)
            kids = [regrow(depth + 1) for _ in range(n)]
            return (replay.choice(listops.OPERATORS), kids)
        return replay.choice(range(10))

    assert regrow(1) == tree and rng.random() == replay.random()
    assert length == len(listops.tree_tokens(tree))


def test_config_errors_are_clear():
    with pytest.raises(ValueError, match="--max-args"):
        list(listops.generate_examples(1, 0, listops.ListOpsConfig(max_args=1)))
    with pytest.raises(ValueError, match="--min-length"):
        list(listops.generate_examples(1, 0, listops.ListOpsConfig(min_length=10, max_length=5)))
    with pytest.raises(ValueError, match="ListOps token"):
        listops.encode(["[MAX", "x"])


@pytest.mark.parametrize("mode", ["needle", "pair"])
def test_far_recall_examples(mode):
    cfg = far_recall.FarRecallConfig(length=64, min_distance=20, num_symbols=12, num_classes=5, mode=mode)
    examples = list(far_recall.generate_examples(200, seed=1, config=cfg))
    assert examples[0][0].tolist() == next(far_recall.generate_examples(1, 1, cfg))[0].tolist()
    words = far_recall.vocab(cfg)
    for ids, label in examples:
        text = [words[i] for i in ids]
        assert len(ids) == 64 and min(ids) >= 2
        if mode == "needle":
            needles = [i for i, t in enumerate(text) if t.startswith("n")]
            assert len(needles) == 1 and needles[0] >= 20 and text[needles[0]] == f"n{label}"
            assert "@" not in text
        else:
            pos = text.index("@")
            assert text.count("@") == 1 and pos >= 20 and text[pos + 1] == f"s{label}"
            assert not any(t.startswith("n") for t in text)
    assert len({label for _, label in examples}) == 5
    assert far_recall.window_receptive_field(16, 2) == 40
    with pytest.raises(ValueError, match="--min-distance"):
        far_recall.FarRecallConfig(length=10, min_distance=9).validate()
    with pytest.raises(ValueError, match="--mode"):
        far_recall.FarRecallConfig(mode="x").validate()


def _generate(prefix, *extra):
    generate_task_data.main(["--task", "LISTOPS", "--output-prefix", str(prefix), "--train-samples", "30",
                             "--valid-samples", "8", "--test-samples", "6", "--min-length", "20",
                             "--max-length", "90", "--max-depth", "6", "--seed", "9", *extra])


def test_tool_writes_megatron_data_with_labels(tmp_path):
    prefix = tmp_path / "lo" / "lo"
    _generate(prefix)
    meta = read_meta(str(prefix))
    assert meta["task"] == "LISTOPS" and meta["num_classes"] == 10 and meta["vocab"][:2] == ["<pad>", "<cls>"]
    assert meta["splits"] == {"valid": 8, "test": 6, "train": 30}
    seen = set()
    for split, n in meta["splits"].items():
        ds = ClassificationDataset(str(prefix), split)
        assert len(ds) == n
        lines = (tmp_path / "lo" / f"lo_{split}.jsonl").read_text().splitlines()
        for i in range(n):
            item, row = ds[i], json.loads(lines[i])
            text = [meta["vocab"][t] for t in item["tokens"]]
            assert " ".join(text) == row["text"] and item["label"] == row["label"] == stack_value(text)
            seen.add(row["text"])
    assert len(seen) == 44  # no example shared between splits
    # a smaller training split keeps validation and test identical
    _generate(tmp_path / "small" / "lo", "--train-samples", "5")
    for split in ("valid", "test"):
        a = (tmp_path / "lo" / f"lo_{split}.bin").read_bytes()
        assert a == (tmp_path / "small" / f"lo_{split}.bin").read_bytes()


def test_dataset_errors_and_batching(tmp_path):
    with pytest.raises(ClassificationDataError, match="generate the data first"):
        read_meta(str(tmp_path / "missing"))
    prefix = tmp_path / "lo"
    _generate(prefix)
    ds = ClassificationDataset(str(prefix), "train")
    np.save(str(prefix) + "_train_labels.npy", np.zeros(3, dtype=np.int64))
    with pytest.raises(ClassificationDataError, match="3 labels for 30 documents"):
        ClassificationDataset(str(prefix), "train")
    batch = collate_classification([ds[0], ds[1]], pad_id=0, max_tokens=40, multiple=8)
    n0, n1 = min(len(ds[0]["tokens"]), 40), min(len(ds[1]["tokens"]), 40)
    assert batch["tokens"].shape == (2, -(-max(n0, n1) // 8) * 8) or batch["tokens"].shape[1] == 40
    assert (batch["tokens"][0, :n0].numpy() == ds[0]["tokens"][:n0]).all() and (batch["tokens"][0, n0:] == 0).all()
    assert batch["labels"].tolist() == [ds[0]["label"], ds[1]["label"]] and batch["loss_mask"].tolist() == [1, 1]
    view = EpochShuffledView(ClassificationDataset(str(tmp_path / "lo"), "valid"), 20, seed=1)
    assert len(view) == 20 and sorted(view.index[:8].tolist()) == list(range(8))
    assert view.index.tolist() == EpochShuffledView(view.dataset, 20, seed=1).index.tolist()


def test_length_bucketing_keeps_the_sample_and_groups_lengths(tmp_path):
    prefix = tmp_path / "lo"
    _generate(prefix)
    ds = ClassificationDataset(str(prefix), "train")
    plain = EpochShuffledView(ds, 60, seed=4)
    bucketed = EpochShuffledView(ds, 60, seed=4, bucket_batches=3, batch_size=5)
    assert bucketed.index.tolist() == EpochShuffledView(ds, 60, seed=4, bucket_batches=3, batch_size=5).index.tolist()
    lengths = ds.lengths
    for start in range(0, 60, 15):  # same examples per run of 3 batches, each batch a contiguous length range
        span_plain, span_bucket = plain.index[start:start + 15], bucketed.index[start:start + 15]
        assert sorted(span_plain.tolist()) == sorted(span_bucket.tolist())
        batches = span_bucket.reshape(3, 5)
        ranges = sorted((lengths[b].min(), lengths[b].max()) for b in batches)
        assert all(hi <= lo2 for (_, hi), (lo2, _) in zip(ranges, ranges[1:]))
