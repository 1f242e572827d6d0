"""The one place that decides, per call, whether an op runs its Triton kernel or the pure-PyTorch reference.

Rules (DESIGN.md, Flow 3):
- The Triton path runs on CUDA tensors of a supported dtype, or on CPU tensors when ``TRITON_INTERPRET=1``
  (that is how CI executes every kernel without a GPU).
- ``HF_FASTKERN_FORCE_REFERENCE=1`` forces the reference everywhere.
- Every other case falls back to ``kernels/reference.py``, and each distinct reason warns exactly once.
- Bad input is not a fallback: it raises ``ValueError``/``TypeError`` naming the argument and the expectation.

Each kernel entry point calls ``kernel_available(op, *tensors)`` (or its own check returning ``(ok, reason)``
passed to ``use_kernel``) and the ``check_*`` helpers below for argument validation.
"""
from __future__ import annotations

import functools
import os
import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
LOW_PRECISION_DTYPES = (torch.bfloat16, torch.float16)


# ``os.environ.get`` costs ~1.8 us for a variable that is not set (its lookup raises and catches KeyError), and
# the entry points read several switches on every call (issue 21: the host path of a decoding step). os.environ's
# backing mapping (``os._Environ._data``, kept current by ``os.environ[...] = ...``, ``del`` and pytest's
# monkeypatch) answers the same question in ~0.3 us; where it does not exist, os.environ.get is used.
_ENV_DATA = getattr(os.environ, "_data", None)
_ENV_ENCODE = getattr(os.environ, "encodekey", None)
_ENV_DECODE = getattr(os.environ, "decodevalue", None)
if _ENV_DATA is None or _ENV_ENCODE is None or _ENV_DECODE is None:
    _ENV_DATA = None


_ENV_KEY_MEMO: dict = {}


def _env_key(name: str):
    # a plain dict, not functools.lru_cache: torch.compile traces the entry points, and dynamo warns on
    # lru_cache-wrapped calls
    key = _ENV_KEY_MEMO.get(name)
    if key is None:
        key = _ENV_KEY_MEMO[name] = _ENV_ENCODE(name)
    return key


def env_get(name: str, default: str | None = None) -> str | None:
    """``os.environ.get(name, default)``, cheap on hot paths."""
    if _ENV_DATA is None:
        return os.environ.get(name, default)
    value = _ENV_DATA.get(_env_key(name))
    return default if value is None else _ENV_DECODE(value)


def raw_env_reader(name: str) -> Callable[[], Any]:
    """A zero-argument reader of variable ``name``'s raw value (bytes, None when unset; ``os.environ.get``'s str
    where the backing mapping is missing): one C call, for cache keys and set/unset tests on hot paths."""
    if _ENV_DATA is None:
        return functools.partial(os.environ.get, name)
    return functools.partial(_ENV_DATA.get, _env_key(name))


def interpret_mode() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return env_get("TRITON_INTERPRET", "0") == "1"


def force_reference() -> bool:
    return env_get("HF_FASTKERN_FORCE_REFERENCE", "0") == "1"


def _probe_triton() -> tuple[bool, str]:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception as e:  # ImportError on macOS/Windows, or a broken install
        return False, f"triton is not importable ({type(e).__name__}: {e})"
    return True, ""


# Probed once at import; a plain value (not functools.lru_cache) so torch.compile traces it without warnings.
_TRITON_STATUS = _probe_triton()


def triton_importable() -> tuple[bool, str]:
    return _TRITON_STATUS


_warned: set[str] = set()


class FastKernFallbackWarning(UserWarning):
    """Emitted once per distinct reason when an op falls back to its PyTorch reference."""


def warn_once(key: str, message: str) -> None:
    if key in _warned:
        return
    _warned.add(key)
    warnings.warn(message, FastKernFallbackWarning, stacklevel=3)


def reset_warnings() -> None:
    """Forget which fallbacks were already reported, and the per-shape decisions that carry them (tests)."""
    _warned.clear()
    clear_per_shape()


def clear_per_shape() -> None:
    """Forget every entry point's per-signature decisions (:class:`PerShape`)."""
    for cache in _PER_SHAPE:
        cache.clear()


# Triton's oldest NVIDIA target is Volta (sm_70); bf16 arithmetic and bf16 tensor-core dots need Ampere (sm_80).
MIN_CAPABILITY = (7, 0)
BF16_MIN_CAPABILITY = (8, 0)
_CAPABILITY: dict[int, tuple[int, int]] = {}


def _capability(device: torch.device) -> tuple[int, int]:
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _CAPABILITY:
        _CAPABILITY[idx] = tuple(torch.cuda.get_device_capability(idx))
    return _CAPABILITY[idx]


def capability_check(device: torch.device, dtypes: Iterable[torch.dtype]) -> tuple[bool, str]:
    """Does this NVIDIA GPU compile our kernels for these dtypes? (ROCm devices are left to Triton.)"""
    if device.type != "cuda" or torch.version.hip is not None:
        return True, ""
    cap = _capability(device)
    if cap < MIN_CAPABILITY:
        return False, f"GPU compute capability {cap[0]}.{cap[1]} is older than Triton's minimum 7.0"
    if torch.bfloat16 in tuple(dtypes) and cap < BF16_MIN_CAPABILITY:
        return False, f"bfloat16 kernels need compute capability 8.0 (Ampere) or newer, this GPU is {cap[0]}.{cap[1]}"
    return True, ""


