#!/usr/bin/env bash
# One batched GPU session: GPU tests + op benchmarks, results under $OUT (the device tool brings them back).
# Usage on the device:  bash benchmarks/run_device.sh [tests] [ops] [attention] [ce] [e2e] [longctx]
# Wheels for peers (liger-kernel, cut-cross-entropy) travel in .whl/ (see docs/benchmarks.md).
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=$PWD:/tmp/site
else
  export PYTHONPATH=$PWD
fi
parts=${*:-tests ops attention ce}
for p in $parts; do
  echo "=== $p $(date -u +%T)"
  case $p in
    tests) timeout 400 python3 -m pytest -q -m gpu -x -p no:cacheprovider tests 2>&1 | tee -a "$OUT/gpu_tests.log" | tail -40 ;;
    ops) for b in rms_norm layer_norm activations; do timeout 150 python3 benchmarks/bench_$b.py --json "$OUT/$b.json" 2>&1 | tail -30; done ;;
    attention) timeout 240 python3 benchmarks/bench_attention.py --json "$OUT/attention.json" 2>&1 | tail -40 ;;
    ce) timeout 200 python3 benchmarks/bench_cross_entropy.py --json "$OUT/cross_entropy.json" 2>&1 | tail -30 ;;
    e2e) timeout 400 python3 benchmarks/bench_e2e.py --json "$OUT/e2e.json" 2>&1 | tail -30 ;;
    longctx) timeout 550 python3 benchmarks/bench_longctx.py --json "$OUT/longctx.json" 2>&1 | tail -30 ;;
  esac
done
echo "=== done $(date -u +%T)"
