"""Where the time of a small fused op goes: GPU kernel time vs host (Python + launch) time, per implementation.

A do_bench median of a ~0.1 ms op is bounded below by whichever is longer: the kernels' GPU time or the host
time to issue them (the GPU idles while Python runs). This script separates the two for RMSNorm, LayerNorm and
SwiGLU at the issue-3 target shapes, for fastkern, Liger and torch.compile:
  bench_ms   do_bench median (what bench_*.py reports)
  gpu_ms     sum of CUDA kernel durations per call, from torch.profiler (every kernel the call launches)
  host_ms    wall time per call of a loop at a tiny shape (16 rows), GPU never the bottleneck
  kernels    the kernels one call launches, with their mean duration
.grad is reset to None before every profiled call, so a fwd+bwd row's gpu_ms holds no gradient-accumulation
adds (the first device run, 2026-11-25b, counted them).

``--cpu-host`` (no GPU needed) measures our wrappers' own host cost on this CPU: TRITON_INTERPRET=1 with the
interpreter's launch stubbed out, so what is timed is the Python and torch work around the launches (checks,
allocations, autograd, the launch path up to Triton's run). Per op it reports the wall time per call, the
launches per call, the top-level aten ops per call (torch.profiler, CPU) and the autograd nodes of the output.
The GPU-side launch cost (Triton's argument binding, the driver call) is not in it.

    python -m benchmarks.profile_ops --json $OUT/profile_ops.json
    python -m benchmarks.profile_ops --cpu-host [--json host.json]
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from hf_fastkern.kernels.activations import swiglu
from hf_fastkern.kernels.layer_norm import layer_norm
from hf_fastkern.kernels.rms_norm import rms_norm

from .harness import (
    bench_ms,
    compiled,
    kernel_table,
    peer_import,
    print_table,
    raise_compile_limits,
    save,
)
from .host_overhead import (
    autograd_node_names,
    per_call_us,
    stubbed_launches,
    top_level_aten,
)

COLS = ["op", "impl", "mode", "T", "bench_ms", "gpu_ms", "host_ms", "n_kernels"]


def _rms_torch(x, w):
    xf = x.float()
    return w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)).to(x.dtype)


def _ln_torch(x, w, b):
    return F.layer_norm(x, (x.shape[-1],), w, b, 1e-5)


def _swiglu_torch(g, u):
    return F.silu(g) * u


def _gpu_profile(fn, leaves: list[torch.Tensor], n: int = 10) -> tuple[float, list]:
    kernels = kernel_table(fn, leaves, n)
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
    liger_rms = peer_import("liger_kernel.ops.rms_norm:LigerRMSNormFunction")
    if liger_rms is not None:
        rms["liger"] = lambda x, w: liger_rms.apply(x, w, 1e-6, 0.0, "llama", False)
    ln = {"fastkern": lambda x, w, b: layer_norm(x, w, b, 1e-5), "compile": compiled(_ln_torch, ("p", H))}
    liger_ln = peer_import("liger_kernel.ops.layer_norm:LigerLayerNormFunction")
    if liger_ln is not None:
        ln["liger"] = lambda x, w, b: liger_ln.apply(x, w, b, 1e-5)
    glu = {"fastkern": swiglu, "compile": compiled(_swiglu_torch, ("p", I))}
    liger_glu = peer_import("liger_kernel.ops.swiglu:LigerSiLUMulFunction")
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
                            row["gpu_ms"], row["kernels"] = _gpu_profile(call, list(args))
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


# ----------------------------------------------------------------------------------------------------------
# --cpu-host: our wrappers' host cost with the launches stubbed out (TRITON_INTERPRET=1, no GPU)

CPU_HOST_COLS = ["op", "shape", "fwd_us", "fwdbwd_us", "launches", "aten_fwd", "aten_fwdbwd", "graph"]


def _top_aten(fn) -> list[str]:
    """Names of the aten ops one call of fn runs at top level (not those nested in another aten op)."""
    return [e.name[len("aten::"):] for e in top_level_aten(fn)]


def cpu_host() -> list[dict]:
    from hf_fastkern.kernels.activations import geglu

    launches = [0]
    bf = torch.bfloat16
    H, I = 4096, 14336
    x = torch.randn(16, H, dtype=bf, requires_grad=True)
    x3 = torch.randn(2, 8, H, dtype=bf, requires_grad=True)
    w = torch.ones(H, dtype=bf, requires_grad=True)
    b = torch.zeros(H, dtype=bf, requires_grad=True)
    dy = torch.randn(16, H, dtype=bf)
    g = torch.randn(16, I, dtype=bf, requires_grad=True)
    u = torch.randn(16, I, dtype=bf, requires_grad=True)
    dyg = torch.randn(16, I, dtype=bf)
    cases = [("rms_norm", "16x4096", lambda: rms_norm(x, w, 1e-6), (x, w), dy),
             ("rms_norm", "2x8x4096", lambda: rms_norm(x3, w, 1e-6), (x3, w), dy.view(2, 8, H)),
             ("layer_norm", "16x4096", lambda: layer_norm(x, w, b, 1e-5), (x, w, b), dy),
             ("layer_norm", "2x8x4096", lambda: layer_norm(x3, w, b, 1e-5), (x3, w, b), dy.view(2, 8, H)),
             ("swiglu", "16x14336", lambda: swiglu(g, u), (g, u), dyg),
             ("geglu_tanh", "16x14336", lambda: geglu(g, u, "tanh"), (g, u), dyg)]
    torch.set_num_threads(1)
    rows = []
    with stubbed_launches(launches):
        for op, shape, f, leaves, d in cases:
            def fwdbwd(f=f, leaves=leaves, d=d):
                f().backward(d)
                for t in leaves:
                    t.grad = None

            launches[0] = 0
            f()
            n_fwd = launches[0]
            launches[0] = 0
            fwdbwd()
            n_fwdbwd = launches[0]
            rows.append(dict(op=op, shape=shape, fwd_us=per_call_us(f, 200, 15),
                             fwdbwd_us=per_call_us(fwdbwd, 200, 15), launches=f"{n_fwd}/{n_fwdbwd}",
                             aten_fwd=_top_aten(f), aten_fwdbwd=_top_aten(fwdbwd), graph=autograd_node_names(f())))
            print_table(rows[-1:], CPU_HOST_COLS)
    return rows


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json")
    ap.add_argument("--cpu-host", action="store_true", help="our wrappers' host cost on this CPU (no GPU)")
    args = ap.parse_args()
    if args.cpu_host:
        if os.environ.get("TRITON_INTERPRET") != "1":
            # the kernel modules read TRITON_INTERPRET when imported: rerun this script with it set
            sys.exit(subprocess.call([sys.executable, "-m", __spec__.name] + sys.argv[1:], env=dict(os.environ, TRITON_INTERPRET="1")))
        rows = cpu_host()
        print_table(rows, CPU_HOST_COLS)
        save(args.json, rows)
        sys.exit(0)
    if not torch.cuda.is_available():
        sys.exit("profile_ops.py needs a GPU (or --cpu-host)")
    rows = run()
    print_table(rows, COLS)
    save(args.json, rows)
