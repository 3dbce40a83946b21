#!/usr/bin/env bash
# One command for a CUDA machine: install offline, then run every CUDA test and the GPU benchmarks.
#
#   bash scripts/gpu_check.sh [--quick] [--only STEPS] [--out DIR] [--skip-install] [--allow-cpu]
#
# Steps (all by default, or a comma list with --only): install, env, cuda_tests, unit_tests, bench_attention,
# bench_attention_torch, bench_train, bench_context_parallel. Every step runs even when an earlier one failed;
# the script exits non-zero at the end naming what failed. Results: benchmark JSONs (device, torch version and
# git commit inside) and gpu_check_summary.json under DIR (default benchmarks/results), logs and junit XML under
# DIR/gpu_check_logs. No network: missing packages come from wheels/ (bash scripts/build_gpu_wheels.sh on a
# machine with PyPI access); torch is never replaced.
#
#   --quick         small benchmark sizes (each step fits in a few minutes)
#   --only STEPS    e.g. --only cuda_tests or --only bench_attention,bench_train
#   --out DIR       where the JSONs go (default benchmarks/results; --allow-cpu: build/gpu_check_cpu)
#   --skip-install  do not touch the Python environment
#   --allow-cpu     no GPU: run the same plumbing on CPU with tiny sizes (CUDA tests run their CPU-checkable parts)
# Environment: PYTHON (default python3), GPU_CHECK_STEP_TIMEOUT (seconds per step, default 3600),
# GPU_CHECK_GIT_COMMIT (recorded when the checkout has no .git), PYTEST_ARGS (extra pytest arguments).
set -uo pipefail  # no -e: a failed step is recorded and the next one runs
cd "$(dirname "$0")/.." || exit 2
REPO=$PWD
PY=${PYTHON:-python3}
ALL_STEPS="install env cuda_tests unit_tests bench_attention bench_attention_torch bench_train bench_context_parallel"
ALLOW_CPU=0 QUICK=0 ONLY="" OUT_DIR="" SKIP_INSTALL=0
STEP_TIMEOUT=${GPU_CHECK_STEP_TIMEOUT:-3600}

while (($#)); do
  case $1 in
    --allow-cpu) ALLOW_CPU=1 ;;
    --quick) QUICK=1 ;;
    --only) ONLY=${2:?--only needs a comma-separated list of steps}; shift ;;
    --only=*) ONLY=${1#*=} ;;
    --out) OUT_DIR=${2:?--out needs a directory}; shift ;;
    --out=*) OUT_DIR=${1#*=} ;;
    --skip-install) SKIP_INSTALL=1 ;;
    -h | --help) sed -n '2,22p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
  shift
done
STEPS=$ALL_STEPS
if [[ -n $ONLY ]]; then
  STEPS=${ONLY//,/ }
  for s in $STEPS; do
    [[ " $ALL_STEPS " == *" $s "* ]] || { echo "gpu_check.sh: unknown step '$s' (steps: $ALL_STEPS)" >&2; exit 2; }
  done
fi
((SKIP_INSTALL)) && STEPS=$(echo " $STEPS " | sed 's/ install / /')
wants() { [[ " $STEPS " == *" $1 "* ]]; }

# --- torch and the device ------------------------------------------------------------------------------------
if ! "$PY" -c "import torch" 2>/dev/null; then
  echo "gpu_check.sh: '$PY' cannot import torch; this script expects a Python with torch (CUDA build) installed" >&2
  exit 2
fi
if "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  DEV=cuda
elif ((ALLOW_CPU)); then
  DEV=cpu
  echo "gpu_check.sh: no CUDA device; --allow-cpu: running the plumbing on CPU with tiny sizes (no GPU result)"
else
  "$PY" - >&2 <<'EOF'
import torch
build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
print(f"gpu_check.sh: no CUDA device visible to torch {torch.__version__} ({build}); this check is for a GPU "
      "machine. On CPU, `bash scripts/gpu_check.sh --allow-cpu` exercises the same steps with tiny sizes.")
EOF
  exit 2
fi

OUT_DIR=${OUT_DIR:-$([[ $DEV == cuda ]] && echo benchmarks/results || echo build/gpu_check_cpu)}
mkdir -p "$OUT_DIR" && OUT_DIR=$(cd "$OUT_DIR" && pwd)
LOG_DIR=$OUT_DIR/gpu_check_logs
mkdir -p "$LOG_DIR"
STEPS_TSV=$LOG_DIR/steps.tsv
: >"$STEPS_TSV"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$REPO/.torch_extensions}
if [[ $DEV == cpu ]]; then
  export DS_ACCELERATOR=cpu OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} MEGATRON_LS_CUDA_TESTS_ON_CPU=1
