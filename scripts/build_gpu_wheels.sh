#!/usr/bin/env bash
# Collect, into wheels/ (gitignored), everything scripts/gpu_check.sh installs offline on a GPU machine that has
# torch + CUDA, triton, sentencepiece, tensorboard and numpy but no DeepSpeed and no network. Run it HERE (a
# machine that reaches PyPI), then carry wheels/ to the GPU machine with the checkout.
#
#   bash scripts/build_gpu_wheels.sh            # pure-Python wheels + binary wheels for CPython 3.10-3.13, x86_64
#   GPU_PYTHON_VERSIONS="3.12" GPU_ARCH=aarch64 bash scripts/build_gpu_wheels.sh
#
# Versions are those installed here (the combination the test suite passes with); never torch itself.
# Idempotent: a wheel already in wheels/ is not fetched again. Total size stays far under 64 MiB.
set -euo pipefail
cd "$(dirname "$0")/.." || exit 2
PY=${PYTHON:-python3}
OUT=${WHEEL_DIR:-wheels}
PYVERS=${GPU_PYTHON_VERSIONS:-"3.10 3.11 3.12 3.13"}
ARCH=${GPU_ARCH:-x86_64}
mkdir -p "$OUT"

# DeepSpeed's install requirements (deepspeed/requirements/requirements.txt: einops hjson msgpack ninja numpy
# packaging psutil py-cpuinfo pydantic>=2 torch tqdm) minus torch/numpy/packaging (on the GPU machine already),
# pydantic's own dependencies, the project's safetensors/tqdm, and pytest with the plugins pytest.ini uses.
PURE="deepspeed hjson pydantic annotated-types typing-inspection typing-extensions einops py-cpuinfo tqdm packaging
pytest pytest-timeout pluggy iniconfig pygments exceptiongroup tomli"
BINARY="pydantic-core msgpack psutil safetensors ninja"

# The version installed here, or the newest one when a package is absent (exceptiongroup/tomli: only < 3.11).
pin() {
  "$PY" - "$1" <<'EOF'
import importlib.metadata as md, sys
try:
    print(f"{sys.argv[1]}=={md.version(sys.argv[1])}")
except md.PackageNotFoundError:
    print(sys.argv[1])
EOF
}

pipq() {  # pip, quiet, without the noise of index mirrors that lack a package
  "$PY" -m pip "$@" -q 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
}

have() {  # is a wheel of this distribution (any version) already in $OUT?
  local stem=${1//-/_}
  compgen -G "$OUT/${stem}-*.whl" >/dev/null || compgen -G "$OUT/${1}-*.whl" >/dev/null
}

failed=()
for name in $PURE; do
  spec=$(pin "$name")
  if [[ $name == deepspeed ]]; then
    have deepspeed && continue
    # DeepSpeed ships an sdist only: build a pure-Python wheel (no CUDA ops; they are JIT-built on first use).
    DS_BUILD_OPS=0 pipq wheel --no-deps --no-build-isolation -w "$OUT" "$spec" || failed+=("$spec")
    continue
  fi
  have "$name" && continue
  # py3-none-any only (tomli also ships mypyc-compiled wheels that would tie it to one CPython)
  pipq download --no-deps --only-binary=:all: -d "$OUT" --python-version 3.10 --implementation py --abi none \
    --platform any "$spec" || failed+=("$spec")
done

for v in $PYVERS; do
  abi="cp${v//./}"
  for name in $BINARY; do
    spec=$(pin "$name")
    # one wheel per CPython version (abi3 / py3-none wheels are shared and fetched once)
    pipq download --no-deps --only-binary=:all: -d "$OUT" --python-version "$v" --implementation cp \
      --abi "$abi" --abi abi3 --abi none --platform "manylinux_2_17_$ARCH" --platform "manylinux2014_$ARCH" \
      --platform "manylinux_2_28_$ARCH" --platform "manylinux_2_5_$ARCH" --platform "manylinux1_$ARCH" \
      "$spec" || failed+=("$spec (python $v)")
  done
done

echo "wheels in $OUT/: $(find "$OUT" -name '*.whl' | wc -l) files, $(du -sh "$OUT" | cut -f1)"
ls "$OUT"
if ((${#failed[@]})); then
  printf 'could not fetch: %s\n' "${failed[@]}" >&2
  exit 1
fi
