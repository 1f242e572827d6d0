"""Shared benchmark machinery: environment record, timing, peak memory, tables and JSON.

Every benchmark script builds rows (dicts) with ``Row``-style keys: ``bench``, ``impl``, the shape keys,
``ms`` (median), a throughput (``GBps`` or ``TFLOPs``) with the formula it came from, ``peak_MiB``, and
``error`` when a peer could not run. ``save`` writes ``{"env": ..., "command": ..., "rows": [...]}``.
"""
from __future__ import annotations

import json
import os
import platform
import sys
import time
from collections.abc import Callable

import torch

# Benchmarks that need a fresh process per variant or trial (e2e, long context, LoRA) run themselves as a
# worker subprocess, which prints one line RESULT_TAG + json; the parent reads it back with worker_result.
RESULT_TAG = "RESULT "


def emit_result(obj) -> None:
    """Worker side: hand ``obj`` (JSON-serialisable) to the parent process."""
    print(RESULT_TAG + json.dumps(obj), flush=True)


def worker_result(stdout: str):
    """Parent side: the object a worker emitted, or None when it printed none (it crashed first)."""
    for line in stdout.splitlines():
        if line.startswith(RESULT_TAG):
            return json.loads(line[len(RESULT_TAG):])
    return None


def prepare_variant(variant: str) -> str:
    """Set up a training variant in this process before its model is built; returns the attn_implementation.
    ``sdpa``: nothing. ``sdpa+liger``: Liger's class-level Llama patch (Liger's way, as the anchors did;
    harmless because each variant owns its process). ``fastkern``: registers ``"fastkern"``."""
    if variant == "sdpa+liger":
        from liger_kernel.transformers import apply_liger_kernel_to_llama
        apply_liger_kernel_to_llama()
    if variant == "fastkern":
        import hf_fastkern  # noqa: F401  (registers "fastkern")
        return "fastkern"
    return "sdpa"


GPU_CAP_ENV = "HF_FASTKERN_BENCH_GPU_GIB"


def cap_gpu_memory() -> float | None:
    """Limit this process's CUDA caching allocator to ``$HF_FASTKERN_BENCH_GPU_GIB`` GiB (None: no limit).

    Why: the long-context targets are stated for an 80 GB H100 (79.2 GiB as torch reports it), and the device
    may lend an H200 (141 GB). With ``HF_FASTKERN_BENCH_GPU_GIB=79.2`` a trial there fails where the H100 would
    run out (``torch.cuda.set_per_process_memory_fraction``; the CUDA context, outside the allocator, exists on
    both cards). Returns the cap applied, recorded in the trial's result."""
    gib = os.environ.get(GPU_CAP_ENV)
    if not gib or not torch.cuda.is_available():
        return None
    total = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
    cap = float(gib) * 2**30
    if cap >= total:
        return None
    torch.cuda.set_per_process_memory_fraction(cap / total)
    return float(gib)


