"""RMSNorm: Triton forward + backward, registered as ``hf_fastkern::rms_norm_fwd`` / ``rms_norm_bwd``.

Semantics are exactly ``reference.rms_norm``: statistics in fp32; Llama order (``cast_before_weight=True``)
rounds the normalised row to ``x.dtype`` and then multiplies by ``offset + weight`` in the promoted dtype of
x and weight (fp32 weights with bf16 x give fp32, as HF does); Gemma order multiplies in fp32 and rounds once.

Design:
- Forward: one tile of ``BLOCK_M`` rows x the whole padded row (``BLOCK_N = next_power_of_2(hidden)``) per
  program, so x is read once and y written once (the memory-traffic floor). Several rows per program only for
  narrow rows, to keep each program >= a few KiB of traffic.
- Backward: a persistent grid of ``SMs x PROGS_PER_SM`` programs striding over row tiles. Each program keeps
  its fp32 dW partial sum in registers and writes one row of ``dw_partial[n_programs, hidden]``;
  ``_sum_partials_kernel`` (one more launch, shared with layer_norm.py) sums the rows in a fixed order in fp32
  and writes dW in the weight's dtype (deterministic: no atomics). The per-row rstd saved by the forward
  avoids a second reduction.
- ``save_rstd_only=True`` (default) keeps x, weight and the fp32 rstd per row [rows] for backward (never the
  normalised activation). ``save_rstd_only=False`` keeps only x and weight; the backward recomputes rstd
  from x in registers (same memory traffic, one more row reduction, no [rows] buffer).
- Host cost per call decides these ops at training sizes (a ~0.1 ms kernel; Liger #323), so the launchers
  keep Python small: leading dimensions are flattened inside the autograd.Function (no view nodes in the
  graph), launch parameters are cached per (hidden, rows class, dtypes, flags), and ``TunedLaunch`` skips
  the autotuner wrapper once it has chosen a config. Forward: 2 allocations + 1 launch; backward: 2-3
  allocations + 2 launches.
Limits: hidden <= ``MAX_FUSED_HIDDEN`` (the whole row must sit in registers); wider rows fall back to the
reference with a warning. x's last dimension must be contiguous (otherwise it is copied once); rows may have
any stride. Offsets are int64, so tokens * hidden may exceed 2**31.
"""
import functools
import math
from typing import Optional

import torch
import triton
import triton.language as tl

from hf_fastkern.kernels import reference, routing
from hf_fastkern.kernels._triton_utils import (
    DirectLaunch,
    TunedLaunch,
    autotune,
    cdiv,
    device_props,
    next_pow2,
    persistent_grid,
    round_to,
    tune_configs,
)
from hf_fastkern.kernels.dispatch import (
    PerShape,
    check_floating,
    check_same_device,
    check_shape,
    device_check,
    entry_key,
    use_kernel,
)
from hf_fastkern.kernels.routing import forward_ad_active, leading_rows, records_grad

# Widest row kept entirely in registers (fp32: 64 KiB per row across up to 32 warps).
MAX_FUSED_HIDDEN = 65536


# ----------------------------------------------------------------------------------------------------------
# launch configuration (row_tile, partials_tile, sum_partials are shared with layer_norm.py)


