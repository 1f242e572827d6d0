"""Helpers every Triton kernel file shares: interpreter detection, the bf16-safe dot, launch-config filters.

Why the dot helper: Triton's CPU interpreter stores bf16 as raw 16-bit integers, so ``tl.dot`` on bf16
operands computes on bit patterns (triton #11584, #11604). Under ``TRITON_INTERPRET=1`` the helper upcasts
both operands to fp32 first; on the GPU it issues the native bf16/fp16 dot (wgmma on Hopper).
Every kernel also upcasts bf16 loads to fp32 before any elementwise arithmetic, for the same reason.
"""
from __future__ import annotations

import os
import sys

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
# Under pytest the autotune lists shrink to their quick configs (GPU tests check correctness, not speed).
# sys.modules, not PYTEST_CURRENT_TEST: kernels are imported during collection, before that variable is set.
UNDER_PYTEST = "pytest" in sys.modules or os.environ.get("HF_FASTKERN_QUICK_TUNE", "0") == "1"
# Read by @triton.jit code: a module-level constexpr is the supported way to branch on it at compile time.
IS_INTERPRET: tl.constexpr = tl.constexpr(INTERPRET)


@triton.jit
def mma(a, b, acc):
    """acc += a @ b, exact under the interpreter (fp32 operands there), native low precision on the GPU."""
    if IS_INTERPRET:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
    else:
        return tl.dot(a, b, acc)


TORCH_TO_TL = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


def tune_configs(full: list, quick: list | None = None) -> list:
    """The autotune list: the full list on a GPU, one (or the given quick) config under the interpreter/pytest."""
    if INTERPRET:
        return (quick or full)[:1]
    if UNDER_PYTEST and quick:
        return quick
    return full


def device_props(device: torch.device | None = None) -> dict:
    """Multiprocessor count and compute capability, cached per device (0 SMs on CPU)."""
    if device is None or device.type != "cuda":
        return {"sms": 1, "cc": (0, 0)}
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _PROPS:
        p = torch.cuda.get_device_properties(idx)
        _PROPS[idx] = {"sms": p.multi_processor_count, "cc": (p.major, p.minor)}
    return _PROPS[idx]


_PROPS: dict = {}
