import os

import pytest
import torch

if not torch.cuda.is_available():
    # Every Triton kernel executes in the CPU interpreter when there is no GPU (CI, laptops).
    os.environ.setdefault("TRITON_INTERPRET", "1")
    # One intra-op thread for the tests' tiny CPU tensors, here and in the processes they launch: with two,
    # every small op waits for both OpenMP threads, 2-8x slower per op once the 2 cores are shared (a second
    # test process, other load); issue 20. The comparisons are within one process, so the thread count is theirs.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)

# The patched models' tests check our attention kernel: on Hopper the default ("auto") would hand the plain
# dense case to SDPA/cuDNN (hf_fastkern.patches.attention). tests/test_patch_attention.py tests "auto" itself.
os.environ.setdefault("HF_FASTKERN_ATTENTION", "triton")
# Likewise the routing tables (hf_fastkern.kernels.routing) would send small GPU test sizes to PyTorch: the GPU
# tests check the kernels. tests/test_routing.py tests the tables themselves.
os.environ.setdefault("HF_FASTKERN_ROUTING", "kernel")

if os.environ.get("TRITON_INTERPRET") == "1":
    # imported after the environment above: tests.harness imports the kernels, which read it at import
    from tests.harness import interpreter_skips_repeated_lang_patching

    interpreter_skips_repeated_lang_patching()


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run `pytest -m gpu` on the device)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def device():
    """Where kernel tests run: CUDA when present, else the CPU (kernels need TRITON_INTERPRET=1 there)."""
    return "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def free_cuda_memory():
    """Huge-size tests (GPU): free the cache before; after, synchronize to surface an illegal memory access inside
    the test that caused it, and free again before the next case."""
    torch.cuda.empty_cache()
    yield
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    torch.cuda.empty_cache()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


_FAIL_LOG = os.environ.get("HF_FASTKERN_FAIL_LOG")


def pytest_runtest_logreport(report):
    """With ``HF_FASTKERN_FAIL_LOG=path``, each failure's traceback is appended to that file as it happens (also
    under pytest-xdist), so a GPU run stopped by the device's time limit still says what failed and why."""
    if _FAIL_LOG and report.failed:
        with open(_FAIL_LOG, "a") as f:
            f.write(f"==== {report.nodeid} ({report.when})\n{report.longreprtext}\n")
