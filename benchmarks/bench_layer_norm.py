"""LayerNorm benchmark: fastkern layer_norm vs torch eager, torch.compile and Liger's LigerLayerNorm, one process.

Run on the GPU:  python -m benchmarks.bench_layer_norm --json $OUT/layer_norm.json [--quick]

Rows: bf16 x, bf16 weight and bias with grad, hidden 2048/4096/8192 x tokens 4096/16384/65536; modes "fwd"
and "fwd+bwd" (dx, dW, dB). Bytes: fwd 2*T*H*e, fwd+bwd (2 + 3)*T*H*e (as bench_rms_norm.py).
Correctness-gated like bench_rms_norm.py (output and all three gradients vs the fp32 reference); do_bench
``ms`` and profiler kernel time ``gpu_ms`` per row, target shape first, ``--budget-s``: as bench_rms_norm.py.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from hf_fastkern.kernels import reference
from hf_fastkern.kernels.layer_norm import layer_norm

from . import harness
from .bench_rms_norm import TARGET
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
QUICK = [(64, 128)]
EPS = 1e-5


def _ln_torch(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    # what nn.LayerNorm does on bf16 parameters and activations (cuDNN/ATen kernel, fp32 statistics)
    return F.layer_norm(x, (x.shape[-1],), w, b, EPS)


def _impls(hidden: int, dtype: torch.dtype, device: str, gpu: bool) -> dict[str, Callable | str]:
    impls: dict[str, Callable | str] = {"torch": _ln_torch, "fastkern": lambda x, w, b: layer_norm(x, w, b, EPS)}
    if gpu:
        impls["compile"] = compiled(_ln_torch, hidden)
        liger_cls = peer_import("liger_kernel.transformers:LigerLayerNorm")
        if liger_cls is None:
            impls["liger"] = "liger_kernel is not installed"
        else:
            mod = liger_cls(hidden, eps=EPS, bias=True).to(device, dtype)
            # the module reads self.weight / self.bias: make them our leaf tensors so the grads land there
            del mod.weight
            del mod.bias

            def liger(x, w, b, mod=mod):
                mod.__dict__["weight"] = w
                mod.__dict__["bias"] = b
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
        if not budget.allows({"op": "layer_norm", "T": tokens, "H": hidden}):
            continue
        x = (torch.randn(tokens, hidden, device=device) + 0.5).to(dtype).requires_grad_()
        w = (1 + 0.1 * torch.randn(hidden, device=device)).to(dtype).requires_grad_()
        b = (0.1 * torch.randn(hidden, device=device)).to(dtype).requires_grad_()
        dy = torch.randn(tokens, hidden, device=device, dtype=dtype)
        oracle = run_grads(reference.layer_norm, [x.float(), w.float(), b.float()], dy.float())
        impls = _impls(hidden, dtype, device, gpu)
        results, failed = {}, {}
        for name, fn in impls.items():
            if isinstance(fn, str):
                failed[name] = fn
                continue
            try:
                results[name] = run_grads(fn, [x, w, b], dy)
            except Exception as e:
                failed[name] = f"{type(e).__name__}: {str(e)[:200]}"
        verdict = gate(results, oracle)
        del oracle, results
        e = x.element_size()
        for name, fn in impls.items():
            row = {"bench": "layer_norm", "op": "layer_norm", "impl": name, "dtype": "bf16", "T": tokens, "H": hidden}
            if name in failed or not verdict[name][1]:
                why = failed.get(name) or f"failed correctness gate (max err {verdict[name][0]:.3g})"
                rows += [dict(row, mode=m, error=why) for m in ("fwd", "fwd+bwd")]
                continue
            g = dy.clone() if name == "liger" else dy
            rows += time_impl(dict(row, max_err=verdict[name][0]), lambda fn=fn, x=x, w=w, b=b: fn(x, w, b),
                              lambda fn=fn, x=x, w=w, b=b, g=g: fn(x, w, b).backward(g), [x, w, b],
                              2 * tokens * hidden * e, 5 * tokens * hidden * e, ("2*T*H*e", "(2+3)*T*H*e"))
            print_table(rows[-2:], COLUMNS)
        del x, w, b, dy
        if gpu:
            torch.cuda.empty_cache()
    return finish(rows)


if __name__ == "__main__":
    op_main(run, __doc__)
