# Device call 2 of the 2026-11-26 session (nvidia-h100-x2 or h200-x2): the fused RoPE attention forward and the
# reordered LoRA GEMMs on the GPU (tests, 8B LoRA benchmark, e2e profile) on GPU 0; issue 7's single
# `hf-fastkern bench all` run under a 500 s budget on GPU 1 (the package is on PYTHONPATH, not installed there).
source benchmarks/device/setup.sh
(
  export CUDA_VISIBLE_DEVICES=0
  step 170 python -m pytest -v -s -m gpu -p no:cacheprovider tests/test_rope.py tests/test_fused_lora.py \
    "tests/test_patch_archs.py::test_parity_bf16_gpu" tests/test_compile.py
  step 220 python benchmarks/bench_lora.py --timeout 100 --profile \
    --variants sdpa,sdpa+liger,fastkern,fastkern_offload --json $OUT/lora.json
  step 160 python benchmarks/bench_e2e.py --profile --json $OUT/e2e.json
) > $OUT/gpu0.log 2>&1 &
(
  export CUDA_VISIBLE_DEVICES=1
  step 570 python -m hf_fastkern.cli bench all --budget 500 --json $OUT/bench_all.json --out-dir $OUT/bench_all \
    --plot $OUT/bench_all.png
  tar czf $OUT/bench_all.tgz -C $OUT bench_all && rm -rf $OUT/bench_all
) > $OUT/gpu1.log 2>&1 &
wait
