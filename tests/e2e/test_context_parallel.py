"""Context parallelism end to end (gloo on CPU, fp32, dropout off): every CP layout logs the one-process run's
losses, grad norms and validation/test losses; a CP2 checkpoint resumes exactly at CP2, continues at CP1 and is
read by tools/evaluate.py and tools/convert_checkpoint.py; DeepSpeed's gradient reduction is pinned down."""
from __future__ import annotations

import json
import re
import sys

import pytest

from tests.e2e.conftest import REPO, pretrain_cmd, run_cli

pytestmark = [pytest.mark.e2e, pytest.mark.distributed]

ITERS = 4
# One Long-Short layer and one full-attention layer; 128-token samples split into pieces of 64/32/16 tokens.
CP_FLAGS = ["--num-layers", "2", "--full-attention-layers", "1", "--hidden-dropout", "0", "--attention-dropout",
            "0", "--train-iters", str(ITERS), "--global-batch-size", "4", "--micro-batch-size", "2",
            "--eval-interval", "2"]
ITERATION = re.compile(r" iteration\s+(\d+)/\s*\d+ \|.*? lm loss: (\S+) \|.*? grad norm: (\S+) \|")
EVALUATION = re.compile(r" (validation|test) loss at iteration (\d+) \| lm loss value: (\S+) \|")


def _vocab(tp: int) -> list:
    return ["--make-vocab-size-divisible-by", str(256 // tp)]  # the same padded vocab at every TP size


def _cmd(nproc: int, corpus: str, *extra: str, launcher: str = "torchrun") -> list:
    tp = int(extra[extra.index("--tensor-model-parallel-size") + 1]) if "--tensor-model-parallel-size" in extra else 1
    cmd = pretrain_cmd(corpus, *CP_FLAGS, *_vocab(tp), *extra)
    if nproc == 1:
        return cmd
    if launcher == "deepspeed":
        return [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(nproc), *cmd[1:]]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), *cmd[1:]]


def _logged(stdout: str) -> dict:
    """{("train", it): (loss, grad norm), ("validation"|"test", it): loss} as printed (strings)."""
    out: dict = {("train", int(m[1])): (m[2], m[3]) for m in ITERATION.finditer(stdout)}
    out.update({(m[1], int(m[2])): m[3] for m in EVALUATION.finditer(stdout)})
    return out


def _assert_close(logged: dict, reference: dict, what: str, rel: float = 1e-5) -> None:
    assert logged, f"{what}: nothing logged"
    for key, value in logged.items():
        assert key in reference, (what, key)
        ref = reference[key]
        if key[0] == "train":
            assert float(value[0]) == pytest.approx(float(ref[0]), rel=rel), (what, key, value, ref)
            assert float(value[1]) == pytest.approx(float(ref[1]), rel=rel, abs=1.5e-3), (what, key, value, ref)
        else:
            assert float(value) == pytest.approx(float(ref), rel=rel), (what, key, value, ref)


def _run(nproc: int, corpus: str, *extra: str, timeout: float = 400, **kw) -> dict:
    return _logged(run_cli(_cmd(nproc, corpus, *extra, **kw), timeout=timeout).stdout)


@pytest.fixture(scope="module")
def reference(corpus_prefix) -> dict:
    logged = _run(1, corpus_prefix)
    assert sorted(k[1] for k in logged if k[0] == "train") == list(range(1, ITERS + 1))
    assert ("validation", 2) in logged and ("test", ITERS) in logged
    return logged


def test_deepspeed_averages_gradients_over_data_x_context_parallel():
    """Measured, not assumed: what DeepSpeed divides the DP x CP sum of gradients (and the pipeline loss) by."""
    from tests.distributed.launch import run_torchrun

    out = run_torchrun(REPO / "tests/e2e/workers/ds_cp_scaling.py", nproc=4, timeout=400)
    records = [json.loads(line[5:]) for line in out.splitlines() if line.startswith("DSCP ")]
    plain = {(r["mpu"], r["zero_stage"], r["bf16"]): r for r in records if r["engine"] == "plain"}
    assert len(plain) == 10, out
    for (mpu, stage, bf16), r in plain.items():
        tol = 1e-2 if bf16 else 1e-6
        if mpu == "training":  # what training hands DeepSpeed: plain data parallelism over DP x CP, every stage
            assert r["ds_dp_world_size"] == 4 and r["divisors"] == pytest.approx([4.0] * 4, rel=tol), r
            if r["grad_norm_over_applied"] is not None:
                assert r["grad_norm_over_applied"] == pytest.approx(1.0, rel=tol), r
        elif stage < 3:  # megatron_ls.parallel.state as mpu: summed over CP (divided by DP = 2)
            assert r["divisors"] == pytest.approx([2.0] * 4, rel=tol), r
        # state as mpu with ZeRO-3 partitions over DP only: CP ranks are never reduced (not asserted, printed)
    pipeline = [r for r in records if r["engine"] == "pipeline"]
    assert len(pipeline) == 8, out
    for r in pipeline:  # PP2 x CP2: the engine's data axis is DP x CP = 2; gradients and loss averaged over it
        assert r["ds_dp_world_size"] == 2 and r["grad_divisor"] == pytest.approx(2.0, rel=1e-6), r
        assert r["loss_divisor"] == pytest.approx(2.0, rel=1e-6), r


