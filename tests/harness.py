"""Shared test helpers: the comparison harness (kernel vs fp64 oracle vs PyTorch's same-dtype result, forward and
gradients), multi-process launches, and the case tables and checks that several op test files share (edge
cases, huge sizes, bad input, determinism)."""
from __future__ import annotations

import inspect
import os
import re
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
import torch

import hf_fastkern
from hf_fastkern.kernels import reference
from hf_fastkern.kernels.activations import geglu, gelu, swiglu
from hf_fastkern.kernels.attention import flash_attention, flash_attention_varlen
from hf_fastkern.kernels.cross_entropy import cross_entropy, fused_linear_cross_entropy
from hf_fastkern.kernels.layer_norm import layer_norm
from hf_fastkern.kernels.rms_norm import rms_norm
from tests.tolerances import assert_close, bound, max_err


def _leaf(t, dtype=None):
    if not isinstance(t, torch.Tensor):
        return t
    t = t.detach().clone()
    if dtype is not None and t.is_floating_point():
        t = t.to(dtype)
    if t.is_floating_point():
        t.requires_grad_(True)
    return t


def check_op(kernel_fn: Callable, reference_fn: Callable, inputs: Sequence, dtype: torch.dtype,
             name: str = "", baseline_fn: Callable | None = None, grad_out: torch.Tensor | None = None,
             grads: bool = True) -> None:
    """Compare ``kernel_fn(*inputs)`` against ``reference_fn`` on fp64 copies (the oracle), with the
    same-dtype baseline ``baseline_fn`` (default: ``reference_fn`` on the same inputs), forward and the
    gradient of every floating-point input. Inputs are given in ``dtype`` already."""
    baseline_fn = baseline_fn or reference_fn
    k_in = [_leaf(t) for t in inputs]
    o_in = [_leaf(t, torch.float64) for t in inputs]
    b_in = [_leaf(t) for t in inputs]
    out = kernel_fn(*k_in)
    ref = reference_fn(*o_in)
    base = baseline_fn(*b_in)
    assert out.dtype == base.dtype, f"{name}: output dtype {out.dtype}, expected {base.dtype}"
    assert_close(out, ref, base, dtype, "output", f"{name} output")
    if not grads:
        return
    if grad_out is None:
        g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.device)
    else:
        g = grad_out
    out.backward(g.to(out.dtype))
    ref.backward(g.to(ref.dtype))
    base.backward(g.to(base.dtype))
    # the op's own magnitude: the floor's scale for a gradient PyTorch computes exactly (tests/tolerances.py)
    oracles = [ref.detach()] + [r.grad for r in o_in if isinstance(r, torch.Tensor) and r.grad is not None]
    op_scale = max((t.abs().max().item() for t in oracles if t.numel()), default=0.0)
    for i, (a, r, b) in enumerate(zip(k_in, o_in, b_in)):
        if isinstance(a, torch.Tensor) and a.requires_grad:
            assert a.grad is not None, f"{name}: no gradient reached input {i}"
            assert_close(a.grad, r.grad, b.grad, dtype, "grad", f"{name} grad[{i}]", op_scale)


# ----------------------------------------------------------------------------------------------------------
# multi-process CPU launches (DDP / FSDP2 tests)

ROOT = Path(__file__).resolve().parent.parent


def interpreter_skips_repeated_lang_patching() -> None:
    """Triton's CPU interpreter patches ``triton.language`` for a launch (``GridExecutor.__call__`` ->
    ``_patch_lang``: ``inspect.getmembers`` over the ``tl`` / ``tl.core`` modules the kernel's globals hold, their
    tensor class and tl.math) and then again at every call of a ``@triton.jit`` helper inside the kernel
    (``InterpretedFunction.__call__``), although the launch's patch is still in place: ~0.25 ms per helper call
    (``mma``, ``round_to``, ``tl.sum`` in every loop trip), about a fifth of a training test's interpreter time
    (triton 3.9; issue 20). Here a helper call inside a launch whose language modules that launch has already
    patched skips the repeat (a helper that sees a module not yet patched, e.g. ``tl.core`` from Triton's own
    ``tl.sum``, is patched as before). Nothing changes without TRITON_INTERPRET=1 or when this Triton's
    interpreter lacks these private names (checked with hasattr; written against triton 3.9, under which the
    whole suite runs in CI). Called by conftest and by the processes the multi-process tests launch."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return
    try:
        import triton.language as tl
        from triton.runtime import interpreter as ti
    except ImportError:
        return
    if not all(hasattr(ti, n) for n in ("_patch_lang", "_LangPatchScope", "GridExecutor")):
        return
    real_patch, real_launch = ti._patch_lang, ti.GridExecutor.__call__
    langs_of: dict = {}  # function -> ids of the language modules _patch_lang patches for it (its globals' rule)
    launch_state = {"active": False, "patched": set()}

    def patch_lang(fn):
        langs = langs_of.get(fn)
        if langs is None:
            langs = langs_of[fn] = frozenset(id(v) for v in fn.__globals__.values()
                                             if inspect.ismodule(v) and v in (tl, tl.core))
        if launch_state["active"] and langs <= launch_state["patched"]:
            return ti._LangPatchScope()  # nothing to restore: the launch's scope restores its own patch
        scope = real_patch(fn)
        if launch_state["active"]:
            launch_state["patched"] |= langs
        return scope

    def launch(self, *args, **kwargs):
        launch_state["active"], launch_state["patched"] = True, set()
        try:
            return real_launch(self, *args, **kwargs)
        finally:
            launch_state["active"], launch_state["patched"] = False, set()

    ti._patch_lang, ti.GridExecutor.__call__ = patch_lang, launch


def cpu_launch_env() -> dict:
    """Environment of a child process that must run our kernels on the CPU: the interpreter on, one thread per
    process (two ranks share the CI's two cores), CUDA hidden even on a GPU machine, no forced reference."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1",
           "CUDA_VISIBLE_DEVICES": ""}
    env.pop("HF_FASTKERN_FORCE_REFERENCE", None)
    return env


