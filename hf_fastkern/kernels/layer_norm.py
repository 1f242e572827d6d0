"""LayerNorm (weight and bias optional): Triton forward + backward as ``hf_fastkern::layer_norm_fwd/_bwd``.

Semantics are exactly ``reference.layer_norm``: mean, variance and the affine map in fp32, result in x.dtype
(GPT-2, GPT-NeoX, any ``nn.LayerNorm``).

Design (same shape as rms_norm.py, whose tile heuristic and config filter it shares):
- Forward: one tile of rows x the whole padded row per program; saves mean and rstd per row [rows] fp32.
- Backward: persistent grid of ``SMs x PROGS_PER_SM`` programs over row tiles; each keeps fp32 dW and dB
  partial sums in registers and writes one row of ``[n_programs, hidden]`` partials, reduced by a torch sum
  (deterministic, no atomics).
Limits: hidden <= ``MAX_FUSED_HIDDEN`` (else the reference, with a warning); last dimension contiguous (else
copied once); int64 offsets.
"""
from typing import Optional

import torch
import triton
import triton.language as tl

from hf_fastkern.kernels import reference
from hf_fastkern.kernels._triton_utils import device_props
from hf_fastkern.kernels.dispatch import (
    check_floating,
    check_same_device,
    check_shape,
    device_check,
    use_kernel,
)
from hf_fastkern.kernels.rms_norm import (
    BWD_CONFIGS,
    FWD_CONFIGS,
    MAX_FUSED_HIDDEN,
    MAX_PROGS_PER_SM,
    prune_by_elems_per_thread,
    round_to,
    row_class,
    row_tile,
)

# ----------------------------------------------------------------------------------------------------------
# kernels


@triton.autotune(configs=FWD_CONFIGS, key=["n_cols", "n_rows_class"],
                 prune_configs_by={"early_config_prune": prune_by_elems_per_thread})
@triton.jit(do_not_specialize=["n_rows", "eps"])
def _layer_norm_fwd_kernel(X, W, B, Y, MEAN, RSTD, n_rows, n_cols, n_rows_class, stride_x, stride_y, eps,
                           HAS_W: tl.constexpr, HAS_B: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM] int64
    cols = tl.arange(0, BLOCK_N)
    rmask = rows < n_rows
    cmask = cols < n_cols
    mask = rmask[:, None] & cmask[None, :]
    x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)  # [BM, BN]
    mean = tl.sum(x, axis=1) / n_cols
    # two-pass variance on the row already in registers: no cancellation, no extra memory traffic
    xc = tl.where(cmask[None, :], x - mean[:, None], 0.0)
    rstd = tl.rsqrt(tl.sum(xc * xc, axis=1) / n_cols + eps)
    tl.store(MEAN + rows, mean, mask=rmask)
    tl.store(RSTD + rows, rstd, mask=rmask)
    y = xc * rstd[:, None]
    if HAS_W:
        y = y * tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    if HAS_B:
        y = y + tl.load(B + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    tl.store(Y + rows[:, None] * stride_y + cols[None, :], round_to(y, Y.dtype.element_ty), mask=mask)


@triton.autotune(configs=BWD_CONFIGS, key=["n_cols", "n_rows_class"],
                 prune_configs_by={"early_config_prune": prune_by_elems_per_thread})
@triton.jit(do_not_specialize=["n_rows"])
def _layer_norm_bwd_kernel(DY, X, W, MEAN, RSTD, DX, DW_PART, DB_PART, n_rows, n_cols, n_rows_class,
                           stride_dy, stride_x, stride_dx,
                           HAS_W: tl.constexpr, COMPUTE_DW: tl.constexpr, COMPUTE_DB: tl.constexpr,
                           PROGS_PER_SM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid = tl.program_id(0)
    n_prog = tl.num_programs(0)
    cols = tl.arange(0, BLOCK_N)
    cmask = cols < n_cols
    if HAS_W:
        w = tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)
    dw_acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    db_acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    n_tiles = tl.cdiv(n_rows, BLOCK_M)
    for tile in range(pid, n_tiles, n_prog):
        # tile * BLOCK_M < n_rows fits int32; the int64 arange widens the sum before it multiplies a stride
        rows = tile * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)  # [BM] int64
        rmask = rows < n_rows
        mask = rmask[:, None] & cmask[None, :]
        x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + rows[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(MEAN + rows, mask=rmask, other=0.0)
        rstd = tl.load(RSTD + rows, mask=rmask, other=0.0)
        xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)  # [BM, BN]
        if HAS_W:
            g = dy * w[None, :]
            if COMPUTE_DW:
                dw_acc += dy * xhat
        else:
            g = dy
        if COMPUTE_DB:
            db_acc += dy
        # d/dx of (x - mean) * rstd: rstd * (g - mean(g) - xhat * mean(g * xhat))
        c1 = tl.sum(g * xhat, axis=1) / n_cols
        c2 = tl.sum(g, axis=1) / n_cols
        dx = (g - xhat * c1[:, None] - c2[:, None]) * rstd[:, None]
        tl.store(DX + rows[:, None] * stride_dx + cols[None, :], round_to(dx, DX.dtype.element_ty), mask=mask)
    if COMPUTE_DW:
        tl.store(DW_PART + pid.to(tl.int64) * n_cols + cols, tl.sum(dw_acc, axis=0), mask=cmask)
    if COMPUTE_DB:
        tl.store(DB_PART + pid.to(tl.int64) * n_cols + cols, tl.sum(db_acc, axis=0), mask=cmask)


