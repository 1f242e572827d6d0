"""Helpers every Triton kernel file shares: interpreter detection, the bf16-safe dot and rounding, host-side
ceil division, launch-config filters, the low-overhead autotuned launch and the persistent grid.

Why the dot helper: Triton's CPU interpreter stores bf16 as raw 16-bit integers, so ``tl.dot`` on bf16
operands computes on bit patterns (triton #11584, #11604). Under ``TRITON_INTERPRET=1`` the helper upcasts
both operands to fp32 first; on the GPU it issues the native bf16/fp16 dot (wgmma on Hopper).
Every kernel also upcasts bf16 loads to fp32 before any elementwise arithmetic, for the same reason.
"""
from __future__ import annotations

import inspect
import os
import sys
from typing import Optional

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


# Autotuning: what one config's benchmark costs. triton.autotune's default (25 ms warm-up + 100 ms of timed
# repeats per config) makes every new autotune key (a new sequence-length bucket, a new hidden size) a pause of
# 1.5-2 s for the attention kernels' 14 configs, which a ragged SFT batch meets inside training (issue 24). The
# kernels tuned here run 0.01-5 ms, so 25 ms of repeats still times each config 5-2500 times.
TUNE_WARMUP_MS, TUNE_REP_MS = 5, 25
_AUTOTUNE_PARAMS = set(inspect.signature(triton.autotune).parameters)


def _tune_bench(kernel_call, quantiles):
    return triton.testing.do_bench(kernel_call, warmup=TUNE_WARMUP_MS, rep=TUNE_REP_MS, quantiles=quantiles)


# HF_FASTKERN_AUTOTUNE_CACHE=0 (read when the kernels are imported): no tunings on disk, each process tunes again
AUTOTUNE_CACHE = os.environ.get("HF_FASTKERN_AUTOTUNE_CACHE", "1") != "0"


def autotune(configs: list, key: list, **kwargs):
    """``triton.autotune`` with the package's benchmark budget per config (``TUNE_WARMUP_MS``/``TUNE_REP_MS``)
    and, where the installed Triton has it (3.4+) and ``AUTOTUNE_CACHE`` allows, ``cache_results``: the timings
    are kept in Triton's cache directory (``TRITON_CACHE_DIR``, default ``~/.triton/cache``), keyed by the
    kernel's source, the GPU architecture, the configs and the autotune key, so a later process with the same
    shapes starts without tuning. Hooks that make repeated benchmark launches unsafe to replay from disk
    (``reset_to_zero``, ``restore_value``, ``pre_hook``) are refused: no kernel of ours needs them."""
    for hook in ("reset_to_zero", "restore_value", "pre_hook"):
        if kwargs.get(hook):
            raise ValueError(f"autotune: {hook} is not supported here (tunings are cached on disk)")
    if "do_bench" in _AUTOTUNE_PARAMS:
        kwargs.setdefault("do_bench", _tune_bench)
    if "cache_results" in _AUTOTUNE_PARAMS and AUTOTUNE_CACHE:
        kwargs.setdefault("cache_results", True)
    return triton.autotune(configs=configs, key=key, **kwargs)


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


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for host code: ``triton.cdiv`` is a constexpr function in recent Triton, whose call wrapper
    costs ~3 us per host call (triton 3.9), a visible share of a small op's launch path."""
    return -(-a // b)


@triton.jit
def round_to(x, dtype: tl.constexpr):
    """fp32 -> dtype, round-to-nearest-even. On the GPU that is ``x.to(dtype)``; Triton's CPU interpreter
    truncates fp32 -> bf16 instead (triton 3.9), so there the rounding is done on the bits first and the
    truncating cast is then exact. Keeps the interpreter's bf16 results equal to PyTorch's."""
    if IS_INTERPRET:
        if dtype == tl.bfloat16:
            b = x.to(tl.uint32, bitcast=True)
            b = b + 0x7FFF + ((b >> 16) & 1)
            x = ((b >> 16) << 16).to(tl.float32, bitcast=True)
    return x.to(dtype)


# Most programs per SM a persistent backward may run (rms_norm, layer_norm): sizes the partial buffers.
MAX_PROGS_PER_SM = 8


class TunedLaunch:
    """An ``@triton.autotune`` kernel launched with less host time per call.

    The first launch for a ``key`` goes through the autotuner, which benchmarks its configs (once per
    autotuner key) and runs the winner; the config it ran is remembered under ``key`` and later launches call
    the jit function with it directly. That skips the autotuner's per-call Python (an argument dict, a key
    tuple holding every tensor argument's dtype string, a fresh config-kwargs dict): with the launch itself
    stubbed out, 4.9 us through the autotuner vs 1.3 us direct on the CI CPU (triton 3.9), several times
    that on the slower H100 host.
    ``key`` must determine the autotuner's key (its ``key`` arguments and the dtype of every tensor argument),
    so that the remembered config is the one the autotuner would pick for that launch.
    """

    def __init__(self, kernel) -> None:
        self.kernel = kernel
        self.jit = kernel.fn  # JITFunction on the GPU, InterpretedFunction under TRITON_INTERPRET=1
        self._chosen: dict = {}

    def chosen(self, key) -> Optional[dict]:
        """The config kwargs (e.g. ``{"PROGS_PER_SM": 2, "num_warps": 8, ...}``) used for ``key``, or None
        before the first launch with that key."""
        return self._chosen.get(key)

    def __call__(self, key, grid, *args, **constexprs) -> dict:
        """Launch ``kernel[grid](*args, **constexprs)``; returns the config kwargs it ran with."""
        cfg = self._chosen.get(key)
        if cfg is not None:
            self.jit.run(*args, grid=grid, warmup=False, **constexprs, **cfg)
            return cfg
        self.kernel[grid](*args, **constexprs)
        cfg = self._chosen[key] = self.kernel.best_config.all_kwargs()
        return cfg


def persistent_grid(launcher: TunedLaunch, key, n_tiles: int, sms: int):
    """(programs, grid) of a persistent backward with a ``PROGS_PER_SM`` config (rms_norm, layer_norm):
    ``programs`` sizes the per-program partial buffers. Before the first launch for ``key`` the autotuner tries
    several PROGS_PER_SM, so the buffers are sized for the largest and the grid follows each candidate."""
    cfg = launcher.chosen(key)
    if cfg is None:
        return min(n_tiles, sms * MAX_PROGS_PER_SM), (lambda meta: (min(n_tiles, sms * meta["PROGS_PER_SM"]),))
    n_prog = min(n_tiles, sms * cfg["PROGS_PER_SM"])
    return n_prog, (n_prog,)
