# Device call 2 of the third 2026-11-25 session (nvidia-h100-x2).
source benchmarks/device/setup.sh
{
  # both GPUs: the FSDP2 row that crashed last time (attention pinned to the Triton kernel, as the DDP/single
  # fastkern rows of benchmarks/results/h100/multi_gpu.json were measured), and the 2-GPU tests
  HF_FASTKERN_ATTENTION=triton step 150 python benchmarks/bench_multi_gpu.py --impls fastkern --modes fsdp2 --no-single \
    --json $OUT/multi_gpu_fsdp2.json
  step 70 python -m pytest -v -m gpu -p no:cacheprovider tests/test_fsdp.py tests/test_ddp.py
} > $OUT/both.log 2>&1
(
  export CUDA_VISIBLE_DEVICES=0
  step 190 python -m pytest -v -m gpu -p no:cacheprovider --durations=10 tests/test_huge.py \
    "tests/test_patch_attention.py::test_gpu_auto_backend_routes_dense_on_hopper" tests/test_offload.py \
    tests/test_lora_fast.py tests/test_peft.py tests/test_cli.py
  step 175 python examples/finetune_trainer.py --size 1b --steps 200 --seq 512 --lr 5e-5 --warmup-steps 20 \
    --profile-steps 30,33 --compare --json $OUT/convergence_1b.json
) > $OUT/gpu0.log 2>&1 &
(
  export CUDA_VISIBLE_DEVICES=1
  step 200 python benchmarks/bench_lora.py --timeout 90 --profile --json $OUT/lora.json
  HF_FASTKERN_ATTENTION=triton step 90 python benchmarks/bench_lora.py --timeout 85 --profile --variants fastkern \
    --json $OUT/lora_triton_attention.json
) > $OUT/gpu1.log 2>&1 &
wait
