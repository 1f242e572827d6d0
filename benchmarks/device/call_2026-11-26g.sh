# Device call 4 of the second 2026-11-26 session (one H100 80 GB): the GPU tests call e's cap cut (phi3 bf16
# parity, rope), and whether the offload variant's 1 x 8192 slowdown in call f (950.9 vs 853.7 ms) depends on
# running after 4 x 2048 in the same process: 1 x 8192 alone, then 1 x 8192 before 4 x 2048.
source benchmarks/device/setup.sh
nvidia-smi --query-gpu=name,memory.total --format=csv > $OUT/gpus.txt
step 200 python -m pytest -v -m gpu -p no:cacheprovider "tests/test_patch_archs.py::test_parity_bf16_gpu[phi3]" \
  tests/test_rope.py tests/test_shared_cast.py
step 120 python benchmarks/bench_lora.py --timeout 110 --profile --variants fastkern_offload --shapes 1x8192 \
  --json $OUT/lora_offload_8192_alone.json
step 150 python benchmarks/bench_lora.py --timeout 140 --variants fastkern_offload,fastkern --shapes 1x8192,4x2048 \
  --json $OUT/lora_offload_8192_first.json
