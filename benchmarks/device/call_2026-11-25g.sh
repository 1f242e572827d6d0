# Device call 3 of the third 2026-11-25 session (nvidia-h100-x2).
source benchmarks/device/setup.sh
step 70 python -m pytest -v -m gpu -p no:cacheprovider tests/test_fsdp.py > $OUT/both.log 2>&1
(
  export CUDA_VISIBLE_DEVICES=0
  step 150 python -m pytest -v -m gpu -p no:cacheprovider tests/test_offload.py::test_offload_saves_gpu_memory \
    tests/test_rms_norm.py tests/test_layer_norm.py tests/test_activations.py tests/test_patch_archs.py
  step 330 python benchmarks/bench_e2e.py --profile --json $OUT/e2e.json
) > $OUT/gpu0.log 2>&1 &
(
  export CUDA_VISIBLE_DEVICES=1
  step 470 python benchmarks/bench_longctx.py --variants fastkern,fastkern_gc,fastkern_gc_offload --time-budget 440 \
    --trial-timeout 150 --json $OUT/longctx.json
) > $OUT/gpu1.log 2>&1 &
wait
