"""Context-parallel plumbing in one process: batch slicing, the loss share, DeepSpeed's mpu view, and which
layout changes a checkpoint load refuses."""
import json
from types import SimpleNamespace

import pytest
import torch

from megatron_ls.model.gpt import masked_token_mean
from megatron_ls.parallel import state
from megatron_ls.parallel.cp_layout import ContextLayout
from megatron_ls.training.checkpointing import CheckpointError, check_layout_change
from megatron_ls.training.data_loading import collate_tokens, slice_for_context_parallel
from megatron_ls.training.deepspeed_mpu import DataContextParallelMpu


@pytest.mark.parametrize("kind", ["contiguous", "balanced"])
def test_each_cp_rank_gets_its_tokens_of_the_same_samples(kind):
    samples = [{"tokens": list(range(i * 100, i * 100 + 17)), "loss_mask": [1.0] * 16} for i in range(2)]
    batch = collate_tokens(samples)
    parts = [slice_for_context_parallel(batch, ContextLayout(16, 2, r, kind)) for r in range(2)]
    for rank, part in enumerate(parts):
        positions = ContextLayout(16, 2, rank, kind).local_positions()
        assert torch.equal(part["tokens"], batch["tokens"][:, positions])
        assert torch.equal(part["labels"], part["tokens"] + 1)  # labels stay aligned with their inputs
        assert part["loss_mask"].shape == (2, 8)
    joined = torch.cat([p["tokens"] for p in parts], dim=1).sort(dim=1).values
    assert torch.equal(joined, batch["tokens"])
    assert slice_for_context_parallel(batch, None) is batch


def test_loss_share_without_context_parallelism_is_the_masked_mean():
    losses = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    assert masked_token_mean(losses, torch.tensor([[1.0, 0.0, 1.0, 0.0]])).item() == pytest.approx(2.0)
    assert masked_token_mean(losses).item() == pytest.approx(2.5)
    assert masked_token_mean(losses, torch.zeros(1, 4)).item() == 0.0  # fully masked: 0, not NaN


def test_deepspeed_view_has_no_sequence_parallel_names():
    mpu = DataContextParallelMpu()
    assert not any(name.startswith(("get_sequence", "initialize_sequence")) for name in dir(mpu))
    assert mpu.get_data_parallel_world_size() == state.get_data_parallel_world_size() == 1
    assert mpu.get_model_parallel_world_size() == 1 and mpu.get_tensor_model_parallel_rank() == 0


def _checkpoint(tmp_path, *, dp: int, cp: int, zero: int) -> str:
    tag = tmp_path / "iter_0000002"
    tag.mkdir(parents=True)
    (tmp_path / "latest").write_text("iter_0000002\n")
    (tag / "megatron_ls.json").write_text(json.dumps({
        "format_version": 1, "iteration": 2, "consumed_samples": 8,
        "args": {"parallel": {"zero_stage": zero, "context_parallel_size": cp}},
        "layout": {"tensor_model_parallel_size": 1, "pipeline_model_parallel_size": 1, "data_parallel_size": dp,
                   "context_parallel_size": cp}}))
    return str(tmp_path)


def _parallel(cp: int, zero: int, tp: int = 1, pp: int = 1):
    return SimpleNamespace(context_parallel_size=cp, zero_stage=zero, tensor_model_parallel_size=tp,
                           pipeline_model_parallel_size=pp)


def test_data_and_context_parallel_changes_load_and_tensor_or_pipeline_changes_name_the_converter(tmp_path):
    # DeepSpeed's partitioned optimizer state is re-partitioned on load (training/elastic.py), so any DP x CP
    # size and ZeRO stage loads; another TP / PP layout needs tools/convert_checkpoint.py first.
    for zero in (0, 1, 2, 3):
        saved = _checkpoint(tmp_path / f"z{zero}", dp=1, cp=2, zero=zero)
        check_layout_change(saved, _parallel(1, zero), 1)
        check_layout_change(saved, _parallel(1, 3 - zero), 4)
    with pytest.raises(CheckpointError, match=r"TP=1 x PP=1, this run has TP=2 x PP=1.*convert_checkpoint"):
        check_layout_change(str(tmp_path / "z1"), _parallel(1, 1, tp=2), 1)
    with pytest.raises(CheckpointError, match=r"TP=1 x PP=2.*--target-pipeline-model-parallel-size 2"):
        check_layout_change(str(tmp_path / "z1"), _parallel(1, 1, pp=2), 1)
