"""PEFT LoRA linear in one autograd node: no input casts, the adapter summed in the GEMM epilogue (issue 12).

PEFT's ``lora.Linear`` computes ``base(x) + lora_B(lora_A(dropout(x))) * scaling``. With fp32 adapters under bf16
autocast (PEFT's default ``autocast_adapter_dtype``) and dropout 0 that is, per projection and call:
- ``x.to(float32)`` (``_cast_input_dtype``) and autocast's cast of it back to bf16: two full ``[tokens, in]``
  copies whose round trip is exact (bf16 -> fp32 -> bf16 is the identity);
- ``lora_B``'s ``[tokens, out]`` output, ``* scaling`` and ``+ result``: three more full-size elementwise passes;
- a bf16 copy of ``x`` kept by ``lora_A`` for its weight gradient, beside ``x`` itself;
- and in backward, the same passes mirrored (the scaled gradient, the casts, the sum of the two input gradients).
On the Llama-3.1-8B LoRA benchmark these elementwise passes took ~330 of ~980 GPU ms per step (profile in
``benchmarks/results/h100/lora.json``), about as much as half the model's GEMMs.

:class:`LoRALinearFunction` computes the same function with the two GEMMs it needs, and nothing else of size
``[tokens, *]``:

    a = x A^T  ([tokens, r]);   y = a (sB)^T + b;   y += x W^T     (addmm_, beta 1: the big GEMM's epilogue
    dB = s dy^T a;    da = dy (sB);   dA = da^T x                      reads y, hidden in compute-bound work)
    dx = da A;  dx += dy W  (addmm_)                                    dW, db only when the base is trainable

It saves ``x`` (the tensor the caller passed, no copy, when autocast does not cast it), ``a`` and the parameters
themselves (cast again in backward; ``A`` and ``B`` are tiny, a frozen bf16 ``W`` needs no cast).

Numerics: operands are cast exactly as autocast casts them; PEFT's exact up-cast of ``x`` before autocast's
down-cast is skipped (same values). ``sB`` is rounded once (a tiny [out, r]) and the sum with ``x W^T`` once
in the GEMM's fp32 epilogue, where PEFT rounds ``a B^T``, its product with ``s`` and the sum separately;
likewise ``dx``. Both are at least as accurate; the tests hold them to the tolerance table against an fp64
oracle.

Without autocast, fp32 adapters on a bf16/fp16 base (PEFT's default ``autocast_adapter_dtype=True`` in a plain
loop, issue 21) take this node too, with PEFT's numerics there: ``x.to(float32)`` (exact) into an fp32
``lora_A``, the adapter product and its sum with the base output in fp32, rounded once to the base output's
dtype; gradients of the adapters in fp32 from the same operands; ``dx`` the base's plus the adapter's, each
rounded to x's dtype, as PEFT sums them. What differs is memory and passes: PEFT keeps an fp32 copy of ``x`` per
projection for ``lora_A``'s weight gradient, the node keeps ``x`` (cast again in backward), and the forward
holds one fp32 ``[tokens, out]`` buffer where PEFT makes three. A bf16 adapter product would be cheaper still,
but its adapter gradients would carry bf16 error where PEFT's carry fp32's: outside the tolerance table.

Taken per call, for a PEFT ``lora.Linear`` (exactly that class) with one active adapter, dropout 0 (an
``nn.Identity``), no DoRA or other variant, not merged, no ``lora_bias``, not ``fan_in_fan_out``, a plain
``nn.Linear`` base and no hooks (:func:`hf_fastkern.layers.common.down_parts` decides), and no extra forward
arguments (``adapter_names``). Anything else runs PEFT's own forward, warning once with the reason.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from hf_fastkern.kernels.dispatch import warn_once
from hf_fastkern.layers.common import (
    ac_cast,
    adapter_grads,
    autocast_state,
    down_parts_cached,
    grad_input_adapter,
    linear_adapter,
    lora_input,
    rows,
    scaled_b,
    tensor_reason,
)


class LoRALinearFunction(torch.autograd.Function):
    """``y = x W^T + b + scaling * (x' A^T) B^T`` (x' = PEFT's input to ``lora_A``): see the module docstring.

    Inputs: x [..., in], weight [out, in], bias [out] or None, lora_a [r, in], lora_b [out, r], scaling,
    cast_input (PEFT's cast of x to lora_A's dtype). Output [..., out] in the base linear's output dtype.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float, cast_input: bool) -> torch.Tensor:
        ac = autocast_state(x.device.type)
        xb = ac_cast(x, ac)  # the base matmul's operand
        xl = lora_input(x, lora_a.dtype, cast_input, ac)  # lora_A's operand: usually the same tensor
        a = F.linear(xl, ac_cast(lora_a, ac))  # [..., r]
        y = linear_adapter(xb, ac_cast(weight, ac), ac_cast(bias, ac), a, scaled_b(lora_b, scaling, ac))
        ctx.autocast, ctx.scaling, ctx.x_dtype, ctx.x_shape = ac, scaling, x.dtype, x.shape
        ctx.cast_input = cast_input
        # Without autocast lora_A's operand is a cast of x itself (an fp32 copy of a bf16 x: PEFT's default fp32
        # adapters in a plain loop, twice x's bytes per projection, which PEFT keeps): save nothing more, cast
        # again in backward. Under autocast it is a cast of the caller's tensor, kept as before.
        ctx.same = xl is xb
        ctx.recast = not ctx.same and x is xb
        ctx.save_for_backward(xb, None if ctx.same or ctx.recast else xl, weight, bias, lora_a, lora_b, a)
        return y

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> tuple:
        xb, xl, weight, bias, lora_a, lora_b, a = ctx.saved_tensors
        need_x, need_w, need_b, need_la, need_lb = ctx.needs_input_grad[:5]
        ac, s = ctx.autocast, ctx.scaling
        dy2 = rows(dy)
        dx = dw = db = dla = None
        dlb, da = adapter_grads(dy2, rows(a), lora_b, s, ac, need_lb, need_la or need_x)  # [out, r], [tokens, r]
        if need_la:
            # the forward's lora_A operand again (the same casts of the same x: the same values)
            if ctx.same:
                xl = xb
            elif ctx.recast:
                xl = lora_input(xb, lora_a.dtype, ctx.cast_input, ac)
            dla = torch.mm(da.t().to(xl.dtype), rows(xl)).to(lora_a.dtype)  # [r, in]
            del xl
        if need_w:
            dw = torch.mm(dy2.t().to(xb.dtype), rows(xb)).to(weight.dtype)
        if need_b:
            db = dy2.sum(0).to(bias.dtype)
        if need_x:
            dx = grad_input_adapter(dy2, ac_cast(weight, ac), da, ac_cast(lora_a, ac))
            dx = dx.reshape(ctx.x_shape).to(ctx.x_dtype)
        return dx, dw, db, dla, dlb, None, None


def lora_linear_reason(module: nn.Module, x: torch.Tensor) -> tuple[Any, str]:
    """(parts, "") when :class:`LoRALinearFunction` computes ``module(x)``, else (None, why)."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        return None, f"input is {getattr(x, 'dtype', type(x).__name__)}"
    parts, why = down_parts_cached(module)
    if parts is None:
        return None, why
    if parts.lora_a is None:
        return None, "no active adapter"
    return (parts, "") if not (why := tensor_reason(parts, x)) else (None, why)


def lora_linear_forward(self: nn.Module, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """Replacement forward for a PEFT ``lora.Linear`` instance: the fused node, or PEFT's forward."""
    if not args and not kwargs:
        parts, why = lora_linear_reason(self, x)
        if parts is not None:
            return LoRALinearFunction.apply(x, parts.weight, parts.bias, parts.lora_a, parts.lora_b,
                                            parts.scaling, parts.cast_input)
        if why != "no active adapter":  # (disabled adapters: PEFT's forward is just the base linear)
            warn_once(f"lora_linear:{why}", f"hf_fastkern: a LoRA linear runs PEFT's forward: {why}.")
    return type(self).forward(self, x, *args, **kwargs)
