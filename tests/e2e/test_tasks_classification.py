"""tasks/main.py end to end on a tiny generated ListOps set: training, accuracy, checkpoints, exact resume, TP/DP."""
from __future__ import annotations

import json
import sys

import pytest

from megatron_ls.arguments import parse_args
from megatron_ls.config import ConfigError
from tests.distributed.launch import run_torchrun
from tests.e2e.conftest import iteration_losses, run_cli

pytestmark = pytest.mark.e2e

TINY = ["--task", "LISTOPS", "--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "2",
        "--ffn-hidden-size", "48", "--seq-length", "96", "--window-size", "8", "--projection-rank", "2",
        "--micro-batch-size", "4", "--lr", "2e-3", "--log-interval", "1", "--seed", "3",
        "--make-vocab-size-divisible-by", "16"]  # 32 rows at TP1 and TP2


@pytest.fixture(scope="module")
def listops_prefix(tmp_path_factory) -> str:
    prefix = tmp_path_factory.mktemp("listops") / "lo"
    run_cli([sys.executable, "tools/generate_task_data.py", "--task", "LISTOPS", "--output-prefix", str(prefix),
             "--train-samples", "64", "--valid-samples", "12", "--test-samples", "10", "--min-length", "20",
             "--max-length", "90", "--max-depth", "6", "--seed", "5"])
    return str(prefix)


def tasks_cmd(prefix: str, *extra: str) -> list:
    return [sys.executable, "tasks/main.py", "--data-path", prefix, *TINY, *extra]


def test_trains_reports_accuracy_saves_and_resumes_exactly(listops_prefix, tmp_path):
    common = ("--train-iters", "4", "--eval-interval", "2", "--eval-iters", "1", "--cls-last-layer",
              "--hidden-dropout", "0.1", "--attention-dropout", "0.1")
    results = tmp_path / "res.json"
    full = run_cli(tasks_cmd(listops_prefix, *common, "--results-json", str(results)))
    losses = iteration_losses(full.stdout)
    assert sorted(losses) == [1, 2, 3, 4]
    assert "metrics for validation at iteration 2: correct / total = " in full.stdout
    assert " / 4 = " in full.stdout  # --eval-iters 1 global batch of 4 at iteration 2
    assert "metrics for validation at iteration 4: correct / total = " in full.stdout and " / 12 = " in full.stdout
    assert "metrics for test at iteration 4: correct / total = " in full.stdout and " / 10 = " in full.stdout
    summary = json.loads(results.read_text())
    assert summary["test"]["total"] == 10 and 0.0 <= summary["test"]["accuracy"] <= 1.0
    assert [h["iteration"] for h in summary["history"]] == [2, 4, 4]

    ckpt = tmp_path / "ckpt"
    first = run_cli(tasks_cmd(listops_prefix, *common, "--save", str(ckpt), "--exit-interval", "2"))
    assert "exiting program at iteration 2" in first.stdout
    assert (ckpt / "latest").read_text().strip() == "iter_0000002"
    meta = json.loads((ckpt / "iter_0000002" / "megatron_ls.json").read_text())
    assert meta["task"] == {"task": "LISTOPS", "num_classes": 10, "pooling": "mean", "cls_last_layer": True}
    resumed = run_cli(tasks_cmd(listops_prefix, *common, "--load", str(ckpt), "--save", str(ckpt)))
    again = iteration_losses(resumed.stdout)
    assert sorted(again) == [3, 4]
    for it in (3, 4):  # dropout on: data order, RNG, optimizer and schedule resume exactly
        assert again[it] == losses[it], (it, again[it], losses[it])
    assert resumed.stdout.split("metrics for test")[1].split("|")[0] == \
        full.stdout.split("metrics for test")[1].split("|")[0]

    # a checkpoint of another pooling scheme is refused, naming the difference
    bad = run_cli(tasks_cmd(listops_prefix, "--train-iters", "4", "--pooling", "cls", "--load", str(ckpt)),
                  check=False)
    assert bad.returncode != 0 and "cls_last_layer is False here but True in the checkpoint" in bad.stderr


