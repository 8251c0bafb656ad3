#!/usr/bin/env bash
# One prepared check for a session that has a CUDA GPU (H200 in this project).
#
#   1. pytest -m gpu tests/test_kernels_gpu.py     cupy backend parity (fp32/fp16/bf16)
#   2. benchmarks/lif.py                           T=4, N=4M: CPU + CUDA, every dtype
#      benchmarks/lif.py --devices cuda            N=64M: bandwidth-bound, launch overhead hidden
#   3. benchmarks/train_step.py                    MLP-SPE-T step per backend (224 px, bf16 AMP)
#
# Results (JSON + text logs) go to "${OUT:-.}". Each stage has its own time limit so a hang in
# one cannot eat the device budget; the script exits with the test stage's status.
# Needs torch (CUDA build), CuPy, pytest and numpy only: mixersnn never imports Ray, MLflow
# or webdataset.
#
#   OUT=/tmp/gpu bash benchmarks/gpu_check.sh
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-.}"
mkdir -p "$OUT"
if [ -n "${PYTHON:-}" ]; then PY="$PYTHON"
elif [ -x .venv/bin/python ]; then PY=.venv/bin/python
else PY=python3; fi

{
  echo "== $(date -u +%FT%TZ) $(hostname)"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.memory --format=csv 2>&1
  "$PY" - <<'EOF'
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
try:
    import cupy
    print("cupy", cupy.__version__, "devices", cupy.cuda.runtime.getDeviceCount())
except Exception as err:
    print("cupy unavailable:", err)
from mixersnn.neurons import available_backends
print("backends", available_backends())
EOF
} 2>&1 | tee "$OUT/gpu_env.txt"

echo "== 1. GPU parity tests"
timeout 360 "$PY" -m pytest -m gpu tests/test_kernels_gpu.py -q -p no:cacheprovider \
  --junitxml="$OUT/gpu_tests.xml" 2>&1 | tee "$OUT/gpu_tests.txt"
rc_tests=${PIPESTATUS[0]}

echo "== 2. LIF throughput"
timeout 150 "$PY" benchmarks/lif.py --json "$OUT/lif.json" 2>&1 | tee "$OUT/lif.txt"
timeout 90 "$PY" benchmarks/lif.py --devices cuda --numel 67108864 --repeats 10 \
  --copy-mib 2048 --json "$OUT/lif_64M.json" 2>&1 | tee "$OUT/lif_64M.txt"

echo "== 3. Training step"
timeout 180 "$PY" benchmarks/train_step.py --json "$OUT/train_step.json" 2>&1 \
  | tee "$OUT/train_step.txt"

echo "== done: tests exit status $rc_tests; results in $OUT"
exit "$rc_tests"
