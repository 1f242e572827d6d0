"""Helpers every Triton kernel file shares: interpreter detection, the bf16-safe dot and rounding, host-side
ceil division, launch-config filters, the low-overhead autotuned launch and the persistent grid.

Why the dot helper: Triton's CPU interpreter stores bf16 as raw 16-bit integers, so ``tl.dot`` on bf16
operands computes on bit patterns (triton #11584, #11604). Under ``TRITON_INTERPRET=1`` the helper upcasts
both operands to fp32 first; on the GPU it issues the native bf16/fp16 dot (wgmma on Hopper).
Every kernel also upcasts bf16 loads to fp32 before any elementwise arithmetic, for the same reason.
"""
from __future__ import annotations

import contextlib
import inspect
import os
import sys
import weakref
from typing import Optional

import torch
import triton
import triton.language as tl

from hf_fastkern.kernels.dispatch import raw_env_reader

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


def next_pow2(n: int) -> int:
    """``triton.next_power_of_2(n)`` for host code (0 for 0), without its constexpr-function wrapper (~4 us per
    call on the CI CPU with triton 3.9; a one-token decoding call made four)."""
    return 0 if n <= 0 else 1 << (n - 1).bit_length()


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


def _direct_launch_available() -> bool:
    """Can :class:`DirectLaunch` replay a compiled kernel? On a GPU build of Triton whose ``JITFunction.run``
    launches with the call form the replay uses (Triton 3.3-3.9 do: ``kernel.run(grid_0, grid_1, grid_2, stream,
    kernel.function, kernel.packed_metadata, launch_metadata, enter_hook, exit_hook, *bound_args.values())``).
    Any other Triton keeps its own launch path. Replay itself is opt-in (``HF_FASTKERN_DIRECT_LAUNCH=1``, read
    per launch, one C call) until the device has measured it: see :data:`_DIRECT_SWITCH`."""
    if INTERPRET or torch.version.hip is not None:
        # ROCm: Triton's HIP backend also specializes a tensor on its storage fitting 2 GiB (buffer ops), which
        # the key below does not hold
        return False
    try:
        from triton.runtime.jit import JITFunction

        src = inspect.getsource(JITFunction.run)
    except (ImportError, OSError, TypeError):
        return False
    return ("kernel.run(grid_0, grid_1, grid_2, stream, kernel.function, kernel.packed_metadata, launch_metadata,"
            in src and "*bound_args.values())" in src and "knobs.runtime.launch_enter_hook" in src)


DIRECT_LAUNCH = _direct_launch_available()
# Opt-in: replay runs only with HF_FASTKERN_DIRECT_LAUNCH=1. It is checked on the CPU against Triton's own
# specialization (tests/test_launch.py), but its GPU test (bitwise equal to Triton's launch) and its timing
# (benchmarks/bench_launch.py, the guard with a direct variant) have not run on a GPU yet; the default turns on
# only after they have (docs/architecture.md, "Launching").
_DIRECT_SWITCH = raw_env_reader("HF_FASTKERN_DIRECT_LAUNCH")
_ON = ("1", b"1")
_I32_MIN, _I32_MAX, _I64_MAX = -(2 ** 31), 2 ** 31 - 1, 2 ** 63 - 1
# Compiled kernels one DirectLaunch keeps (keys are specialization classes, not values: a handful per kernel).
_DIRECT_CACHE_MAX = 256


def _spec_expr(i: int, t: type) -> str:
    """The key expression of positional argument ``a{i}`` of type t: at least as fine as Triton's specialization
    (triton.runtime.jit: a tensor by dtype and 16-byte alignment, an int by == 1, divisibility by 16 and
    i32/i64/u64 range, a float or bool by type, None as a constant), so one key never covers two compiled
    kernels (tests/test_launch.py checks this against Triton's own specialization)."""
    a = f"a{i}"
    if issubclass(t, torch.Tensor):
        return f"{a}.dtype, {a}.data_ptr() & 15"
    if t is int:
        return f"{a} == 1, {a} & 15, {_I32_MIN} <= {a} <= {_I32_MAX}, {a} > {_I64_MAX}"
    if t in (float, bool) or t is type(None):
        return "0"
    raise TypeError(t)


