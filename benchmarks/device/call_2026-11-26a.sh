# Device call 1 of the 2026-11-26 session (nvidia-h100-x2): the fused LoRA linear on the GPU (tests + the 8B
# LoRA benchmark), issue 7's checkpointed long context with the MLP in chunks, the GPU tests still owed, and
# what the per-call label check costs end to end.
source benchmarks/device/setup.sh
(
  export CUDA_VISIBLE_DEVICES=0
  step 150 python -m pytest -v -s -m gpu -p no:cacheprovider tests/test_fused_lora.py tests/test_fused_mlp.py \
    tests/test_lora_fast.py
  step 390 python benchmarks/bench_lora.py --timeout 95 --profile \
    --variants sdpa,sdpa+liger,fastkern,fastkern_offload --json $OUT/lora.json
) > $OUT/gpu0.log 2>&1 &
(
  export CUDA_VISIBLE_DEVICES=1
  step 255 python benchmarks/bench_longctx.py --variants fastkern_gc_chunk --start 368640 --grow 1.25 \
    --time-budget 245 --trial-timeout 240 --json $OUT/longctx_chunk.json
  step 170 python -m pytest -v -m gpu -p no:cacheprovider tests/test_activations.py tests/test_patch_attention.py \
    tests/test_rms_norm.py "tests/test_patch_archs.py::test_parity_bf16_gpu[phi3]"
  step 70 python benchmarks/bench_e2e.py --variants fastkern --steps 20 --json $OUT/e2e_labelcheck_on.json
  (export HF_FASTKERN_SKIP_LABEL_CHECK=1; step 70 python benchmarks/bench_e2e.py --variants fastkern --steps 20 \
    --json $OUT/e2e_labelcheck_off.json)
) > $OUT/gpu1.log 2>&1 &
wait