def environment() -> dict:
    env = {"python": platform.python_version(), "torch": torch.__version__,
           "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    for mod in ("triton", "transformers", "liger_kernel", "cut_cross_entropy", "peft", "accelerate"):
        try:
            m = __import__(mod)
            env[mod] = getattr(m, "__version__", "installed")
        except Exception:
            env[mod] = None
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        env.update(gpu=p.name, sms=p.multi_processor_count, gpu_mem_GiB=round(p.total_memory / 2**30, 1),
                   cuda=torch.version.cuda)
    else:
        env.update(gpu=None, note="no GPU: reference/interpreter path at small sizes; GPU numbers need a GPU")
    return env


def bench_ms(fn: Callable[[], object], grad_to_none=None, warmup: int = 25, rep: int = 100) -> float:
    """Median milliseconds of ``fn`` (CUDA events via triton.testing.do_bench; wall clock on CPU)."""
    if torch.cuda.is_available():
        from triton.testing import do_bench
        return float(do_bench(fn, warmup=warmup, rep=rep, grad_to_none=grad_to_none, return_mode="median"))
    times = []
    fn()
    for _ in range(3):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[len(times) // 2]


def peak_mib(fn: Callable[[], object]) -> float | None:
    """Peak extra CUDA memory (MiB) that one call of ``fn`` allocates above what was live before."""
    if not torch.cuda.is_available():
        return None
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def ceilings() -> dict:
    """Measured device ceilings: copy bandwidth (TB/s, read+write) and the bf16 matmul rate (TFLOP/s)."""
    if not torch.cuda.is_available():
        return {}
    return {"copy_TBps": _copy_tbps(), "bf16_mm_TFLOPs": _mm_tflops()}


def _copy_tbps(n: int = 2**28) -> float:
    x = torch.randn(n, device="cuda")
    y = torch.empty_like(x)
    return 2 * n * 4 / bench_ms(lambda: y.copy_(x)) / 1e9


def _mm_tflops(n: int = 8192) -> float:
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn_like(a)
    return 2 * n**3 / bench_ms(lambda: a @ b) / 1e9


def print_table(rows: list[dict], cols: list[str]) -> None:
    widths = [max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in cols] if rows else [len(c) for c in cols]
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths)))
    for r in rows:
        print("  ".join(_fmt(r.get(c)).ljust(w) for c, w in zip(cols, widths)))
    sys.stdout.flush()


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def add_ratios(rows: list[dict], group_keys: list[str], metric: str = "ms", ours: str = "fastkern") -> None:
    """Set ``vs_best_peer`` on our rows: best peer time / our time (> 1 means we are faster)."""
    groups: dict = {}
    for r in rows:
        groups.setdefault(tuple(r.get(k) for k in group_keys), []).append(r)
    for rs in groups.values():
        peers = [r[metric] for r in rs if r.get("impl") != ours and r.get(metric)]
        for r in rs:
            if r.get("impl") == ours and r.get(metric) and peers:
                r["vs_best_peer"] = min(peers) / r[metric]


def save(path: str | None, rows: list[dict], extra: dict | None = None) -> None:
    if not path:
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    doc = {"env": environment(), "command": " ".join([os.path.basename(sys.executable)] + sys.argv), "rows": rows}
    if extra:
        doc.update(extra)
    with open(path, "w") as f:
        json.dump(doc, f, indent=1)
    print(f"wrote {path}")


# Kernel classes of a profiled training step; the first match wins, so the names of our own kernels
# (``_rms_norm_bwd_kernel``, ``_glu_fwd_kernel``) are matched before the generic attention patterns.
KERNEL_CLASSES = (
    ("norm", ("rms_norm", "layer_norm", "_ln_", "norm_")),
    ("activation", ("glu", "silu", "gelu", "swiglu")),
    ("cross_entropy", ("cross_entropy", "_ce_", "flce", "lse", "logsumexp", "nll", "softmax")),
    ("attention", ("attn", "flash", "fmha", "sdpa", "cudnn")),
    ("gemm", ("gemm", "sm90_xmma", "cutlass", "nvjet", "matmul", "wgmma")),
    ("optimizer", ("adam", "multi_tensor", "foreach")),
    ("copy/cast", ("copy", "cast", "to_copy", "memcpy", "fill", "zero")),
)


def kernel_class(name: str) -> str:
    low = name.lower()
    return next((c for c, keys in KERNEL_CLASSES if any(k in low for k in keys)), "other")


def profile_steps(step: Callable[[], object], n: int = 2, top: int = 25) -> dict:
    """GPU time per training step by kernel class and the top kernels, from torch.profiler over ``n`` steps."""
    from torch.profiler import ProfilerActivity, profile
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            step()
        torch.cuda.synchronize()
    kernels = [(e.key, e.device_time_total / n / 1e3) for e in prof.key_averages() if e.device_time_total > 0]
    kernels.sort(key=lambda k: -k[1])
    by_class: dict = {}
    for name, ms in kernels:
        cls = kernel_class(name)
        by_class[cls] = by_class.get(cls, 0.0) + ms
    return {"gpu_ms_per_step": sum(ms for _, ms in kernels),
            "by_class_ms": {k: round(v, 2) for k, v in sorted(by_class.items(), key=lambda kv: -kv[1])},
            "top_kernels_ms": [(name[:100], round(ms, 3)) for name, ms in kernels[:top]]}
