"""LayerNorm (weight and bias optional): Triton forward + backward as ``hf_fastkern::layer_norm_fwd/_bwd``.

Semantics are exactly ``reference.layer_norm``: mean, variance and the affine map in fp32, result in x.dtype
(GPT-2, GPT-NeoX, any ``nn.LayerNorm``).

Design (same shape as rms_norm.py, whose tile heuristic and config filter it shares):
- Forward: one tile of rows x the whole padded row per program; saves the per-row statistics as one fp32
  tensor ``stats [2, rows]`` (mean, rstd): one allocation and one saved tensor instead of two.
- Backward: persistent grid of ``SMs x PROGS_PER_SM`` programs over row tiles; each keeps fp32 dW and dB
  partial sums in registers and writes one row of ``[n_programs, hidden]`` partials; one launch of
  rms_norm.py's ``sum_partials`` reduces both in a fixed order and writes dW and dB in the parameters' dtypes
  (deterministic, no atomics).
- Host cost as rms_norm.py: leading dimensions flattened inside the autograd.Function, cached launch
  parameters, ``TunedLaunch`` past the autotuner. Forward: 2 allocations + 1 launch; backward: 3-5
  allocations + 2 launches.
Limits: hidden <= ``MAX_FUSED_HIDDEN`` (else the reference, with a warning); last dimension contiguous (else
copied once); int64 offsets.
"""
from typing import Optional

import torch
import triton
import triton.language as tl

