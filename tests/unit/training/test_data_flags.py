"""Megatron's data flags: per-split paths, --eod-mask-loss, the surplus; the reset flags GPT-LS cannot honour."""
import pytest

from megatron_ls.arguments import parse_args

BATCH = ["--micro-batch-size", "2", "--global-batch-size", "4"]


def test_per_split_paths_eod_mask_loss_and_surplus_parse():
    a = parse_args(["--train-data-path", "0.6", "a", "0.4", "b", "--valid-data-path", "c", "--eod-mask-loss",
                    "--mid-level-dataset-surplus", "0.01", *BATCH], world_size=1)
    assert a.data.data_path == [] and a.data.train_data_path == ["0.6", "a", "0.4", "b"]
    assert a.data.valid_data_path == ["c"] and a.data.test_data_path == []
    assert a.data.eod_mask_loss is True and a.data.mid_level_dataset_surplus == 0.01
    assert parse_args(["--data-path", "x", *BATCH], world_size=1).data.eod_mask_loss is False


@pytest.mark.parametrize("argv,message", [
    (["--reset-position-ids"], "--reset-position-ids is not supported: GPT-LS takes tokens only"),
    (["--reset-attention-mask"], "--reset-attention-mask is not supported: GPT-LS takes tokens only"),
    (["--train-data-path", "y"], "--data-path and --train/valid/test-data-path cannot be used together"),
    (["--mid-level-dataset-surplus", "-1"], "--mid-level-dataset-surplus must be >= 0"),
])
def test_refused_data_flags_name_the_flag(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        parse_args(["--data-path", "x", *BATCH, *argv], world_size=1)
    assert exc.value.code == 2 and message in capsys.readouterr().err
