"""Tiny torchrun target for testing the launcher helper: prints, then fails or hangs on request."""
import os
import sys
import time

rank = int(os.environ["RANK"])
print(f"probe rank {rank} of {os.environ['WORLD_SIZE']} omp={os.environ.get('OMP_NUM_THREADS')} "
      f"ds={os.environ.get('DS_ACCELERATOR')} extra={os.environ.get('PROBE_EXTRA', '')}", flush=True)
mode = sys.argv[1] if len(sys.argv) > 1 else "ok"
if mode == "fail" and rank == 1:
    print("probe failing on purpose", file=sys.stderr, flush=True)
    sys.exit(3)
if mode == "hang":
    time.sleep(120)
