#!/usr/bin/env python3
"""Summarise a ``scripts/gpu_check.sh`` run: step results, test counts, provenance; exit 1 if anything failed.

Usage (called by gpu_check.sh): gpu_check_summary.py --steps STEPS.tsv [--junit TESTS.xml ...] --env ENV.json
--out SUMMARY.json --device cuda|cpu. Benchmark JSONs the steps wrote get any provenance field they lack
(device, torch, git_commit) filled in and marked ``provenance_from: gpu_check``.
``gpu_check_summary.py --write-env ENV.json`` prints and records the software / GPU environment instead.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def read_steps(path: Path) -> list:
    """Rows written by gpu_check.sh: name, exit code (or 'skip'), seconds, log, artifact, note."""
    steps = []
    for line in path.read_text().splitlines() if path.exists() else []:
        name, rc, secs, log, artifact, note = (line.split("\t") + [""] * 6)[:6]
        status = "skipped" if rc == "skip" else "passed" if rc == "0" else "timeout" if rc in ("124", "137") \
            else "failed"
        steps.append({"name": name, "status": status, "exit_code": None if rc == "skip" else int(rc),
                      "seconds": int(secs or 0), "log": log, "artifact": artifact or None, "note": note or None})
    return steps


def read_junit(path: Path) -> dict | None:
    """Counts and the ids of failed / errored / skipped tests from a pytest junit XML file."""
    if not path.exists():
        return None
    root = ET.parse(path).getroot()
    counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0}
    failed, skipped = [], []
    for case in root.iter("testcase"):
        test_id = f"{case.get('classname', '')}::{case.get('name', '')}"
        kinds = {child.tag for child in case}
        if "failure" in kinds or "error" in kinds:
            counts["failed" if "failure" in kinds else "errors"] += 1
            node = case.find("failure") if "failure" in kinds else case.find("error")
            failed.append({"test": test_id, "message": (node.get("message") or "")[:500]})
        elif "skipped" in kinds:
            counts["skipped"] += 1
            skipped.append({"test": test_id, "reason": (case.find("skipped").get("message") or "")[:300]})
        else:
            counts["passed"] += 1
    return {**counts, "failed_tests": failed, "skipped_tests": skipped}


def write_env(path: Path) -> int:
    """Versions of Python, torch, CUDA, cuDNN, triton, DeepSpeed; every visible GPU; FlexAttention availability."""
    import importlib.metadata as md
    import platform
    import subprocess

    import torch

    def version(dist: str):
        try:
            return md.version(dist)
        except md.PackageNotFoundError:
            return None

    env = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
           "triton": version("triton"), "deepspeed": version("deepspeed"), "numpy": version("numpy"),
           "cuda_available": torch.cuda.is_available(), "gpus": []}
    for i in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(i)
        env["gpus"].append({"name": props.name, "capability": f"{props.major}.{props.minor}",
                            "memory_gib": round(props.total_memory / 2 ** 30, 1),
                            "bf16": torch.cuda.is_bf16_supported()})
    try:
        from megatron_ls.ops.flex import flex_available

        env["flex_attention"] = flex_available()
    except Exception as exc:  # noqa: BLE001 - recorded, not fatal: the tests will show the details
        env["flex_attention"] = f"import failed: {exc}"
    try:
        smi = subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=60)
        env["nvidia_smi"] = smi.stdout if smi.returncode == 0 else f"exit {smi.returncode}: {smi.stderr.strip()}"
    except (OSError, subprocess.TimeoutExpired) as exc:
        env["nvidia_smi"] = f"not available: {exc}"
    print(env["nvidia_smi"].rstrip())
    for key, value in env.items():
        if key != "nvidia_smi":
            print(f"{key:>15}: {value}")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(env, indent=2) + "\n")
    return 0


def provenance(device: str) -> dict:
    import torch

    from tools.bench_common import device_name, git_commit

    commit = git_commit() or os.environ.get("GPU_CHECK_GIT_COMMIT") or "unknown"
    return {"device": device_name(device), "device_type": device, "torch": torch.__version__,
            "cuda": torch.version.cuda, "git_commit": commit}


def stamp(artifact: Path, prov: dict) -> None:
    """Fill in the provenance fields a benchmark JSON lacks (e.g. git_commit outside a git checkout)."""
    try:
        data = json.loads(artifact.read_text())
    except (OSError, ValueError):
        return
    if not isinstance(data, dict):
        return
    aliases = {"device": ("device",), "torch": ("torch", "torch_version"), "git_commit": ("git_commit", "commit")}
    added = [k for k, names in aliases.items() if all(data.get(n) in (None, "", "unknown") for n in names)]
    for key in added:
        data[key] = prov[key]
    if added:
        data["provenance_from"] = {"gpu_check": added}
        artifact.write_text(json.dumps(data, indent=2) + "\n")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--write-env", type=Path, default=None, help="only record the environment to this JSON")
    p.add_argument("--steps", type=Path)
    p.add_argument("--junit", type=Path, action="append", default=[], help="pytest junit XML (repeatable)")
    p.add_argument("--env", type=Path, default=None)
    p.add_argument("--out", type=Path)
    p.add_argument("--device", default="cuda")
    args = p.parse_args(argv)
    if args.write_env:
        return write_env(args.write_env)
    if not (args.steps and args.out):
        p.error("--steps and --out are required (or --write-env)")
    prov = provenance(args.device)
    steps = read_steps(args.steps)
    for step in steps:
        if step["artifact"] and step["status"] == "passed" and Path(step["artifact"]).is_file():
            stamp(Path(step["artifact"]), prov)
    tests = {j.stem: read_junit(j) for j in args.junit if j.exists()}
    env = json.loads(args.env.read_text()) if args.env and args.env.is_file() else None
    failed = [s["name"] for s in steps if s["status"] in ("failed", "timeout")]
    for suite in tests.values():
        failed += [t["test"] for t in suite["failed_tests"]]
    summary = {**prov, "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "ok": not failed, "failed": failed,
               "steps": steps, "tests": tests, "environment": env}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(summary, indent=2) + "\n")
    os.replace(tmp, args.out)

    print(f"\n=== gpu_check summary ({prov['device']}, torch {prov['torch']}, commit {prov['git_commit'][:10]})")
    for s in steps:
        extra = f"  -> {s['artifact']}" if s["artifact"] and s["status"] == "passed" else ""
        note = f"  ({s['note']})" if s["note"] else ""
        print(f"  {s['status']:>8}  {s['name']:<24} {s['seconds']:>5d}s{extra}{note}")
    for name, suite in tests.items():
        print(f"  {name}: {suite['passed']} passed, {suite['failed']} failed, {suite['errors']} errors, "
              f"{suite['skipped']} skipped")
        for t in suite["failed_tests"]:
            print(f"    FAILED {t['test']}: {t['message'][:200]}")
    print(f"  summary: {args.out}")
    if failed:
        print(f"gpu_check: {len(failed)} failure(s): " + ", ".join(failed))
        return 1
    print("gpu_check: everything passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
