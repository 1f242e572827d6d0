"""RMSNorm benchmark: fastkern rms_norm vs torch eager, torch.compile and Liger's LigerRMSNorm, one process.

Run on the GPU:  PYTHONPATH=. python benchmarks/bench_rms_norm.py --json $OUT/rms_norm.json [--quick]

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
This file also holds the small shared helpers of bench_layer_norm.py and bench_activations.py.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
import time
import types
from collections.abc import Callable

import torch

try:
    from hf_fastkern.benchmarks.common import add_ratios, bench_ms, peak_mib, print_table, save
except ImportError:  # run as a script from a source checkout
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from benchmarks.common import add_ratios, bench_ms, peak_mib, print_table, save

from hf_fastkern.kernels import reference
from hf_fastkern.kernels.rms_norm import rms_norm

HIDDEN = (2048, 4096, 8192)
TOKENS = (4096, 16384, 65536)
TARGET = (16384, 4096)  # (tokens, hidden) of issue 3: timed first
QUICK = [(64, 128)]  # (tokens, hidden): CPU, fallback path, seconds
COLUMNS = ["op", "impl", "T", "H", "I", "mode", "ms", "gpu_ms", "GBps", "GBps_gpu", "peak_MiB", "vs_best_peer",
           "vs_best_peer_gpu", "max_err", "error"]
# do_bench budget per row (ms of repeated calls): 50 ms still gives >= 50 samples for a 1 ms call, and keeps
# each op grid (up to 9 shapes x 4 implementations x 2 modes) within about a minute with compile and autotuning.
WARMUP_MS, REP_MS = 10, 50
# calls per torch.profiler window for gpu_ms (kernel durations are stable; the window costs host time only)
PROFILE_CALLS = 5
# default --budget-s of the op scripts: stop starting new shapes after this (device runs give each ~60 s)
DEFAULT_BUDGET_S = 50.0
# one bf16 rounding, relative to the largest reference value (tests/tolerances.py's floor)
BF16_ROUNDING = 2.0**-7


# ----------------------------------------------------------------------------------------------------------
# shared helpers


def raise_compile_limits() -> None:
    """One compiled graph per benchmarked shape: dynamo's default recompile limit (8) would silently drop
    torch.compile back to eager half-way through the shape grid."""
    cfg = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit",
                 "accumulated_cache_size_limit"):
        if hasattr(cfg, name):
            setattr(cfg, name, max(getattr(cfg, name), 256))


_COMPILED: dict = {}


def compiled(fn: Callable, key) -> Callable:
    """``torch.compile(fn)`` with its own dynamo cache per ``key`` (e.g. the hidden size): a fresh code object,
    so each hidden size gets static-width kernels while the token count may go dynamic after its first
    shape (automatic dynamic), which keeps the compile time of a 9-shape grid within the GPU budget."""
    if (fn, key) not in _COMPILED:
        code = fn.__code__.replace(co_name=f"{fn.__name__}_{key}")
        f = types.FunctionType(code, fn.__globals__, code.co_name, fn.__defaults__, fn.__closure__)
        _COMPILED[(fn, key)] = torch.compile(f)
    return _COMPILED[(fn, key)]


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item() if a.numel() else 0.0


def run_grads(fn: Callable, inputs: list[torch.Tensor], dy: torch.Tensor) -> list[torch.Tensor]:
    """[output, grad of every input] of one forward + backward (inputs get fresh leaves)."""
    leaves = [t.detach().clone().requires_grad_(t.requires_grad) for t in inputs]
    out = fn(*leaves)
    # a copy: Liger's in-place backwards overwrite dy with dx
    out.backward(dy.to(out.dtype, copy=True))
    return [out.detach()] + [t.grad for t in leaves if t.requires_grad]


def gate(results: dict[str, list[torch.Tensor]], oracle: list[torch.Tensor], base: str = "torch") -> dict:
    """impl -> (max error, ok): every tensor within 2x ``base``'s error + one bf16 rounding of the oracle."""
    verdict = {}
    base_errs = [max_err(a, o) for a, o in zip(results[base], oracle)]
    for impl, res in results.items():
        errs = [max_err(a, o) for a, o in zip(res, oracle)]
        bounds = [2 * be + BF16_ROUNDING * o.float().abs().max().item() for be, o in zip(base_errs, oracle)]
        verdict[impl] = (max(errs), all(e <= b for e, b in zip(errs, bounds)))
    return verdict


def kernel_table(fn: Callable, leaves: list[torch.Tensor], n: int = PROFILE_CALLS) -> list[tuple[str, float, float]]:
    """[(kernel name, ms per call, launches per call)] of ``fn``, longest first: every kernel, memset and copy
    torch.profiler records over ``n`` calls (CUDA). ``.grad`` of ``leaves`` is set to None before each call
    (host-only), so a backward writes its gradients instead of adding them to the previous call's."""
    from torch.profiler import ProfilerActivity, profile

    for t in leaves:
        t.grad = None
    fn()  # outside the window: nothing lazy (allocator growth, autotuning) is counted
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            for t in leaves:
                t.grad = None
            fn()
        torch.cuda.synchronize()
    for t in leaves:
        t.grad = None
    # with only CUDA activity recorded, every event with device time is a kernel/memset/memcpy
    rows = [(e.key, e.device_time_total / n / 1e3, e.count / n) for e in prof.key_averages() if e.device_time_total > 0]
    return sorted(rows, key=lambda r: -r[1])


