"""RMSNorm benchmark: fastkern rms_norm vs torch eager, torch.compile and Liger's LigerRMSNorm, one process.

Run on the GPU:  PYTHONPATH=. python benchmarks/bench_rms_norm.py --json $OUT/rms_norm.json [--quick]

Rows: bf16, Llama order, weight [hidden] bf16 with grad, hidden 2048/4096/8192 x tokens 4096/16384/65536;
mode "fwd" (y = norm(x), x requiring grad) and "fwd+bwd" (``norm(x).backward(dy)``, dx and dW).
Bytes (as anchors/gpu_anchors.py): fwd reads x, writes y: 2*T*H*e; fwd+bwd adds the backward's read of x
and dy and write of dx: (2 + 3)*T*H*e (e = element size; weight traffic ignored). GB/s = bytes / median time.
Each implementation is gated on correctness first (output, dx and dW against the fp32 reference, bound
2x eager's bf16 error + one bf16 rounding); a row that fails carries ``error`` and no timing.
This file also holds the small shared helpers of bench_layer_norm.py and bench_activations.py.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
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
QUICK = [(64, 128)]  # (tokens, hidden): CPU, fallback path, seconds
COLUMNS = ["op", "impl", "T", "H", "I", "mode", "ms", "GBps", "peak_MiB", "vs_best_peer", "max_err", "error"]
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


def time_impl(row: dict, fwd: Callable, fwdbwd: Callable, leaves: list[torch.Tensor], bytes_fwd: int,
              bytes_fwdbwd: int, formula: tuple[str, str]) -> list[dict]:
    """Two rows (fwd, fwd+bwd) with the median ms, GB/s and peak MiB of one implementation."""
    rows = []
    for mode, fn, nbytes, form in (("fwd", fwd, bytes_fwd, formula[0]), ("fwd+bwd", fwdbwd, bytes_fwdbwd, formula[1])):
        r = dict(row, mode=mode)
        ms = bench_ms(fn, grad_to_none=leaves)
        for t in leaves:
            t.grad = None
        r.update(ms=ms, GBps=nbytes / ms / 1e6, bytes_formula=form, peak_MiB=peak_mib(fn))
        for t in leaves:
            t.grad = None
        rows.append(r)
    PARTIAL.extend(rows)
    return rows


# Rows timed so far in this process. main() saves them when a time limit stops the run (SIGTERM from
# `timeout`): the 2026-11-25 device run lost all three op tables that way, keeping only a log tail.
PARTIAL: list[dict] = []


def finish(rows: list[dict]) -> list[dict]:
    add_ratios(rows, ["op", "T", "H", "I", "mode"])
    return rows


def liger_import(what: str):
    """A Liger Kernel attribute ``module:name``, or None when Liger is not installed (or lacks it)."""
    mod, name = what.split(":")
    try:
        return getattr(__import__(mod, fromlist=[name]), name)
    except Exception:
        return None


def main(run: Callable[[bool], list[dict]], doc: str) -> None:
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--json", default=None, help="write rows + environment here")
    ap.add_argument("--quick", action="store_true", help="tiny sizes (CPU: the fallback path, seconds)")
    args = ap.parse_args()
    if args.json:
        def _save_partial(signum, frame):
            save(args.json, finish(list(PARTIAL)), {"partial": True, "stopped_by_signal": signum})
            sys.exit(124)
        signal.signal(signal.SIGTERM, _save_partial)
    rows = run(quick=args.quick or not torch.cuda.is_available())
    print_table(rows, COLUMNS)
    save(args.json, rows)


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


def run(quick: bool = False) -> list[dict]:
    gpu = torch.cuda.is_available()
    device = "cuda" if gpu else "cpu"
    dtype = torch.bfloat16
    raise_compile_limits()
    shapes = QUICK if quick else [(t, h) for h in HIDDEN for t in TOKENS]
    rows: list[dict] = []
    for tokens, hidden in shapes:
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
