"""Smoke test of tools/bench_attention.py: a tiny run writes a complete, consistent JSON file."""
import importlib.util
import json
from pathlib import Path

import pytest

TOOL = Path(__file__).resolve().parents[3] / "tools" / "bench_attention.py"


def _load_tool():
    spec = importlib.util.spec_from_file_location("bench_attention_tool", TOOL)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_bench_tiny_run_writes_json(tmp_path, capsys):
    tool = _load_tool()
    out = tmp_path / "bench.json"
    rc = tool.main(["--seq-lens", "64,128", "--heads", "2", "--head-dim", "8", "--window", "16",
                    "--segment-len", "8", "--rank", "2", "--repeats", "1", "--threads", "1", "--causal",
                    "--no-memory", "--json", str(out)])
    assert rc == 0
    data = json.loads(out.read_text())
    assert data["torch"] and data["git_commit"] and data["device"]
    rows = data["results"]
    assert {(r["impl"], r["n"]) for r in rows} == {("sdpa", 64), ("ls", 64), ("sdpa", 128), ("ls", 128)}
    for r in rows:
        assert r["fwd_bwd_ms"] >= r["fwd_ms"] > 0
    assert "speedup_vs_sdpa" in [r for r in rows if r["impl"] == "ls"][0]
    assert "causal" in capsys.readouterr().out


def test_memory_point_in_fresh_subprocess():
    tool = _load_tool()
    args = tool.parse_args(["--heads", "2", "--head-dim", "8", "--window", "16", "--segment-len", "8",
                            "--threads", "1", "--device", "cpu"])
    mib = tool.measure_memory(args, "ls", True, 4096)
    # q/k/v gradients alone are 3 · 2·4096·8·4 bytes = 0.75 MiB; the op cannot add less than that
    assert 0.5 < mib < 200


def test_visible_pairs_counts_match_definition():
    tool = _load_tool()
    args = tool.parse_args(["--window", "4", "--segment-len", "2", "--rank", "3"])
    # causal, N=7: window keys min(4, t+1) = 1+2+3+4+4+4+4 = 22; chunks visible min(t//2, 3) = 0+0+1+1+2+2+3 = 9
    assert tool.visible_pairs(args, 7, True, "ls") == 22 + 3 * 9
    # bidirectional, N=7, w=4, e=2: segment 0 rows 0..3 see [0, 6) -> 4·6; segment 1 rows 4..6 see [2, 7) -> 3·5
    assert tool.visible_pairs(args, 7, False, "ls") == 24 + 15 + 3 * 7
    assert tool.visible_pairs(args, 7, True, "sdpa") == 28


def test_bad_flags_exit_with_message(capsys):
    tool = _load_tool()
    with pytest.raises(SystemExit):
        tool.parse_args(["--seq-lens", "12,abc"])
    assert "--seq-lens" in capsys.readouterr().err