def test_exit_duration_saves_and_stops(listops_prefix, tmp_path):
    """The Megatron early exits, --log-params-norm and --skip-train work in this loop too (one rank; signals:
    tests/e2e/test_early_exit.py)."""
    # (with the Llama-style switches: the classifier's layers and final norm follow them too)
    out = run_cli(tasks_cmd(listops_prefix, "--train-iters", "4", "--save", str(tmp_path / "c"),
                            "--exit-duration-in-mins", "0.0001", "--log-params-norm", "--normalization", "RMSNorm",
                            "--swiglu", "--disable-bias-linear")).stdout
    assert "exiting program at iteration 1 after " in out and "(--exit-duration-in-mins 0.0001)" in out
    assert " | grad norm: " in out and " | params norm: " in out  # --log-params-norm in this loop too
    assert (tmp_path / "c" / "latest").read_text().strip() == "iter_0000001" and "metrics for test" not in out
    evaluated = run_cli(tasks_cmd(listops_prefix, "--train-iters", "4", "--load", str(tmp_path / "c"), "--save",
                                  str(tmp_path / "c"), "--skip-train", "--normalization", "RMSNorm", "--swiglu",
                                  "--disable-bias-linear")).stdout
    assert "evaluating the weights of iteration 1" in evaluated and "metrics for test at iteration 1" in evaluated
    assert not iteration_losses(evaluated) and sorted(p.name for p in (tmp_path / "c").iterdir()) == [
        "iter_0000001", "latest"]


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("layout", [["--tensor-model-parallel-size", "2"], ["--zero-stage", "2"]],
                         ids=["tp2", "dp2-zero2"])
def test_two_process_layouts_match_one_process(listops_prefix, layout):
    common = ("--train-iters", "3", "--global-batch-size", "8", "--pooling", "cls", "--eval-iters", "0",
              "--hidden-dropout", "0", "--attention-dropout", "0")
    single = run_cli(tasks_cmd(listops_prefix, *common))
    out = run_torchrun("tasks/main.py", 2, ["--data-path", listops_prefix, *TINY, *common, *layout], timeout=240)
    one, two = iteration_losses(single.stdout), iteration_losses(out)
    assert sorted(two) == [1, 2, 3]
    for it, loss in one.items():
        assert two[it] == pytest.approx(loss, rel=1e-5, abs=1e-6), (it, two[it], loss)
    test_line = lambda text: text.split("metrics for test")[1].split("|")[0]  # noqa: E731
    assert test_line(out) == test_line(single.stdout)


def test_unsupported_layouts_and_mixed_cls_schemes_are_refused(listops_prefix):
    from tasks.classification import check_task_arguments
    from tasks.main import task_args

    def args(*extra: str, world: int = 1):
        return parse_args(["--data-path", listops_prefix, *TINY, *extra], extra_args_provider=task_args,
                          defaults={"model.causal": False}, world_size=world)

    with pytest.raises(ConfigError, match="--pipeline-model-parallel-size > 1 is not supported"):
        check_task_arguments(args("--pipeline-model-parallel-size", "2", world=2))
    with pytest.raises(ConfigError, match="--context-parallel-size > 1 is not supported"):
        check_task_arguments(args("--context-parallel-size", "2", world=2))
    with pytest.raises(ConfigError, match="pick one"):
        check_task_arguments(args("--pooling", "cls", "--cls-last-layer"))
    with pytest.raises(ConfigError, match="--untie-embeddings-and-output-weights does not apply"):
        check_task_arguments(args("--untie-embeddings-and-output-weights"))
    cmd = [a if a != "LISTOPS" else "FAR_RECALL" for a in tasks_cmd(listops_prefix, "--train-iters", "1")]
    wrong = run_cli(cmd, check=False)
    assert wrong.returncode != 0 and "holds LISTOPS data" in wrong.stderr


@pytest.mark.slow
def test_long_range_benchmark_smoke(tmp_path):
    out = tmp_path / "bench.json"
    proc = run_cli([sys.executable, "tools/bench_long_range.py", "--variants", "window", "ls-post-cls",
                    "--train-iters", "4", "--length", "64", "--min-distance", "45", "--train-samples", "64",
                    "--batch-size", "4", "--hidden-size", "16", "--data-prefix", str(tmp_path / "fr" / "fr"),
                    "--work-dir", str(tmp_path / "runs"), "--json", str(out)])
    assert "| window | 32 |" in proc.stdout and "| ls-post-cls | 34 |" in proc.stdout
    result = json.loads(out.read_text())
    assert [row["variant"] for row in result["rows"]] == ["window", "ls-post-cls"]
    assert result["window_receptive_field"] == 40 and 0.0 <= result["rows"][0]["test_accuracy"] <= 1.0
