"""Fault handling without a training run: crash-safe saves (temporary directory, atomic publish, full disk), the
token-id check, non-finite steps, resume refusals, and the one-line descriptions of distributed failures."""
from __future__ import annotations

import datetime
import errno
import json
import os

import numpy as np
import pytest
import torch

from megatron_ls.checkpoint_files import CheckpointError, read_latest_tag, safe_torch_load
from megatron_ls.data.indexed_dataset import IndexedDatasetBuilder
from megatron_ls.data.token_check import TokenIdError, check_token_ids, data_path_prefixes
from megatron_ls.training import checkpoint_save, faults
from megatron_ls.training.checkpointing import check_compatible, check_resume_position

MODEL_FILE = "mp_rank_00_model_states.pt"


class FakeEngine:
    """The part of a DeepSpeed engine a save touches: it writes one model file through its checkpoint engine."""

    def __init__(self, weight: float) -> None:
        self._config = None
        self.checkpoint_engine = None
        self.weight = weight

    def _copy_recovery_script(self, save_path: str) -> None:
        pass

    def save_checkpoint(self, save_dir, tag, client_state, save_latest):
        assert not save_latest
        self.checkpoint_engine.save({"w": torch.full((64,), self.weight), **client_state},
                                    os.path.join(save_dir, tag, MODEL_FILE))


def _save(engine: FakeEngine, save_dir, iteration: int) -> str:
    return checkpoint_save.save_checkpoint(engine, str(save_dir), iteration, 4 * iteration, {"model": {}}, {"rng": 1})


def _weight(save_dir) -> float:
    tag = read_latest_tag(str(save_dir))
    return float(safe_torch_load(os.path.join(save_dir, tag, MODEL_FILE))["w"][0])


def test_save_publishes_a_complete_directory_and_resave_never_writes_into_the_live_one(tmp_path):
    save_dir = tmp_path / "ckpt"
    _save(FakeEngine(1.0), save_dir, 2)
    live = save_dir / "iter_0000002" / MODEL_FILE
    os.link(live, tmp_path / "held")  # the live file's inode
    before = (tmp_path / "held").read_bytes()
    _save(FakeEngine(2.0), save_dir, 2)  # same iteration, other content: swapped in, not rewritten
    assert (tmp_path / "held").read_bytes() == before
    assert os.stat(live).st_ino != os.stat(tmp_path / "held").st_ino
    assert _weight(save_dir) == 2.0 and (save_dir / "latest").read_text() == "iter_0000002\n"
    assert sorted(os.listdir(save_dir)) == ["iter_0000002", "latest"]
    assert sorted(os.listdir(save_dir / "iter_0000002")) == sorted([MODEL_FILE, "megatron_ls.json", "rng"])


def test_resave_without_directory_exchange_survives_a_crash_between_the_renames(tmp_path, monkeypatch):
    save_dir = tmp_path / "ckpt"
    _save(FakeEngine(1.0), save_dir, 2)
    monkeypatch.setattr(checkpoint_save, "exchange_paths", lambda a, b: False)
    real_rename = os.rename

    def crash_after_displacing(src, dst):
        real_rename(src, dst)
        if os.path.basename(dst).startswith(".old-"):
            raise KeyboardInterrupt("killed between the two renames")

    monkeypatch.setattr(checkpoint_save.os, "rename", crash_after_displacing)
    with pytest.raises(KeyboardInterrupt):
        _save(FakeEngine(2.0), save_dir, 2)
    assert not (save_dir / "iter_0000002").exists()
    assert read_latest_tag(str(save_dir)) == ".old-iter_0000002" and _weight(save_dir) == 1.0
    monkeypatch.setattr(checkpoint_save.os, "rename", real_rename)
    _save(FakeEngine(3.0), save_dir, 2)  # the next save completes the swap and cleans up
    assert _weight(save_dir) == 3.0 and sorted(os.listdir(save_dir)) == ["iter_0000002", "latest"]


@pytest.mark.parametrize("code, words", [(errno.ENOSPC, "disk full (ENOSPC)"),
                                         (errno.EACCES, "permission denied (EACCES)")])
def test_failed_save_is_one_line_removes_its_files_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch,
                                                                                     code, words):
    save_dir = tmp_path / "ckpt"
    _save(FakeEngine(1.0), save_dir, 2)
    real = checkpoint_save.durable_torch_save

    def fail_half_way(obj, path, zipfile=True):
        with open(path, "wb") as fh:
            fh.write(b"x" * 100)
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(checkpoint_save, "durable_torch_save", fail_half_way)
    with pytest.raises(checkpoint_save.CheckpointSaveError) as info:
        _save(FakeEngine(2.0), save_dir, 4)
    message = str(info.value)
    assert "\n" not in message and words in message and MODEL_FILE in message and "iteration 4" in message
    assert "'latest' still names iter_0000002" in message
    assert sorted(os.listdir(save_dir)) == ["iter_0000002", "latest"]
    monkeypatch.setattr(checkpoint_save, "durable_torch_save", real)
    assert _weight(save_dir) == 1.0


