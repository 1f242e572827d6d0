"""SwiGLU / GeGLU activation benchmark: fastkern vs torch eager, torch.compile and Liger, one process.

Run on the GPU:  python -m benchmarks.bench_activations --json $OUT/activations.json [--quick]

Rows: bf16 gate and up [T, I] (both with grad): swiglu ``silu(g) * u`` vs Liger's LigerSiLUMulFunction,
geglu_tanh ``gelu_tanh(g) * u`` vs Liger's LigerGELUMulFunction (tanh form), geglu_erf (no Liger form) and
swiglu on the two halves of one fused [T, 2I] gate_up tensor (``swiglu_fused``); shapes (T, I) =
(16384, 14336) (the target), (4096, 14336), (16384, 8192).
Bytes (as anchors/gpu_anchors.py): fwd reads g, u and writes y: 3*T*I*e; fwd+bwd adds the backward's reads
of g, u, dy and writes of dg, du: (3 + 5)*T*I*e. Correctness-gated like bench_rms_norm.py; do_bench ``ms``
and profiler kernel time ``gpu_ms`` per row and ``--budget-s``: as bench_rms_norm.py (the target shape is the
first of each op).
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from hf_fastkern.kernels import reference
from hf_fastkern.kernels.activations import geglu, swiglu

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

SHAPES = [(16384, 14336), (4096, 14336), (16384, 8192)]
QUICK = [(64, 256)]


def _swiglu_torch(g, u):
    return F.silu(g) * u


def _geglu_tanh_torch(g, u):
    return F.gelu(g, approximate="tanh") * u


def _geglu_erf_torch(g, u):
    return F.gelu(g) * u


def _fused(fn: Callable) -> Callable:
    """The op on the two halves of one fused [T, 2I] tensor (what a fused gate_up projection produces)."""
    return lambda gu: fn(*gu.chunk(2, dim=-1))


# op -> (oracle, ours, torch eager, Liger "module:name" or None, input layout)
OPS = {
    "swiglu": (reference.swiglu, swiglu, _swiglu_torch, "liger_kernel.ops.swiglu:LigerSiLUMulFunction", "pair"),
    "geglu_tanh": (lambda g, u: reference.geglu(g, u, "tanh"), lambda g, u: geglu(g, u, "tanh"), _geglu_tanh_torch,
                   "liger_kernel.ops.geglu:LigerGELUMulFunction", "pair"),
    "geglu_erf": (reference.geglu, geglu, _geglu_erf_torch, None, "pair"),
    "swiglu_fused": (reference.swiglu, swiglu, _swiglu_torch, "liger_kernel.ops.swiglu:LigerSiLUMulFunction",
                     "fused"),
}


def _impls(op: str, key, gpu: bool) -> dict[str, Callable | str]:
    oracle, ours, eager, liger, layout = OPS[op]
    impls: dict[str, Callable | str] = {"torch": eager, "fastkern": ours}
    if gpu:
        impls["compile"] = compiled(eager, f"{op}_{key}")
        if liger is not None:
            fn = peer_import(liger)
            impls["liger"] = (lambda g, u, fn=fn: fn.apply(g, u)) if fn is not None else "liger_kernel is not installed"
    if layout == "fused":
        impls = {k: (_fused(v) if callable(v) else v) for k, v in impls.items()}
        if gpu:
            # compile the split too, as a user compiling the MLP would
            impls["compile"] = compiled(_fused_swiglu_torch, key)
    return impls


def _fused_swiglu_torch(gu):
    g, u = gu.chunk(2, dim=-1)
    return F.silu(g) * u


def run(quick: bool = False, budget_s: float | None = None) -> list[dict]:
    device = harness.device()
    gpu = device == "cuda"
    dtype = torch.bfloat16
    raise_compile_limits()
    rows: list[dict] = []
    budget = Budget(budget_s)
    for op, (oracle_fn, *_rest, layout) in OPS.items():
        shapes = QUICK if quick else (SHAPES if op in ("swiglu", "geglu_tanh") else SHAPES[:1])
        for tokens, inter in shapes:
            if not budget.allows({"op": op, "T": tokens, "I": inter}):
                continue
            if layout == "fused":
                inputs = [torch.randn(tokens, 2 * inter, device=device, dtype=dtype).requires_grad_()]
                oracle_call = _fused(oracle_fn)
            else:
                inputs = [torch.randn(tokens, inter, device=device, dtype=dtype).requires_grad_() for _ in range(2)]
                oracle_call = oracle_fn
            dy = torch.randn(tokens, inter, device=device, dtype=dtype)
            oracle = run_grads(oracle_call, [t.float() for t in inputs], dy.float())
            impls = _impls(op, inter, gpu)
            results, failed = {}, {}
            for name, fn in impls.items():
                if isinstance(fn, str):
                    failed[name] = fn
                    continue
                try:
                    results[name] = run_grads(fn, inputs, dy)
                except Exception as e:
                    failed[name] = f"{type(e).__name__}: {str(e)[:200]}"
            verdict = gate(results, oracle)
            del oracle, results
            e = dy.element_size()
            for name, fn in impls.items():
                row = {"bench": "activations", "op": op, "impl": name, "dtype": "bf16", "T": tokens, "I": inter}
                if name in failed or not verdict[name][1]:
                    why = failed.get(name) or f"failed correctness gate (max err {verdict[name][0]:.3g})"
                    rows += [dict(row, mode=m, error=why) for m in ("fwd", "fwd+bwd")]
                    continue
                rows += time_impl(dict(row, max_err=verdict[name][0]), lambda fn=fn, ins=inputs: fn(*ins),
                                  lambda fn=fn, ins=inputs, g=dy: fn(*ins).backward(g), inputs,
                                  3 * tokens * inter * e, 8 * tokens * inter * e, ("3*T*I*e", "(3+5)*T*I*e"))
                print_table(rows[-2:], COLUMNS)
            del inputs, dy
            if gpu:
                torch.cuda.empty_cache()
    return finish(rows)


if __name__ == "__main__":
    op_main(run, __doc__)
