#!/usr/bin/env bash
# One prepared check for a session that has a CUDA GPU (H200 in this project), under 7 minutes
# in all: every stage has its own time limit (sum: 435 s) so a hang in one cannot eat the
# device budget, and each writes its results before the next starts.
#
#   0. environment (20 s)
#   1. pytest -m gpu tests/test_kernels_gpu.py tests/test_compile.py     (110 s)
#        cupy backend parity (fp32/fp16/bf16); the LIF custom op on CUDA = the cupy backend;
#        the traced model under bf16 autocast = eager
#   2. benchmarks/lif.py, T=4, N=4M, CPU + CUDA, every dtype              (45 s)
#   3. benchmarks/train_step.py, MLP-SPE-T 224 px, bf16 autocast, full step (images/s):
#        a. reference (torch LIF) vs cupy eager                           (60 s)
#        b. reference vs compiled block by block, and vs CUDA graphs
#           (mode="reduce-overhead") block by block                       (110 s)
#        c. reference vs the whole model as one compiled graph            (90 s)
#
# Results (JSON + text logs) go to "${OUT:-.}". The script exits with the test stage's status.
# Needs torch (CUDA build, with Triton for the compiled stages), CuPy, pytest and numpy only:
# mixersnn never imports Ray, MLflow or webdataset.
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
  timeout 20 "$PY" - <<'EOF'
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
timeout 110 "$PY" -m pytest -m gpu tests/test_kernels_gpu.py tests/test_compile.py -q -p no:cacheprovider \
  --junitxml="$OUT/gpu_tests.xml" 2>&1 | tee "$OUT/gpu_tests.txt"
rc_tests=${PIPESTATUS[0]}

echo "== 2. LIF throughput"
timeout 45 "$PY" benchmarks/lif.py --json "$OUT/lif.json" 2>&1 | tee "$OUT/lif.txt"

echo "== 3. Training step, 224 px, bf16 autocast"
STEP=(benchmarks/train_step.py --cuda-only --repeats 5 --warmup 1)
timeout 60 "$PY" "${STEP[@]}" --cuda-variants reference eager --json "$OUT/train_step_eager.json" 2>&1 \
  | tee "$OUT/train_step_eager.txt"
timeout 110 "$PY" "${STEP[@]}" --cuda-variants reference compiled-blocks cudagraphs \
  --json "$OUT/train_step_compiled_blocks.json" 2>&1 | tee "$OUT/train_step_compiled_blocks.txt"
timeout 90 "$PY" "${STEP[@]}" --cuda-variants reference compiled --json "$OUT/train_step_compiled.json" 2>&1 \
  | tee "$OUT/train_step_compiled.txt"

echo "== done: tests exit status $rc_tests; results in $OUT"
exit "$rc_tests"