@functools.lru_cache(maxsize=None)
def row_tile(hidden: int) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_N) for a row-wise norm: the whole row padded to a power of two, and enough rows per
    tile that a program moves >= 4096 elements (narrow rows would otherwise launch tiny programs)."""
    block_n = next_pow2(max(hidden, 1))
    block_m = max(1, min(16, 4096 // block_n))
    return block_m, block_n


@functools.lru_cache(maxsize=None)
def partials_tile(hidden: int, n_part: int) -> tuple[int, int, int, int]:
    """(BLOCK_P, BLOCK_N, num_warps, programs) of ``_sum_partials_kernel``.

    The partials are up to SMs x MAX_PROGS_PER_SM rows (1056 on an H100) of fp32 and one program owns a column
    strip, so the kernel is latency-bound unless each program keeps many loads in flight and there are about
    as many programs as SMs: strips of hidden/128 columns (16..64: 64-256 bytes per row, whole 32-byte
    sectors), and up to 4096 elements (16 KiB) loaded per loop step, 16 per thread over 8 warps. BLOCK_P
    follows n_part (a power of two, at most 4096 / BLOCK_N) so a handful of partial rows do not drag masked
    tiles; the summation order depends only on (hidden, n_part), so dW stays deterministic.
    """
    block_n = max(16, min(64, next_pow2(max(hidden // 128, 1))))
    block_p = min(4096 // block_n, next_pow2(max(n_part, 1)))
    warps = max(1, min(8, block_p * block_n // 512))
    return block_p, block_n, warps, cdiv(hidden, block_n)


def row_class(rows: int) -> int:
    """Autotune bucket for the row count (few buckets, so varying sequence lengths do not retune)."""
    return 0 if rows < 4096 else (1 if rows < 32768 else 2)


def prune_by_elems_per_thread(configs, named_args, **kwargs):
    """Keep configs whose threads each hold 4..64 elements of the tile: fewer wastes threads and breaks
    16-byte vector accesses, more spills registers. Keeps the config closest to the range if none fits."""
    elems = kwargs["BLOCK_M"] * kwargs["BLOCK_N"]
    pps_ok = [c for c in configs if c.num_warps * c.kwargs.get("PROGS_PER_SM", 1) <= 64]
    kept = [c for c in pps_ok if 4 <= elems // (32 * c.num_warps) <= 64]
    if kept:
        return kept
    return [min(pps_ok or configs, key=lambda c: abs(math.log2(max(elems // (32 * c.num_warps), 1)) - 3))]


FWD_CONFIGS = tune_configs([triton.Config({}, num_warps=w) for w in (1, 2, 4, 8, 16, 32)],
                           [triton.Config({}, num_warps=w) for w in (4, 8, 16)])

# PROGS_PER_SM: programs resident per SM in the persistent backward (latency hiding vs dW partial size).
BWD_CONFIGS = tune_configs(
    [triton.Config({"PROGS_PER_SM": p}, num_warps=w) for w in (4, 8, 16) for p in (1, 2, 4, 8)],
    [triton.Config({"PROGS_PER_SM": 2}, num_warps=w) for w in (4, 8, 16)])
# ----------------------------------------------------------------------------------------------------------
# kernels


@autotune(FWD_CONFIGS, key=["n_cols", "n_rows_class"],
           prune_configs_by={"early_config_prune": prune_by_elems_per_thread})
@triton.jit(do_not_specialize=["n_rows", "n_rows_class", "eps", "offset"])
def _rms_norm_fwd_kernel(X, W, Y, RSTD, n_rows, n_cols, n_rows_class, stride_x, stride_y, eps, offset,
                         HAS_W: tl.constexpr, CAST_BEFORE_W: tl.constexpr, ROUND_W: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM] int64: rows * stride may exceed 2**31
    cols = tl.arange(0, BLOCK_N)  # [BN]
    rmask = rows < n_rows
    cmask = cols < n_cols
    mask = rmask[:, None] & cmask[None, :]
    x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)  # [BM, BN]
    rstd = tl.rsqrt(tl.sum(x * x, axis=1) / n_cols + eps)  # [BM]
    tl.store(RSTD + rows, rstd, mask=rmask)
    y = x * rstd[:, None]
    if HAS_W:
        w = tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32) + offset
        if ROUND_W:
            # Llama order adds the offset in the weight's dtype (``weight + offset``), so round like it.
            w = round_to(w, W.dtype.element_ty).to(tl.float32)
        if CAST_BEFORE_W:
            # Llama order: the normalised row is rounded to x.dtype before the weight multiplies it.
            y = round_to(y, X.dtype.element_ty).to(tl.float32)
        y = y * w[None, :]
    tl.store(Y + rows[:, None] * stride_y + cols[None, :], round_to(y, Y.dtype.element_ty), mask=mask)


@autotune(BWD_CONFIGS, key=["n_cols", "n_rows_class"],
           prune_configs_by={"early_config_prune": prune_by_elems_per_thread})
@triton.jit(do_not_specialize=["n_rows", "n_rows_class", "eps", "offset"])
def _rms_norm_bwd_kernel(DY, X, W, RSTD, DX, DW_PART, n_rows, n_cols, n_rows_class, stride_dy, stride_x,
                         stride_dx, eps, offset,
                         HAS_W: tl.constexpr, CAST_BEFORE_W: tl.constexpr, ROUND_W: tl.constexpr,
                         RECOMPUTE_RSTD: tl.constexpr, COMPUTE_DW: tl.constexpr, PROGS_PER_SM: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid = tl.program_id(0)
    n_prog = tl.num_programs(0)
    cols = tl.arange(0, BLOCK_N)
    cmask = cols < n_cols
    if HAS_W:
        w = tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32) + offset
        if ROUND_W:
            w = round_to(w, W.dtype.element_ty).to(tl.float32)
    dw_acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    n_tiles = tl.cdiv(n_rows, BLOCK_M)
    for tile in range(pid, n_tiles, n_prog):
        # tile * BLOCK_M < n_rows fits int32; the int64 arange widens the sum before it multiplies a stride
        rows = tile * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)  # [BM] int64
        rmask = rows < n_rows
        mask = rmask[:, None] & cmask[None, :]
        x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + rows[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        if RECOMPUTE_RSTD:
            rstd = tl.rsqrt(tl.sum(x * x, axis=1) / n_cols + eps)
        else:
            rstd = tl.load(RSTD + rows, mask=rmask, other=0.0)
        xhat = x * rstd[:, None]  # [BM, BN]
        if HAS_W:
            g = dy * w[None, :]
            if COMPUTE_DW:
                if CAST_BEFORE_W:
                    # the forward multiplied the weight by the x.dtype-rounded row
                    dw_acc += dy * round_to(xhat, X.dtype.element_ty).to(tl.float32)
                else:
                    dw_acc += dy * xhat
        else:
            g = dy
        # d/dx of x * rstd(x): rstd * (g - xhat * mean(g * xhat))
        c = tl.sum(g * xhat, axis=1) / n_cols  # [BM]
        dx = (g - xhat * c[:, None]) * rstd[:, None]
        tl.store(DX + rows[:, None] * stride_dx + cols[None, :], round_to(dx, DX.dtype.element_ty), mask=mask)
    if HAS_W:
        if COMPUTE_DW:
            tl.store(DW_PART + pid.to(tl.int64) * n_cols + cols, tl.sum(dw_acc, axis=0), mask=cmask)


@triton.jit(do_not_specialize=["n_part"])
def _sum_partials_kernel(P, OUT, P2, OUT2, n_part, n_cols, HAS_2: tl.constexpr,
                         BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr):
    """OUT[c] = sum_p P[p, c] (and OUT2 from P2 when HAS_2): P, P2 [n_part, n_cols] fp32 contiguous; the sum is
    fp32 in a fixed order (deterministic), rounded once to OUT's dtype. One program per BLOCK_N columns."""
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    cmask = cols < n_cols
    acc = tl.zeros([BLOCK_P, BLOCK_N], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK_P, BLOCK_N], dtype=tl.float32)
    for p0 in range(0, n_part, BLOCK_P):
        prow = p0 + tl.arange(0, BLOCK_P).to(tl.int64)  # [BP] int64: n_part * n_cols may exceed 2**31
        mask = (prow < n_part)[:, None] & cmask[None, :]
        offs = prow[:, None] * n_cols + cols[None, :]
        acc += tl.load(P + offs, mask=mask, other=0.0)
        if HAS_2:
            acc2 += tl.load(P2 + offs, mask=mask, other=0.0)
    tl.store(OUT + cols, round_to(tl.sum(acc, axis=0), OUT.dtype.element_ty), mask=cmask)
    if HAS_2:
        tl.store(OUT2 + cols, round_to(tl.sum(acc2, axis=0), OUT2.dtype.element_ty), mask=cmask)


