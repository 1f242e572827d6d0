"""The one benchmark harness: environment record, timing, peak memory, the correctness gate (with the one
tolerance rule), peers' import, tables, JSON and plot writing, and the shape-grid helpers of the op scripts.

Every benchmark (``bench_<name>.py``, listed in ``registry.py``) builds rows (dicts): ``bench``, ``impl``, the
shape keys, ``ms`` (median), a throughput (``GBps`` or ``TFLOPs``) with the formula it came from, ``peak_MiB``,
and ``error`` when a peer could not run. ``save`` writes ``{"env", "command", "rows"}``: every JSON carries its
own command, environment and date. Benchmarks run as modules of this package (``python -m
benchmarks.bench_rms_norm`` from a checkout; ``hf-fastkern bench`` once installed) and import this file
relatively, so one import line serves both names of the package. Nothing here is tied to CUDA: on a machine
without a GPU every helper takes the CPU path (wall-clock timing, no peak memory).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import sys
import time
import types
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.autograd import DeviceType

# ----------------------------------------------------------------------------------------------------------
# the one tolerance rule (tests/tolerances.py explains it and is the tests' entry to it)


@dataclass(frozen=True)
class Floor:
    rtol: float  # one rounding of this dtype, relative to a value in [1, 2)
    atol: float


FLOORS = {
    # fp32 keeps a few ulps: kernels and torch sum in different orders.
    torch.float32: Floor(rtol=2.0**-20, atol=1e-7),
    # one bf16/fp16 rounding (spacing 2**-7 / 2**-10 relative to a value in [1, 2)).
    torch.bfloat16: Floor(rtol=2.0**-7, atol=1e-5),
    torch.float16: Floor(rtol=2.0**-10, atol=1e-6),
}
FACTOR = {"output": 2.0, "grad": 3.0}
# roundings of the op's own magnitude that make the floor when PyTorch's same-dtype error is exactly zero
ZERO_BASE_ROUNDINGS = 4


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def bound(oracle: torch.Tensor, baseline_err: float | None, dtype: torch.dtype, kind: str,
          op_scale: float = 0.0) -> float:
    """Largest allowed max-abs error against the fp64 ``oracle`` (tests/tolerances.py states the rule).

    baseline_err: PyTorch's same-dtype error (None: unknown); op_scale: the largest magnitude among the op's
    oracle tensors, the floor's scale when PyTorch's error is exactly zero."""
    f = FLOORS[dtype]
    scale = oracle.double().abs().max().item() if oracle.numel() else 0.0
    if baseline_err == 0.0:
        return ZERO_BASE_ROUNDINGS * f.rtol * max(scale, op_scale) + f.atol
    return FACTOR[kind] * (baseline_err or 0.0) + f.rtol * scale + f.atol


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
        peer_import("liger_kernel.transformers:apply_liger_kernel_to_llama")()
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


def loop_ms(fn: Callable[[], object], grad_to_none=None, loops: int = 5, loop_ms_target: float = 20.0,
            warmup: int = 3) -> float:
    """Median milliseconds per call of ``fn`` run back to back: each loop launches ``fn`` n times without a cache
    flush or a sync in between and synchronizes once at its end (wall clock), so a call costs what it costs
    inside a step: its host time where launching is the bottleneck (a few hundred tokens), its GPU time where the
    GPU is. ``do_bench`` (``bench_ms``) times each call between CUDA events after an L2 flush kernel, which
    gives the host a head start and hides launch cost up to the flush's length (docs/routing.md).
    ``grad_to_none``: tensors whose ``.grad`` is reset before each call. Warm-up: ``warmup`` calls; n is sized
    so that a loop lasts about ``loop_ms_target`` ms (1 to 1,000 calls)."""
    def one():
        if grad_to_none is not None:
            for t in grad_to_none:
                t.grad = None
        fn()
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    for _ in range(warmup):
        one()
    sync()
    t0 = time.perf_counter()
    one()
    sync()
    first = (time.perf_counter() - t0) * 1e3
    n = max(1, min(1000, int(loop_ms_target / max(first, 1e-3))))
    times = []
    for _ in range(loops):
        sync()
        t0 = time.perf_counter()
        for _ in range(n):
            one()
        sync()
        times.append((time.perf_counter() - t0) * 1e3 / n)
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
    x = torch.randn(n, device=device())
    y = torch.empty_like(x)
    return 2 * n * 4 / bench_ms(lambda: y.copy_(x)) / 1e9


def _mm_tflops(n: int = 8192) -> float:
    a = torch.randn(n, n, device=device(), dtype=torch.bfloat16)
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


def command_line() -> str:
    """How this process was started, runnable as written: ``python -m benchmarks.bench_x ...`` for a module run
    (``sys.argv[0]`` is then the file's path, which cannot run: the benchmarks import relatively)."""
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    head = ["python", "-m", spec.name] if spec is not None and spec.name else ["python", sys.argv[0]]
    return " ".join(head + sys.argv[1:])


def save(path: str | None, rows: list[dict], extra: dict | None = None) -> None:
    """``{"env", "command", "rows", **extra}`` to ``path`` (write then rename: a run killed mid-write keeps the
    previous complete file)."""
    if not path:
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    doc = {"env": environment(), "command": command_line(), "rows": rows}
    if extra:
        doc.update(extra)
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1, default=str)
    os.replace(tmp, path)
    print(f"wrote {path}")