from hf_fastkern.kernels import reference, routing
from hf_fastkern.kernels._triton_utils import (
    TunedLaunch,
    autotune,
    cdiv,
    device_props,
    persistent_grid,
    round_to,
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
from hf_fastkern.kernels.rms_norm import (
    BWD_CONFIGS,
    FWD_CONFIGS,
    MAX_FUSED_HIDDEN,
    prune_by_elems_per_thread,
    row_class,
    row_tile,
    rows_view,
    sum_partials,
)
from hf_fastkern.kernels.routing import forward_ad_active, leading_rows, records_grad

# ----------------------------------------------------------------------------------------------------------
# kernels


@autotune(FWD_CONFIGS, key=["n_cols", "n_rows_class"],
           prune_configs_by={"early_config_prune": prune_by_elems_per_thread})
@triton.jit(do_not_specialize=["n_rows", "n_rows_class", "eps"])
def _layer_norm_fwd_kernel(X, W, B, Y, STATS, n_rows, n_cols, n_rows_class, stride_x, stride_y, eps,
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
    # STATS [2, n_rows] fp32: mean in row 0, rstd in row 1
    tl.store(STATS + rows, mean, mask=rmask)
    tl.store(STATS + n_rows + rows, rstd, mask=rmask)
    y = xc * rstd[:, None]
    if HAS_W:
        y = y * tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    if HAS_B:
        y = y + tl.load(B + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    tl.store(Y + rows[:, None] * stride_y + cols[None, :], round_to(y, Y.dtype.element_ty), mask=mask)


@autotune(BWD_CONFIGS, key=["n_cols", "n_rows_class"],
           prune_configs_by={"early_config_prune": prune_by_elems_per_thread})
@triton.jit(do_not_specialize=["n_rows", "n_rows_class"])
def _layer_norm_bwd_kernel(DY, X, W, STATS, DX, DW_PART, DB_PART, n_rows, n_cols, n_rows_class,
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
        mean = tl.load(STATS + rows, mask=rmask, other=0.0)
        rstd = tl.load(STATS + n_rows + rows, mask=rmask, other=0.0)
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
# They take x with any leading dimensions (no view nodes in the autograd graph; see rms_norm.py).

_FWD = TunedLaunch(_layer_norm_fwd_kernel)
_BWD = TunedLaunch(_layer_norm_bwd_kernel)


def _dtype(t: Optional[torch.Tensor]) -> Optional[torch.dtype]:
    return None if t is None else t.dtype


def _layer_norm_fwd_impl(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                         eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """x: [..., hidden] fp32/bf16/fp16 -> (y [..., hidden] contiguous x.dtype, stats [2, rows] fp32: mean, rstd)."""
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    x2 = rows_view(x)
    rows, hidden = x2.shape
    stats = torch.empty((2, rows), dtype=torch.float32, device=x.device)
    if rows == 0:
        return y, stats
    block_m, block_n = row_tile(hidden)
    rc = row_class(rows)
    _FWD((hidden, rc, x.dtype, _dtype(weight), _dtype(bias)), (cdiv(rows, block_m),),
         x2, weight if weight is not None else x2, bias if bias is not None else x2, y, stats,
         rows, hidden, rc, x2.stride(0), hidden, eps,
         HAS_W=weight is not None, HAS_B=bias is not None, BLOCK_M=block_m, BLOCK_N=block_n)
    return y, stats


layer_norm_fwd = torch.library.custom_op("hf_fastkern::layer_norm_fwd", mutates_args=())(_layer_norm_fwd_impl)


@layer_norm_fwd.register_fake
def _(x, weight, bias, eps):
    return x.new_empty(x.shape), x.new_empty((2, leading_rows(x)), dtype=torch.float32)


def _param_grad(dtype: Optional[torch.dtype], wanted: bool, x: torch.Tensor, hidden: int,
                fill_zero: bool = False) -> torch.Tensor:
    """A parameter's gradient buffer ([hidden] in its dtype), or an empty fp32 tensor when not wanted."""
    if not wanted:
        return x.new_empty((0,), dtype=torch.float32)
    if fill_zero:
        return x.new_zeros((hidden,), dtype=dtype)
    return x.new_empty((hidden,), dtype=dtype)


def _layer_norm_bwd_impl(dy: torch.Tensor, x: torch.Tensor, weight: Optional[torch.Tensor],
                         stats: torch.Tensor, bias_dtype: Optional[torch.dtype], compute_dw: bool,
                         compute_db: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dy, x: [..., hidden]; stats: [2, rows] fp32 (mean, rstd); bias_dtype: the bias's dtype (the bias itself
    is not needed). Returns (dx [..., hidden] contiguous x.dtype, dw [hidden] weight.dtype, db [hidden]
    bias_dtype); dw/db are empty fp32 tensors when not requested."""
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    x2, dy2 = rows_view(x), rows_view(dy)
    rows, hidden = x2.shape
    # distinct tensors: custom-op outputs may not alias each other
    if rows == 0:
        return (dx, _param_grad(_dtype(weight), compute_dw, x, hidden, True),
                _param_grad(bias_dtype, compute_db, x, hidden, True))
    block_m, block_n = row_tile(hidden)
    n_tiles = cdiv(rows, block_m)
    sms = device_props(x.device)["sms"]
    rc = row_class(rows)
    key = (hidden, rc, x.dtype, dy.dtype, _dtype(weight), compute_dw, compute_db)
    n_prog, grid = persistent_grid(_BWD, key, n_tiles, sms)
    dw_part = torch.empty((n_prog, hidden) if compute_dw else (1,), dtype=torch.float32, device=x.device)
    db_part = torch.empty((n_prog, hidden) if compute_db else (1,), dtype=torch.float32, device=x.device)
    cfg = _BWD(key, grid,
               dy2, x2, weight if weight is not None else x2, stats, dx, dw_part, db_part,
               rows, hidden, rc, dy2.stride(0), x2.stride(0), hidden,
               HAS_W=weight is not None, COMPUTE_DW=compute_dw, COMPUTE_DB=compute_db,
               BLOCK_M=block_m, BLOCK_N=block_n)
    n_prog = min(n_tiles, sms * cfg["PROGS_PER_SM"])
    dw = _param_grad(_dtype(weight), compute_dw, x, hidden)
    db = _param_grad(bias_dtype, compute_db, x, hidden)
    if compute_dw and compute_db:
        sum_partials(dw_part, n_prog, dw, db_part, db)
    elif compute_dw:
        sum_partials(dw_part, n_prog, dw)
    elif compute_db:
        sum_partials(db_part, n_prog, db)
    return dx, dw, db


layer_norm_bwd = torch.library.custom_op("hf_fastkern::layer_norm_bwd", mutates_args=())(_layer_norm_bwd_impl)


@layer_norm_bwd.register_fake
def _(dy, x, weight, stats, bias_dtype, compute_dw, compute_db):
    hidden = x.shape[-1]
    return (x.new_empty(x.shape), _param_grad(_dtype(weight), compute_dw, x, hidden),
            _param_grad(bias_dtype, compute_db, x, hidden))


def _save(ctx, x, weight, bias, stats):
    ctx.save_for_backward(x, weight, stats)
    ctx.bias_dtype = _dtype(bias)


def _grads(ctx, dy, bwd):
    x, weight, stats = ctx.saved_tensors
    want_dw = weight is not None and ctx.needs_input_grad[1]
    want_db = ctx.bias_dtype is not None and ctx.needs_input_grad[2]
    dx, dw, db = bwd(dy, x, weight, stats, ctx.bias_dtype, want_dw, want_db)
    return dx, (dw if want_dw else None), (db if want_db else None), None


def _setup_context(ctx, inputs, output):
    x, weight, bias, _ = inputs
    ctx.mark_non_differentiable(output[1])
    _save(ctx, x, weight, bias, output[1])


layer_norm_fwd.register_autograd(lambda ctx, dy, _dstats: _grads(ctx, dy, layer_norm_bwd),
                                 setup_context=_setup_context)


class LayerNormFunction(torch.autograd.Function):
    """Eager autograd path over the same launchers as the custom ops. x: [..., hidden] -> y [..., hidden]."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps):
        y, stats = _layer_norm_fwd_impl(x, weight, bias, eps)
        _save(ctx, x, weight, bias, stats)
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


def _validate(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor]) -> None:
    check_floating("x", x)
    if x.dim() == 0:
        raise ValueError("x must have at least one dimension [..., hidden], got a 0-d tensor")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None:
            check_floating(name, t)
            check_shape(name, t, (x.shape[-1],))
    check_same_device(x=x, weight=weight, bias=bias)


# validation and the kernel/reference decision, once per call signature (dispatch.entry_key)
_ENTRY = PerShape()


def layer_norm_routed(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor]) -> bool:
    """Does the routing table send this call to the kernel? False: the module's own (stock) forward should run."""
    return routing.use_kernel("layer_norm", x.device, tokens=leading_rows(x), hidden=x.shape[-1],
                              grad=records_grad(x, weight, bias))


def layer_norm(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
               eps: float = 1e-5) -> torch.Tensor:
    """LayerNorm over the last dimension, exactly ``reference.layer_norm``.

    x: [..., hidden] fp32/bf16/fp16 (any leading shape, any strides); weight, bias: [hidden] or None (any
    floating dtype, e.g. fp32 parameters with bf16 activations). Returns [..., hidden] in x.dtype.
    """
    key = entry_key(x, weight, bias)
    kernel = _ENTRY.get(key)
    if kernel is None:  # first call with this signature: validate (raises on bad input) and decide
        _validate(x, weight, bias)
        kernel = use_kernel("layer_norm", _kernel_check(x, weight, bias)) and routing.use_kernel(
            "layer_norm", x.device, tokens=leading_rows(x), hidden=x.shape[-1], grad=records_grad(x, weight, bias))
        _ENTRY.put(key, kernel)
    if not kernel:
        return reference.layer_norm(x, weight, bias, eps)
    # The kernels index weight/bias as dense [hidden] vectors; strided views are copied (autograd-tracked).
    if weight is not None and not weight.is_contiguous():
        weight = weight.contiguous()
    if bias is not None and not bias.is_contiguous():
        bias = bias.contiguous()
    # x keeps its leading dimensions: the launchers flatten them (one autograd node, no views; see rms_norm)
    if torch.compiler.is_compiling():
        return layer_norm_fwd(x, weight, bias, float(eps))[0]
    if not records_grad(x, weight, bias) and not forward_ad_active():
        return _layer_norm_fwd_impl(x, weight, bias, float(eps))[0]  # generate(), eval: as rms_norm
    return LayerNormFunction.apply(x, weight, bias, float(eps))