# ----------------------------------------------------------------------------------------------------------
# launchers: plain functions, registered as torch.library custom ops (traced by torch.compile) and called
# directly by the eager autograd.Function (less host overhead than custom-op dispatch; see rms_norm.py).


def _rows_view(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _layer_norm_fwd_impl(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                   eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x: [rows, hidden] fp32/bf16/fp16 -> (y [rows, hidden] x.dtype, mean [rows] fp32, rstd [rows] fp32)."""
    rows, hidden = x.shape
    y = torch.empty((rows, hidden), dtype=x.dtype, device=x.device)
    mean = torch.empty((rows,), dtype=torch.float32, device=x.device)
    rstd = torch.empty((rows,), dtype=torch.float32, device=x.device)
    if rows == 0:
        return y, mean, rstd
    x = _rows_view(x)
    block_m, block_n = row_tile(hidden)
    _layer_norm_fwd_kernel[(triton.cdiv(rows, block_m),)](
        x, weight if weight is not None else x, bias if bias is not None else x, y, mean, rstd,
        rows, hidden, row_class(rows), x.stride(0), y.stride(0), eps,
        HAS_W=weight is not None, HAS_B=bias is not None, BLOCK_M=block_m, BLOCK_N=block_n)
    return y, mean, rstd


layer_norm_fwd = torch.library.custom_op("hf_fastkern::layer_norm_fwd", mutates_args=())(_layer_norm_fwd_impl)


@layer_norm_fwd.register_fake
def _(x, weight, bias, eps):
    rows = x.shape[0]
    return torch.empty_like(x), x.new_empty((rows,), dtype=torch.float32), x.new_empty((rows,), dtype=torch.float32)


def _layer_norm_bwd_impl(dy: torch.Tensor, x: torch.Tensor, weight: Optional[torch.Tensor], mean: torch.Tensor,
                   rstd: torch.Tensor, compute_dw: bool,
                   compute_db: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dy, x: [rows, hidden]; mean, rstd: [rows] fp32. Returns (dx x.dtype, dw [hidden] fp32, db [hidden] fp32);
    dw/db are empty tensors when not requested (the autograd wrapper casts them to the parameters' dtypes)."""
    rows, hidden = x.shape
    dx = torch.empty((rows, hidden), dtype=x.dtype, device=x.device)
    # distinct tensors: custom-op outputs may not alias each other
    empty = lambda: x.new_empty((0,), dtype=torch.float32)
    if rows == 0:
        zeros = lambda: x.new_zeros((hidden,), dtype=torch.float32)
        return dx, (zeros() if compute_dw else empty()), (zeros() if compute_db else empty())
    x, dy = _rows_view(x), _rows_view(dy)
    block_m, block_n = row_tile(hidden)
    n_tiles = triton.cdiv(rows, block_m)
    sms = device_props(x.device)["sms"]
    max_progs = min(n_tiles, sms * MAX_PROGS_PER_SM)
    dw_part = torch.empty((max_progs, hidden) if compute_dw else (1,), dtype=torch.float32, device=x.device)
    db_part = torch.empty((max_progs, hidden) if compute_db else (1,), dtype=torch.float32, device=x.device)
    launched = [max_progs]

    def grid(meta):
        # Remember the grid of the launch that counts (the autotuner calls this for every candidate first).
        launched[0] = min(n_tiles, sms * meta["PROGS_PER_SM"])
        return (launched[0],)

    _layer_norm_bwd_kernel[grid](
        dy, x, weight if weight is not None else x, mean, rstd, dx, dw_part, db_part,
        rows, hidden, row_class(rows), dy.stride(0), x.stride(0), dx.stride(0),
        HAS_W=weight is not None, COMPUTE_DW=compute_dw, COMPUTE_DB=compute_db, BLOCK_M=block_m, BLOCK_N=block_n)
    dw = dw_part[: launched[0]].sum(0) if compute_dw else empty()
    db = db_part[: launched[0]].sum(0) if compute_db else empty()
    return dx, dw, db


layer_norm_bwd = torch.library.custom_op("hf_fastkern::layer_norm_bwd", mutates_args=())(_layer_norm_bwd_impl)


@layer_norm_bwd.register_fake
def _(dy, x, weight, mean, rstd, compute_dw, compute_db):
    hidden = x.shape[1]
    dw = x.new_empty((hidden,) if compute_dw else (0,), dtype=torch.float32)
    db = x.new_empty((hidden,) if compute_db else (0,), dtype=torch.float32)
    return torch.empty_like(x), dw, db


def _save(ctx, x, weight, bias, mean, rstd):
    ctx.save_for_backward(x, weight, mean, rstd)
    ctx.param_dtypes = (None if weight is None else weight.dtype, None if bias is None else bias.dtype)


def _grads(ctx, dy, bwd):
    x, weight, mean, rstd = ctx.saved_tensors
    w_dtype, b_dtype = ctx.param_dtypes
    want_dw = w_dtype is not None and ctx.needs_input_grad[1]
    want_db = b_dtype is not None and ctx.needs_input_grad[2]
    dx, dw, db = bwd(dy, x, weight, mean, rstd, want_dw, want_db)
    return dx, (dw.to(w_dtype) if want_dw else None), (db.to(b_dtype) if want_db else None), None


def _setup_context(ctx, inputs, output):
    x, weight, bias, _ = inputs
    ctx.mark_non_differentiable(output[1], output[2])
    _save(ctx, x, weight, bias, output[1], output[2])


layer_norm_fwd.register_autograd(lambda ctx, dy, _dm, _dr: _grads(ctx, dy, layer_norm_bwd),
                                 setup_context=_setup_context)


class LayerNormFunction(torch.autograd.Function):
    """Eager autograd path over the same launchers as the custom ops. x: [rows, hidden] -> y [rows, hidden]."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps):
        y, mean, rstd = _layer_norm_fwd_impl(x, weight, bias, eps)
        _save(ctx, x, weight, bias, mean, rstd)
        return y

    @staticmethod
    def backward(ctx, dy):
        return _grads(ctx, dy, _layer_norm_bwd_impl)


# ----------------------------------------------------------------------------------------------------------
# public entry


def _kernel_check(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor]) -> tuple[bool, str]:
    ok, why = device_check((x, weight, bias))
    if ok and x.shape[-1] > MAX_FUSED_HIDDEN:
        return False, f"hidden size {x.shape[-1]} > {MAX_FUSED_HIDDEN} does not fit the one-row-in-registers kernel"
    return ok, why


def layer_norm(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
               eps: float = 1e-5) -> torch.Tensor:
    """LayerNorm over the last dimension, exactly ``reference.layer_norm``.

    x: [..., hidden] fp32/bf16/fp16 (any leading shape, any strides); weight, bias: [hidden] or None (any
    floating dtype, e.g. fp32 parameters with bf16 activations). Returns [..., hidden] in x.dtype.
    """
    check_floating("x", x)
    if x.dim() == 0:
        raise ValueError("x must have at least one dimension [..., hidden], got a 0-d tensor")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None:
            check_floating(name, t)
            check_shape(name, t, (x.shape[-1],))
    check_same_device(x=x, weight=weight, bias=bias)
    if not use_kernel("layer_norm", _kernel_check(x, weight, bias)):
        return reference.layer_norm(x, weight, bias, eps)
    # The kernels index weight/bias as dense [hidden] vectors; strided views are copied (autograd-tracked).
    weight = weight.contiguous() if weight is not None else None
    bias = bias.contiguous() if bias is not None else None
    args = (x.reshape(-1, x.shape[-1]), weight, bias, float(eps))
    if torch.compiler.is_compiling():
        y = layer_norm_fwd(*args)[0]
    else:
        y = LayerNormFunction.apply(*args)
    return y.view(*x.shape[:-1], x.shape[-1])
