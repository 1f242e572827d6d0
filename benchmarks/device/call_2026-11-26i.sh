# Last device call of the second 2026-11-26 session (one H100 80 GB): issue 7's single `hf-fastkern bench all`
# run on the targets' card (the last full one ran on an H200), with the current kernels (shared cast, fused RoPE).
source benchmarks/device/setup.sh
nvidia-smi --query-gpu=name,memory.total --format=csv > $OUT/gpus.txt
step 560 python -m hf_fastkern.cli bench all --budget 470 --json $OUT/bench_all.json --out-dir $OUT/bench_all \
  --plot $OUT/bench_all.png
tar czf $OUT/bench_all.tgz -C $OUT bench_all && rm -rf $OUT/bench_all