_SUM_PARTIALS = DirectLaunch(_sum_partials_kernel)


def sum_partials(part: torch.Tensor, n_part: int, out: torch.Tensor, part2: Optional[torch.Tensor] = None,
                 out2: Optional[torch.Tensor] = None) -> None:
    """out[:] = part[:n_part].sum(0) (and out2 from part2) in one launch, replacing torch's slice + sum + cast.

    part, part2: [>= n_part, hidden] fp32 contiguous partial sums (rows past n_part are ignored); out, out2:
    [hidden] in any supported dtype (a parameter's dtype: the cast is fused). Deterministic: each column is
    summed in fp32 in a fixed order that depends only on n_part and hidden.
    """
    hidden = out.shape[0]
    block_p, block_n, warps, programs = partials_tile(hidden, n_part)
    has_2 = part2 is not None
    _SUM_PARTIALS((programs,),
        part, out, part2 if has_2 else part, out2 if has_2 else out, n_part, hidden, HAS_2=has_2,
        BLOCK_P=block_p, BLOCK_N=block_n, num_warps=warps)


# ----------------------------------------------------------------------------------------------------------
# launchers: plain functions, registered below as torch.library custom ops (what torch.compile traces) and
# called directly by the eager autograd.Function (custom-op dispatch costs ~4x the host time of an
# autograd.Function, which decides small shapes: Liger #323). They take x with any leading dimensions and
# flatten it themselves: a reshape/view outside the Function would add two autograd nodes per call.

