"""tools/bench_data.py runs end to end at a tiny size and writes the JSON it promises."""
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]


def test_bench_smoke(tmp_path):
    out = tmp_path / "bench.json"
    cmd = [sys.executable, str(REPO / "tools" / "bench_data.py"), "--preprocess-mb", "1", "--spm-mb", "0",
           "--workers", "1", "--repeats", "1", "--dataset-tokens", "300000", "--seq-length", "128",
           "--num-samples", "500", "--access-samples", "2000", "--json", str(out), "--tmp-dir", str(tmp_path)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "MB/s" in res.stdout and "samples/s" in res.stdout
    result = json.loads(out.read_text())
    assert result["numpy"] and result["git_commit"]
    assert result["preprocess_byte_level"][0]["mb_per_s"] > 0
    assert result["gpt_dataset_access"]["random_samples_per_s"] > 0
