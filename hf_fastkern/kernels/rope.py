"""Rotary position embedding (RoPE), forward and backward in one Triton kernel each (issue 12).

transformers' ``apply_rotary_pos_emb(q, k, cos, sin)`` is ``q * cos + rotate_half(q) * sin`` (and the same for
``k``) with ``rotate_half(x) = cat(-x2, x1)``: under autograd that is a ``neg``, a ``cat``, two products and a
sum per tensor, forward and backward, each a full pass over ``q`` or ``k`` (~55 ms of a ~1,000 ms 8B LoRA step
on the H100). Here one pass reads ``x`` and one row of ``cos``/``sin`` and writes the result:

    out1 = x1 c1 - x2 s1,  out2 = x2 c2 + x1 s2          (x = [x1 | x2], cos = [c1 | c2], sin = [s1 | s2])
    dx1  = g1 c1 + g2 s2,  dx2  = g2 c2 - g1 s1          (the transpose, for the gradient g of out)

Shapes: ``x`` [batch, heads, seq, head_dim] with any strides whose last one is 1 (q/k come out of
``view(...).transpose(1, 2)``, heads and seq interleaved in memory); ``cos``/``sin`` [batch or 1, seq, head_dim]
(``unsqueeze_dim=1``, the Llama-family call). The output keeps ``x``'s memory layout (what the elementwise ops
give) and has ``torch.result_type(x, cos)`` as its dtype, as the unfused expression does; the arithmetic is fp32
with one rounding at the end (the unfused bf16 expression rounds three times). q and k are rotated by one
launch, forward and backward, under one autograd node (the eager path; Liger does the same): per decoder layer
two launches and one node fewer than one per tensor, host time that decides small steps (issue 21).
``cos``/``sin`` get no gradient
(transformers computes them under ``no_grad``); when they require one, or for partial rotary (cos narrower than
the head) or other layouts, :func:`apply_rope` runs the reference expression.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from hf_fastkern.kernels import reference, routing
from hf_fastkern.kernels._triton_utils import INTERPRET, DirectLaunch, cdiv, next_pow2, round_to
from hf_fastkern.kernels.dispatch import PerShape, device_check, entry_key, use_kernel

# Elements of one program's tile (tokens x heads x half the head): a Llama-3-8B q row (32 heads x 64) is 2048.
TILE = 4096


def launch_config(tokens: int, heads: int, half: int) -> tuple[int, int, int]:
    """(BLOCK_T, BLOCK_H, BLOCK_D): one program rotates BLOCK_T tokens x BLOCK_H heads x both halves of the head.

    On the GPU one token per program (BLOCK_T = 1), all its heads up to TILE elements. Under the interpreter a
    program costs its ops' Python time whatever its tile (~0.5 ms per op on the CI CPU), so one program takes
    as many tokens as fill TILE: a test model's RoPE launch is 1 program instead of batch x seq (it was 70% of
    the interpreter's time in the training tests, issue 20). tests/test_rope.py runs both under the interpreter.
    """
    block_d = next_pow2(half)
    block_h = max(1, min(next_pow2(heads), TILE // block_d))
    block_t = max(1, min(next_pow2(tokens), TILE // (block_h * block_d))) if INTERPRET else 1
    return block_t, block_h, block_d


@triton.jit
def _rope_kernel(X, Y, COS, SIN, OX, OY, T, HX, HY, NXB, S, HALF,
                 sxb, sxh, sxs, syb, syh, sys_, soxb, soxh, soxs, soyb, soyh, soys, scb, scs, ssb, sss,
                 BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, BACKWARD: tl.constexpr):
    # One launch rotates two tensors (q and k, or their gradients): head blocks [0, NXB) are X's, the rest Y's.
    # One program: BLOCK_T (batch, position) tokens x BLOCK_H heads of one tensor; both halves of each head.
    pid_h = tl.program_id(1)
    if pid_h < NXB:
        IN, OUT, H, hb = X, OX, HX, pid_h
        sib, sih, sis, sob, soh, sos = sxb, sxh, sxs, soxb, soxh, soxs
    else:
        IN, OUT, H, hb = Y, OY, HY, pid_h - NXB
        sib, sih, sis, sob, soh, sos = syb, syh, sys_, soyb, soyh, soys
    tok = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)  # [BT]
    b = tok // S
    s = tok % S
    heads = hb.to(tl.int64) * BLOCK_H + tl.arange(0, BLOCK_H)  # [BH]
    d = tl.arange(0, BLOCK_D)
    tmask = (tok < T)[:, None, None]
    dmask = (d < HALF)[None, None, :]
    cmask = tmask & dmask  # [BT, 1, BD]
    mask = cmask & (heads < H)[None, :, None]  # [BT, BH, BD]
    c_row = COS + (b * scb + s * scs)[:, None, None] + d[None, None, :]
    s_row = SIN + (b * ssb + s * sss)[:, None, None] + d[None, None, :]
    c1 = tl.load(c_row, mask=cmask, other=0.0).to(tl.float32)
    c2 = tl.load(c_row + HALF, mask=cmask, other=0.0).to(tl.float32)
    s1 = tl.load(s_row, mask=cmask, other=0.0).to(tl.float32)
    s2 = tl.load(s_row + HALF, mask=cmask, other=0.0).to(tl.float32)
    xo = (b * sib + s * sis)[:, None, None] + heads[None, :, None] * sih + d[None, None, :]
    x1 = tl.load(IN + xo, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(IN + xo + HALF, mask=mask, other=0.0).to(tl.float32)
    if BACKWARD:
        o1 = x1 * c1 + x2 * s2
        o2 = x2 * c2 - x1 * s1
    else:
        o1 = x1 * c1 - x2 * s1
        o2 = x2 * c2 + x1 * s2
    oo = (b * sob + s * sos)[:, None, None] + heads[None, :, None] * soh + d[None, None, :]
    tl.store(OUT + oo, round_to(o1, OUT.dtype.element_ty), mask=mask)
    tl.store(OUT + oo + HALF, round_to(o2, OUT.dtype.element_ty), mask=mask)


_ROPE = DirectLaunch(_rope_kernel)


def _rope_pair(x: torch.Tensor, y: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor, backward: bool,
               out_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Rotate x and y (q and k: [B, H, S, D] each, head counts may differ, last stride 1, one dtype) in one
    launch; y None: x alone. cos/sin [B or 1, S, D] (last stride 1). Outputs keep their input's memory layout."""
    ox = torch.empty_like(x, dtype=out_dtype)  # x's memory layout (dense tensors keep their strides)
    oy = torch.empty_like(y, dtype=out_dtype) if y is not None else None
    B, HX, S, D = x.shape
    HY = y.shape[1] if y is not None else 0
    if B * S == 0 or D == 0 or HX + HY == 0:
        return ox, oy
    half = D // 2
    block_t, block_h, block_d = launch_config(B * S, max(HX, HY), half)
    nxb, nyb = cdiv(HX, block_h), cdiv(HY, block_h)
    cb = cos.stride(0) if cos.shape[0] > 1 else 0
    sb = sin.stride(0) if sin.shape[0] > 1 else 0
    yy, oyy = (y, oy) if y is not None else (x, ox)
    grid = (cdiv(B * S, block_t), nxb + nyb)
    _ROPE(grid, x, yy, cos, sin, ox, oyy, B * S, HX, HY, nxb, S, half,
                       x.stride(0), x.stride(1), x.stride(2), yy.stride(0), yy.stride(1), yy.stride(2),
                       ox.stride(0), ox.stride(1), ox.stride(2), oyy.stride(0), oyy.stride(1), oyy.stride(2),
                       cb, cos.stride(1), sb, sin.stride(1),
                       BLOCK_T=block_t, BLOCK_H=block_h, BLOCK_D=block_d, BACKWARD=backward, num_warps=4)
    return ox, oy


