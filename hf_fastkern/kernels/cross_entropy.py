"""Cross-entropy from logits, and fused linear cross-entropy from hidden states without the full logits.

Semantics are exactly ``reference.cross_entropy`` / ``reference.linear_cross_entropy``: per token
``(1 - ls) * (lse - z_y) + ls * (lse - mean_j z_j) + z_loss * lse**2`` with ``z`` the (optionally
soft-capped ``c * tanh(x / c)``) logits, ignored tokens contribute 0, and reductions 'none' / 'sum' / 'mean'
('mean' divides by the valid-token count, or by ``num_items_in_batch`` when given). A 'mean' over zero valid
tokens is NaN (0/0) like ``torch.nn.functional.cross_entropy``; its gradients are zero, like torch's.

Design:
- Two row kernels. ``_ce_fwd_kernel``: one program per row streams the vocabulary once with an online
  log-sum-exp in fp32 (base-2: the ``log2(e)`` scale is folded once, then ``exp2``) and writes the loss and
  the lse of the row. ``_ce_bwd_kernel``: streams the row again and writes
  ``g_row * d(loss)/d(logits) = g_row * (softmax * (1 + 2 z_loss lse) - ls / V - (1 - ls) onehot) * softcap'``
  into an output that may alias the logits (in place).
- ``cross_entropy(logits, ...)``: forward = ``_ce_fwd_kernel``; backward = ``_ce_bwd_kernel`` into a fresh
  buffer, scaled per row by the incoming gradient (so every reduction, 'none' included, is exact).
- ``fused_linear_cross_entropy(hidden, weight, ...)``: chunks of ``C`` tokens. Per chunk the logits
  ``[C, vocab]`` come from cuBLAS (``torch.mm``: bf16 in, fp32 accumulate) into one reused buffer, the two row
  kernels turn them into the loss and, in place, into d(loss)/d(logits); then ``d_hidden[chunk] = dlogits @ W``
  and ``d_weight += dlogits^T @ hidden[chunk]`` (addmm into a ``weight.dtype`` accumulator: an fp32 one
  would cost 2 GiB at 128K x 4096). For reductions to a scalar ('mean'/'sum') the gradients are computed in the
  forward, scaled by ``1 / denominator`` there, and the backward only multiplies them by ``grad_output`` in
  place (a kernel that does nothing when it is 1, without a host sync). For 'none' the per-token gradient is
  only known in the backward, so the backward recomputes the chunk logits (one more matmul) and scales each
  row by its own ``grad_output`` (Liger #968 got this wrong by scaling after the fact).
- Chunk size: the largest power of two whose ``[C, vocab]`` buffer fits ``HF_FASTKERN_CE_CHUNK_MB`` (128 MiB by
  default: C = 512 for a 128K vocabulary in bf16), or ``chunk_size=``. Peak extra memory is the gradients
  themselves plus that buffer.
- All launchers are ``torch.library`` custom ops (``hf_fastkern::ce_fwd``, ``ce_bwd``, ``flce_fwd``,
  ``flce_bwd``, ``scale_``) with fake and autograd registrations, so ``torch.compile`` traces through them.
  Eager calls take ``CEFunction`` / ``FLCEFunction`` over the same launchers instead: custom-op dispatch costs
  several times an autograd.Function's host time (rms_norm.py), which decides host-bound training steps.

Bad input: labels outside ``[0, vocab)`` that are not ``ignore_index`` raise ``ValueError`` naming the value
and its position. That check costs one host sync per call; set ``HF_FASTKERN_SKIP_LABEL_CHECK=1`` to skip it
(it is also skipped while ``torch.compile`` traces). Unchecked out-of-range labels never read out of bounds:
their loss is NaN.
``HF_FASTKERN_LABEL_CHECK=async`` (fused loss, 'mean'/'sum') checks without a sync inside the step: the bad
batch's loss is NaN and its gradients zero, and the ValueError follows at its backward or at most two calls later
(:func:`check_label_range_async`, docs/cross_entropy.md).
Limits: the last dimension of logits/hidden/weight must be contiguous (otherwise it is copied once); the
backward of the scalar reductions runs once (``retain_graph`` double backward is refused). Offsets are int64,
so tokens x vocab may exceed 2**31.
"""
import atexit
import functools
import math
import os
import warnings
from typing import Optional

import torch
import triton
import triton.language as tl

from hf_fastkern.kernels import reference
from hf_fastkern.kernels._triton_utils import DirectLaunch, cdiv, next_pow2
from hf_fastkern.kernels.dispatch import (
    check_floating,
    check_same_device,
    device_check,
    env_get,
    use_kernel,
)

# read by @triton.jit code, hence constexpr
LOG2E: tl.constexpr = tl.constexpr(1.4426950408889634)
LN2: tl.constexpr = tl.constexpr(0.6931471805599453)
_CHUNK_MB_DEFAULT = 128

# ----------------------------------------------------------------------------------------------------------
# launch heuristic


@functools.lru_cache(maxsize=None)
def _row_launch(n_cols: int) -> tuple[int, int]:
    """Block over the vocabulary and warps for the row kernels.

    Why: the kernels are bandwidth-bound streams over one row; 8192 fp32 lanes (16 per thread at 16 warps)
    keep enough loads in flight per SM with one to four rows resident, and fewer, larger blocks are also what
    keeps the CPU interpreter fast. Narrow vocabularies use one block of the next power of two.
    """
    block = min(next_pow2(max(n_cols, 16)), 8192)
    return block, (16 if block >= 8192 else 8 if block >= 2048 else 4)