def test_cp_model_equals_one_process_model():
    from tests.distributed.launch import run_torchrun

    out = run_torchrun(REPO / "tests/e2e/workers/cp_model_check.py", nproc=2, timeout=300)
    for variant in ("", "llama-"):  # the paper's GPT-LS and the Llama-style switches (RMSNorm, SwiGLU, ...)
        assert f"CHECK-OK cp-model-{variant}contiguous" in out and f"CHECK-OK cp-model-{variant}balanced" in out, out


def test_cp2_matches_resumes_exactly_and_continues_at_cp1(corpus_prefix, reference, tmp_path):
    from megatron_ls.training.checkpointing import read_latest_tag, read_metadata

    cp2 = ("--context-parallel-size", "2")
    full = _run(2, corpus_prefix, *cp2)
    _assert_close(full, reference, "CP2")
    ckpt = tmp_path / "cp2"
    first = _run(2, corpus_prefix, *cp2, "--save", str(ckpt), "--exit-interval", "2")
    assert sorted(k[1] for k in first if k[0] == "train") == [1, 2]
    layout = read_metadata(str(ckpt), read_latest_tag(str(ckpt)))["layout"]
    assert (layout["context_parallel_size"], layout["data_parallel_size"]) == (2, 1)

    resumed = _run(2, corpus_prefix, *cp2, "--load", str(ckpt))
    assert sorted(k[1] for k in resumed if k[0] == "train") == [3, 4]
    for key, value in resumed.items():  # bit-exact: the very strings the uninterrupted CP2 run printed
        assert value == full[key], (key, value, full[key])

    at_cp1 = _run(1, corpus_prefix, "--load", str(ckpt))  # ZeRO-0: weights, optimizer, RNG, data position
    assert sorted(k[1] for k in at_cp1 if k[0] == "train") == [3, 4]
    _assert_close(at_cp1, reference, "CP2 checkpoint continued at CP1")

    # The tools read the CP2 checkpoint directly and after conversion, with the same result.
    run_cli([sys.executable, "tools/convert_checkpoint.py", "--load", str(ckpt), "--consolidated-dir",
             str(tmp_path / "full")])
    results = []
    for path in (ckpt, tmp_path / "full"):
        out = tmp_path / f"eval_{path.name}.json"
        run_cli([sys.executable, "tools/evaluate.py", "--load", str(path), "--data-path", corpus_prefix,
                 "--split", "90,8,2", "--max-tokens", "600", "--stride", "64", "--json", str(out)])
        results.append(json.loads(out.read_text()))
    assert results[0]["tokens"] == 599 and results[0]["loss_nats"] == pytest.approx(results[1]["loss_nats"],
                                                                                    rel=1e-6)


@pytest.mark.slow
def test_cp_composes_with_tp_pp_balanced_layout_and_recompute(corpus_prefix, reference):
    for nproc, layout in [
        (4, ("--context-parallel-size", "4", "--context-parallel-layout", "balanced")),
        (4, ("--context-parallel-size", "2", "--tensor-model-parallel-size", "2")),
        (4, ("--context-parallel-size", "2", "--pipeline-model-parallel-size", "2", "--recompute-activations")),
    ]:
        _assert_close(_run(nproc, corpus_prefix, *layout), reference, layout)


@pytest.mark.slow
def test_cp2_dp2_zero_stages_and_checkpoint_moving_to_cp1(corpus_prefix, reference, tmp_path):
    ckpt = tmp_path / "zero2"
    zero3 = _run(4, corpus_prefix, "--context-parallel-size", "2", "--zero-stage", "3")
    _assert_close(zero3, reference, "DP2 x CP2 ZeRO-3")
    zero2 = _run(4, corpus_prefix, "--context-parallel-size", "2", "--zero-stage", "2", "--save", str(ckpt),
                 "--exit-interval", "2")
    _assert_close(zero2, reference, "DP2 x CP2 ZeRO-2")
    # ZeRO-2 optimizer state is partitioned over the 4 replicas; one process re-partitions it on load
    # (training/elastic.py) and continues the uninterrupted run.
    resumed = _run(1, corpus_prefix, "--zero-stage", "2", "--load", str(ckpt))
    assert sorted(k[1] for k in resumed if k[0] == "train") == [3, 4]
    _assert_close(resumed, reference, "DP2 x CP2 ZeRO-2 continued by one process")


@pytest.mark.slow
def test_cp2_under_the_deepspeed_launcher_and_in_bf16(corpus_prefix, reference):
    _assert_close(_run(2, corpus_prefix, "--context-parallel-size", "2", launcher="deepspeed"), reference,
                  "deepspeed launcher, CP2")
    bf16_reference = _run(1, corpus_prefix, "--bf16")
    _assert_close(_run(2, corpus_prefix, "--context-parallel-size", "2", "--bf16"), bf16_reference, "CP2 bf16",
                  rel=2e-2)
