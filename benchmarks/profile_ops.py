"""Where the time of a small fused op goes: GPU kernel time vs host (Python + launch) time, per implementation.

A do_bench median of a ~0.1 ms op is bounded below by whichever is longer: the kernels' GPU time or the host
time to issue them (the GPU idles while Python runs). This script separates the two for RMSNorm, LayerNorm and
SwiGLU at the issue-3 target shapes, for fastkern, Liger and torch.compile:
  bench_ms   do_bench median (what bench_*.py reports)
  gpu_ms     sum of CUDA kernel durations per call, from torch.profiler (every kernel the call launches)
  host_ms    wall time per call of a loop at a tiny shape (16 rows), GPU never the bottleneck
  kernels    the kernels one call launches, with their mean duration

    PYTHONPATH=. python benchmarks/profile_ops.py --json $OUT/profile_ops.json
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F

try:
    from hf_fastkern.benchmarks.bench_rms_norm import compiled, liger_import, raise_compile_limits
    from hf_fastkern.benchmarks.common import bench_ms, print_table, save
except ImportError:  # run as a script from a source checkout
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from benchmarks.bench_rms_norm import compiled, liger_import, raise_compile_limits
    from benchmarks.common import bench_ms, print_table, save

from hf_fastkern.kernels.activations import swiglu
from hf_fastkern.kernels.layer_norm import layer_norm
from hf_fastkern.kernels.rms_norm import rms_norm

COLS = ["op", "impl", "mode", "T", "bench_ms", "gpu_ms", "host_ms", "n_kernels"]


def _rms_torch(x, w):
    xf = x.float()
    return w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)).to(x.dtype)


def _ln_torch(x, w, b):
    return F.layer_norm(x, (x.shape[-1],), w, b, 1e-5)


def _swiglu_torch(g, u):
    return F.silu(g) * u


def _gpu_profile(fn, n: int = 10) -> tuple[float, list]:
    from torch.profiler import ProfilerActivity, profile
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            fn()
        torch.cuda.synchronize()
    kernels = [(e.key, e.device_time_total / n / 1e3, e.count / n) for e in prof.key_averages()
               if e.device_time_total > 0]
    kernels.sort(key=lambda k: -k[1])
    return sum(k[1] for k in kernels), [(name[:90], round(ms, 4), cnt) for name, ms, cnt in kernels[:8]]


def _host_ms(fn, n: int = 200) -> float:
    for _ in range(10):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / n * 1e3


def _cases(T: int, dev: str = "cuda", bf=torch.bfloat16):
    """(op, {impl: (make_inputs(T) -> (args, grads_of)), fn})"""
    H, I = 4096, 14336

    def rms_in(t):
        x = torch.randn(t, H, device=dev, dtype=bf, requires_grad=True)
        w = torch.ones(H, device=dev, dtype=bf, requires_grad=True)
        return (x, w), torch.randn(t, H, device=dev, dtype=bf)

    def ln_in(t):
        x = torch.randn(t, H, device=dev, dtype=bf, requires_grad=True)
        w = torch.ones(H, device=dev, dtype=bf, requires_grad=True)
        b = torch.zeros(H, device=dev, dtype=bf, requires_grad=True)
        return (x, w, b), torch.randn(t, H, device=dev, dtype=bf)

    def glu_in(t):
        g = torch.randn(t, I, device=dev, dtype=bf, requires_grad=True)
        u = torch.randn(t, I, device=dev, dtype=bf, requires_grad=True)
        return (g, u), torch.randn(t, I, device=dev, dtype=bf)

    rms = {"fastkern": lambda x, w: rms_norm(x, w, 1e-6), "compile": compiled(_rms_torch, ("p", H))}
    liger_rms = liger_import("liger_kernel.ops.rms_norm:LigerRMSNormFunction")
    if liger_rms is not None:
        rms["liger"] = lambda x, w: liger_rms.apply(x, w, 1e-6, 0.0, "llama", False)
    ln = {"fastkern": lambda x, w, b: layer_norm(x, w, b, 1e-5), "compile": compiled(_ln_torch, ("p", H))}
    liger_ln = liger_import("liger_kernel.ops.layer_norm:LigerLayerNormFunction")
    if liger_ln is not None:
        ln["liger"] = lambda x, w, b: liger_ln.apply(x, w, b, 1e-5)
    glu = {"fastkern": swiglu, "compile": compiled(_swiglu_torch, ("p", I))}
    liger_glu = liger_import("liger_kernel.ops.swiglu:LigerSiLUMulFunction")
    if liger_glu is not None:
        glu["liger"] = liger_glu.apply
    return [("rms_norm", rms_in, rms, 16384), ("layer_norm", ln_in, ln, 16384), ("swiglu", glu_in, glu, 16384)]


def run() -> list[dict]:
    raise_compile_limits()
    rows = []
    for op, make, impls, T in _cases(16384):
        for impl, fn in impls.items():
            for mode in ("fwd", "fwd+bwd"):
                row = dict(op=op, impl=impl, mode=mode, T=T)
                try:
                    for t, key in ((T, "big"), (16, "tiny")):
                        args, dy = make(t)

                        def call(args=args, dy=dy, fn=fn, mode=mode, impl=impl):
                            out = fn(*args)
                            if mode == "fwd+bwd":
                                out.backward(dy.clone() if impl == "liger" else dy)
                            return out

                        if key == "big":
                            row["bench_ms"] = bench_ms(call, grad_to_none=list(args))
                            row["gpu_ms"], row["kernels"] = _gpu_profile(call)
                            row["n_kernels"] = sum(k[2] for k in row["kernels"])
                        else:
                            row["host_ms"] = _host_ms(call)
                        for a in args:
                            a.grad = None
                        del args, dy
                except Exception as e:
                    row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
                rows.append(row)
                print_table([row], COLS)
                if row.get("kernels"):
                    for k in row["kernels"]:
                        print("     ", k)
        torch.cuda.empty_cache()
    return rows


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("profile_ops.py needs a GPU")
    rows = run()
    print_table(rows, COLS)
    save(args.json, rows)