fi
TIMEOUT=()
command -v timeout >/dev/null && TIMEOUT=(timeout --kill-after=60 "$STEP_TIMEOUT")

record() { printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" "${5:-}" "${6:-}" >>"$STEPS_TSV"; }

# run_step NAME ARTIFACT CMD...: run with a time limit, log to $LOG_DIR/NAME.log, record exit code and time.
run_step() {
  local name=$1 artifact=$2 log=$LOG_DIR/$1.log t0=$SECONDS rc
  shift 2
  [[ $artifact == *.xml ]] && rm -f "$artifact"  # never read a previous run's test report
  echo
  echo "=== [$name] $*"
  ${TIMEOUT[@]+"${TIMEOUT[@]}"} "$@" 2>&1 | tee "$log"
  rc=${PIPESTATUS[0]}
  record "$name" "$rc" "$((SECONDS - t0))" "$log" "$artifact"
  ((rc == 0)) || echo "=== [$name] FAILED (exit $rc; log $log)"
}

skip_step() { echo; echo "=== [$1] skipped: $2"; record "$1" skip 0 "" "" "$2"; }

# --- install: offline, from wheels/, never replacing torch -----------------------------------------------------
install_missing() {
  local pin missing=() mod spec ds
  ds=$(grep -E '^deepspeed' requirements.txt | head -1)
  for pair in "deepspeed:${ds:-deepspeed}" hjson:hjson pydantic:pydantic einops:einops msgpack:msgpack \
    cpuinfo:py-cpuinfo psutil:psutil ninja:ninja tqdm:tqdm safetensors:safetensors numpy:numpy pytest:pytest \
    pytest_timeout:pytest-timeout; do
    mod=${pair%%:*} spec=${pair#*:}
    "$PY" -c "import $mod" 2>/dev/null || missing+=("$spec")
  done
  if ((${#missing[@]})); then
    echo "missing: ${missing[*]}"
    if ! compgen -G "wheels/*.whl" >/dev/null; then
      echo "no wheels/ directory: run 'bash scripts/build_gpu_wheels.sh' on a machine with PyPI access and copy" \
        "wheels/ into this checkout (this machine has no network)"
      return 1
    fi
    pin=$(mktemp)
    "$PY" -c 'import torch; print("torch==" + torch.__version__.split("+")[0])' >"$pin"
    if ! "$PY" -m pip install --no-index --find-links wheels -c "$pin" "${missing[@]}"; then
      echo "resolving all together failed; installing each wheel without dependencies"
      for spec in "${missing[@]}"; do
        "$PY" -m pip install --no-index --find-links wheels --no-deps "$spec" || echo "could not install $spec"
      done
      "$PY" -m pip install --no-index --find-links wheels --no-deps annotated-types typing-inspection \
        typing-extensions pydantic-core pluggy iniconfig pygments 2>/dev/null || true
    fi
    rm -f "$pin"
  else
    echo "all dependencies importable"
  fi
  if [[ $(cd / && PYTHONPATH='' "$PY" -c 'import megatron_ls, os; print(os.path.dirname(os.path.dirname(
megatron_ls.__file__)))' 2>/dev/null) != "$REPO" ]]; then  # installed (not just on PYTHONPATH) from here?
    "$PY" -m pip install --no-index --no-deps --no-build-isolation -e . ||
      echo "editable install failed; the checkout is used through PYTHONPATH"
  else
    echo "megatron_ls already installed from $REPO"
  fi
  "$PY" -c "import torch, deepspeed, megatron_ls, pytest; print('ready: torch', torch.__version__, '| deepspeed', \
deepspeed.__version__, '| megatron_ls', megatron_ls.__file__)"
}

if wants install; then
  t0=$SECONDS
  echo "=== [install]"
  install_missing 2>&1 | tee "$LOG_DIR/install.log"
  record install "${PIPESTATUS[0]}" "$((SECONDS - t0))" "$LOG_DIR/install.log"
fi

wants env && run_step env "$LOG_DIR/env.json" "$PY" scripts/gpu_check_summary.py --write-env "$LOG_DIR/env.json"

# --- tests -----------------------------------------------------------------------------------------------------
# shellcheck disable=SC2086  # PYTEST_ARGS is a list of words on purpose
if wants cuda_tests; then
  run_step cuda_tests "$LOG_DIR/cuda_tests.xml" "$PY" -m pytest -m cuda tests/cuda -p no:cacheprovider -rs \
    --junitxml "$LOG_DIR/cuda_tests.xml" ${PYTEST_ARGS:-}
fi
# shellcheck disable=SC2086
if wants unit_tests; then  # the CPU suite under this machine's torch build (it may differ from the CPU pin)
  unit=tests/unit
  [[ $DEV == cpu ]] && unit=tests/unit/ops/test_bench_attention.py  # plumbing only: CI runs the suite here
  run_step unit_tests "$LOG_DIR/unit_tests.xml" "$PY" -m pytest "$unit" -p no:cacheprovider \
    --junitxml "$LOG_DIR/unit_tests.xml" ${PYTEST_ARGS:-}
fi

# --- benchmarks ------------------------------------------------------------------------------------------------
if [[ $DEV == cpu ]]; then
  ATTN=(--seq-lens "256,512" --window 64 --repeats 1 --threads 1 --no-memory)
  ATTN_TORCH=("${ATTN[@]}")
  TRAIN=(--num-layers 1 --hidden-size 64 --num-attention-heads 4 --window-size 32 --seq-lengths 256 --steps 1
    --warmup 0 --isolate off)
elif ((QUICK)); then
  ATTN=(--dtype bf16 --seq-lens "4096,32768" --repeats 3)
  ATTN_TORCH=(--dtype bf16 --seq-lens "4096,32768" --repeats 3)
  TRAIN=(--bf16 --num-layers 4 --hidden-size 1024 --num-attention-heads 16 --window-size 256 --seq-lengths 8192
    --steps 5 --warmup 2)
else
  ATTN=(--dtype bf16 --seq-lens "1024,2048,4096,8192,16384,32768,65536,131072" --repeats 5)
  ATTN_TORCH=(--dtype bf16 --seq-lens "4096,16384,65536" --repeats 5)
  TRAIN=(--bf16 --num-layers 4 --hidden-size 1024 --num-attention-heads 16 --window-size 256
    --seq-lengths 4096 8192 16384 32768 --steps 10 --warmup 3)
fi
if wants bench_attention; then  # backend auto: flex on CUDA
  f=$OUT_DIR/bench_attention_${DEV}_bf16.json
  [[ $DEV == cpu ]] && f=$OUT_DIR/bench_attention_cpu.json
  run_step bench_attention "$f" "$PY" tools/bench_attention.py --device "$DEV" --backend auto "${ATTN[@]}" --json "$f"
fi
if wants bench_attention_torch; then  # the blockwise torch backend on the same device, for comparison
  f=$OUT_DIR/bench_attention_${DEV}_torch_backend.json
  run_step bench_attention_torch "$f" "$PY" tools/bench_attention.py --device "$DEV" --backend torch \
    "${ATTN_TORCH[@]}" --json "$f"
fi
if wants bench_train; then
  f=$OUT_DIR/bench_train_${DEV}.json
  run_step bench_train "$f" "$PY" tools/bench_train.py --device "$DEV" "${TRAIN[@]}" --json "$f"
fi
if wants bench_context_parallel; then
  tool=tools/bench_context_parallel.py
  if [[ ! -f $tool ]]; then
    skip_step bench_context_parallel "$tool not in this checkout"
  else
    help=$("$PY" "$tool" --help 2>&1)
    has() { grep -q -- "$1" <<<"$help"; }
    f=$OUT_DIR/bench_context_parallel_${DEV}.json
    args=()
    has --device && args+=(--device "$DEV")
    if has --output; then args+=(--output "$f"); elif has --json; then args+=(--json "$f"); fi
    gpus=$("$PY" -c "import torch; print(torch.cuda.device_count())")
    if [[ $DEV == cuda ]]; then  # NCCL needs one GPU per rank: only CP sizes that fit on this machine
      sizes=() c=1
      while ((c <= gpus && c <= 4)); do sizes+=("$c"); c=$((c * 2)); done
      has --cp-sizes && args+=(--cp-sizes "${sizes[@]}")
      has --longest-cp && args+=(--longest-cp "${sizes[-1]}")
    fi
    if [[ $DEV == cpu ]] || ((QUICK)); then
      has --scaling-length && args+=(--scaling-length 2048)
      has --balance-length && args+=(--balance-length 4096)
      has --longest-length && args+=(--longest-length 8192)
      has --repeats && args+=(--repeats 1)
    fi
    run_step bench_context_parallel "$f" "$PY" "$tool" ${args[@]+"${args[@]}"}
  fi
fi

# --- summary ---------------------------------------------------------------------------------------------------
tag=""
[[ -n $ONLY ]] && tag="_${ONLY//,/_}"
junit=()
for x in cuda_tests unit_tests; do
  wants "$x" && junit+=(--junit "$LOG_DIR/$x.xml")
done
"$PY" scripts/gpu_check_summary.py --steps "$STEPS_TSV" ${junit[@]+"${junit[@]}"} --env "$LOG_DIR/env.json" --device "$DEV" \
  --out "$OUT_DIR/gpu_check_summary${tag}.json"
