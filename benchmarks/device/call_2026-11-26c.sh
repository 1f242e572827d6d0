# Device call 3 of the 2026-11-26 session: issue 12's 100-step 8B LoRA loss curve (patched vs HF + PEFT) and the
# compile GPU test cut by call b's cap on GPU 0; issue 12's long-context trials on GPU 1: with offload at the
# target 262,144 tokens, without offload at 147,456 (1.5x Liger's 98,304).
source benchmarks/device/setup.sh
(
  export CUDA_VISIBLE_DEVICES=0
  step 300 python examples/finetune_lora.py --size 8b --dtype bf16 --rank 16 --steps 100 --seq 2048 --batch 4 \
    --lr 1e-4 --gradient-checkpointing --compare --json $OUT/lora_curve.json
  step 190 python -m pytest -v -m gpu -p no:cacheprovider tests/test_compile.py
) > $OUT/gpu0.log 2>&1 &
(
  export CUDA_VISIBLE_DEVICES=1
  step 300 python benchmarks/bench_lora.py --variants "" --longctx --longctx-variants fastkern_offload \
    --longctx-budget 290 --json $OUT/lora_longctx_offload.json
  step 190 python benchmarks/bench_lora.py --variants "" --longctx --longctx-variants fastkern \
    --longctx-start 147456 --longctx-budget 180 --json $OUT/lora_longctx.json
) > $OUT/gpu1.log 2>&1 &
wait
