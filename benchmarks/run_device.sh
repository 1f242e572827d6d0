#!/usr/bin/env bash
# One batched GPU session: GPU tests + benchmarks, results under $OUT (the device tool brings them back).
# Usage on the device:  bash benchmarks/run_device.sh [tests] [ops] [ce] [attention] [e2e]
# Peer wheels (liger-kernel, cut-cross-entropy) travel in .whl/ (see docs/benchmarks.md). Each part has its
# own time limit so one slow part cannot starve the rest; pytest gets SIGINT so it still prints its summary.
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=$PWD:/tmp/site
else
  export PYTHONPATH=$PWD
fi
T_TESTS=${T_TESTS:-160} T_E2E=${T_E2E:-200}
# kernel files first, then integration, then the heavy ones: a cut run still covers the kernels
GPU_TESTS="tests/test_rms_norm.py tests/test_layer_norm.py tests/test_activations.py tests/test_cross_entropy.py
 tests/test_patch_loss.py tests/test_patch_attention.py tests/test_patch_archs.py tests/test_trainer.py
 tests/test_peft.py tests/test_recompute.py tests/test_compile.py tests/test_attention.py
 tests/test_patch_apply.py"
parts=${*:-tests ops ce e2e}
for p in $parts; do
  echo "=== $p $(date -u +%T)"
  case $p in
    tests) timeout -s INT "$T_TESTS" python3 -m pytest -q -m gpu -p no:cacheprovider -rfE --durations=15 $GPU_TESTS 2>&1 | tee "$OUT/gpu_tests.log" | tail -45 ;;
    ops) timeout 65 python3 benchmarks/bench_rms_norm.py --json "$OUT/rms_norm.json" 2>&1 | tail -22
         timeout 50 python3 benchmarks/bench_activations.py --json "$OUT/activations.json" 2>&1 | tail -22
         timeout 45 python3 benchmarks/bench_layer_norm.py --json "$OUT/layer_norm.json" 2>&1 | tail -22 ;;
    ce) timeout 75 python3 benchmarks/bench_cross_entropy.py --quick --json "$OUT/cross_entropy.json" 2>&1 | tail -22 ;;
    attention) timeout 240 python3 benchmarks/bench_attention.py --json "$OUT/attention.json" 2>&1 | tail -40 ;;
    e2e) timeout "$T_E2E" python3 benchmarks/bench_e2e.py --timeout 110 --json "$OUT/e2e.json" 2>&1 | tail -25 ;;
  esac
done
echo "=== done $(date -u +%T)"