def device() -> str:
    """Where a benchmark allocates: the current CUDA device when there is one, else the CPU."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def cannot_run_here(bench: str, why: str) -> list[dict]:
    """The one row of a benchmark that cannot run on this machine at all, saying why in one line (the CLI
    prints it and counts it as no failure)."""
    return [dict(bench=bench, impl="-", error=why, cannot_run_here=True)]


def peer_import(what: str):
    """A peer's attribute ``module:name`` (Liger Kernel, cut-cross-entropy, ...), or None when the peer is not
    installed or lacks it: the one place benchmarks import optional peers."""
    mod, name = what.split(":")
    try:
        return getattr(__import__(mod, fromlist=[name]), name)
    except Exception:
        return None


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
    return summarize_profile(prof, n, top)


def summarize_profile(prof, n: int = 1, top: int = 25, host: bool = False) -> dict:
    """A finished torch.profiler run of ``n`` steps, per step: GPU ms by kernel class and the top kernels (and,
    with ``host``, the top ops by self host time with their call counts)."""
    ka = prof.key_averages()
    # the GPU's own events only (kernels, memcpy/memset): a CPU op's device time is the sum of its kernels'
    kernels = [(e.key, e.device_time_total / n / 1e3) for e in ka
               if e.device_type == DeviceType.CUDA and e.device_time_total > 0]
    kernels.sort(key=lambda k: -k[1])
    by_class: dict = {}
    for name, ms in kernels:
        cls = kernel_class(name)
        by_class[cls] = by_class.get(cls, 0.0) + ms
    out = {"gpu_ms_per_step": sum(ms for _, ms in kernels),
           "by_class_ms": {k: round(v, 2) for k, v in sorted(by_class.items(), key=lambda kv: -kv[1])},
           "top_kernels_ms": [(name[:100], round(ms, 3)) for name, ms in kernels[:top]]}
    if host:
        ops = sorted(((e.key, e.self_cpu_time_total / n / 1e3, e.count) for e in ka), key=lambda k: -k[1])
        out["top_host_ms"] = [(name[:100], round(ms, 3), c) for name, ms, c in ops[:top]]
    return out


# ----------------------------------------------------------------------------------------------------------
# op benchmarks (rms_norm, layer_norm, activations, rope): one shape grid, correctness-gated, two timings per row

COLUMNS = ["op", "impl", "T", "H", "I", "mode", "ms", "gpu_ms", "GBps", "GBps_gpu", "peak_MiB", "vs_best_peer",
           "vs_best_peer_gpu", "max_err", "error"]
# do_bench budget per row (ms of repeated calls): 50 ms still gives >= 50 samples for a 1 ms call, and keeps
# each op grid (up to 9 shapes x 4 implementations x 2 modes) within about a minute with compile and autotuning.
WARMUP_MS, REP_MS = 10, 50
# calls per torch.profiler window for gpu_ms (kernel durations are stable; the window costs host time only)
PROFILE_CALLS = 5
# default --budget-s of the op scripts: stop starting new shapes after this (device runs give each ~60 s)
DEFAULT_BUDGET_S = 50.0
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


def run_grads(fn: Callable, inputs: list[torch.Tensor], dy: torch.Tensor) -> list[torch.Tensor]:
    """[output, grad of every input] of one forward + backward (inputs get fresh leaves)."""
    leaves = [t.detach().clone().requires_grad_(t.requires_grad) for t in inputs]
    out = fn(*leaves)
    # a copy: Liger's in-place backwards overwrite dy with dx
    out.backward(dy.to(out.dtype, copy=True))
    return [out.detach()] + [t.grad for t in leaves if t.requires_grad]


def gate(results: dict[str, list[torch.Tensor]], oracle: list[torch.Tensor], base: str = "torch",
         dtype: torch.dtype = torch.bfloat16) -> dict:
    """impl -> (max error, ok): every tensor within the tolerance rule (``bound``, as an output) of the fp32
    ``oracle``, with ``base``'s error as PyTorch's same-dtype error."""
    verdict = {}
    base_errs = [max_err(a, o) for a, o in zip(results[base], oracle)]
    op_scale = max((o.float().abs().max().item() for o in oracle if o.numel()), default=0.0)
    for impl, res in results.items():
        errs = [max_err(a, o) for a, o in zip(res, oracle)]
        bounds = [bound(o, be, dtype, "output", op_scale) for be, o in zip(base_errs, oracle)]
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


def finish(rows: list[dict], group_keys: list[str] = GROUP_KEYS) -> list[dict]:
    """Our ratio to the best peer of the same shape and mode, on do_bench time and on kernel time."""
    add_ratios(rows, group_keys)
    # the same ratio on kernel time: best peer gpu_ms / ours
    groups: dict = {}
    for r in rows:
        groups.setdefault(tuple(r.get(k) for k in group_keys), []).append(r)
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


def op_main(run: Callable[..., list[dict]], doc: str) -> None:
    """Command line of an op benchmark (``python -m benchmarks.bench_<op> [--json F] [--quick] [--budget-s S]``)."""
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


