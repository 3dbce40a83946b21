"""The vision benchmark runs end to end: each kind in its own child, the table and the JSON rows."""
from __future__ import annotations

import json
import sys

from tests.e2e.conftest import run_cli


def test_bench_vision_compares_the_patch_query_paths(tmp_path):
    out = tmp_path / "vision.json"
    proc = run_cli([sys.executable, "tools/bench_vision.py", "--kinds", "ls-fused,ls-dense,full", "--sides", "32",
                    "--layers", "1", "--hidden", "16", "--heads", "2", "--window", "2", "--rank", "2",
                    "--batch", "1", "--repeats", "1", "--json", str(out)])
    assert proc.stdout.count("images/s") == 3
    result = json.loads(out.read_text())
    assert result["complete"] is True
    rows = result["rows"]
    assert [r["kind"] for r in rows] == ["ls-fused", "ls-dense", "full"]
    assert all(r["patches"] == 64 and r["images_per_s"] > 0 for r in rows)


def test_bench_vision_refuses_unknown_kinds(tmp_path):
    proc = run_cli([sys.executable, "tools/bench_vision.py", "--kinds", "ls-flash"], check=False)
    assert proc.returncode == 2 and "--kinds" in proc.stderr and "ls-flash" in proc.stderr
