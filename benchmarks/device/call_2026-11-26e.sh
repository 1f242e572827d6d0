# Device call 2 of the second 2026-11-26 session. GPU 0: the shared autocast cast (hf_fastkern/shared_cast.py) on
# the GPU (its tests, bf16 parity), the LoRA GEMM-order and loss-chunk micro benchmark (why the fused LoRA
# step's GEMM class is 56 ms above HF + PEFT's), and the e2e benchmark with the shared cast. GPU 1: issue 7's
# no-checkpointing search at 80 GB (79.2 GiB cap) from the target 67,584, then the compile GPU test.
source benchmarks/device/setup.sh
export HF_FASTKERN_BENCH_GPU_GIB=79.2
nvidia-smi --query-gpu=name,memory.total --format=csv > $OUT/gpus.txt
(
  export CUDA_VISIBLE_DEVICES=0
  step 150 python -m pytest -v -m gpu -p no:cacheprovider tests/test_shared_cast.py \
    "tests/test_patch_archs.py::test_parity_bf16_gpu" tests/test_rope.py
  step 120 python benchmarks/bench_lora_gemm.py --json $OUT/lora_gemm.json
  unset HF_FASTKERN_BENCH_GPU_GIB
  step 160 python benchmarks/bench_e2e.py --profile --json $OUT/e2e.json
) > $OUT/gpu0.log 2>&1 &
(
  export CUDA_VISIBLE_DEVICES=1
  step 230 python benchmarks/bench_longctx.py --variants fastkern --start 67584 --grow 1.125 --time-budget 220 \
    --json $OUT/longctx_nockpt_after.json
  step 240 python -m pytest -v -m gpu -p no:cacheprovider tests/test_compile.py
) > $OUT/gpu1.log 2>&1 &
wait
