# Sourced at the start of every device call (see docs/device_log.md): the package is not installed there,
# carried wheels (liger-kernel, cut-cross-entropy) go to /tmp/site, and tests import hf_fastkern.benchmarks.
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl 2>&1 | tail -2
export PYTHONPATH=$PWD:/tmp/site
[ -e hf_fastkern/benchmarks ] || ln -s ../benchmarks hf_fastkern/benchmarks
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 PYTHONUNBUFFERED=1
step() { local secs=$1; shift; echo "=== $(date +%T) [$secs s] $*"; timeout "$secs" "$@"; echo "=== rc=$? $(date +%T)"; }
