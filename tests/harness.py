"""Shared comparison harness: kernel vs fp64 oracle vs PyTorch's same-dtype result, forward and gradients."""
from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from tests.tolerances import assert_close


def _leaf(t, dtype=None):
    if not isinstance(t, torch.Tensor):
        return t
    t = t.detach().clone()
    if dtype is not None and t.is_floating_point():
        t = t.to(dtype)
    if t.is_floating_point():
        t.requires_grad_(True)
    return t


def check_op(kernel_fn: Callable, reference_fn: Callable, inputs: Sequence, dtype: torch.dtype,
             name: str = "", baseline_fn: Callable | None = None, grad_out: torch.Tensor | None = None,
             grads: bool = True) -> None:
    """Compare ``kernel_fn(*inputs)`` against ``reference_fn`` on fp64 copies (the oracle), with the
    same-dtype baseline ``baseline_fn`` (default: ``reference_fn`` on the same inputs), forward and the
    gradient of every floating-point input. Inputs are given in ``dtype`` already."""
    baseline_fn = baseline_fn or reference_fn
    k_in = [_leaf(t) for t in inputs]
    o_in = [_leaf(t, torch.float64) for t in inputs]
    b_in = [_leaf(t) for t in inputs]
    out = kernel_fn(*k_in)
    ref = reference_fn(*o_in)
    base = baseline_fn(*b_in)
    assert out.dtype == base.dtype, f"{name}: output dtype {out.dtype}, expected {base.dtype}"
    assert_close(out, ref, base, dtype, "output", f"{name} output")
    if not grads:
        return
    if grad_out is None:
        g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.device)
    else:
        g = grad_out
    out.backward(g.to(out.dtype))
    ref.backward(g.to(ref.dtype))
    base.backward(g.to(base.dtype))
    for i, (a, r, b) in enumerate(zip(k_in, o_in, b_in)):
        if isinstance(a, torch.Tensor) and a.requires_grad:
            assert a.grad is not None, f"{name}: no gradient reached input {i}"
            assert_close(a.grad, r.grad, b.grad, dtype, "grad", f"{name} grad[{i}]")


# ----------------------------------------------------------------------------------------------------------
# multi-process CPU launches (DDP / FSDP2 tests)

ROOT = Path(__file__).resolve().parent.parent


def cpu_launch_env() -> dict:
    """Environment of a child process that must run our kernels on the CPU: the interpreter on, one thread per
    process (two ranks share the CI's two cores), CUDA hidden even on a GPU machine, no forced reference."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1",
           "CUDA_VISIBLE_DEVICES": ""}
    env.pop("HF_FASTKERN_FORCE_REFERENCE", None)
    return env


def torchrun_module(module: str, nproc: int = 2, timeout: float = 240) -> tuple[int, str]:
    """``python -m torch.distributed.run --standalone --nproc_per_node N -m module`` on the CPU (gloo);
    returns (return code, stdout + stderr)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           "-m", module]
    proc = subprocess.run(cmd, env=cpu_launch_env(), capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    return proc.returncode, proc.stdout + proc.stderr