_FWD = TunedLaunch(_rms_norm_fwd_kernel)
_BWD = TunedLaunch(_rms_norm_bwd_kernel)


def _out_dtype(x: torch.Tensor, weight: Optional[torch.Tensor], cast_before_weight: bool) -> torch.dtype:
    if weight is None or not cast_before_weight or weight.dtype == x.dtype:
        return x.dtype
    return torch.promote_types(x.dtype, weight.dtype)


def rows_view(t: torch.Tensor) -> torch.Tensor:
    """t: [..., hidden] -> [rows, hidden] with a unit last stride (rows may keep any stride; copies only when
    no such view exists)."""
    if t.dim() != 2:
        t = t.reshape(-1, t.shape[-1])
    return t if t.stride(-1) == 1 else t.contiguous()


def _round_w(weight: Optional[torch.Tensor], offset: float, cast_before_weight: bool) -> bool:
    return weight is not None and cast_before_weight and offset != 0.0 and weight.dtype != torch.float32


def _rms_norm_fwd_impl(x: torch.Tensor, weight: Optional[torch.Tensor], eps: float, offset: float,
                       cast_before_weight: bool, save_rstd_only: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """x: [..., hidden] fp32/bf16/fp16 -> (y [..., hidden] contiguous in the output dtype, rstd [rows] fp32)."""
    y = torch.empty(x.shape, dtype=_out_dtype(x, weight, cast_before_weight), device=x.device)
    x2 = rows_view(x)
    rows, hidden = x2.shape
    rstd = torch.empty((rows,), dtype=torch.float32, device=x.device)
    if rows == 0:
        return y, rstd
    block_m, block_n = row_tile(hidden)
    has_w = weight is not None
    round_w = _round_w(weight, offset, cast_before_weight)
    rc = row_class(rows)
    # y is contiguous: its row stride is hidden whatever its leading shape
    _FWD((hidden, rc, x.dtype, weight.dtype if has_w else None, cast_before_weight, round_w),
         (cdiv(rows, block_m),),
         x2, weight if has_w else x2, y, rstd, rows, hidden, rc, x2.stride(0), hidden, eps, offset,
         HAS_W=has_w, CAST_BEFORE_W=cast_before_weight, ROUND_W=round_w, BLOCK_M=block_m, BLOCK_N=block_n)
    return y, rstd


rms_norm_fwd = torch.library.custom_op("hf_fastkern::rms_norm_fwd", mutates_args=())(_rms_norm_fwd_impl)


@rms_norm_fwd.register_fake
def _(x, weight, eps, offset, cast_before_weight, save_rstd_only):
    return (x.new_empty(x.shape, dtype=_out_dtype(x, weight, cast_before_weight)),
            x.new_empty((leading_rows(x),), dtype=torch.float32))


def _rms_norm_bwd_impl(dy: torch.Tensor, x: torch.Tensor, weight: Optional[torch.Tensor],
                       rstd: Optional[torch.Tensor], eps: float, offset: float, cast_before_weight: bool,
                       compute_dw: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """dy: [..., hidden] (output dtype); x: [..., hidden]; rstd: [rows] fp32, or None to recompute it.
    Returns (dx [..., hidden] contiguous x.dtype, dw [hidden] weight.dtype; an empty tensor when not computed)."""
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    want_dw = weight is not None and compute_dw
    x2, dy2 = rows_view(x), rows_view(dy)
    rows, hidden = x2.shape
    if rows == 0:
        return dx, (torch.zeros_like(weight) if want_dw else x.new_empty((0,)))
    block_m, block_n = row_tile(hidden)
    n_tiles = cdiv(rows, block_m)
    sms = device_props(x.device)["sms"]
    has_w = weight is not None
    round_w = _round_w(weight, offset, cast_before_weight)
    rc = row_class(rows)
    key = (hidden, rc, x.dtype, dy.dtype, weight.dtype if has_w else None, cast_before_weight, round_w,
           rstd is None, want_dw)
    n_prog, grid = persistent_grid(_BWD, key, n_tiles, sms)
    dw_part = torch.empty((n_prog, hidden) if want_dw else (1,), dtype=torch.float32, device=x.device)
    cfg = _BWD(key, grid,
               dy2, x2, weight if has_w else x2, rstd if rstd is not None else x2, dx, dw_part,
               rows, hidden, rc, dy2.stride(0), x2.stride(0), hidden, eps, offset,
               HAS_W=has_w, CAST_BEFORE_W=cast_before_weight, ROUND_W=round_w,
               RECOMPUTE_RSTD=rstd is None, COMPUTE_DW=want_dw, BLOCK_M=block_m, BLOCK_N=block_n)
    if not want_dw:
        return dx, x.new_empty((0,))
    dw = torch.empty((hidden,), dtype=weight.dtype, device=x.device)
    sum_partials(dw_part, min(n_tiles, sms * cfg["PROGS_PER_SM"]), dw)
    return dx, dw


rms_norm_bwd = torch.library.custom_op("hf_fastkern::rms_norm_bwd", mutates_args=())(_rms_norm_bwd_impl)


@rms_norm_bwd.register_fake
def _(dy, x, weight, rstd, eps, offset, cast_before_weight, compute_dw):
    dw = weight.new_empty(weight.shape) if (weight is not None and compute_dw) else x.new_empty((0,))
    return x.new_empty(x.shape), dw


def _save(ctx, x, weight, rstd, eps, offset, cast_before_weight, save_rstd_only):
    ctx.save_for_backward(x, weight, rstd if save_rstd_only else None)
    ctx.args = (eps, offset, cast_before_weight)


def _grads(ctx, dy, bwd):
    x, weight, rstd = ctx.saved_tensors
    eps, offset, cast_before_weight = ctx.args
    want_dw = weight is not None and ctx.needs_input_grad[1]
    dx, dw = bwd(dy, x, weight, rstd, eps, offset, cast_before_weight, want_dw)
    return dx, (dw if want_dw else None), None, None, None, None


def _setup_context(ctx, inputs, output):
    ctx.mark_non_differentiable(output[1])
    _save(ctx, inputs[0], inputs[1], output[1], *inputs[2:])


rms_norm_fwd.register_autograd(lambda ctx, dy, _drstd: _grads(ctx, dy, rms_norm_bwd), setup_context=_setup_context)


class RMSNormFunction(torch.autograd.Function):
    """Eager autograd path over the same launchers as the custom ops. x: [..., hidden] -> y [..., hidden]."""

    @staticmethod
    def forward(ctx, x, weight, eps, offset, cast_before_weight, save_rstd_only):
        y, rstd = _rms_norm_fwd_impl(x, weight, eps, offset, cast_before_weight, save_rstd_only)
        _save(ctx, x, weight, rstd, eps, offset, cast_before_weight, save_rstd_only)
        return y

    @staticmethod
    def backward(ctx, dy):
        return _grads(ctx, dy, _rms_norm_bwd_impl)


# ----------------------------------------------------------------------------------------------------------
# public entry


def _kernel_check(x: torch.Tensor, weight: Optional[torch.Tensor]) -> tuple[bool, str]:
    ok, why = device_check((x, weight))
    if ok and x.shape[-1] > MAX_FUSED_HIDDEN:
        return False, f"hidden size {x.shape[-1]} > {MAX_FUSED_HIDDEN} does not fit the one-row-in-registers kernel"
    return ok, why


def _validate(x: torch.Tensor, weight: Optional[torch.Tensor]) -> None:
    check_floating("x", x)
    if x.dim() == 0:
        raise ValueError("x must have at least one dimension [..., hidden], got a 0-d tensor")
    if weight is not None:
        check_floating("weight", weight)
        check_shape("weight", weight, (x.shape[-1],))
        check_same_device(x=x, weight=weight)


# validation and the kernel/reference decision, once per call signature (dispatch.entry_key)
_ENTRY = PerShape()


def rms_norm_routed(x: torch.Tensor, weight: Optional[torch.Tensor]) -> bool:
    """Does the routing table send this call to the kernel? False: the module's own (stock) forward should run.
    (CPU tensors: True, the interpreter runs the kernels.)"""
    return routing.use_kernel("rms_norm", x.device, tokens=leading_rows(x), hidden=x.shape[-1],
                              grad=records_grad(x, weight))


def rms_norm(x: torch.Tensor, weight: Optional[torch.Tensor], eps: float = 1e-6, offset: float = 0.0,
             cast_before_weight: bool = True, save_rstd_only: bool = True) -> torch.Tensor:
    """RMSNorm over the last dimension, exactly ``reference.rms_norm``.

    x: [..., hidden] fp32/bf16/fp16 (any leading shape, any strides); weight: [hidden] or None.
    Returns [..., hidden] in x.dtype, or the promoted dtype of x and weight in Llama order
    (``cast_before_weight=True``). Gemma: ``offset=1.0, cast_before_weight=False``.
    ``save_rstd_only``: keep only the per-row fp32 rstd for backward (True) or recompute it there (False).
    """
    key = entry_key(x, weight)
    kernel = _ENTRY.get(key)
    if kernel is None:  # first call with this signature: validate (raises on bad input) and decide
        _validate(x, weight)
        kernel = use_kernel("rms_norm", _kernel_check(x, weight)) and routing.use_kernel(
            "rms_norm", x.device, tokens=leading_rows(x), hidden=x.shape[-1], grad=records_grad(x, weight))
        _ENTRY.put(key, kernel)
    if not kernel:
        return reference.rms_norm(x, weight, eps, offset, cast_before_weight)
    # The kernels index weight as a dense [hidden] vector; a strided view (w[::2]) is copied (autograd-tracked).
    if weight is not None and not weight.is_contiguous():
        weight = weight.contiguous()
    # x goes in with its leading dimensions: the launchers flatten them, so autograd records one node, not
    # the two views a reshape here and a view of the result would add (host time per call, forward and backward)
    args = (x, weight, float(eps), float(offset), bool(cast_before_weight), bool(save_rstd_only))
    if torch.compiler.is_compiling():
        return rms_norm_fwd(*args)[0]
    if not records_grad(x, weight) and not forward_ad_active():
        return _rms_norm_fwd_impl(*args)[0]  # generate(), eval: the launcher alone, no autograd node's host time
    return RMSNormFunction.apply(*args)
