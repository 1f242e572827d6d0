"""RMSNorm benchmark: fastkern rms_norm vs torch eager, torch.compile and Liger's LigerRMSNorm, one process.

Run on the GPU:  python -m benchmarks.bench_rms_norm --json $OUT/rms_norm.json [--quick]

Rows: bf16, Llama order, weight [hidden] bf16 with grad, hidden 2048/4096/8192 x tokens 4096/16384/65536;
mode "fwd" (y = norm(x), x requiring grad) and "fwd+bwd" (``norm(x).backward(dy)``, dx and dW).
Bytes (as anchors/gpu_anchors.py): fwd reads x, writes y: 2*T*H*e; fwd+bwd adds the backward's read of x
and dy and write of dx: (2 + 3)*T*H*e (e = element size; weight traffic ignored). GB/s = bytes / median time.
Each implementation is gated on correctness first (output, dx and dW against the fp32 reference, bound
2x eager's bf16 error + one bf16 rounding); a row that fails carries ``error`` and no timing.

Two times per row: ``ms`` is do_bench's median (what a training step sees, host time included: at ~0.1 ms per
call the GPU idles while the slow device host issues the next call) and ``gpu_ms`` the CUDA kernel time of
one call from torch.profiler (every kernel the call launches; .grad reset between calls so the gradient-
accumulation adds of repeated backwards do not count). ``GBps_gpu`` = bytes / gpu_ms is the kernels'
bandwidth; ``vs_best_peer_gpu`` compares kernel time as ``vs_best_peer`` compares do_bench time.
The issue-3 target shape runs first, and ``--budget-s`` stops before a shape that would not finish in time
(``skipped_shapes`` in the JSON), so a run cut by its time limit still has the rows that matter.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from hf_fastkern.kernels import reference
from hf_fastkern.kernels.rms_norm import rms_norm

from . import harness
from .harness import (
    COLUMNS,
    Budget,
    compiled,
    finish,
    gate,
    op_main,
    peer_import,
    print_table,
    raise_compile_limits,
    run_grads,
    time_impl,
)

HIDDEN = (2048, 4096, 8192)
TOKENS = (4096, 16384, 65536)
TARGET = (16384, 4096)  # (tokens, hidden) of issue 3: timed first
QUICK = [(64, 128)]  # (tokens, hidden): CPU, fallback path, seconds
# ----------------------------------------------------------------------------------------------------------
# RMSNorm


def _rms_torch(x: torch.Tensor, w: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    # what LlamaRMSNorm computes
    xf = x.float()
    return w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def _impls(hidden: int, dtype: torch.dtype, device: str, gpu: bool) -> dict[str, Callable | str]:
    impls: dict[str, Callable | str] = {"torch": _rms_torch, "fastkern": lambda x, w: rms_norm(x, w, 1e-6)}
    if gpu:
        impls["compile"] = compiled(_rms_torch, hidden)
        liger_cls = peer_import("liger_kernel.transformers:LigerRMSNorm")
        if liger_cls is None:
            impls["liger"] = "liger_kernel is not installed"
        else:
            mod = liger_cls(hidden, eps=1e-6).to(device, dtype)
            # Liger's module reads self.weight: make it our (leaf) weight tensor so dW lands on it
            del mod.weight

            def liger(x, w, mod=mod):
                mod.__dict__["weight"] = w
                return mod(x)

            impls["liger"] = liger
    return impls


def run(quick: bool = False, budget_s: float | None = None) -> list[dict]:
    device = harness.device()
    gpu = device == "cuda"
    dtype = torch.bfloat16
    raise_compile_limits()
    shapes = QUICK if quick else [TARGET] + [(t, h) for h in HIDDEN for t in TOKENS if (t, h) != TARGET]
    rows: list[dict] = []
    budget = Budget(budget_s)
    for tokens, hidden in shapes:
        if not budget.allows({"op": "rms_norm", "T": tokens, "H": hidden}):
            continue
        x = torch.randn(tokens, hidden, device=device, dtype=dtype)
        w = (1 + 0.1 * torch.randn(hidden, device=device)).to(dtype)
        dy = torch.randn(tokens, hidden, device=device, dtype=dtype)
        x.requires_grad_()
        w.requires_grad_()
        oracle = run_grads(lambda x, w: reference.rms_norm(x, w.float()), [x.float(), w.float()], dy.float())
        impls = _impls(hidden, dtype, device, gpu)
        results, failed = {}, {}
        for name, fn in impls.items():
            if isinstance(fn, str):
                failed[name] = fn
                continue
            try:
                results[name] = run_grads(fn, [x, w], dy)
            except Exception as e:  # a peer that cannot run this shape is reported, not fatal
                failed[name] = f"{type(e).__name__}: {str(e)[:200]}"
        verdict = gate(results, oracle)
        del oracle, results
        e = x.element_size()
        for name, fn in impls.items():
            row = {"bench": "rms_norm", "op": "rms_norm", "impl": name, "dtype": "bf16", "T": tokens, "H": hidden}
            if name in failed or not verdict[name][1]:
                why = failed.get(name) or f"failed correctness gate (max err {verdict[name][0]:.3g})"
                rows += [dict(row, mode=m, error=why) for m in ("fwd", "fwd+bwd")]
                continue
            # Liger's backward writes dx into dy (in place): give it its own dy
            g = dy.clone() if name == "liger" else dy
            rows += time_impl(dict(row, max_err=verdict[name][0]), lambda fn=fn, x=x, w=w: fn(x, w),
                              lambda fn=fn, x=x, w=w, g=g: fn(x, w).backward(g), [x, w], 2 * tokens * hidden * e,
                              5 * tokens * hidden * e, ("2*T*H*e", "(2+3)*T*H*e"))
            print_table(rows[-2:], COLUMNS)
        del x, w, dy
        if gpu:
            torch.cuda.empty_cache()
    return finish(rows)


if __name__ == "__main__":
    op_main(run, __doc__)
