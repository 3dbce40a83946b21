"""Faults end to end (issue 9): a re-run never rewrites its live checkpoint and a kill -9 during a re-save leaves
it loadable, a full disk is one line, out-of-vocabulary data is refused at TP1 and TP2 (and by tools/evaluate.py
and tasks/main.py), a frozen peer ends the job within --distributed-timeout-minutes, a diverging loss stops in one
line (pretraining and classification), and a checkpoint resumes at another ZeRO stage, data-parallel size or
(re-sharded) tensor-parallel size continuing the same loss curve."""
from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.e2e.conftest import REPO, cli_env, iteration_losses, pretrain_cmd, run_cli

pytestmark = pytest.mark.e2e

NO_DROPOUT = ("--hidden-dropout", "0", "--attention-dropout", "0")
MODEL_FILE = "mp_rank_00_model_states.pt"


def _torchrun(nproc: int, cmd: list) -> list:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), *cmd[1:]]


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _one_error_line(stderr: str) -> str:
    """The first ``error:`` line; no traceback of ours (torchrun adds its own ChildFailedError report)."""
    lines = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert lines and stderr.count("Traceback (most recent") == stderr.count("ChildFailedError:"), stderr[-3000:]
    return lines[0]


@pytest.fixture(scope="module")
def reference(corpus_prefix) -> dict:
    """Losses of one uninterrupted 4-iteration run without dropout (the curve every resume must continue)."""
    return iteration_losses(run_cli(pretrain_cmd(corpus_prefix, *NO_DROPOUT, "--train-iters", "4")).stdout)


@pytest.fixture()
def finished(corpus_prefix, tmp_path) -> Path:
    """A job that ran to the end (iteration 2) and saved."""
    ckpt = tmp_path / "ckpt"
    run_cli(pretrain_cmd(corpus_prefix, "--train-iters", "2", "--save", str(ckpt)))
    return ckpt


def test_rerun_of_a_finished_job_never_writes_into_its_live_checkpoint(corpus_prefix, finished, tmp_path):
    live = finished / "iter_0000002" / MODEL_FILE
    os.link(live, tmp_path / "held")  # another name for the live file's inode
    stamp, digest = os.stat(live).st_mtime_ns, _digest(live)
    again = run_cli(pretrain_cmd(corpus_prefix, "--train-iters", "2", "--load", str(finished), "--save",
                                 str(finished)))
    assert "not rewritten" in again.stdout
    assert os.stat(live).st_mtime_ns == stamp and _digest(live) == digest
    # Same iteration, other content (--finetune restarts the count): swapped in whole, the old inode untouched.
    run_cli(pretrain_cmd(corpus_prefix, "--train-iters", "2", "--lr", "1e-2", "--load", str(finished), "--save",
                         str(finished), "--finetune"))
    assert _digest(tmp_path / "held") == digest and os.stat(tmp_path / "held").st_mtime_ns == stamp
    assert _digest(live) != digest and sorted(os.listdir(finished)) == ["iter_0000002", "latest"]


def test_kill_9_during_a_resave_leaves_the_checkpoint_loadable(corpus_prefix, finished):
    from megatron_ls.checkpoint_files import read_latest_tag, read_metadata, safe_torch_load

    before = {p.name: _digest(p) for p in (finished / "iter_0000002").iterdir() if p.is_file()}
    cmd = pretrain_cmd(corpus_prefix, "--train-iters", "2", "--lr", "1e-2", "--load", str(finished), "--save",
                       str(finished), "--finetune")
    proc = subprocess.Popen(cmd, cwd=REPO, env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    entries = set(os.listdir(finished))
    stamps = {p: os.stat(p).st_mtime_ns for p in (finished / "iter_0000002").iterdir()}
    try:
        deadline = time.time() + 240
        while proc.poll() is None and time.time() < deadline:  # kill at the first sign of the re-save
            if set(os.listdir(finished)) != entries or any(
                    os.path.exists(p) and os.stat(p).st_mtime_ns != s for p, s in stamps.items()):
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.002)
    finally:
        proc.kill()
        proc.wait()
    tag = read_latest_tag(str(finished))
    metadata = read_metadata(str(finished), tag)
    state = safe_torch_load(str(finished / tag / MODEL_FILE))
    assert metadata["iteration"] == 2 and "module" in state
    if tag == "iter_0000002" and metadata["args"]["training"]["lr"] != 1e-2:  # the old checkpoint: untouched
        assert {p.name: _digest(p) for p in (finished / tag).iterdir() if p.is_file()} == before