def end_worker() -> None:
    """End a torchrun worker process (the ``__main__`` of a multi-process test) without the interpreter's
    shutdown, after its output is flushed: a gloo worker thread still releasing the last collective's tensors
    aborts a shutting-down interpreter (examples/finetune_trainer.py ``exit_if_distributed`` has the analysis)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def torchrun_module(module: str, nproc: int = 2, timeout: float = 240) -> tuple[int, str]:
    """``python -m torch.distributed.run --standalone --nproc_per_node N -m module`` on the CPU (gloo);
    returns (return code, stdout + stderr)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           "-m", module]
    proc = subprocess.run(cmd, env=cpu_launch_env(), capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    return proc.returncode, proc.stdout + proc.stderr


# ----------------------------------------------------------------------------------------------------------
# dtype lists and their test ids

LOW = [torch.bfloat16, torch.float16]
ALL = [torch.float32, torch.bfloat16, torch.float16]


def dtype_ids(dtypes):
    return [str(d).replace("torch.", "") for d in dtypes]


# ----------------------------------------------------------------------------------------------------------
# norms at the edges of eps (tests/test_rms_norm.py, tests/test_layer_norm.py)

def assert_like_reference(out, base, oracle, dtype, kind, name):
    """Never worse than torch: no inf/NaN where the same-dtype reference is finite; where the kernel gives a
    special value, the reference gives the same one; every finite kernel entry is within the tolerance table
    of the fp64 oracle (PyTorch's error taken where PyTorch is finite: torch's own fp32 autograd overflows
    to NaN in places where a kernel that stays finite is simply more accurate)."""
    new_special = ~torch.isfinite(out) & torch.isfinite(base)
    assert not new_special.any(), f"{name}: {int(new_special.sum())} inf/NaN entries where the reference is finite"
    sp = ~torch.isfinite(out)
    assert torch.equal(torch.isnan(out[sp]), torch.isnan(base[sp])), f"{name}: NaN where the reference has inf"
    assert torch.equal(out[sp & ~torch.isnan(out)], base[sp & ~torch.isnan(out)]), f"{name}: inf of the wrong sign"
    fin = torch.isfinite(out) & torch.isfinite(oracle)
    both = fin & torch.isfinite(base)
    if fin.any():
        err = max_err(out[fin], oracle[fin])
        lim = bound(oracle[fin], max_err(base[both], oracle[both]), dtype, kind)
        assert err <= lim, f"{name} ({kind}): max error {err:.3e} > bound {lim:.3e}"


def check_norm_eps_at_dtype_limit(op: str, eps_kind: str, dtype: torch.dtype, device: str) -> None:
    """eps = 0, finfo(dtype).tiny, finfo(dtype).eps with a zero row and a constant row.

    Documented behaviour (the reference's, i.e. torch's): with eps=0 a zero row (RMSNorm) or constant row
    (LayerNorm) is 0 * inf = NaN in the output and the gradients; with any eps > 0 everything is finite
    in the forward (gradients of a zero row scale like 1/sqrt(eps) and may overflow fp16, like torch)."""
    eps = {"zero": 0.0, "tiny": torch.finfo(dtype).tiny, "dtype_eps": torch.finfo(dtype).eps}[eps_kind]
    hidden = 19
    x = torch.randn(4, hidden, device=device)
    x[0] = 0.0
    x[2] = 0.5
    w = (torch.rand(hidden, device=device) + 0.5).to(dtype)
    b = torch.randn(hidden, device=device).to(dtype)
    g = torch.randn(4, hidden, device=device)
    if op == "rms_norm":
        fn, ref, params = (lambda x, w: rms_norm(x, w, eps)), (lambda x, w: reference.rms_norm(x, w, eps)), [w]
    else:
        fn = lambda x, w, b: layer_norm(x, w, b, eps)
        ref = lambda x, w, b: reference.layer_norm(x, w, b, eps)
        params = [w, b]
    runs = []
    for impl, dt in ((fn, None), (ref, None), (ref, torch.float64)):
        ins = [t.detach().clone().to(dt or t.dtype).requires_grad_(True) for t in [x.to(dtype)] + params]
        out = impl(*ins)
        out.backward(g.to(out.dtype))
        runs.append((out.detach(), [t.grad for t in ins]))
    (o_k, g_k), (o_b, g_b), (o_r, g_r) = runs
    name = f"{op} eps={eps:g} {dtype}"
    if eps > 0:
        assert torch.isfinite(o_k).all(), f"{name}: non-finite output with eps > 0"
    assert_like_reference(o_k, o_b, o_r, dtype, "output", name + " output")
    for i, (a, bb, r) in enumerate(zip(g_k, g_b, g_r)):
        assert_like_reference(a, bb, r, dtype, "grad", f"{name} grad[{i}]")


# ----------------------------------------------------------------------------------------------------------
# huge sizes (GPU only): index arithmetic past 2**31 elements
#
# Each case makes one tensor the kernel indexes hold more than 2**31 elements, so any offset computed in int32
# (``row * stride``, ``batch * stride_b``, ``pid * BLOCK``) wraps and reads or writes the wrong place: an
# illegal memory access or a silently wrong slice at the end of the tensor. The kernel runs once on the whole
# tensor; the reference runs chunk by chunk (it could not hold the whole problem) on the first slice and on
# the slices past the 2**31 boundary, plus every reduction over the whole tensor (weight gradients). The
# comparison is the tolerance table (tests/tolerances.py) with an fp32 oracle (the fp64 oracle of the CPU tests
# is too slow at this size; fp32's error is ~1e-7, far below the bf16 bound) and PyTorch's same-dtype result
# as the baseline. Sized for an 80 GB H100 (peak ~40 GB); each case frees its memory before the next.

BF = torch.bfloat16
# HF_FASTKERN_HUGE_DRYRUN=1 shrinks every size around a fake "2**31" of 2**13 and runs on the CPU (with
# TRITON_INTERPRET=1), to check this file's own slicing and bookkeeping without a GPU. Not a test mode.
HUGE_DRY = os.environ.get("HF_FASTKERN_HUGE_DRYRUN", "0") == "1"
HUGE_DEV = "cpu" if HUGE_DRY else "cuda"
I32 = 2**13 if HUGE_DRY else 2**31
HUGE_SIZES = dict(
    norm_hidden=64, norm_extra=8, norm_chunk=16,
    inter=96, inter_extra=4, act_chunk=8,
    attn=(20, 32, 2, 16), attn_chunk=2,
    varlen_hd=(2, 16), varlen_pattern=[32, 17, 48, 0, 7, 32, 1], varlen_extra=64, varlen_seqs=3,
    vocab=301, ce_extra=6, ce_chunk=4,
    flce=(64, 16, 301), flce_chunk=16,
) if HUGE_DRY else dict(
    norm_hidden=4096, norm_extra=256, norm_chunk=32768,
    inter=14336, inter_extra=64, act_chunk=8192,
    attn=(1040, 1024, 16, 128), attn_chunk=16,
    varlen_hd=(16, 128), varlen_pattern=[1024, 513, 1536, 0, 7, 1024, 1], varlen_extra=64 * 1024, varlen_seqs=8,
    vocab=128256, ce_extra=64, ce_chunk=1024,
    flce=(32768, 1024, 128256), flce_chunk=2048,
)


def huge_sync():
    if HUGE_DEV == "cuda":
        torch.cuda.synchronize()


def kw_if_supported(fn, **kw):
    """Keyword arguments the entry point accepts (e.g. require_kernel=True: never fall back silently here)."""
    params = inspect.signature(fn).parameters
    return {k: v for k, v in kw.items() if k in params}


def huge_randn(*shape, dtype=BF, scale=1.0):
    t = torch.empty(*shape, device=HUGE_DEV, dtype=dtype)
    return t.normal_(0.0, scale)


def huge_slices(n: int, boundary_row: int, chunk: int) -> list[slice]:
    """The first chunk, and every chunk from just before the int32 boundary to the end."""
    start = max(chunk, (boundary_row // chunk) * chunk - chunk)
    return [slice(0, chunk)] + [slice(i, min(i + chunk, n)) for i in range(start, n, chunk)]


def check_norm_tokens_times_hidden_over_2_31(op: str) -> None:
    hidden = HUGE_SIZES["norm_hidden"]
    rows = I32 // hidden + HUGE_SIZES["norm_extra"]  # 524544 rows x 4096 = 2.15e9 elements (4.3 GB per bf16 tensor)
    assert rows * hidden > I32
    x = huge_randn(rows, hidden)
    w = (huge_randn(hidden, dtype=torch.float32) * 0.1 + 1).to(BF).requires_grad_(True)
    b = huge_randn(hidden).requires_grad_(True) if op == "layer_norm" else None
    x.requires_grad_(True)
    if op == "rms_norm":
        fn = lambda x, w, b: rms_norm(x, w, 1e-6)
        ref = lambda x, w, b: reference.rms_norm(x, w, 1e-6)
    else:
        fn = lambda x, w, b: layer_norm(x, w, b, 1e-5)
        ref = lambda x, w, b: reference.layer_norm(x, w, b, 1e-5)
    y = fn(x, w, b)
    dy = huge_randn(rows, hidden)
    y.backward(dy)
    huge_sync()
    params = [w] + ([b] if b is not None else [])
    chunk = HUGE_SIZES["norm_chunk"]
    dparam_oracle = [torch.zeros(hidden, device=HUGE_DEV, dtype=torch.float32) for _ in params]
    dparam_base = [torch.zeros(hidden, device=HUGE_DEV, dtype=torch.float32) for _ in params]
    checked = {(s.start, s.stop) for s in huge_slices(rows, I32 // hidden, chunk)}
    for i in range(0, rows, chunk):
        s = slice(i, min(i + chunk, rows))
        xo = x.detach()[s].float().requires_grad_(True)
        po = [p.detach().float().requires_grad_(True) for p in params]
        xb = x.detach()[s].clone().requires_grad_(True)
        pb = [p.detach().clone().requires_grad_(True) for p in params]
        yo = ref(xo, *po, *([None] * (2 - len(po))))
        yb = ref(xb, *pb, *([None] * (2 - len(pb))))
        yo.backward(dy[s].float())
        yb.backward(dy[s])
        for acc, p in zip(dparam_oracle, po):
            acc += p.grad
        for acc, p in zip(dparam_base, pb):
            acc += p.grad.float()
        if (s.start, s.stop) in checked:
            assert_close(y.detach()[s], yo.detach(), yb.detach(), BF, "output", f"{op} rows {s.start}:{s.stop}")
            assert_close(x.grad[s], xo.grad, xb.grad, BF, "grad", f"{op} dx rows {s.start}:{s.stop}")
    for i, p in enumerate(params):
        assert_close(p.grad, dparam_oracle[i], dparam_base[i].to(BF), BF, "grad", f"{op} dparam[{i}] over all rows")


# ----------------------------------------------------------------------------------------------------------
# bad input: the shared case tables (each op's test file runs its own ids)
#
# Every case either raises a Python ``ValueError``/``TypeError`` whose message names the offending argument,
# or (for inputs that have a well-defined answer: non-contiguous and strided views, zero-length batches) returns
# the correct result, forward and gradients, held to the tolerance table. Never a silent wrong value, never a
# device-side assert. Device mixes use a ``meta`` tensor as the second device so they run on a CPU-only machine.

ERRORS = (ValueError, TypeError)


H = 24  # hidden size of the norm/activation cases


def raises_naming(fn, *names: str) -> str:
    """``fn()`` raises ValueError/TypeError and the message names one of ``names`` (as a word)."""
    with pytest.raises(ERRORS) as info:
        fn()
    msg = str(info.value)
    assert any(re.search(rf"(?<![A-Za-z0-9_]){re.escape(n)}(?![A-Za-z0-9_])", msg) for n in names), (
        f"error does not name any of {names}: {type(info.value).__name__}: {msg}")
    return msg


def r(*shape, dtype=torch.bfloat16, device="cpu"):
    return torch.randn(shape, device=device).to(dtype)


def meta_like(t: torch.Tensor) -> torch.Tensor:
    return torch.empty(t.shape, dtype=t.dtype, device="meta")


def _attn(device, b=2, s=8, h=4, hk=2, d=16, dtype=torch.bfloat16):
    return r(b, s, h, d, dtype=dtype, device=device), r(b, s, hk, d, dtype=dtype, device=device), \
        r(b, s, hk, d, dtype=dtype, device=device)


def _varlen(device, total=10, h=4, hk=2, d=16):
    q, k, v = (r(total, n, d, device=device) for n in (h, hk, hk))
    cu = torch.tensor([0, 4, total], dtype=torch.int32, device=device)
    return q, k, v, cu


ERROR_CASES = {
    # --- rms_norm
    "rms_norm/x-int": (lambda d: lambda: rms_norm(torch.ones(3, H, dtype=torch.int32, device=d), r(H, device=d)), ["x"]),
    "rms_norm/weight-int": (lambda d: lambda: rms_norm(r(3, H, device=d), torch.ones(H, dtype=torch.long, device=d)), ["weight"]),
    "rms_norm/weight-hidden-mismatch": (lambda d: lambda: rms_norm(r(3, H, device=d), r(H - 1, device=d)), ["weight"]),
    "rms_norm/weight-2d": (lambda d: lambda: rms_norm(r(3, H, device=d), r(1, H, device=d)), ["weight"]),
    "rms_norm/x-0d": (lambda d: lambda: rms_norm(r(device=d), r(1, device=d)), ["x"]),
    "rms_norm/weight-other-device": (lambda d: lambda: rms_norm(r(3, H, device=d), meta_like(r(H))), ["weight"]),
    "rms_norm/x-other-device": (lambda d: lambda: rms_norm(meta_like(r(3, H)), r(H, device=d)), ["x", "weight"]),
    # --- layer_norm
    "layer_norm/x-int": (lambda d: lambda: layer_norm(torch.ones(3, H, dtype=torch.int64, device=d), r(H, device=d), r(H, device=d)), ["x"]),
    "layer_norm/weight-hidden-mismatch": (lambda d: lambda: layer_norm(r(3, H, device=d), r(H + 1, device=d), r(H, device=d)), ["weight"]),
    "layer_norm/bias-hidden-mismatch": (lambda d: lambda: layer_norm(r(3, H, device=d), r(H, device=d), r(H - 2, device=d)), ["bias"]),
    "layer_norm/bias-int": (lambda d: lambda: layer_norm(r(3, H, device=d), r(H, device=d), torch.zeros(H, dtype=torch.int32, device=d)), ["bias"]),
    "layer_norm/x-0d": (lambda d: lambda: layer_norm(r(device=d), None, None), ["x"]),
    "layer_norm/bias-other-device": (lambda d: lambda: layer_norm(r(3, H, device=d), r(H, device=d), meta_like(r(H))), ["bias"]),
    # --- activations
    "swiglu/shape-mismatch": (lambda d: lambda: swiglu(r(3, H, device=d), r(3, H + 1, device=d)), ["gate", "up"]),
    "swiglu/rows-mismatch": (lambda d: lambda: swiglu(r(3, H, device=d), r(4, H, device=d)), ["gate", "up"]),
    "swiglu/gate-int": (lambda d: lambda: swiglu(torch.ones(3, H, dtype=torch.int32, device=d), r(3, H, device=d)), ["gate"]),
    "swiglu/up-int": (lambda d: lambda: swiglu(r(3, H, device=d), torch.ones(3, H, dtype=torch.int32, device=d)), ["up"]),
    "swiglu/up-other-device": (lambda d: lambda: swiglu(r(3, H, device=d), meta_like(r(3, H))), ["up", "gate"]),
    "geglu/shape-mismatch": (lambda d: lambda: geglu(r(3, H, device=d), r(2, H, device=d)), ["gate", "up"]),
    "geglu/bad-approximate": (lambda d: lambda: geglu(r(3, H, device=d), r(3, H, device=d), approximate="fast"), ["approximate"]),
    "gelu/bad-approximate": (lambda d: lambda: gelu(r(3, H, device=d), approximate="erf"), ["approximate"]),
    "gelu/x-int": (lambda d: lambda: gelu(torch.ones(3, H, dtype=torch.int32, device=d)), ["x"]),
    # --- flash_attention ([batch, seq, heads, head_dim])
    "flash_attention/q-3d": (lambda d: lambda: flash_attention(r(8, 4, 16, device=d), *_attn(d)[1:]), ["q"]),
    "flash_attention/k-head_dim-mismatch": (lambda d: lambda: flash_attention(_attn(d)[0], r(2, 8, 2, 32, device=d), r(2, 8, 2, 32, device=d)), ["k"]),
    "flash_attention/heads-not-multiple": (lambda d: lambda: flash_attention(r(2, 8, 5, 16, device=d), *_attn(d)[1:]), ["q", "k", "heads"]),
    "flash_attention/dtype-mismatch": (lambda d: lambda: flash_attention(_attn(d)[0], *_attn(d, dtype=torch.float16)[1:]), ["q", "k", "v"]),
    "flash_attention/q-int": (lambda d: lambda: flash_attention(torch.ones(2, 8, 4, 16, dtype=torch.int32, device=d), *_attn(d)[1:]), ["q"]),
    "flash_attention/k-other-device": (lambda d: lambda: flash_attention(_attn(d)[0], meta_like(_attn(d)[1]), _attn(d)[2]), ["k"]),
    "flash_attention/batch-mismatch": (lambda d: lambda: flash_attention(_attn(d)[0], r(3, 8, 2, 16, device=d), r(3, 8, 2, 16, device=d)), ["k"]),
    "flash_attention/v-seq-mismatch": (lambda d: lambda: flash_attention(_attn(d)[0], _attn(d)[1], r(2, 7, 2, 16, device=d)), ["v"]),
    "flash_attention/v-heads-mismatch": (lambda d: lambda: flash_attention(_attn(d)[0], _attn(d)[1], r(2, 8, 4, 16, device=d)), ["v"]),
    # --- flash_attention_varlen ([total, heads, head_dim] + cu_seqlens int32 [n_seq + 1])
    "varlen/q-4d": (lambda d: lambda: flash_attention_varlen(r(1, 10, 4, 16, device=d), *_varlen(d)[1:3], _varlen(d)[3], _varlen(d)[3], 6, 6), ["q"]),
    "varlen/cu_seqlens-float": (lambda d: lambda: flash_attention_varlen(*_varlen(d)[:3], _varlen(d)[3].float(), _varlen(d)[3], 6, 6), ["cu_seqlens_q"]),
    "varlen/cu_seqlens-2d": (lambda d: lambda: flash_attention_varlen(*_varlen(d)[:3], _varlen(d)[3][None], _varlen(d)[3], 6, 6), ["cu_seqlens_q"]),
    "varlen/cu_seqlens-count-mismatch": (lambda d: lambda: flash_attention_varlen(*_varlen(d)[:3], _varlen(d)[3], torch.tensor([0, 10], dtype=torch.int32, device=d), 6, 10), ["cu_seqlens_k", "cu_seqlens_q"]),
    "varlen/cu_seqlens-past-total": (lambda d: lambda: flash_attention_varlen(*_varlen(d)[:3], torch.tensor([0, 4, 13], dtype=torch.int32, device=d), torch.tensor([0, 4, 13], dtype=torch.int32, device=d), 9, 9), ["cu_seqlens_q", "cu_seqlens_k"]),
    "varlen/k-head_dim-mismatch": (lambda d: lambda: flash_attention_varlen(_varlen(d)[0], r(10, 2, 8, device=d), r(10, 2, 8, device=d), _varlen(d)[3], _varlen(d)[3], 6, 6), ["k"]),
    # --- fused_linear_cross_entropy (hidden [tokens, hidden], weight [vocab, hidden], labels [tokens])
    "flce/hidden-int": (lambda d: lambda: fused_linear_cross_entropy(torch.ones(4, H, dtype=torch.int32, device=d), r(11, H, device=d), torch.zeros(4, dtype=torch.long, device=d)), ["hidden"]),
    "flce/weight-hidden-mismatch": (lambda d: lambda: fused_linear_cross_entropy(r(4, H, device=d), r(11, H + 3, device=d), torch.zeros(4, dtype=torch.long, device=d)), ["weight"]),
    "flce/labels-float": (lambda d: lambda: fused_linear_cross_entropy(r(4, H, device=d), r(11, H, device=d), torch.zeros(4, device=d)), ["labels"]),
    "flce/labels-count-mismatch": (lambda d: lambda: fused_linear_cross_entropy(r(4, H, device=d), r(11, H, device=d), torch.zeros(5, dtype=torch.long, device=d)), ["labels"]),
    "flce/label-too-large": (lambda d: lambda: fused_linear_cross_entropy(r(4, H, device=d), r(11, H, device=d), torch.tensor([0, 11, 2, 3], device=d)), ["labels"]),
    "flce/label-negative": (lambda d: lambda: fused_linear_cross_entropy(r(4, H, device=d), r(11, H, device=d), torch.tensor([0, 1, -5, 3], device=d)), ["labels"]),
    "flce/bias-shape": (lambda d: lambda: fused_linear_cross_entropy(r(4, H, device=d), r(11, H, device=d), torch.zeros(4, dtype=torch.long, device=d), r(10, device=d)), ["bias"]),
    "flce/weight-other-device": (lambda d: lambda: fused_linear_cross_entropy(r(4, H, device=d), meta_like(r(11, H)), torch.zeros(4, dtype=torch.long, device=d)), ["weight"]),
    "flce/bad-reduction": (lambda d: lambda: fused_linear_cross_entropy(r(4, H, device=d), r(11, H, device=d), torch.zeros(4, dtype=torch.long, device=d), reduction="avg"), ["reduction"]),
    # --- cross_entropy (logits [tokens, vocab], labels [tokens])
    "ce/logits-0d": (lambda d: lambda: cross_entropy(r(device=d), torch.zeros(1, dtype=torch.long, device=d)), ["logits"]),
    "ce/logits-1d-labels-mismatch": (lambda d: lambda: cross_entropy(r(11, device=d), torch.zeros(3, dtype=torch.long, device=d)), ["logits", "labels"]),
    "ce/logits-int": (lambda d: lambda: cross_entropy(torch.ones(4, 11, dtype=torch.int32, device=d), torch.zeros(4, dtype=torch.long, device=d)), ["logits"]),
    "ce/labels-count-mismatch": (lambda d: lambda: cross_entropy(r(4, 11, device=d), torch.zeros(3, dtype=torch.long, device=d)), ["labels"]),
    "ce/labels-float": (lambda d: lambda: cross_entropy(r(4, 11, device=d), torch.zeros(4, device=d)), ["labels"]),
    "ce/label-too-large": (lambda d: lambda: cross_entropy(r(4, 11, device=d), torch.tensor([0, 1, 2, 40], device=d)), ["labels"]),
    "ce/label-negative": (lambda d: lambda: cross_entropy(r(4, 11, device=d), torch.tensor([-1, 1, 2, 3], device=d)), ["labels"]),
    "ce/labels-other-device": (lambda d: lambda: cross_entropy(r(4, 11, device=d), torch.zeros(4, dtype=torch.long, device="meta")), ["labels", "logits"]),
    "ce/bad-reduction": (lambda d: lambda: cross_entropy(r(4, 11, device=d), torch.zeros(4, dtype=torch.long, device=d), reduction="max"), ["reduction"]),
    # --- apply_fast_kernels
    "apply_fast_kernels/not-a-module": (lambda d: lambda: hf_fastkern.apply_fast_kernels("meta-llama/Llama-3-8B"), ["model"]),
    "revert_fast_kernels/not-a-module": (lambda d: lambda: hf_fastkern.revert_fast_kernels(42), ["model"]),
}


# Cases where a missing check reads out of bounds (an illegal memory access on the GPU, a segfault in the
# interpreter): run in a child process so a crash is reported as this test's failure, not the suite's death.
OUT_OF_BOUNDS = {"varlen/cu_seqlens-past-total"}


# Genuine bugs found by these tests and not fixed by their owners at the time of writing (issue 8 report).
# strict=True: the day one is fixed, its xfail turns into a failure and must be removed here.
KNOWN_BUGS = {
}


def case_params(ids):
    return [pytest.param(c, id=c, marks=[pytest.mark.xfail(strict=True, reason=KNOWN_BUGS[c])] if c in KNOWN_BUGS
                         else []) for c in ids]


def case_ids(ids, *prefixes: str) -> list[str]:
    """The ids of a shared case table that belong to one test file (the op's name before the ``/``)."""
    return [c for c in ids if c.startswith(prefixes)]


def check_error_case(case: str, device: str) -> None:
    build, names = ERROR_CASES[case]
    if case in OUT_OF_BOUNDS:
        code = ("import sys; import tests.harness as t; b, n = t.ERROR_CASES[sys.argv[1]]; "
                "t.raises_naming(b(sys.argv[2]), *n)")
        env = {**os.environ, "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET", "0")}
        p = subprocess.run([sys.executable, "-c", code, case, device], capture_output=True, text=True, env=env,
                           cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), timeout=300)
        assert p.returncode == 0, f"{case}: child exited with {p.returncode} (negative = killed by a signal)\n" \
                                  f"{p.stderr[-2000:]}"
        return
    raises_naming(build(device), *names)


def view_cases(device):
    """(id, kernel_fn, reference_fn, leaf inputs, dtype): the view is taken inside the functions so the
    gradient flows back through it to the contiguous leaf."""
    bf = torch.bfloat16
    big = r(6, 2 * H, dtype=bf, device=device)
    tall = r(H, 5, dtype=bf, device=device)
    w, bias = r(H, dtype=bf, device=device), r(H, dtype=bf, device=device)
    w2 = r(2 * H, dtype=bf, device=device)
    x3 = r(2, 5, H, dtype=bf, device=device)
    qkv = r(2, 4, 9, 3 * 16, dtype=bf, device=device)  # [batch, heads, seq, 3*head_dim] one projection
    logits_big = r(5, 40, dtype=bf, device=device)
    labels = torch.tensor([0, 3, -100, 17, 9], device=device)
    hid = r(H, 5, dtype=bf, device=device)
    wt = r(H, 19, dtype=bf, device=device)
    lab5 = torch.tensor([0, 18, 3, -100, 7], device=device)

    def split_attn(fn):
        # transformers' layout: [batch, heads, seq, head_dim] views handed over as [batch, seq, heads, head_dim]
        return lambda t: fn(t[..., :16].transpose(1, 2), t[..., 16:32].transpose(1, 2), t[..., 32:].transpose(1, 2))

    return [
        ("rms_norm/x-strided-last-dim", lambda t, w: rms_norm(t[:, ::2], w), lambda t, w: reference.rms_norm(t[:, ::2], w), [big, w]),
        ("rms_norm/x-transposed", lambda t, w: rms_norm(t.t(), w), lambda t, w: reference.rms_norm(t.t(), w), [tall, w]),
        ("rms_norm/x-3d-sliced", lambda t, w: rms_norm(t[:, 1:], w), lambda t, w: reference.rms_norm(t[:, 1:], w), [x3, w]),
        ("rms_norm/weight-strided", lambda t, w: rms_norm(t[:, :H], w[::2]), lambda t, w: reference.rms_norm(t[:, :H], w[::2]), [big, w2]),
        ("rms_norm/bf16-x-fp32-weight", lambda t, w: rms_norm(t, w), lambda t, w: reference.rms_norm(t, w), [x3, w.float()]),
        ("layer_norm/x-strided-last-dim", lambda t, w, b: layer_norm(t[:, 1::2], w, b), lambda t, w, b: reference.layer_norm(t[:, 1::2], w, b), [big, w, bias]),
        ("layer_norm/weight-bias-strided", lambda t, w: layer_norm(t[:, :H], w[::2], w[1::2]), lambda t, w: reference.layer_norm(t[:, :H], w[::2], w[1::2]), [big, w2]),
        ("layer_norm/x-transposed", lambda t: layer_norm(t.t(), None, None), lambda t: reference.layer_norm(t.t(), None, None), [tall]),
        ("swiglu/fused-gate-up-halves", lambda t: swiglu(*t.chunk(2, -1)), lambda t: reference.swiglu(*t.chunk(2, -1)), [big]),
        ("swiglu/transposed", lambda a, b: swiglu(a.t(), b.t()), lambda a, b: reference.swiglu(a.t(), b.t()), [tall, tall.clone()]),
        ("geglu/fused-halves-tanh", lambda t: geglu(*t.chunk(2, -1), approximate="tanh"), lambda t: reference.geglu(*t.chunk(2, -1), approximate="tanh"), [big]),
        ("gelu/strided", lambda t: gelu(t[:, ::3]), lambda t: reference.gelu(t[:, ::3]), [big]),
        ("flash_attention/qkv-views-of-one-projection", split_attn(lambda q, k, v: flash_attention(q, k, v, causal=True)),
         split_attn(lambda q, k, v: reference.attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True).transpose(1, 2)), [qkv]),
        ("cross_entropy/logits-vocab-slice", lambda z: cross_entropy(z[:, :33], labels), lambda z: reference.cross_entropy(z[:, :33], labels), [logits_big]),
        ("flce/hidden-and-weight-transposed", lambda h, w: fused_linear_cross_entropy(h.t(), w.t(), lab5),
         lambda h, w: reference.linear_cross_entropy(h.t(), w.t(), lab5), [hid, wt]),
    ]


VIEW_IDS = [c[0] for c in view_cases("cpu")]


def check_view_case(case: str, device: str) -> None:
    (_, fn, ref, ins), = [c for c in view_cases(device) if c[0] == case]
    check_op(fn, ref, ins, torch.bfloat16, case)


def zero_length_cases(device):
    bf = torch.bfloat16
    return [
        ("rms_norm/zero-rows", lambda: [r(0, H, dtype=bf, device=device), r(H, dtype=bf, device=device)], lambda x, w: rms_norm(x, w)),
        ("rms_norm/zero-batch-3d", lambda: [r(0, 7, H, dtype=bf, device=device), r(H, dtype=bf, device=device)], lambda x, w: rms_norm(x, w)),
        ("layer_norm/zero-rows", lambda: [r(0, H, dtype=bf, device=device), r(H, dtype=bf, device=device), r(H, dtype=bf, device=device)], lambda x, w, b: layer_norm(x, w, b)),
        ("swiglu/zero-rows", lambda: [r(0, H, dtype=bf, device=device), r(0, H, dtype=bf, device=device)], swiglu),
        ("geglu/zero-rows", lambda: [r(0, H, dtype=bf, device=device), r(0, H, dtype=bf, device=device)], geglu),
        ("gelu/zero-rows", lambda: [r(0, 3, H, dtype=bf, device=device)], gelu),
        ("flash_attention/zero-batch", lambda: [r(0, 8, 4, 16, device=device), r(0, 8, 2, 16, device=device), r(0, 8, 2, 16, device=device)], flash_attention),
        ("flash_attention/zero-q_len", lambda: [r(2, 0, 4, 16, device=device), r(2, 8, 2, 16, device=device), r(2, 8, 2, 16, device=device)], flash_attention),
        ("cross_entropy/zero-tokens-sum", lambda: [r(0, 11, dtype=bf, device=device)],
         lambda z: cross_entropy(z, torch.zeros(0, dtype=torch.long, device=device), reduction="sum")),
        ("flce/zero-tokens-sum", lambda: [r(0, H, dtype=bf, device=device), r(11, H, dtype=bf, device=device)],
         lambda h, w: fused_linear_cross_entropy(h, w, torch.zeros(0, dtype=torch.long, device=device), reduction="sum")),
    ]


ZERO_IDS = [c[0] for c in zero_length_cases("cpu")]


def check_zero_length_case(case: str, device: str) -> None:
    """An empty batch returns an empty (or zero) result of the right shape and dtype, and backward gives
    gradients of the inputs' shapes: empty for the batch, zeros for parameters."""
    (_, make, fn), = [c for c in zero_length_cases(device) if c[0] == case]
    ins = [t.requires_grad_(True) for t in make()]
    out = fn(*ins)
    assert torch.isfinite(out).all()
    if out.dim() == 0:
        assert float(out) == 0.0, "sum over zero tokens must be 0"
    else:
        assert 0 in out.shape
    out.sum().backward()
    for i, t in enumerate(ins):
        g = t.grad if t.grad is not None else torch.zeros_like(t)
        assert g.shape == t.shape and (g == 0).all(), f"{case}: gradient of input {i}"


# ----------------------------------------------------------------------------------------------------------
# determinism: two runs of a backward give bit-identical gradients (see tests/test_dispatch.py)

def determinism_cases(device: str, big: bool):
    """(name, fn(*inputs) -> output, input builders). ``big`` sizes make many programs (GPU)."""
    bf = torch.bfloat16
    n, h, inter = (8192, 4096, 14336) if big else (37, 96, 80)
    b, s, hq, hk, d = (2, 2048, 16, 4, 128) if big else (1, 21, 2, 1, 16)
    vocab, hid = (32000, 2048) if big else (301, 48)
    lens = [0, 900, 1, 2047, 1100] if big else [0, 7, 1, 12]
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device=device)
    total, mx = sum(lens), max(lens)
    labels = torch.randint(0, vocab, (n,), device=device)
    labels[::5] = -100

    def rn(*shape):
        return lambda: torch.randn(*shape, device=device).to(bf)

    return [
        ("rms_norm", lambda x, w: rms_norm(x, w), [rn(n, h), rn(h)]),
        ("layer_norm", lambda x, w, bb: layer_norm(x, w, bb), [rn(n, h), rn(h), rn(h)]),
        ("swiglu", swiglu, [rn(n, inter), rn(n, inter)]),
        ("geglu", lambda a, c: geglu(a, c, approximate="tanh"), [rn(n, inter), rn(n, inter)]),
        ("gelu", gelu, [rn(n, inter)]),
        ("flash_attention_gqa_causal", lambda q, k, v: flash_attention(q, k, v, causal=True),
         [rn(b, s, hq, d), rn(b, s, hk, d), rn(b, s, hk, d)]),
        ("flash_attention_window_bidir", lambda q, k, v: flash_attention(q, k, v, causal=False, sliding_window=s // 3),
         [rn(b, s, hq, d), rn(b, s, hk, d), rn(b, s, hk, d)]),
        ("flash_attention_varlen", lambda q, k, v: flash_attention_varlen(q, k, v, cu, cu, mx, mx, causal=True),
         [rn(total, hq, d), rn(total, hk, d), rn(total, hk, d)]),
        ("cross_entropy", lambda z: cross_entropy(z, labels, label_smoothing=0.1), [rn(n, vocab)]),
        ("fused_linear_cross_entropy", lambda x, w: fused_linear_cross_entropy(x, w, labels, z_loss=1e-4),
         [rn(n, hid), rn(vocab, hid)]),
    ]


def run_backward(fn, inputs, grad_seed: int = 3):
    ins = [t.detach().clone().requires_grad_(True) for t in inputs]
    out = fn(*ins)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(grad_seed)).to(out.device, out.dtype)
    out.backward(g)
    return [out.detach()] + [t.grad for t in ins]


def check_bitwise(name, fn, builders, runs: int):
    torch.manual_seed(0)
    inputs = [mk() for mk in builders]
    first = run_backward(fn, inputs)
    for r in range(1, runs):
        again = run_backward(fn, inputs)
        for i, (a, b) in enumerate(zip(first, again)):
            what = "output" if i == 0 else f"grad[{i - 1}]"
            # equal_nan: bitwise identity is the claim, NaN included (there should be none)
            same = torch.equal(a, b) or (torch.equal(a.isnan(), b.isnan())
                                         and torch.equal(a.nan_to_num(), b.nan_to_num()))
            assert same, f"{name}: {what} differs between run 0 and run {r}"


DETERMINISM_IDS = [c[0] for c in determinism_cases("cpu", big=False)]


def check_bitwise_case(case: str, device: str, big: bool, runs: int) -> None:
    (name, fn, builders), = [c for c in determinism_cases(device, big=big) if c[0] == case]
    check_bitwise(name, fn, builders, runs=runs)


def time_fwd_bwd_gpu(models: dict, x: torch.Tensor, dy: torch.Tensor, autocast: bool,
                     runs: int = 3) -> tuple[dict[str, float], dict[str, float]]:
    """(ms of the last of ``runs`` forward + backward calls, peak GiB) per named module, CUDA events, under bf16
    autocast when asked; gradients cleared between calls. The GPU tests' side-by-side figures (printed, not
    asserted: a benchmark is a script, benchmarks/)."""
    ms, peak = {}, {}
    for name, m in models.items():
        torch.cuda.reset_peak_memory_stats()
        for _ in range(runs):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
                y = m(x)
            y.backward(dy)
            end.record()
            torch.cuda.synchronize()
            ms[name] = start.elapsed_time(end)
            m.zero_grad(set_to_none=True)
            x.grad = None
        peak[name] = torch.cuda.max_memory_allocated() / 2**30
    return ms, peak


class CallCounter:
    """Wraps a callable and counts its calls (which path a call took: monkeypatch it in place of the original)."""

    def __init__(self, fn: Callable):
        self.fn, self.calls = fn, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.fn(*args, **kwargs)