def device_check(tensors: Sequence[torch.Tensor | None],
                 dtypes: Iterable[torch.dtype] = SUPPORTED_DTYPES) -> tuple[bool, str]:
    """Can a Triton kernel run on these tensors? Returns ``(ok, reason)``; reason is empty when ok.

    Runs on every call of every op, so it stays cheap (one environment read, one pass over the tensors);
    the environment is read per call because tests and users flip HF_FASTKERN_FORCE_REFERENCE at run time."""
    if force_reference():
        return False, "HF_FASTKERN_FORCE_REFERENCE=1 is set"
    if not _TRITON_STATUS[0]:
        return _TRITON_STATUS
    if not isinstance(dtypes, (tuple, frozenset, set)):
        dtypes = tuple(dtypes)
    first = None
    interpret = None
    for t in tensors:
        if t is None:
            continue
        device = t.device
        if device.type != "cuda":
            if interpret is None:
                interpret = interpret_mode()
            if device.type != "cpu" or not interpret:
                return False, (f"tensors on device '{device.type}' (Triton kernels need CUDA, or TRITON_INTERPRET=1 "
                               "on CPU)")
        if first is None:
            first = device
    if first is None:
        return True, ""
    present = [t for t in tensors if t is not None]
    for t in present:
        if t.dtype not in dtypes:
            return False, f"dtype {t.dtype} is not supported by the kernel (supported: {', '.join(map(str, dtypes))})"
    if first.type != "cuda":
        return True, ""
    return capability_check(first, {t.dtype for t in present})


def use_kernel(op: str, check: tuple[bool, str]) -> bool:
    """Turn an ``(ok, reason)`` check into a decision, warning once per (op, reason) on fallback."""
    ok, reason = check
    if not ok:
        warn_once(f"{op}:{reason}", f"hf_fastkern: {op} falls back to the PyTorch reference: {reason}.")
    return ok


def kernel_available(op: str, *tensors: torch.Tensor | None,
                     dtypes: Iterable[torch.dtype] = SUPPORTED_DTYPES) -> bool:
    return use_kernel(op, device_check(tensors, dtypes))


# ----------------------------------------------------------------------------------------------------------
# argument validation shared by every public entry point: raise, never fall back, on bad input

def check_floating(name: str, t: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor (float32, bfloat16 or float16), got {t.dtype}")


def check_same_device(**tensors: torch.Tensor | None) -> None:
    first = None
    for v in tensors.values():
        if v is None:
            continue
        if first is None:
            first = v.device
        elif v.device != first:
            present = {k: v for k, v in tensors.items() if v is not None}
            desc = ", ".join(f"{k} on {v.device}" for k, v in present.items())
            raise ValueError(f"tensors must be on one device, got {desc}")


def check_shape(name: str, t: torch.Tensor | None, expected: tuple[int, ...]) -> None:
    if t is not None and tuple(t.shape) != tuple(expected):
        raise ValueError(f"{name} must have shape {tuple(expected)}, got {tuple(t.shape)}")


def check_last_dim(name: str, t: torch.Tensor, expected: int, what: str = "hidden size") -> None:
    if t.dim() == 0 or t.shape[-1] != expected:
        raise ValueError(
            f"{name} must have its last dimension equal to the {what} {expected}, got shape {tuple(t.shape)}")


def check_same_shape(**tensors: torch.Tensor) -> None:
    items = list(tensors.items())
    first_name, first = items[0]
    for name, t in items[1:]:
        if t.shape != first.shape:
            raise ValueError(f"{name} must have the shape of {first_name} {tuple(first.shape)}, got {tuple(t.shape)}")


# ----------------------------------------------------------------------------------------------------------
# once per shape: validation and dispatch decisions cached on the call's tensor signature (issue 21)

_ENV_KEYS = ("HF_FASTKERN_FORCE_REFERENCE", "HF_FASTKERN_ROUTING", "HF_FASTKERN_ROUTING_TABLE",
             "HF_FASTKERN_ATTENTION", "TRITON_INTERPRET")
_ENV_BKEYS = tuple(_env_key(k) for k in _ENV_KEYS) if _ENV_DATA is not None else ()


def call_key(*tensors: torch.Tensor | None) -> tuple:
    """What an entry point's validation and kernel/reference decision read from its tensors and the process:
    each tensor's shape, strides, dtype, device and requires_grad, grad mode, the deterministic flag, and the
    environment switches (tests and users flip them at run time)."""
    env = tuple(map(_ENV_DATA.get, _ENV_BKEYS)) if _ENV_DATA is not None else \
        tuple(os.environ.get(k) for k in _ENV_KEYS)
    return (env, torch.is_grad_enabled(),
            torch.are_deterministic_algorithms_enabled(),
            *(None if t is None else (t.shape, t.stride(), t.dtype, t.device, t.requires_grad) for t in tensors))


# every PerShape, created at import by the entry points' modules, so reset_warnings() can clear them
_PER_SHAPE: list = []


class PerShape:
    """Results computed on the first call with a given :func:`call_key` and reused after (validation that
    passed, the kernel-or-reference decision). Bad input raises before anything is stored, so it raises on
    every call. Bounded: cleared when full (dynamic shapes, decoding lengths)."""

    def __init__(self, size: int = 4096) -> None:
        self._d: dict = {}
        self._size = size
        _PER_SHAPE.append(self)

    def get(self, key: tuple | None):
        return None if key is None else self._d.get(key)

    def put(self, key: tuple | None, value) -> None:
        if key is None:
            return
        if len(self._d) >= self._size:
            self._d.clear()
        self._d[key] = value

    def clear(self) -> None:
        self._d.clear()


def entry_key(*tensors: torch.Tensor | None) -> tuple | None:
    """:func:`call_key`, or None while torch.compile traces (the graph runs the checks once, at trace time)."""
    if torch.compiler.is_compiling():
        return None
    return call_key(*tensors)