def _token_data(prefix: str, tokens: list[int]) -> str:
    builder = IndexedDatasetBuilder(prefix + ".bin", np.uint16)
    builder.add_item(tokens)
    builder.end_document()
    builder.finalize(prefix + ".idx")
    return prefix


def test_token_ids_outside_the_vocabulary_name_the_file_the_id_and_the_size(tmp_path, monkeypatch):
    good = _token_data(str(tmp_path / "good"), [1, 2, 256])
    bad = _token_data(str(tmp_path / "bad"), [1, 300, 2])
    check_token_ids([good], 257, "--tokenizer-type ByteTokenizer")
    with pytest.raises(TokenIdError, match=r"bad\.bin holds token id 300, outside the vocabulary of 257 ids "
                                           r"\(--tokenizer-type ByteTokenizer\)"):
        check_token_ids(data_path_prefixes(["0.5", good, "0.5", bad]), 257, "--tokenizer-type ByteTokenizer")
    caches = os.listdir(tmp_path / "index-cache")
    assert len(caches) == 2 and all("token-range" in name for name in caches)

    def no_rescan(prefix):
        raise AssertionError("the cached range was not used")

    monkeypatch.setattr("megatron_ls.data.token_check._scan", no_rescan)
    with pytest.raises(TokenIdError, match="token id 300"):
        check_token_ids([bad], 257, "x")
    assert data_path_prefixes([good]) == [good]


def test_nonfinite_steps_are_counted_and_stop_training_in_one_line():
    tracker = faults.NonFiniteTracker(limit=3, loss_scaling=False)
    tracker.update(1, float("nan"), float("nan"), skipped=True)
    tracker.update(2, 2.0, 1.0, skipped=False)  # a finite step resets the count
    tracker.update(3, float("inf"), None, skipped=True)
    tracker.update(4, float("nan"), float("nan"), skipped=True)
    with pytest.raises(faults.NumericsError, match=r"iteration 5: 3 consecutive .*--nonfinite-steps-limit 3"):
        tracker.update(5, float("nan"), float("nan"), skipped=True)
    with pytest.raises(faults.NumericsError, match="iteration 7: .*not skipped"):
        faults.NonFiniteTracker(limit=5, loss_scaling=False).update(7, float("nan"), 1.0, skipped=False)
    fp16 = faults.NonFiniteTracker(limit=1, loss_scaling=True)
    for it in range(10):  # loss-scale overflows are the scaler's business
        fp16.update(it, 3.0, float("inf"), skipped=True)


def test_distributed_failures_are_described_with_the_step_and_the_rank():
    faults.set_phase("training iteration 12")
    faults._TIMEOUT_MINUTES = 0.5
    line = faults.describe_failure(RuntimeError("[gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting "
                                                "30000ms for recv operation to complete"))
    assert line.startswith("rank 0: training iteration 12: a collective did not complete within "
                           "--distributed-timeout-minutes 0.5")
    line = faults.describe_failure(RuntimeError("[pair.cc:553] Connection closed by peer [127.0.0.1]:3216"))
    assert "training iteration 12: a peer rank exited" in line
    assert faults.describe_failure(OSError(errno.ENOSPC, "No space left on device", "/x/y")) == \
        "rank 0: training iteration 12: No space left on device: /x/y"
    assert faults.describe_failure(KeyError("a bug")) is None


def test_collective_timeouts_follow_the_flag_for_every_group(tmp_path):
    import torch.distributed as dist

    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        dist.new_group([0])
        assert faults.bound_collective_timeouts(0.5) >= 2
    finally:
        dist.destroy_process_group()


def test_nccl_groups_get_the_flag_timeout_and_the_watchdog_error_handling(monkeypatch):
    from megatron_ls.parallel import timeouts

    variable = "TORCH_NCCL_ASYNC_ERROR_HANDLING"
    assert timeouts.backend_environment("nccl", {}) == {variable: "3"}
    assert timeouts.backend_environment("cpu:gloo,cuda:nccl", {}) == {variable: "3"}
    assert timeouts.backend_environment("gloo", {}) == {}
    for user_set in ({variable: "1"}, {"NCCL_ASYNC_ERROR_HANDLING": "0"}):  # the user's choice stands
        assert timeouts.backend_environment("nccl", user_set) == {}
    monkeypatch.delenv(variable, raising=False)
    monkeypatch.delenv("NCCL_ASYNC_ERROR_HANDLING", raising=False)
    assert timeouts.apply_backend_environment("nccl") == {variable: "3"} and os.environ[variable] == "3"
    monkeypatch.setattr(timeouts, "_TIMEOUT", None)
    assert timeouts.group_kwargs() == {}
    timeouts.set_collective_timeout(0.5 * 60)
    assert timeouts.group_kwargs() == {"timeout": datetime.timedelta(seconds=30)}