def _tmpfs(directory: Path, size: str):
    """A tiny tmpfs at ``directory`` (root only); None where it cannot be mounted."""
    directory.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return None
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(directory)],
                          capture_output=True)
    return directory if done.returncode == 0 else None


@pytest.mark.parametrize("disk", ["simulated", "tmpfs"])
def test_disk_full_during_save_is_one_line_and_keeps_the_previous_checkpoint(corpus_prefix, tmp_path, disk):
    # Before: "unexpected pos 64 vs 0" from torch, partial files left behind.
    cmd = pretrain_cmd(corpus_prefix, "--train-iters", "4", "--save-interval", "2")
    if disk == "simulated":  # every checkpoint write of the second save fails with ENOSPC
        ckpt = tmp_path / "ckpt"
        cmd[1] = str(REPO / "tests/e2e/workers/full_disk.py")
    else:  # a real file system with room for one checkpoint (~0.6 MB) only
        ckpt = _tmpfs(tmp_path / "small", "900k")
        if ckpt is None:
            pytest.skip("cannot mount a tmpfs here (needs root); the simulated full disk covers this")
    try:
        proc = run_cli(cmd + ["--save", str(ckpt)], check=False)
        assert proc.returncode == 1, proc.stderr[-3000:]
        line = _one_error_line(proc.stderr)
        assert "saving iteration 4 failed: disk full (ENOSPC)" in line and "'latest' still names iter_0000002" in line
        assert sorted(os.listdir(ckpt)) == ["iter_0000002", "latest"]
    finally:
        if disk == "tmpfs":
            subprocess.run(["umount", str(ckpt)], capture_output=True)