def _rope_impl(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backward: bool,
               out_dtype: torch.dtype) -> torch.Tensor:
    """x [B, H, S, D] (last stride 1), cos/sin [B or 1, S, D] (last stride 1) -> out like x in ``out_dtype``."""
    return _rope_pair(x, None, cos, sin, backward, out_dtype)[0]


rope_op = torch.library.custom_op("hf_fastkern::rope", mutates_args=())(_rope_impl)


@rope_op.register_fake
def _(x, cos, sin, backward, out_dtype):
    return torch.empty_like(x, dtype=out_dtype)


def _dx(ctx, g, launch):
    """The gradient of x: the transposed rotation of ``g`` (``launch``: the custom op or the eager launcher)."""
    cos, sin = ctx.saved_tensors
    return launch(_rows_unit(g), cos, sin, not ctx.backward, ctx.x_dtype)


def _rope_grad(ctx, g):
    return _dx(ctx, g, rope_op), None, None, None, None


def _rope_setup(ctx, inputs, output):
    x, cos, sin, backward, _ = inputs
    ctx.save_for_backward(cos, sin)
    ctx.backward, ctx.x_dtype = backward, x.dtype


rope_op.register_autograd(_rope_grad, setup_context=_rope_setup)


class RopeQKFunction(torch.autograd.Function):
    """Eager path: q and k in one launch and one autograd node (forward and backward), saving cos and sin only.
    (torch.compile traces the per-tensor custom op instead.)"""

    @staticmethod
    def forward(ctx, q, k, cos, sin, out_dtype):
        ctx.save_for_backward(cos, sin)
        ctx.dtypes = (q.dtype, k.dtype)
        ctx.set_materialize_grads(False)  # an unused output's gradient arrives as None, not a tensor of zeros
        return _rope_pair(q, k, cos, sin, False, out_dtype)

    @staticmethod
    def backward(ctx, gq, gk):
        cos, sin = ctx.saved_tensors
        if gq is None and gk is None:  # neither output reached the loss (a custom Function returned None for both)
            return None, None, None, None, None
        if gq is None or gk is None:  # one output unused: the other alone
            g, dt = (gk, ctx.dtypes[1]) if gq is None else (gq, ctx.dtypes[0])
            dx = _rope_pair(_rows_unit(g), None, cos, sin, True, dt)[0]
            return (None, dx, None, None, None) if gq is None else (dx, None, None, None, None)
        dq, dk = _rope_pair(_rows_unit(gq), _rows_unit(gk), cos, sin, True, ctx.dtypes[0])
        return dq, dk, None, None, None