def gpu_kernel_ms(fn: Callable, leaves: list[torch.Tensor], n: int = PROFILE_CALLS) -> float | None:
    """CUDA kernel time of one call of ``fn`` (ms): the sum of :func:`kernel_table`; None without CUDA."""
    if not torch.cuda.is_available():
        return None
    return sum(ms for _, ms, _ in kernel_table(fn, leaves, n))


def time_impl(row: dict, fwd: Callable, fwdbwd: Callable, leaves: list[torch.Tensor], bytes_fwd: int,
              bytes_fwdbwd: int, formula: tuple[str, str]) -> list[dict]:
    """Two rows (fwd, fwd+bwd) of one implementation: do_bench median ``ms`` and ``GBps``, profiler kernel
    time ``gpu_ms`` and ``GBps_gpu`` (None on CPU), peak MiB."""
    rows = []
    for mode, fn, nbytes, form in (("fwd", fwd, bytes_fwd, formula[0]), ("fwd+bwd", fwdbwd, bytes_fwdbwd, formula[1])):
        r = dict(row, mode=mode)
        ms = bench_ms(fn, grad_to_none=leaves, warmup=WARMUP_MS, rep=REP_MS)
        for t in leaves:
            t.grad = None
        gpu = gpu_kernel_ms(fn, leaves)
        r.update(ms=ms, gpu_ms=gpu, GBps=nbytes / ms / 1e6, GBps_gpu=(nbytes / gpu / 1e6) if gpu else None,
                 bytes_formula=form, peak_MiB=peak_mib(fn))
        for t in leaves:
            t.grad = None
        rows.append(r)
    PARTIAL.extend(rows)
    return rows


# Rows timed so far in this process. main() saves them when a time limit stops the run (SIGTERM from
# `timeout`): the 2026-11-25 device run lost all three op tables that way, keeping only a log tail.
PARTIAL: list[dict] = []
# Shapes a run left out because its --budget-s was spent (saved in the JSON as skipped_shapes).
SKIPPED: list[dict] = []

GROUP_KEYS = ["op", "T", "H", "I", "mode"]


def finish(rows: list[dict]) -> list[dict]:
    add_ratios(rows, GROUP_KEYS)
    # the same ratio on kernel time: best peer gpu_ms / ours
    groups: dict = {}
    for r in rows:
        groups.setdefault(tuple(r.get(k) for k in GROUP_KEYS), []).append(r)
    for rs in groups.values():
        peers = [r["gpu_ms"] for r in rs if r.get("impl") != "fastkern" and r.get("gpu_ms")]
        for r in rs:
            if r.get("impl") == "fastkern" and r.get("gpu_ms") and peers:
                r["vs_best_peer_gpu"] = min(peers) / r["gpu_ms"]
    return rows


class Budget:
    """Stops a shape grid before a shape that would overrun ``seconds`` (None: no limit), judged by the
    longest shape so far, so a run under a device time limit ends with its JSON written and says what it
    left out."""

    def __init__(self, seconds: float | None) -> None:
        self.seconds = seconds
        self.t0 = time.monotonic()
        self.last = self.t0
        self.longest = 0.0

    def allows(self, what: dict) -> bool:
        now = time.monotonic()
        self.longest = max(self.longest, now - self.last)
        self.last = now
        if self.seconds is None or now - self.t0 + self.longest <= self.seconds:
            return True
        SKIPPED.append(what)
        print(f"budget: {self.seconds:.0f} s would be exceeded, skipping {what}")
        return False


def liger_import(what: str):
    """A Liger Kernel attribute ``module:name``, or None when Liger is not installed (or lacks it)."""
    mod, name = what.split(":")
    try:
        return getattr(__import__(mod, fromlist=[name]), name)
    except Exception:
        return None


def main(run: Callable[..., list[dict]], doc: str) -> None:
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--json", default=None, help="write rows + environment here")
    ap.add_argument("--quick", action="store_true", help="tiny sizes (CPU: the fallback path, seconds)")
    ap.add_argument("--budget-s", type=float, default=DEFAULT_BUDGET_S,
                    help="start no shape that would end after this many seconds (0: no limit)")
    args = ap.parse_args()
    if args.json:
        def _save_partial(signum, frame):
            save(args.json, finish(list(PARTIAL)),
                 {"partial": True, "stopped_by_signal": signum, "skipped_shapes": SKIPPED})
            sys.exit(124)
        signal.signal(signal.SIGTERM, _save_partial)
    rows = run(quick=args.quick or not torch.cuda.is_available(), budget_s=args.budget_s or None)
    print_table(rows, COLUMNS)
    save(args.json, rows, {"skipped_shapes": SKIPPED} if SKIPPED else None)


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
        liger_cls = liger_import("liger_kernel.transformers:LigerRMSNorm")
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
    gpu = torch.cuda.is_available()
    device = "cuda" if gpu else "cpu"
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
    main(run, __doc__)
