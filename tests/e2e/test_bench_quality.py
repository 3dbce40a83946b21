"""The ablation benchmark runs end to end: training per variant, the summary table and the per-position losses."""
from __future__ import annotations

import json
import os
import sys

import pytest

from tests.e2e.conftest import run_cli


@pytest.mark.slow
def test_ablation_benchmark_smoke(corpus_prefix, tmp_path):
    out = tmp_path / "quality.json"
    proc = run_cli([sys.executable, "tools/bench_quality.py", "--variants", "ls", "window", "--train-iters", "3",
                    "--num-layers", "1", "--hidden-size", "32", "--seq-length", "128", "--window-size", "16",
                    "--eval-iters", "1", "--data-dir", os.path.dirname(corpus_prefix),
                    "--save-dir", str(tmp_path / "ckpt"), "--position-eval-sequences", "2", "--output", str(out)])
    assert "| variant | positions 0-15 | positions 16-63 | positions 64-127 |" in proc.stdout
    result = json.loads(out.read_text())
    assert result["complete"] is True
    runs = {r["variant"]: r for r in result["runs"]}
    assert set(runs) == {"ls", "window"} and runs["window"]["keys_per_query"] == 16
    for run in runs.values():
        assert [b["positions"] for b in run["position_losses"]] == [[0, 16], [16, 64], [64, 128]]
        assert all(0 < b["loss"] < 10 for b in run["position_losses"])
    assert len(result["norm_ratio_at_init"]["dual_ln"]) == 1


def test_attention_cost_counts_only_the_full_layers():
    from tools.bench_quality import attention_keys_per_query, parse_args

    args = parse_args(["--num-layers", "4", "--seq-length", "1024", "--window-size", "32", "--segment-length", "16",
                       "--projection-rank", "1"])
    cost = {v: attention_keys_per_query(args, v) for v in ("ls", "window", "full", "masformer-ls", "masformer-window")}
    assert cost["ls"] == 64 and cost["window"] == 32 and cost["full"] == 512.5
    assert cost["masformer-ls"] == (512.5 + 3 * 64) / 4 and cost["masformer-window"] == (512.5 + 3 * 32) / 4
