# Device call of the second 2026-11-26 session (one H100 80 GB): is the offload variant's slow 1 x 8192 (call f)
# the change of shape or the torch.profiler session that ran on 4 x 2048 just before? First 4 x 2048 then
# 1 x 8192 without --profile; then the 4-variant LoRA benchmark again with the profiles moved after every
# shape's timed steps (bench_lora.worker), so that no timing follows a profiler session.
source benchmarks/device/setup.sh
nvidia-smi --query-gpu=name,memory.total --format=csv > $OUT/gpus.txt
step 120 python benchmarks/bench_lora.py --timeout 110 --variants fastkern_offload --shapes 4x2048,1x8192 \
  --json $OUT/lora_offload_2048_first.json
step 300 python benchmarks/bench_lora.py --timeout 100 --profile --variants sdpa,sdpa+liger,fastkern,fastkern_offload \
  --json $OUT/lora.json