def _out_of_vocabulary_copy(corpus_prefix: str, directory: Path) -> str:
    prefix = str(directory / "oov_text_document")
    shutil.copy(corpus_prefix + ".idx", prefix + ".idx")
    tokens = np.fromfile(corpus_prefix + ".bin", dtype=np.uint16)
    tokens[len(tokens) // 2] = 300  # byte-level data: ids 0..256
    tokens.tofile(prefix + ".bin")
    return prefix


@pytest.mark.parametrize("tp", [1, pytest.param(2, marks=[pytest.mark.slow, pytest.mark.distributed])])
def test_token_ids_outside_the_vocabulary_are_refused(corpus_prefix, tmp_path, tp):
    # Before: TP1 died with an IndexError inside the embedding, TP2 trained silently on masked ids.
    prefix = _out_of_vocabulary_copy(corpus_prefix, tmp_path)
    cmd = pretrain_cmd(prefix, "--train-iters", "2", "--tensor-model-parallel-size", str(tp))
    proc = run_cli(_torchrun(tp, cmd) if tp > 1 else cmd, check=False, timeout=300)
    assert proc.returncode != 0
    assert "oov_text_document.bin holds token id 300, outside the vocabulary of 257 ids" in _one_error_line(
        proc.stderr)


@pytest.mark.slow
@pytest.mark.distributed
def test_frozen_peer_ends_the_job_within_the_timeout(corpus_prefix):
    from megatron_ls.parallel.launch_env import free_port

    env = dict(cli_env(), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port("127.0.0.1")), WORLD_SIZE="2")
    cmd = pretrain_cmd(corpus_prefix, "--train-iters", "1000", "--distributed-timeout-minutes", "0.5")
    procs = [subprocess.Popen(cmd, cwd=REPO, env=dict(env, RANK=str(r), LOCAL_RANK=str(r)), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    try:
        for line in procs[0].stdout:  # rank 0 logs; freeze rank 1 once training runs
            if " iteration        2/" in line:
                break
        os.kill(procs[1].pid, signal.SIGSTOP)
        frozen_at = time.time()
        procs[0].stdout.close()
        _, stderr = procs[0].communicate(timeout=150)
        waited = time.time() - frozen_at
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
    assert procs[0].returncode == 1 and waited < 30 + 60, (procs[0].returncode, waited)
    line = _one_error_line(stderr)
    assert line.startswith("error: rank 0: training iteration ") and "--distributed-timeout-minutes 0.5" in line


def test_diverging_loss_stops_in_one_line_after_the_skipped_steps(corpus_prefix):
    # --lr 1e6 wrecks the weights at step 1; the NaN steps after it are skipped and counted, then training stops
    # (before: a FloatingPointError traceback).
    proc = run_cli(pretrain_cmd(corpus_prefix, "--train-iters", "8", "--lr", "1e6", "--nonfinite-steps-limit", "2"),
                   check=False)
    assert proc.returncode == 1
    assert "number of skipped iterations: 1 |" in proc.stdout
    line = _one_error_line(proc.stderr)
    assert "iteration 3: 2 consecutive iteration(s) with a non-finite loss" in line


def test_evaluate_refuses_token_ids_outside_the_vocabulary(corpus_prefix, finished, tmp_path):
    # Before: tools/evaluate.py scored the data (ids inside the padded table) or died with an IndexError.
    prefix = _out_of_vocabulary_copy(corpus_prefix, tmp_path)
    proc = run_cli([sys.executable, "tools/evaluate.py", "--load", str(finished), "--data-path", prefix], check=False)
    assert proc.returncode == 1
    assert ("oov_text_document.bin holds token id 300, outside the vocabulary of 257 ids (--tokenizer-type "
            f"ByteTokenizer of {finished})") in _one_error_line(proc.stderr)


@pytest.fixture(scope="module")
def listops_prefix(tmp_path_factory) -> str:
    prefix = tmp_path_factory.mktemp("listops") / "lo"
    run_cli([sys.executable, "tools/generate_task_data.py", "--task", "LISTOPS", "--output-prefix", str(prefix),
             "--train-samples", "32", "--valid-samples", "8", "--test-samples", "8", "--min-length", "20",
             "--max-length", "60", "--seed", "5"])
    return str(prefix)


def _tasks_cmd(prefix: str, *extra: str) -> list:
    return [sys.executable, "tasks/main.py", "--task", "LISTOPS", "--data-path", prefix, "--num-layers", "1",
            "--hidden-size", "32", "--num-attention-heads", "2", "--seq-length", "64", "--window-size", "8",
            "--projection-rank", "2", "--micro-batch-size", "4", "--log-interval", "1", "--eval-iters", "1", *extra]


def test_classification_diverging_loss_is_skipped_counted_and_stops_in_one_line(listops_prefix):
    # Before: tasks/main.py trained on through NaN losses (skipped steps never stopped it) and a non-finite loss
    # of a step that was not skipped raised its own FloatingPointError.
    proc = run_cli(_tasks_cmd(listops_prefix, "--train-iters", "8", "--lr", "1e6", "--nonfinite-steps-limit", "2"),
                   check=False)
    assert proc.returncode == 1, proc.stdout[-2000:]
    assert "number of skipped iterations: 1 |" in proc.stdout
    line = _one_error_line(proc.stderr)
    assert line.startswith("error: rank 0: iteration 3: 2 consecutive iteration(s) with a non-finite loss"), line


def test_classification_token_ids_outside_the_task_vocabulary_are_refused(listops_prefix, tmp_path):
    # Before: trained silently (ids past the 17-token ListOps vocabulary index the padded embedding rows).
    copy = tmp_path / "lo"
    for path in Path(listops_prefix).parent.iterdir():
        if path.is_file():
            shutil.copy(path, tmp_path / path.name)
    from megatron_ls.data.indexed_dataset import IndexedDataset

    tokens = np.fromfile(f"{copy}_train.bin", dtype=IndexedDataset(f"{copy}_train").tokens.dtype)
    tokens[5] = 40
    tokens.tofile(f"{copy}_train.bin")
    proc = run_cli(_tasks_cmd(str(copy), "--train-iters", "1"), check=False)
    assert proc.returncode == 1
    assert (f"{copy}_train.bin holds token id 40, outside the vocabulary of 17 ids (the vocab of {copy}_meta.json)"
            in _one_error_line(proc.stderr))


@pytest.mark.slow
def test_classification_resume_checks_are_the_pretraining_ones(listops_prefix, tmp_path):
    # Before: a checkpoint past --train-iters was silently only evaluated, and --allow-attention-change (which the
    # refusal suggests) was ignored.
    ckpt = tmp_path / "ckpt"
    run_cli(_tasks_cmd(listops_prefix, "--train-iters", "2", "--save", str(ckpt)))
    past = run_cli(_tasks_cmd(listops_prefix, "--train-iters", "1", "--load", str(ckpt)), check=False)
    assert past.returncode == 1
    assert f"--load {ckpt} is at iteration 2, past --train-iters 1" in _one_error_line(past.stderr)
    changed = run_cli(_tasks_cmd(listops_prefix, "--train-iters", "2", "--load", str(ckpt), "--window-size", "4",
                                 "--allow-attention-change"), check=False)
    assert changed.returncode == 0, changed.stderr[-3000:]
    assert "loaded checkpoint from" in changed.stdout


@pytest.fixture(scope="module")
def zero1_checkpoint(corpus_prefix, tmp_path_factory) -> Path:
    """A one-process ZeRO-1 run stopped (and saved) at iteration 2 of 4."""
    ckpt = tmp_path_factory.mktemp("zero1") / "ckpt"
    run_cli(pretrain_cmd(corpus_prefix, *NO_DROPOUT, "--train-iters", "4", "--zero-stage", "1", "--save", str(ckpt),
                         "--exit-interval", "2"))
    return ckpt


def test_zero1_checkpoint_resumes_without_zero_and_refuses_a_changed_window(corpus_prefix, reference,
                                                                           zero1_checkpoint):
    # Before: --zero-stage 0 on a ZeRO-1 checkpoint died with an AttributeError.
    resumed = iteration_losses(run_cli(pretrain_cmd(corpus_prefix, *NO_DROPOUT, "--train-iters", "4", "--load",
                                                    str(zero1_checkpoint))).stdout)
    assert sorted(resumed) == [3, 4]
    assert all(resumed[it] == pytest.approx(reference[it], rel=1e-5) for it in (3, 4)), (resumed, reference)
    proc = run_cli(pretrain_cmd(corpus_prefix, "--train-iters", "4", "--load", str(zero1_checkpoint),
                                "--window-size", "64"), check=False)
    assert proc.returncode == 1
    assert "--window-size is 64 here but 32 in the checkpoint" in _one_error_line(proc.stderr)


@pytest.mark.slow
@pytest.mark.distributed
def test_resharded_checkpoint_resumes_at_tp2_with_its_optimizer_state(corpus_prefix, reference, zero1_checkpoint,
                                                                       tmp_path):
    # Before: the converter wrote weights only (--finetune: fresh Adam moments and LR schedule).
    tp2 = tmp_path / "tp2"
    out = run_cli([sys.executable, "tools/convert_checkpoint.py", "--load", str(zero1_checkpoint), "--save", str(tp2),
                   "--target-tensor-parallel-size", "2"]).stdout
    assert f"continue training with --load {tp2}" in out and "--finetune" not in out
    cmd = pretrain_cmd(corpus_prefix, *NO_DROPOUT, "--train-iters", "4", "--tensor-model-parallel-size", "2",
                       "--load", str(tp2))
    resumed = iteration_losses(run_cli(_torchrun(2, cmd), timeout=400).stdout)
    assert sorted(resumed) == [3, 4]
    assert all(resumed[it] == pytest.approx(reference[it], rel=2e-5) for it in (3, 4)), (resumed, reference)


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("zero, saved_dp, resumed_dp", [(1, 2, 1), (3, 1, 2)])
def test_resume_at_another_data_parallel_size_continues_the_loss_curve(corpus_prefix, reference, tmp_path, zero,
                                                                        saved_dp, resumed_dp):
    # Before: refused as "corrupt or incompatible" (ZeRO-1/2) or "same data x context parallel size" (ZeRO-3).
    ckpt = tmp_path / "ckpt"

    def run(dp: int, *extra: str):
        cmd = pretrain_cmd(corpus_prefix, *NO_DROPOUT, "--train-iters", "4", "--zero-stage", str(zero), *extra)
        return run_cli(_torchrun(dp, cmd) if dp > 1 else cmd, timeout=400)

    run(saved_dp, "--save", str(ckpt), "--exit-interval", "2")
    resumed = iteration_losses(run(resumed_dp, "--load", str(ckpt)).stdout)
    assert sorted(resumed) == [3, 4]
    assert all(resumed[it] == pytest.approx(reference[it], rel=2e-5) for it in (3, 4)), (resumed, reference)