def _unsupported(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, unsqueeze_dim: int) -> str:
    """Why the kernel does not take this call ("" when it does)."""
    if unsqueeze_dim != 1:
        return f"unsqueeze_dim={unsqueeze_dim} (the kernel takes q/k as [batch, heads, seq, head_dim])"
    if q.dim() != 4 or k.dim() != 4 or cos.dim() != 3 or sin.shape != cos.shape:
        return f"shapes q {tuple(q.shape)}, k {tuple(k.shape)}, cos {tuple(cos.shape)}, sin {tuple(sin.shape)}"
    D = q.shape[-1]
    if k.shape[-1] != D or cos.shape[-1] != D or D % 2:
        return f"head_dim {D} vs cos {cos.shape[-1]} (partial rotary or odd head_dim)"
    if k.shape[0] != q.shape[0]:  # one launch walks both with q's (batch, seq)
        return f"q batch {q.shape[0]} != k batch {k.shape[0]}"
    for x in (q, k):
        if x.shape[2] != cos.shape[1] or cos.shape[0] not in (1, x.shape[0]):
            return f"cos {tuple(cos.shape)} does not broadcast as [batch, 1, seq, head_dim] over {tuple(x.shape)}"
    if cos.requires_grad or sin.requires_grad:
        return "cos/sin require grad"
    if not (cos.is_floating_point() and sin.is_floating_point()) or cos.dtype != sin.dtype:
        return f"cos/sin dtypes {cos.dtype}/{sin.dtype}"
    return ""


def _rows_unit(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def apply_rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               unsqueeze_dim: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' ``apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim)``: (q_embed, k_embed).

    q [B, Hq, S, D], k [B, Hk, S, D] (any strides), cos/sin [B or 1, S, D]. Triton on CUDA (or the interpreter);
    the reference expression elsewhere or for what the kernel does not take (one warning naming why).
    """
    key = entry_key(q, k, cos, sin)
    key = key if key is None else (key, unsqueeze_dim)
    kernel = _ENTRY.get(key)
    if kernel is None:  # first call with this signature: the checks, the warning if any, and the table's choice
        why = _unsupported(q, k, cos, sin, unsqueeze_dim)
        # (routing: False when the table measured stock faster here)
        kernel = use_kernel("rope", (False, why) if why else device_check((q, k, cos, sin))) and routing.use_kernel(
            "rope", q.device, tokens=q.shape[0] * q.shape[2], head_dim=q.shape[-1], grad=routing.records_grad(q, k))
        _ENTRY.put(key, kernel)
    if not kernel:
        return reference.rope(q, k, cos, sin, unsqueeze_dim)
    cos, sin = _rows_unit(cos), _rows_unit(sin)
    q, k = _rows_unit(q), _rows_unit(k)
    dt = torch.promote_types(q.dtype, cos.dtype)  # result_type of two tensors (traceable by dynamo)
    if torch.compiler.is_compiling() or k.dtype != q.dtype:
        # per tensor (the custom op torch.compile traces; q and k of different dtypes, never seen in a model)
        return rope_op(q, cos, sin, False, dt), rope_op(k, cos, sin, False, torch.promote_types(k.dtype, cos.dtype))
    if not routing.records_grad(q, k) and not routing.forward_ad_active():
        return _rope_pair(q, k, cos, sin, False, dt)  # generate(), eval: the launcher alone, no autograd node
    return RopeQKFunction.apply(q, k, cos, sin, dt)


# the checks and the kernel/reference decision, once per call signature (dispatch.entry_key)
_ENTRY = PerShape()
