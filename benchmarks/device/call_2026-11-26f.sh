# Device call 3 of the second 2026-11-26 session, on a true H100 80 GB (nvidia-h100-x1; the two-GPU calls all got
# H200s): issue 7's e2e benchmark and no-checkpointing search (no cap: the card is the target's), and issue 12's
# 8B LoRA benchmark with the profile, so the ratios are restated on the card the issues name.
source benchmarks/device/setup.sh
nvidia-smi --query-gpu=name,memory.total --format=csv > $OUT/gpus.txt
step 150 python benchmarks/bench_e2e.py --profile --json $OUT/e2e.json
step 130 python benchmarks/bench_longctx.py --variants fastkern --start 62464 --grow 1.0625 --time-budget 120 \
  --json $OUT/longctx_nockpt.json
step 280 python benchmarks/bench_lora.py --timeout 100 --profile --variants sdpa,sdpa+liger,fastkern,fastkern_offload \
  --json $OUT/lora.json
