# Device call 1 of the second 2026-11-26 session: the long-context targets at an H100's 80 GB, on whatever card
# comes (an H200's allocator capped to 79.2 GiB). GPU 1: issue 12's 8B LoRA searches, with offload from the
# target 262,144 and without from 147,456 (1.5x Liger's 98,304). GPU 0: issue 7's 1.5B searches on the code
# before the shared norm-output cast (the "before" of that change): no checkpointing from the H100's 54,272,
# and checkpointing with MLP chunks from 368,640.
source benchmarks/device/setup.sh
export HF_FASTKERN_BENCH_GPU_GIB=79.2
nvidia-smi --query-gpu=name,memory.total --format=csv > $OUT/gpus.txt
(
  export CUDA_VISIBLE_DEVICES=0
  step 230 python benchmarks/bench_longctx.py --variants fastkern --start 54272 --grow 1.125 --time-budget 220 \
    --json $OUT/longctx_nockpt_before.json
  step 290 python benchmarks/bench_longctx.py --variants fastkern_gc_chunk --start 368640 --time-budget 280 \
    --trial-timeout 270 --json $OUT/longctx_chunk_before.json
) > $OUT/gpu0.log 2>&1 &
(
  export CUDA_VISIBLE_DEVICES=1
  step 300 python benchmarks/bench_lora.py --variants "" --longctx --longctx-variants fastkern_offload \
    --longctx-budget 290 --json $OUT/lora_longctx_offload.json
  step 220 python benchmarks/bench_lora.py --variants "" --longctx --longctx-variants fastkern \
    --longctx-start 147456 --longctx-budget 210 --json $OUT/lora_longctx.json
) > $OUT/gpu1.log 2>&1 &
wait