def default_chunk(n_tokens: int, vocab: int, itemsize: int) -> int:
    """Tokens per chunk of the fused linear CE: the largest power of two whose logits fit the chunk budget."""
    budget = int(os.environ.get("HF_FASTKERN_CE_CHUNK_MB", _CHUNK_MB_DEFAULT)) * 2**20
    c = max(16, budget // max(1, vocab * itemsize))
    c = 1 << (c.bit_length() - 1)
    return max(1, min(c, n_tokens))


# ----------------------------------------------------------------------------------------------------------
# jit helpers and kernels


@triton.jit
def _capped(x, softcap, HAS_SOFTCAP: tl.constexpr):
    """``softcap * tanh(x / softcap)``; tanh through exp2 (overflow to inf gives exactly +-1)."""
    if HAS_SOFTCAP:
        e = tl.exp2(x * (2.0 * LOG2E) / softcap)
        return softcap * (1.0 - 2.0 / (e + 1.0))
    else:
        return x


# n_cols (the vocabulary) stays specialised on purpose: it is fixed per model, so it costs no recompiles, and
# knowing it is a multiple of 16 (128256, 32000 ...) lets the masked row loads vectorise.
@triton.jit(do_not_specialize=["ignore_index"])
def _ce_fwd_kernel(logits_ptr, stride_row, labels_ptr, loss_ptr, lse_ptr, n_cols, ignore_index,
                   label_smoothing, z_loss, softcap,
                   HAS_SOFTCAP: tl.constexpr, HAS_SMOOTHING: tl.constexpr, BLOCK_V: tl.constexpr):
    """One program per row: online lse over the row, then the per-token loss. loss, lse: [rows] fp32."""
    row = tl.program_id(0).to(tl.int64)
    label = tl.load(labels_ptr + row).to(tl.int64)
    if label == ignore_index:
        tl.store(loss_ptr + row, 0.0)
        tl.store(lse_ptr + row, 0.0)
        return
    row_ptr = logits_ptr + row * stride_row
    cols = tl.arange(0, BLOCK_V)
    # running max and sum in the base-2 domain: z * log2(e)
    m = float("-inf")
    s = 0.0
    zsum = 0.0
    for start in range(0, n_cols, BLOCK_V):
        offs = start + cols
        mask = offs < n_cols
        x = tl.load(row_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        z = _capped(x, softcap, HAS_SOFTCAP)
        z2 = tl.where(mask, z * LOG2E, float("-inf"))
        m_new = tl.maximum(m, tl.max(z2, axis=0))
        s = s * tl.exp2(m - m_new) + tl.sum(tl.exp2(z2 - m_new), axis=0)
        m = m_new
        if HAS_SMOOTHING:
            zsum += tl.sum(tl.where(mask, z, 0.0), axis=0)
    lse = (m + tl.log2(s)) * LN2
    in_range = (label >= 0) & (label < n_cols)
    # an unchecked out-of-range label reads nothing and turns the loss into NaN
    x_y = tl.load(row_ptr + label, mask=in_range, other=0.0).to(tl.float32)
    z_y = _capped(x_y, softcap, HAS_SOFTCAP)
    loss = lse - z_y
    if HAS_SMOOTHING:
        loss = (1.0 - label_smoothing) * loss + label_smoothing * (lse - zsum / n_cols)
    loss += z_loss * lse * lse
    loss = tl.where(in_range, loss, float("nan"))
    tl.store(loss_ptr + row, loss)
    tl.store(lse_ptr + row, lse)


@triton.jit(do_not_specialize=["ignore_index"])
def _ce_bwd_kernel(logits_ptr, stride_row, grad_ptr, stride_grad_row, labels_ptr, lse_ptr, gscale_ptr,
                   gscale_stride, n_cols, ignore_index, label_smoothing, z_loss, softcap,
                   HAS_SOFTCAP: tl.constexpr, BLOCK_V: tl.constexpr):
    """One program per row: grad[row] = g * d(loss_row)/d(logits_row); grad may alias logits (in place).

    g is ``gscale[row * gscale_stride]`` (stride 0: one scalar for all rows). Ignored rows get exact zeros
    without touching g, so an infinite g (a 'mean' over no valid token) never makes 0 * inf = NaN.
    """
    row = tl.program_id(0).to(tl.int64)
    label = tl.load(labels_ptr + row).to(tl.int64)
    cols = tl.arange(0, BLOCK_V)
    grad_row = grad_ptr + row * stride_grad_row
    if label == ignore_index:
        for start in range(0, n_cols, BLOCK_V):
            offs = start + cols
            tl.store(grad_row + offs, tl.zeros([BLOCK_V], tl.float32), mask=offs < n_cols)
        return
    row_ptr = logits_ptr + row * stride_row
    g = tl.load(gscale_ptr + row * gscale_stride).to(tl.float32)
    lse2 = tl.load(lse_ptr + row) * LOG2E
    # d/dz of z_loss * lse^2 is 2 z_loss lse softmax: fold it into the softmax coefficient
    coef = g * (1.0 + 2.0 * z_loss * tl.load(lse_ptr + row))
    smooth = g * label_smoothing / n_cols
    hit = g * (1.0 - label_smoothing)
    for start in range(0, n_cols, BLOCK_V):
        offs = start + cols
        mask = offs < n_cols
        x = tl.load(row_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        z = _capped(x, softcap, HAS_SOFTCAP)
        d = coef * tl.exp2(z * LOG2E - lse2) - smooth
        d = tl.where(offs == label, d - hit, d)
        if HAS_SOFTCAP:
            t = z / softcap
            d = d * (1.0 - t * t)
        tl.store(grad_row + offs, d, mask=mask)


@triton.jit
def _scale_kernel(x_ptr, g_ptr, n, BLOCK: tl.constexpr):
    """x *= g in place, a no-op (no traffic) when g == 1: the usual grad_output of a scalar loss."""
    g = tl.load(g_ptr).to(tl.float32)
    if g != 1.0:
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(x_ptr + offs, x * g, mask=mask)


# ----------------------------------------------------------------------------------------------------------
# launchers (plain functions on validated, 2-D, last-dim-contiguous tensors)


_CE_FWD = DirectLaunch(_ce_fwd_kernel)
_CE_BWD = DirectLaunch(_ce_bwd_kernel)


def _launch_fwd(logits: torch.Tensor, labels: torch.Tensor, loss: torch.Tensor, lse: torch.Tensor,
                ignore_index: int, label_smoothing: float, z_loss: float, softcap: float) -> None:
    rows, n_cols = logits.shape
    if rows == 0:
        return
    block, warps = _row_launch(n_cols)
    _CE_FWD((rows,), logits, logits.stride(0), labels, loss, lse, n_cols, ignore_index,
                            label_smoothing, z_loss, softcap, HAS_SOFTCAP=softcap > 0,
                            HAS_SMOOTHING=label_smoothing > 0, BLOCK_V=block, num_warps=warps)


def _launch_bwd(logits: torch.Tensor, grad: torch.Tensor, labels: torch.Tensor, lse: torch.Tensor,
                gscale: torch.Tensor, ignore_index: int, label_smoothing: float, z_loss: float,
                softcap: float) -> None:
    rows, n_cols = logits.shape
    if rows == 0:
        return
    block, warps = _row_launch(n_cols)
    gstride = 0 if gscale.numel() == 1 else gscale.stride(0)
    _CE_BWD((rows,), logits, logits.stride(0), grad, grad.stride(0), labels, lse, gscale, gstride,
                            n_cols, ignore_index, label_smoothing, z_loss, softcap,
                            HAS_SOFTCAP=softcap > 0, BLOCK_V=block, num_warps=warps)


def _rowwise(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


# ----------------------------------------------------------------------------------------------------------
# custom ops: plain cross-entropy from logits


def _ce_fwd_impl(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int, label_smoothing: float,
               z_loss: float, softcap: float) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [rows, vocab] (last dim contiguous), labels [rows] int -> (loss [rows] fp32, lse [rows] fp32)."""
    rows = logits.shape[0]
    loss = torch.empty(rows, device=logits.device, dtype=torch.float32)
    lse = torch.empty(rows, device=logits.device, dtype=torch.float32)
    _launch_fwd(logits, labels, loss, lse, ignore_index, label_smoothing, z_loss, softcap)
    return loss, lse


_ce_fwd_op = torch.library.custom_op("hf_fastkern::ce_fwd", mutates_args=())(_ce_fwd_impl)


@_ce_fwd_op.register_fake
def _(logits, labels, ignore_index, label_smoothing, z_loss, softcap):
    rows = logits.shape[0]
    return (logits.new_empty(rows, dtype=torch.float32), logits.new_empty(rows, dtype=torch.float32))


def _ce_bwd_impl(grad_rows: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor, lse: torch.Tensor,
               ignore_index: int, label_smoothing: float, z_loss: float, softcap: float) -> torch.Tensor:
    """grad_rows [rows] (or one element) -> d(sum_r grad_rows[r] * loss[r]) / d(logits), logits.dtype."""
    grad = torch.empty_like(logits)
    g = grad_rows.float().contiguous()
    _launch_bwd(logits, grad, labels, lse, g, ignore_index, label_smoothing, z_loss, softcap)
    return grad


_ce_bwd_op = torch.library.custom_op("hf_fastkern::ce_bwd", mutates_args=())(_ce_bwd_impl)


@_ce_bwd_op.register_fake
def _(grad_rows, logits, labels, lse, ignore_index, label_smoothing, z_loss, softcap):
    return torch.empty_like(logits)


def _ce_setup(ctx, inputs, output):
    logits, labels, ignore_index, label_smoothing, z_loss, softcap = inputs
    ctx.set_materialize_grads(False)  # lse is internal: no zero gradient for it (see _flce_setup)
    ctx.save_for_backward(logits, labels, output[1])
    ctx.opts = (ignore_index, label_smoothing, z_loss, softcap)


def _ce_backward(ctx, g_loss, g_lse):
    logits, labels, lse = ctx.saved_tensors
    # lse is an internal output: nothing public returns it, so g_lse is None
    grad = torch.ops.hf_fastkern.ce_bwd(g_loss, logits, labels, lse, *ctx.opts)
    return grad, None, None, None, None, None


_ce_fwd_op.register_autograd(_ce_backward, setup_context=_ce_setup)


class CEFunction(torch.autograd.Function):
    """Eager autograd path over the same launchers as ``ce_fwd``/``ce_bwd`` (custom-op dispatch costs several
    times an autograd.Function's host time). Inputs as ``ce_fwd``; returns the per-row loss [rows] fp32."""

    @staticmethod
    def forward(ctx, logits, labels, ignore_index, label_smoothing, z_loss, softcap):
        rows, lse = _ce_fwd_impl(logits, labels, ignore_index, label_smoothing, z_loss, softcap)
        ctx.save_for_backward(logits, labels, lse)
        ctx.opts = (ignore_index, label_smoothing, z_loss, softcap)
        return rows

    @staticmethod
    def backward(ctx, g_loss):
        logits, labels, lse = ctx.saved_tensors
        return _ce_bwd_impl(g_loss, logits, labels, lse, *ctx.opts), None, None, None, None, None


# ----------------------------------------------------------------------------------------------------------
# custom ops: fused linear cross-entropy


def _chunk_logits(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                  out: torch.Tensor) -> None:
    """out [c, vocab] = h @ weight.T (+ bias), cuBLAS with fp32 accumulation, rounded once to out.dtype."""
    if bias is not None:
        torch.addmm(bias, h, weight.t(), out=out)
    else:
        torch.mm(h, weight.t(), out=out)


def _chunk_grads(dl: torch.Tensor, h: torch.Tensor, weight: torch.Tensor, start: int, dh: torch.Tensor | None,
                 dw: torch.Tensor | None, db: torch.Tensor | None) -> None:
    """Accumulate one chunk's dlogits [c, vocab] into d_hidden rows, d_weight and d_bias."""
    if dh is not None:
        torch.mm(dl, weight, out=dh if dl.shape[0] == dh.shape[0] else dh[start:start + dl.shape[0]])
    if dw is not None:
        if start == 0:
            # the first chunk writes d_weight, which saves zero-filling (and re-reading) 1 GiB at 128K x 4096
            torch.mm(dl.t(), h, out=dw)
        else:
            dw.addmm_(dl.t(), h)
    if db is not None:
        db += dl.sum(0, dtype=torch.float32)


def _flce_loop(hidden, weight, bias, labels, gscale, opts, chunk, loss, lse, dh, dw, db, recompute) -> None:
    """The chunk loop shared by forward and backward (see the header). ``recompute``: lse is known (bwd)."""
    n_tok, vocab = hidden.shape[0], weight.shape[0]
    want_grad = dh is not None or dw is not None or db is not None
    buf = torch.empty(min(chunk, n_tok), vocab, device=hidden.device, dtype=hidden.dtype)
    per_row = gscale.numel() > 1
    # the op computes in the dtype it was given: autocast around the caller must not re-cast its matmuls
    with torch.autocast(device_type=hidden.device.type, enabled=False):
        if 0 < n_tok <= chunk:  # one chunk (every host-bound step): the whole tensors, no slice views
            _chunk_logits(hidden, weight, bias, buf)
            if not recompute:
                _launch_fwd(buf, labels, loss, lse, *opts)
            if want_grad:
                _launch_bwd(buf, buf, labels, lse, gscale, *opts)
                _chunk_grads(buf, hidden, weight, 0, dh, dw, db)
            return
        for s in range(0, n_tok, chunk):
            e = min(s + chunk, n_tok)
            h = hidden[s:e]
            lg = buf[: e - s]
            _chunk_logits(h, weight, bias, lg)
            if not recompute:
                _launch_fwd(lg, labels[s:e], loss[s:e], lse[s:e], *opts)
            if want_grad:
                _launch_bwd(lg, lg, labels[s:e], lse[s:e], gscale[s:e] if per_row else gscale, *opts)
                _chunk_grads(lg, h, weight, s, dh, dw, db)
    if dw is not None and n_tok == 0:
        dw.zero_()


def _grad_buffers(hidden, weight, bias, need_dh, need_dw, need_db):
    dh = torch.empty_like(hidden) if need_dh else None
    dw = torch.empty_like(weight) if need_dw else None
    db = torch.zeros(weight.shape[0], device=weight.device, dtype=torch.float32) if need_db else None
    return dh, dw, db


def _flce_fwd_impl(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], labels: torch.Tensor,
                 denom: torch.Tensor, ignore_index: int, label_smoothing: float, z_loss: float, softcap: float,
                 reduce: bool, need_dh: bool, need_dw: bool, need_db: bool, chunk: int
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """hidden [T, H], weight [V, H], bias [V] or None, labels [T], denom 0-d fp32.

    Returns (loss, lse [T] fp32, d_hidden, d_weight, d_bias). reduce=True: loss is the 0-d fp32
    ``sum(loss_rows) / denom`` and the requested gradients of that loss are computed here (the others are
    empty). reduce=False: loss is [T] fp32 and all gradients are empty (the backward recomputes).
    """
    n_tok = hidden.shape[0]
    rows = torch.empty(n_tok, device=hidden.device, dtype=torch.float32)
    lse = torch.empty(n_tok, device=hidden.device, dtype=torch.float32)
    opts = (ignore_index, label_smoothing, z_loss, softcap)
    if reduce:
        dh, dw, db = _grad_buffers(hidden, weight, bias, need_dh, need_dw, need_db)
        # per-token gradient scale 1/denom; 0 when denom is 0 (then every row is ignored and gets zeros anyway)
        inv = torch.where(denom != 0, 1.0 / denom, torch.zeros_like(denom)).reshape(1)
    else:
        dh = dw = db = None
        inv = denom.reshape(1)
    _flce_loop(hidden, weight, bias, labels, inv, opts, chunk, rows, lse, dh, dw, db, recompute=False)
    loss = rows.sum() / denom if reduce else rows
    return (loss, lse, dh if dh is not None else hidden.new_empty(0),
            dw if dw is not None else hidden.new_empty(0),
            db.to(bias.dtype) if db is not None else hidden.new_empty(0))


_flce_fwd_op = torch.library.custom_op("hf_fastkern::flce_fwd", mutates_args=())(_flce_fwd_impl)


@_flce_fwd_op.register_fake
def _(hidden, weight, bias, labels, denom, ignore_index, label_smoothing, z_loss, softcap, reduce, need_dh,
      need_dw, need_db, chunk):
    n_tok = hidden.shape[0]
    loss = hidden.new_empty((), dtype=torch.float32) if reduce else hidden.new_empty(n_tok, dtype=torch.float32)
    return (loss, hidden.new_empty(n_tok, dtype=torch.float32),
            torch.empty_like(hidden) if reduce and need_dh else hidden.new_empty(0),
            torch.empty_like(weight) if reduce and need_dw else hidden.new_empty(0),
            bias.new_empty(weight.shape[0]) if reduce and need_db else hidden.new_empty(0))


def _flce_bwd_impl(grad_rows: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                 labels: torch.Tensor, lse: torch.Tensor, ignore_index: int, label_smoothing: float,
                 z_loss: float, softcap: float, need_dh: bool, need_dw: bool, need_db: bool, chunk: int
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token-weighted gradients for reduction='none': grad_rows [T] -> (d_hidden, d_weight, d_bias)."""
    dh, dw, db = _grad_buffers(hidden, weight, bias, need_dh, need_dw, need_db)
    g = grad_rows.float().contiguous()
    _flce_loop(hidden, weight, bias, labels, g, (ignore_index, label_smoothing, z_loss, softcap), chunk,
               None, lse, dh, dw, db, recompute=True)
    return (dh if dh is not None else hidden.new_empty(0), dw if dw is not None else hidden.new_empty(0),
            db.to(bias.dtype) if db is not None else hidden.new_empty(0))


_flce_bwd_op = torch.library.custom_op("hf_fastkern::flce_bwd", mutates_args=())(_flce_bwd_impl)


@_flce_bwd_op.register_fake
def _(grad_rows, hidden, weight, bias, labels, lse, ignore_index, label_smoothing, z_loss, softcap, need_dh,
      need_dw, need_db, chunk):
    return (torch.empty_like(hidden) if need_dh else hidden.new_empty(0),
            torch.empty_like(weight) if need_dw else hidden.new_empty(0),
            bias.new_empty(weight.shape[0]) if need_db else hidden.new_empty(0))


_SCALE_BLOCK = 4096


_SCALE = DirectLaunch(_scale_kernel)


def _scale_launch(x: torch.Tensor, g1: torch.Tensor) -> None:
    """x *= g1 in place; g1: [1] fp32 contiguous (prepared once for the several tensors of one backward)."""
    n = x.numel()
    if n == 0:
        return
    _SCALE((cdiv(n, _SCALE_BLOCK),), x, g1, n, BLOCK=_SCALE_BLOCK, num_warps=8)


def _scale_impl(x: torch.Tensor, g: torch.Tensor) -> None:
    """x *= g (g one element) in place; no memory traffic when g == 1."""
    _scale_launch(x, g.reshape(1).float().contiguous())


_scale_op = torch.library.custom_op("hf_fastkern::scale_", mutates_args=("x",))(_scale_impl)


@_scale_op.register_fake
def _(x, g):
    return None


def _flce_setup(ctx, inputs, output):
    (hidden, weight, bias, labels, denom, ignore_index, label_smoothing, z_loss, softcap, reduce, need_dh,
     need_dw, need_db, chunk) = inputs
    # Only the loss is differentiable; lse and the gradient buffers are internal outputs. Without this, autograd
    # materialises a zero "gradient" for each of them before the backward: a [vocab, hidden] zeros tensor
    # (1 GiB at 128K x 4096), which was the extra GiB of peak memory measured on the H100 on 2026-11-25.
    ctx.set_materialize_grads(False)
    ctx.reduce = reduce
    ctx.needs = (need_dh, need_dw, need_db)
    ctx.has_bias = bias is not None
    ctx.consumed = False
    if reduce:
        ctx.save_for_backward(output[2], output[3], output[4])
    else:
        ctx.save_for_backward(hidden, weight, bias, labels, output[1])
        ctx.opts = (ignore_index, label_smoothing, z_loss, softcap)
        ctx.chunk = chunk


def _flce_backward(ctx, g_loss, g_lse, g_dh, g_dw, g_db):
    need_dh, need_dw, need_db = ctx.needs
    if ctx.reduce:
        if ctx.consumed:
            raise RuntimeError("fused_linear_cross_entropy: the backward of a 'mean'/'sum' loss runs once "
                               "(its gradients are scaled in place); retain_graph double backward is unsupported")
        ctx.consumed = True
        dh, dw, db = ctx.saved_tensors
        for t in (dh, dw, db):
            torch.ops.hf_fastkern.scale_(t, g_loss)
    else:
        hidden, weight, bias, labels, lse = ctx.saved_tensors
        dh, dw, db = torch.ops.hf_fastkern.flce_bwd(g_loss, hidden, weight, bias, labels, lse, *ctx.opts,
                                                    need_dh, need_dw, need_db, ctx.chunk)
    return (dh if need_dh else None, dw if need_dw else None, db if need_db and ctx.has_bias else None,
            None, None, None, None, None, None, None, None, None, None, None)


_flce_fwd_op.register_autograd(_flce_backward, setup_context=_flce_setup)


class FLCEFunction(torch.autograd.Function):
    """Eager autograd path over the same launchers as ``flce_fwd``/``flce_bwd``/``scale_`` (custom-op dispatch
    costs several times an autograd.Function's host time). Inputs as ``flce_fwd``; returns only the loss
    (0-d fp32 when ``reduce``, else [T] fp32), so no internal output ever gets a materialised zero gradient."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, denom, ignore_index, label_smoothing, z_loss, softcap, reduce,
                need_dh, need_dw, need_db, chunk, labels_ok=None):
        # labels_ok: the asynchronous label check's device flag (reduce only): False zeroes the gradients
        ctx.labels_ok = labels_ok
        out = _flce_fwd_impl(hidden, weight, bias, labels, denom, ignore_index, label_smoothing, z_loss, softcap,
                             reduce, need_dh, need_dw, need_db, chunk)
        _flce_setup(ctx, (hidden, weight, bias, labels, denom, ignore_index, label_smoothing, z_loss, softcap,
                          reduce, need_dh, need_dw, need_db, chunk), out)
        return out[0]

    @staticmethod
    def backward(ctx, g_loss):
        need_dh, need_dw, need_db = ctx.needs
        if ctx.reduce:
            if ctx.consumed:
                raise RuntimeError("fused_linear_cross_entropy: the backward of a 'mean'/'sum' loss runs once "
                                   "(its gradients are scaled in place); retain_graph double backward is "
                                   "unsupported")
            ctx.consumed = True
            if _PENDING:
                resolve_label_checks(wait=False)  # raise before the optimizer step if the values are in already
            dh, dw, db = ctx.saved_tensors
            g1 = g_loss.reshape(1).float().contiguous()
            if ctx.labels_ok is not None:
                # a bad label (found after the fact): exactly zero gradients, whatever reached the loss (its
                # value is NaN, so d(f(loss))/d(loss) may be NaN too); finite gradients x 0 = 0
                g1 = torch.where(ctx.labels_ok, g1, torch.zeros_like(g1))
            for t in (dh, dw, db):
                _scale_launch(t, g1)
        else:
            hidden, weight, bias, labels, lse = ctx.saved_tensors
            dh, dw, db = _flce_bwd_impl(g_loss, hidden, weight, bias, labels, lse, *ctx.opts, need_dh, need_dw,
                                        need_db, ctx.chunk)
        return (dh if need_dh else None, dw if need_dw else None, db if need_db and ctx.has_bias else None,
                None, None, None, None, None, None, None, None, None, None, None, None)


# ----------------------------------------------------------------------------------------------------------
# argument validation shared by both entry points


_REDUCTIONS = ("mean", "sum", "none")


def _check_options(reduction: str, label_smoothing: float, z_loss: float, softcap: float | None) -> None:
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
    if z_loss < 0:
        raise ValueError(f"z_loss must be >= 0, got {z_loss}")
    if softcap is not None and not softcap >= 0:
        raise ValueError(f"softcap must be None or > 0, got {softcap}")


def _check_labels_tensor(labels: torch.Tensor, n_tok: int, what: str) -> None:
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise ValueError(f"labels must be an integer tensor (int64/int32), got {labels.dtype}")
    if labels.numel() != n_tok:
        raise ValueError(f"labels must hold one label per token of {what} ({n_tok} tokens), "
                         f"got shape {tuple(labels.shape)}")


LABEL_CHECK_ENV = "HF_FASTKERN_LABEL_CHECK"
LABEL_CHECK_MODES = ("sync", "async")


def label_check_mode() -> str:
    """``HF_FASTKERN_LABEL_CHECK``: ``sync`` (default) or ``async`` (see :func:`check_label_range_async`)."""
    m = env_get(LABEL_CHECK_ENV, "sync")
    if m not in LABEL_CHECK_MODES:
        raise ValueError(f"{LABEL_CHECK_ENV} must be one of {', '.join(LABEL_CHECK_MODES)}, got {m!r}")
    return m


def _label_check_skipped(labels: torch.Tensor) -> bool:
    """Skipped by the user or empty (both callers return under torch.compile before asking)."""
    return env_get("HF_FASTKERN_SKIP_LABEL_CHECK", "0") == "1" or labels.numel() == 0


def _label_range(labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """[min, max] of the labels that are not ``ignore_index`` (those count as 0, a valid label): one reduction."""
    lo, hi = torch.where(labels == ignore_index, 0, labels).aminmax()
    return torch.stack((lo, hi))


def _raise_out_of_range(labels: torch.Tensor, vocab: int, ignore_index: int, earlier: str = "") -> None:
    """Locate the first label outside ``[0, vocab)`` that is not ``ignore_index`` and raise (return if none)."""
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab))
    if not bool(bad.any()):  # vocab 0 with every label ignored, or labels changed in place since
        return
    flat = int(bad.reshape(-1).nonzero()[0, 0])
    pos = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), labels.shape))
    value = int(labels.reshape(-1)[flat])
    where = f"labels[{', '.join(map(str, pos))}]" if labels.dim() else "labels"
    raise ValueError(f"{earlier}{where} = {value} is out of range: labels must be in [0, {vocab}) "
                     f"(the vocabulary size) or equal ignore_index={ignore_index}")


def check_label_range(labels: torch.Tensor, vocab: int, ignore_index: int) -> None:
    """Raise ``ValueError`` naming the first label outside ``[0, vocab)`` that is not ``ignore_index``.

    One fused device reduction and one host sync; skipped under ``HF_FASTKERN_SKIP_LABEL_CHECK=1`` and while
    ``torch.compile`` traces (unchecked bad labels give a NaN loss, never an out-of-bounds read).
    """
    if torch.compiler.is_compiling():
        return
    if _PENDING:
        resolve_label_checks()  # asynchronous checks of earlier calls (this call syncs anyway)
    if _label_check_skipped(labels):
        return
    # Fast path, one reduction and one sync: ignored labels are replaced by 0 (a valid label), then the range
    # [min, max] of what is left is read once. Only a failing check pays for locating the first bad label.
    lo, hi = _label_range(labels, ignore_index).tolist()
    if lo < 0 or hi >= vocab:
        _raise_out_of_range(labels, vocab, ignore_index)


class _PendingCheck:
    """One asynchronous label check: its [min, max] on its way to (pinned) host memory, and what to name."""
    __slots__ = ("host", "event", "labels", "vocab", "ignore_index")

    def __init__(self, host, event, labels, vocab, ignore_index):
        self.host, self.event, self.labels, self.vocab, self.ignore_index = host, event, labels, vocab, ignore_index


_PENDING: list[_PendingCheck] = []
_SETTLE_AT_EXIT = {"registered": False}


def _settle_at_exit() -> None:
    """The last calls' checks, at interpreter exit: each bad label there becomes a warning (nothing can be raised
    to)."""
    while _PENDING:
        try:
            resolve_label_checks()
        except ValueError as e:
            warnings.warn(f"hf_fastkern: {e}", stacklevel=1)
        except Exception:  # CUDA torn down already: nothing left to read
            return


def check_label_range_async(labels: torch.Tensor, vocab: int, ignore_index: int) -> torch.Tensor | None:
    """The label check without a host sync inside the step (``HF_FASTKERN_LABEL_CHECK=async``).

    A sync in the loss's forward makes the host wait for the GPU to finish the forward before it may launch the
    backward: in a host-bound step that head start is lost (stock transformers' loss has no sync). Here the
    [min, max] reduction is copied to pinned host memory behind an event and read when it has arrived: in this
    loss's backward if it is there by then, else at a later call of the fused loss (each call waits only for a
    check two calls old, so the error comes at the latest two calls later). Returns a 0-d bool device tensor,
    False when a label is out of range: that call's loss is NaN (the kernel's row loss of a bad label) and
    ``FLCEFunction``'s backward zeroes its gradients, so a bad batch never writes NaN into the weights before
    the ``ValueError`` (the sync check's message, saying it may be an earlier call) is raised. Returns None when
    the check is skipped (as :func:`check_label_range`, also under ``torch.compile``, which checks nothing).
    """
    if torch.compiler.is_compiling():
        return None
    resolve_label_checks(keep=1)
    if _label_check_skipped(labels):
        return None
    rng = _label_range(labels, ignore_index)
    if labels.device.type == "cuda":
        host = torch.empty(2, dtype=rng.dtype, pin_memory=True)
        host.copy_(rng, non_blocking=True)
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(labels.device))  # the copy's stream (labels may be on cuda:1)
    else:  # no stream to run ahead of: the values are there
        host, event = rng, None
    if not _SETTLE_AT_EXIT["registered"]:
        atexit.register(_settle_at_exit)
        _SETTLE_AT_EXIT["registered"] = True
    _PENDING.append(_PendingCheck(host, event, labels, vocab, ignore_index))
    return (rng[0] >= 0) & (rng[1] < vocab)


def resolve_label_checks(keep: int = 0, wait: bool = True) -> None:
    """Read the asynchronous label checks whose values have reached the host, oldest first, and raise for the
    first out-of-range one. ``keep``: the newest checks that may stay pending; older ones are waited for
    (``wait``) or left for later (``wait=False``: never blocks). Call with no arguments to settle every check,
    e.g. after the last training step."""
    while _PENDING:
        p = _PENDING[0]
        if p.event is not None and not p.event.query():
            if not wait or len(_PENDING) <= keep:
                return
            p.event.synchronize()
        _PENDING.pop(0)
        lo, hi = p.host.tolist()
        if lo < 0 or hi >= p.vocab:
            earlier = ("fused_linear_cross_entropy, label check of this or an earlier call "
                       f"({LABEL_CHECK_ENV}=async: that call's loss is NaN and its gradients zero): ")
            _raise_out_of_range(p.labels, p.vocab, p.ignore_index, earlier=earlier)
            # the labels tensor changed in place since: its position is lost, its range was not
            raise ValueError(f"{earlier}a label in [{lo}, {hi}] is out of range: labels must be in [0, {p.vocab}) "
                             f"(the vocabulary size) or equal ignore_index={p.ignore_index} (the tensor changed "
                             "in place since, so its position is unknown)")


def _denominator(labels: torch.Tensor, reduction: str, ignore_index: int,
                 num_items_in_batch: int | torch.Tensor | None, device: torch.device) -> torch.Tensor:
    """0-d fp32 divisor of the summed loss: 1 ('sum'), num_items_in_batch, or the valid-token count."""
    if reduction == "sum":
        return torch.ones((), device=device, dtype=torch.float32)
    if num_items_in_batch is not None:
        return torch.as_tensor(num_items_in_batch, dtype=torch.float32).to(device).reshape(())
    return (labels != ignore_index).sum(dtype=torch.float32)


def _autocast_cast(*tensors: torch.Tensor | None) -> list[torch.Tensor | None]:
    """Mirror F.linear under autocast: the matmul operands go to the autocast dtype."""
    dev = next(t for t in tensors if t is not None).device.type
    if dev not in ("cuda", "cpu") or not torch.is_autocast_enabled(dev):
        return list(tensors)
    dt = torch.get_autocast_dtype(dev)
    return [t.to(dt) if t is not None and t.is_floating_point() else t for t in tensors]


# ----------------------------------------------------------------------------------------------------------
# public entry points


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor, *, ignore_index: int = -100,
                  reduction: str = "mean", label_smoothing: float = 0.0, z_loss: float = 0.0,
                  softcap: float | None = None,
                  num_items_in_batch: int | torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy of given logits, semantics of ``reference.cross_entropy``.

    logits: [..., vocab] fp32/bf16/fp16; labels: [...] int (one per row of logits).
    Returns fp32: [...] for 'none', a 0-d tensor for 'sum'/'mean'. The gradient w.r.t. logits (logits.dtype)
    is recomputed in the backward from the saved fp32 lse: no [tokens, vocab] buffer is kept in between.
    """
    check_floating("logits", logits)
    _check_options(reduction, label_smoothing, z_loss, softcap)
    if logits.dim() < 1:
        raise ValueError(f"logits must have shape [..., vocab], got {tuple(logits.shape)}")
    vocab = logits.shape[-1]
    lead = logits.shape[:-1]
    n_tok = math.prod(lead)
    _check_labels_tensor(labels, n_tok, "logits")
    check_same_device(logits=logits, labels=labels)
    # already 2-D (the patched model's case): no reshape, whose view would be one more autograd node
    z2 = logits if logits.dim() == 2 else logits.reshape(n_tok, vocab)
    y = labels.reshape(n_tok)
    kw = dict(ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing, z_loss=z_loss,
              softcap=softcap, num_items_in_batch=num_items_in_batch)
    if not use_kernel("cross_entropy", device_check([z2])):
        out = reference.cross_entropy(z2, y, **kw)
        return out.reshape(labels.shape) if reduction == "none" else out
    check_label_range(labels, vocab, ignore_index)
    args = (_rowwise(z2), y.contiguous(), int(ignore_index), float(label_smoothing), float(z_loss),
            float(softcap or 0.0))
    rows = torch.ops.hf_fastkern.ce_fwd(*args)[0] if torch.compiler.is_compiling() else CEFunction.apply(*args)
    if reduction == "none":
        # no view node when labels are already 1-D (an autograd node costs host time in backward)
        return rows if rows.shape == labels.shape else rows.reshape(labels.shape)
    # an ordinary torch division: its gradient (g / denom per row) reaches the backward kernel per row
    return rows.sum() / _denominator(y, reduction, ignore_index, num_items_in_batch, z2.device)


def fused_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                               bias: torch.Tensor | None = None, *, ignore_index: int = -100,
                               reduction: str = "mean", label_smoothing: float = 0.0, z_loss: float = 0.0,
                               softcap: float | None = None,
                               num_items_in_batch: int | torch.Tensor | None = None,
                               chunk_size: int | None = None) -> torch.Tensor:
    """``cross_entropy(hidden @ weight.T + bias, labels)`` without materialising the logits.

    hidden: [..., H] fp32/bf16/fp16 (leading dims are flattened to tokens); weight: [V, H] of hidden's dtype;
    bias: [V] or None; labels: [...] int, one per token. Options as ``reference.cross_entropy``:
    ``num_items_in_batch`` divides the summed loss ('mean' only), so micro-batches of one accumulated batch add
    up to that batch's loss. A 'mean' over zero valid tokens is NaN (0/0, like torch), with zero gradients.
    ``chunk_size``: tokens per chunk (default: ``default_chunk``). Under autocast hidden/weight/bias are cast
    to the autocast dtype first, as ``F.linear`` would.
    Returns fp32: labels' shape for 'none', else a 0-d tensor. Gradients reach hidden, weight and bias.
    """
    check_floating("hidden", hidden)
    check_floating("weight", weight)
    if bias is not None:
        check_floating("bias", bias)
    _check_options(reduction, label_smoothing, z_loss, softcap)
    hidden, weight, bias = _autocast_cast(hidden, weight, bias)
    if weight.dim() != 2:
        raise ValueError(f"weight must have shape [vocab, hidden], got {tuple(weight.shape)}")
    vocab, hdim = weight.shape
    if hidden.dim() < 1 or hidden.shape[-1] != hdim:
        raise ValueError(f"hidden must have shape [..., {hdim}] (weight is [vocab={vocab}, hidden={hdim}]), "
                         f"got {tuple(hidden.shape)}")
    if hidden.dtype != weight.dtype:
        raise ValueError(f"hidden ({hidden.dtype}) and weight ({weight.dtype}) must have one dtype")
    if bias is not None and (tuple(bias.shape) != (vocab,) or bias.dtype != weight.dtype):
        raise ValueError(f"bias must have shape ({vocab},) and dtype {weight.dtype}, "
                         f"got {tuple(bias.shape)} {bias.dtype}")
    n_tok = math.prod(hidden.shape[:-1])
    _check_labels_tensor(labels, n_tok, "hidden")
    check_same_device(hidden=hidden, weight=weight, labels=labels, bias=bias)
    # already 2-D (the patched model's case): no reshape, whose view would be one more autograd node
    h2 = hidden if hidden.dim() == 2 else hidden.reshape(n_tok, hdim)
    y = labels.reshape(n_tok)
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if not use_kernel("fused_linear_cross_entropy", device_check([h2, weight, bias])):
        out = reference.linear_cross_entropy(h2, weight, y, bias, ignore_index=ignore_index, reduction=reduction,
                                             label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap,
                                             num_items_in_batch=num_items_in_batch)
        return out.reshape(labels.shape) if reduction == "none" else out
    reduce = reduction != "none"
    labels_ok = None
    if label_check_mode() == "async" and reduce:
        labels_ok = check_label_range_async(labels, vocab, ignore_index)
    else:
        check_label_range(labels, vocab, ignore_index)
    grad_on = torch.is_grad_enabled()
    need_dh = grad_on and h2.requires_grad
    need_dw = grad_on and weight.requires_grad
    need_db = grad_on and bias is not None and bias.requires_grad
    chunk = chunk_size or default_chunk(n_tok, vocab, h2.element_size())
    denom = (_denominator(y, reduction, ignore_index, num_items_in_batch, h2.device) if reduce
             else torch.ones((), device=h2.device, dtype=torch.float32))
    args = (_rowwise(h2), _rowwise(weight), bias.contiguous() if bias is not None else None, y.contiguous(), denom,
            int(ignore_index), float(label_smoothing), float(z_loss), float(softcap or 0.0), reduce,
            need_dh, need_dw, need_db, int(chunk))
    # eager: the autograd.Function over the same launchers; the custom op is what torch.compile traces
    # (a bad label's row loss is NaN already, so the loss is; labels_ok zeroes the gradients in the backward)
    loss = (torch.ops.hf_fastkern.flce_fwd(*args)[0] if torch.compiler.is_compiling()
            else FLCEFunction.apply(*args, labels_ok))
    if reduce or loss.shape == labels.shape:
        return loss
    return loss.reshape(labels.shape)


__all__ = ["cross_entropy", "fused_linear_cross_entropy", "check_label_range", "check_label_range_async",
           "resolve_label_checks", "default_chunk"]
