# Device call 1 of the third 2026-11-25 session (nvidia-h100-x2): GPU tests of the interpreter-only paths and
# the owed benchmarks, two independent streams, one per GPU.
source benchmarks/device/setup.sh
nvidia-smi --query-gpu=name,memory.total --format=csv > $OUT/gpu0.log
(
  export CUDA_VISIBLE_DEVICES=0
  step 330 python -m pytest -v -m gpu -p no:cacheprovider --durations=15 tests/test_attention.py tests/test_cross_entropy.py \
    tests/test_fused_mlp.py tests/test_patch_attention.py tests/test_patch_loss.py tests/test_compile.py \
    tests/test_determinism.py tests/test_huge.py tests/test_trainer.py tests/test_cli.py tests/test_offload.py \
    tests/test_lora_fast.py tests/test_peft.py tests/test_activations.py tests/test_rms_norm.py \
    tests/test_layer_norm.py tests/test_patch_archs.py
  step 80 python benchmarks/bench_rms_norm.py --budget-s 55 --json $OUT/rms_norm.json
  step 150 python examples/finetune_trainer.py --size 1b --steps 200 --seq 512 --lr 1e-4 --compare --json $OUT/convergence_1b.json
) >> $OUT/gpu0.log 2>&1 &
(
  export CUDA_VISIBLE_DEVICES=1
  step 110 python benchmarks/convergence.py --arch llama --json $OUT/convergence_llama.json --plot $OUT/convergence_llama.png
  step 420 python benchmarks/bench_lora.py --timeout 150 --json $OUT/lora.json
) > $OUT/gpu1.log 2>&1 &
wait