def test_every_group_is_made_with_the_collective_timeout(monkeypatch):
    """initialize_distributed / initialize_model_parallel pass the timeout to init_process_group and new_group
    (before: new_group fell back to torch's 30 minutes; only a later pass over the groups fixed gloo's)."""
    import torch.distributed as dist

    from megatron_ls.parallel import state as ps
    from megatron_ls.parallel import timeouts
    from megatron_ls.parallel.launch_env import free_port

    monkeypatch.setattr(timeouts, "_TIMEOUT", None)
    for name, value in (("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", str(free_port("127.0.0.1"))), ("RANK", "0"),
                        ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0")):
        monkeypatch.setenv(name, value)
    ps.initialize_distributed(backend="gloo", timeout_s=30, collective_timeout_s=30)
    try:
        ps.initialize_model_parallel(1, 1, 1)
        groups = [dist.distributed_c10d._get_default_group()] + list(ps._GROUPS.values())
        assert len(groups) >= 8
        for group in groups:
            assert group._get_backend(torch.device("cpu")).options._timeout == datetime.timedelta(seconds=30)
    finally:
        ps.destroy_model_parallel()
        dist.destroy_process_group()


def test_classification_labels_outside_the_classes_name_the_file_and_the_label(tmp_path):
    from megatron_ls.data.classification_dataset import (ClassificationDataError, ClassificationDataset,
                                                         ClassificationWriter, write_meta)

    prefix = str(tmp_path / "task")
    writer = ClassificationWriter(prefix, "train", vocab_size=8, jsonl=False)
    for label in (1, 12, 3):
        writer.add(np.array([2, 3, 4]), label)
    writer.finalize()
    write_meta(prefix, task="LISTOPS", vocab=list("abcdefgh"), pad_id=0, cls_id=1, num_classes=10,
               splits={"train": 3})
    with pytest.raises(ClassificationDataError, match=r"task_train_labels\.npy holds label 12, outside the 10 "
                                                      r"classes of .*task_meta\.json"):
        ClassificationDataset(prefix, "train")


def _metadata(tmp_path, **model) -> str:
    tag = tmp_path / "iter_0000008"
    tag.mkdir(parents=True)
    (tmp_path / "latest").write_text("iter_0000008\n")
    (tag / "megatron_ls.json").write_text(json.dumps({"iteration": 8, "consumed_samples": 32,
                                                      "args": {"model": model}}))
    return str(tmp_path)


def test_resume_refuses_changed_attention_other_shapes_and_a_finished_schedule(tmp_path):
    from megatron_ls.config import TransformerConfig

    config = TransformerConfig(window_size=64, segment_length=16, dual_ln_scope="head")
    saved = _metadata(tmp_path, window_size=32, segment_length=16, dual_ln_scope="full", hidden_size=128,
                      vocab_size=config.vocab_size)
    with pytest.raises(CheckpointError, match=r"--window-size is 64 here but 32.*--dual-ln-scope is head here but "
                                              r"full.*--finetune.*--allow-attention-change"):
        check_compatible(saved, config)
    check_compatible(saved, config, finetune=True)
    check_compatible(saved, config, allow_attention_change=True)
    with pytest.raises(CheckpointError, match="--hidden-size is 256 here but 128"):
        check_compatible(saved, TransformerConfig(hidden_size=256, window_size=32), allow_attention_change=True)
    check_resume_position(saved, 8)
    with pytest.raises(CheckpointError, match="at iteration 8, past --train-iters 5.*--finetune"):
        check_resume_position(saved, 5)
    check_resume_position(saved, 5, finetune=True)


def test_pipeline_names_map_to_model_names_and_back():
    from megatron_ls.training.optimizer_reshard import model_name, pipeline_name

    pairs = {"embedding.word_embeddings.weight": "tied_modules.embed.word_embeddings.weight",
             "layers.0.self_attention.qkvp.weight": "1.self_attention.qkvp.weight",
             "layers.3.mlp.dense_4h_to_h.bias": "4.mlp.dense_4h_to_h.bias",
             "final_layernorm.weight": "5.weight"}
    for name, piped in pairs.items():
        assert pipeline_name(name, 4) == piped and model_name(piped, 4) == name