class DirectLaunch:
    """A ``@triton.jit`` kernel launched without Triton's per-call argument binding, once a launch of the same
    specialization has gone through Triton.

    ``JITFunction.run`` binds and specializes every argument on every launch (one native call per argument),
    turns the specialization into a string key, looks it up, re-checks the kernel's globals and reads several
    knobs; for a kernel of ~35 arguments that is tens of microseconds of host time, more than the GPU time of a
    one-token decoding step or a one-row norm. Here the first launch of a key goes through ``JITFunction.run``,
    which compiles (or loads) and launches, and returns the ``CompiledKernel``; it is kept under a key computed by
    a small generated function of the argument types at that call site (see :func:`_spec_expr`), and later
    launches with that key call the compiled kernel's launcher exactly as ``JITFunction.run`` does.

    What falls back to ``JITFunction.run`` every time: the interpreter (``TRITON_INTERPRET=1``, where ``fn`` is
    an ``InterpretedFunction``), ROCm, a Triton whose launch form differs (:func:`_direct_launch_available`), a
    grid given as a function, launch hooks installed (a profiler such as proton), the kernel's
    ``pre_run_hooks``, an argument of a type the key does not know, a call that passes a runtime argument by
    keyword or a constexpr positionally. Call with every non-constexpr argument positional and every constexpr
    and launch option (``num_warps``, ``num_stages``) by keyword.
    Not re-checked on a replay (``JITFunction.run`` checks them on every launch): a changed global of the
    kernel's source (Triton raises there) and Triton's runtime knobs ``debug``, ``instrumentation_mode`` and
    the stage-inspection hook; set those before the first launch.
    """

    def __init__(self, fn) -> None:
        self.jit = fn
        self._direct = DIRECT_LAUNCH and type(fn).__name__ == "JITFunction"
        self._params = list(inspect.signature(fn.fn).parameters.values()) if self._direct else []
        self._names = {p.name for p in self._params}
        self._constexpr = {p.name for p in self._params if "constexpr" in str(p.annotation)}
        self._keyfns: dict = {}
        self._kernels: dict = {}
        _LAUNCHERS.add(self)

    def _keyfn(self, types: tuple):
        fn = self._keyfns.get(types)
        if fn is None:
            names = ", ".join(f"a{i}" for i in range(len(types)))
            exprs = ", ".join(_spec_expr(i, t) for i, t in enumerate(types))
            scope: dict = {}
            exec(f"def key({names}):\n    return ({exprs},)\n", scope)  # noqa: S102 - built from types only
            fn = self._keyfns[types] = scope["key"]
        return fn

    def _replayable(self, n_args: int, kw: dict) -> bool:
        """Only constexprs by keyword and only runtime arguments positionally: a keyword runtime argument would
        be replayed from the first call, a positional constexpr keyed by its class, not its value."""
        return (not any(p.name in self._constexpr for p in self._params[:n_args])
                and all(name in self._constexpr for name in kw if name in self._names))

    def _tail(self, n_args: int, kw: dict) -> tuple:
        """The values ``JITFunction.run`` passes after the positional ones: every later parameter in signature
        order (constexprs included), from the keywords or the defaults."""
        out = []
        for p in self._params[n_args:]:
            if p.name in kw:
                out.append(kw[p.name])
            elif p.default is not inspect.Parameter.empty:
                out.append(p.default)
            else:
                raise TypeError(f"{self.jit.fn.__name__}: missing argument {p.name!r}")
        return tuple(out)

    def __call__(self, grid, *args, **kw) -> None:
        if not self._direct or callable(grid) or _DIRECT_SWITCH() not in _ON:
            self.jit.run(*args, grid=grid, warmup=False, **kw)
            return
        try:
            types = tuple(map(type, args))
            # keyword values with their types: True == 1 == 1.0 hash alike, Triton compiles each apart
            key = (torch.cuda.current_device(), types, self._keyfn(types)(*args), tuple(kw.items()),
                   tuple(map(type, kw.values())))
            hit = self._kernels.get(key)
        except TypeError:  # an argument type the key does not cover, or an unhashable constexpr
            key = hit = None
        knobs = triton.knobs.runtime
        if hit is None or _hook_on(knobs.launch_enter_hook) or _hook_on(knobs.launch_exit_hook) \
                or self.jit.pre_run_hooks:
            kernel = self.jit.run(*args, grid=grid, warmup=False, **kw)
            if key is not None and kernel is not None and hasattr(kernel, "packed_metadata") \
                    and self._replayable(len(args), kw):
                if len(self._kernels) >= _DIRECT_CACHE_MAX:
                    self._kernels.clear()
                # the CompiledKernel is kept too: its module stays loaded while the function handle is in use
                self._kernels[key] = (kernel.run, kernel.function, kernel.packed_metadata,
                                      self._tail(len(args), kw), kernel)
            return
        run, function, metadata, tail, _ = hit
        n = len(grid)
        run(grid[0], grid[1] if n > 1 else 1, grid[2] if n > 2 else 1, _current_stream(key[0]), function,
            metadata, None, None, None, *args, *tail)


_LAUNCHERS: "weakref.WeakSet[DirectLaunch]" = weakref.WeakSet()


@contextlib.contextmanager
def triton_launches():
    """Inside: every DirectLaunch launches through ``JITFunction.run`` (benchmarks/bench_launch.py compares the
    two paths in one process)."""
    saved = [(lc, lc._direct) for lc in list(_LAUNCHERS)]
    for lc, _ in saved:
        lc._direct = False
    try:
        yield
    finally:
        for lc, was in saved:
            lc._direct = was


def _hook_on(hook) -> bool:
    """Is a launch hook installed? Triton 3.6 keeps None when there is none, later versions an empty HookChain."""
    return hook is not None and bool(getattr(hook, "calls", True))


def _current_stream(device: int) -> int:
    """The stream Triton's driver launches on (``driver.active.get_current_stream``)."""
    return torch._C._cuda_getCurrentRawStream(device)


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
        self._launch = DirectLaunch(self.jit)
        self._chosen: dict = {}

    def chosen(self, key) -> Optional[dict]:
        """The config kwargs (e.g. ``{"PROGS_PER_SM": 2, "num_warps": 8, ...}``) used for ``key``, or None
        before the first launch with that key."""
        return self._chosen.get(key)

    def __call__(self, key, grid, *args, **constexprs) -> dict:
        """Launch ``kernel[grid](*args, **constexprs)``; returns the config kwargs it ran with."""
        cfg = self._chosen.get(key)
        if cfg is not None:
            self._launch(grid, *args, **constexprs, **cfg)
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
