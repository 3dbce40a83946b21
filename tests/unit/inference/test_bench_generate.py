"""Smoke test of tools/bench_generate.py: a tiny run (one subprocess per point) writes a consistent JSON file."""
import importlib.util
import json
from pathlib import Path

TOOL = Path(__file__).resolve().parents[3] / "tools" / "bench_generate.py"


def _load_tool():
    spec = importlib.util.spec_from_file_location("bench_generate_tool", TOOL)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_tiny_run_writes_json(tmp_path, capsys):
    tool = _load_tool()
    out = tmp_path / "bench.json"
    rc = tool.main(["--contexts", "96", "--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4",
                    "--window-size", "16", "--segment-length", "8", "--projection-rank", "1", "--decode-steps", "3",
                    "--threads", "1", "--device", "cpu", "--json", str(out)])
    assert rc == 0
    data = json.loads(out.read_text())
    assert data["torch"] and data["git_commit"] and data["device"]
    rows = {r["model"]: r for r in data["results"]}
    assert set(rows) == {"ls", "full"}
    # cache content after the 96-token prefill: full = 2 (k, v) x layers x width x t fp32 values
    t = 96
    assert rows["full"]["cache_bytes"] == 2 * 2 * 32 * t * 4
    # LS: ring of w + r per finished chunk + one partial chunk's raw k, v and logits, per layer
    per_layer = (16 + t // 8) * 2 * 32 * 4 + 8 * (2 * 32 + 4) * 4
    assert rows["ls"]["cache_bytes"] == 2 * per_layer
    assert all(r["decode_step_ms"] > 0 and r["prefill_s"] > 0 for r in rows.values())
    assert "smaller" in capsys.readouterr().out
