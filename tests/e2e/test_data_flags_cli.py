"""pretrain_gpt_ls.py with Megatron's per-split data paths and --eod-mask-loss, end to end."""
import sys

from tests.e2e.conftest import TINY_MODEL, iteration_losses, run_cli


def _cmd(data: list, *extra: str) -> list:
    model = list(TINY_MODEL)
    i = model.index("--split")
    del model[i:i + 2]
    return [sys.executable, "pretrain_gpt_ls.py", *data, *model, "--train-iters", "2", *extra]


def test_per_split_paths_and_eod_mask_loss_train(corpus_prefix):
    per_split = ["--train-data-path", "1", corpus_prefix, "--valid-data-path", corpus_prefix,
                 "--test-data-path", corpus_prefix]
    masked = run_cli(_cmd(per_split, "--eod-mask-loss"))
    assert sorted(iteration_losses(masked.stdout)) == [1, 2]
    assert "validation loss at iteration 2" in masked.stdout and "test loss" in masked.stdout
    plain = run_cli(_cmd(per_split))
    # Batch 1 holds no document end and batch 2 one (seed 7): masking its input changes that loss only.
    m, p = iteration_losses(masked.stdout), iteration_losses(plain.stdout)
    assert m[1] == p[1] and m[2] != p[2]


def test_reset_flags_are_refused_naming_the_flag(corpus_prefix):
    proc = run_cli(_cmd(["--data-path", corpus_prefix], "--reset-position-ids"), check=False)
    assert proc.returncode == 2 and "--reset-position-ids is not supported" in proc.stderr
