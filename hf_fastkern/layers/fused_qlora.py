"""PEFT QLoRA linear (a LoRA adapter over a bitsandbytes 4-bit base) in one autograd node (issue 23, item 2).

PEFT's ``lora.bnb.Linear4bit`` computes, per call and active adapter (``peft/tuners/lora/bnb.py``)::

    result = base_layer(x).clone()                  # bitsandbytes: x.to(compute_dtype) @ dequant(W)^T (+ bias)
    x' = x.to(lora_A.dtype) unless CUDA autocast is on                       # ``_cast_input_dtype``
    out = lora_B(lora_A(dropout(x'))) * scaling  (.to(result.dtype) without CUDA autocast)
    result = result + out

so besides the two adapter GEMMs it makes a clone of the base output, the scaled product and the sum (three
full ``[tokens, out]`` elementwise passes), and the mirror of those in backward. bitsandbytes' own node saves
the packed weight (no dequantized copy) and dequantizes again in backward for ``dX``.

:class:`QLoRALinearFunction` computes the same function as the fused LoRA node does for a dense base
(:mod:`hf_fastkern.layers.fused_lora`): the rank-r product written first, the base GEMM accumulating into it
(``addmm_``, the adapter summed in the GEMM's epilogue), and in backward ``dx = da A`` with ``dy W`` accumulated
into it. ``W`` is bitsandbytes' own dequantization of the 4-bit weight (``bitsandbytes.functional.dequantize_4bit``:
NF4 or FP4, double quantization included), made in forward and made again in backward: the node keeps the
packed weight only, never the dequantized ``[out, in]`` copy. The base is frozen (a ``Params4bit`` has no
gradient): no ``dW``; a trainable base bias gets its gradient.

Out of scope here: a Triton dequant-GEMM (dequantizing the 4-bit tiles inside the GEMM's main loop instead of
materializing ``W`` for one GEMM). bitsandbytes 0.50's own CUDA path on sm90 is the same dequantize + cuBLAS at
training sizes (``backends/cuda/ops.py``: "dequant+linear is much faster" above a few rows), so the node's
base product costs what PEFT's does; what it saves is the elementwise passes and one node's bookkeeping.

Numerics: operands are cast as bitsandbytes and autocast cast them (``x.to(compute_dtype)``, the dequantized
weight in the compute dtype, then autocast's cast); the adapter's operand as PEFT casts it. Where PEFT rounds
the adapter product, its scaling and the sum separately, the node rounds the scaled ``B`` once (a tiny
``[out, r]``) and the sum once (in the GEMM's fp32 accumulator, or in fp32 when the adapters are fp32 and no
autocast runs): at least as accurate; the tests hold both against an fp64 oracle with the tolerance table.
The output is in ``x``'s dtype, as bitsandbytes returns it (``.to(inp_dtype)``).

Dropout > 0: ``dropout(x')`` is made outside the node (the same ``nn.Dropout`` call, in the same place of the
random stream as PEFT's: after the base product, which draws nothing) and passed in as the adapter's operand;
autograd carries its gradient back through the dropout and the cast, so the node's ``dx`` is the base part plus
that. With dropout 0 (an ``nn.Identity``) the adapter's operand is derived from ``x`` inside the node and ``dx``
is one fused sum.

Taken per call, for a PEFT ``lora.bnb.Linear4bit`` (exactly that class) over a bitsandbytes ``Linear4bit``
with one active adapter, no DoRA or other variant, not merged, no ``lora_bias``, no hooks on either, a quant
state on the weight, and no extra forward arguments; and on CUDA only where the routing table
(:mod:`hf_fastkern.kernels.routing`, op ``qlora_linear``) measured the node faster than PEFT's forward (no rule:
PEFT's forward). Anything else runs PEFT's own forward, with one warning naming the reason (disabled adapters
and no active adapter run it silently: that forward is the base layer alone).

bitsandbytes is optional: nothing here imports it until a PEFT 4-bit layer (whose module imported it already)
takes the node.
"""
from __future__ import annotations

import importlib
from typing import Any, NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from hf_fastkern.kernels import routing
from hf_fastkern.kernels.dispatch import warn_once
from hf_fastkern.layers.common import (
    ac_cast,
    adapter_grads,
    adapter_parts,
    autocast_state,
    call_reason,
    grad_input_adapter,
    is_qlora_linear,
    linear_adapter,
    lora_input,
    rows,
    scaled_b,
)

OP = "qlora_linear"
# reasons that run PEFT's forward without a warning: that forward is the base layer alone
QUIET = ("no active adapter", "adapters disabled")


class QLoRAParts(NamedTuple):
    """What the node reads from a ``lora.bnb.Linear4bit``: the packed weight and its quant state, the base bias,
    the compute dtype bitsandbytes casts ``x`` to, the active adapter and PEFT's input cast flag."""

    weight: torch.Tensor  # bitsandbytes Params4bit (packed uint8)
    quant_state: Any
    bias: torch.Tensor | None
    compute_dtype: torch.dtype | None
    lora_a: torch.Tensor
    lora_b: torch.Tensor
    scaling: float
    cast_input: bool
    dropout: nn.Module | None  # None: nn.Identity


def _is_bnb_linear4bit(m: nn.Module) -> bool:
    # by name: no bitsandbytes import here (optional dependency)
    cls = type(m)
    return cls.__qualname__ == "Linear4bit" and cls.__module__.startswith("bitsandbytes.")


def qlora_parts(module: nn.Module) -> tuple[QLoRAParts | None, str]:
    """The node's view of a PEFT ``lora.bnb.Linear4bit``, or (None, why PEFT's forward runs). Structure only."""
    if not is_qlora_linear(module):
        return None, f"{type(module).__name__} is not PEFT's lora.bnb.Linear4bit"
    why = call_reason(module)
    if why:
        return None, f"lora.bnb.Linear4bit: {why}"
    if module.merged:
        return None, "lora.bnb.Linear4bit with a merged adapter"
    base = module.base_layer
    if not _is_bnb_linear4bit(base):
        return None, f"lora.bnb.Linear4bit base layer is {type(base).__name__}, not bitsandbytes' Linear4bit"
    why = call_reason(base)
    if why:
        return None, f"lora.bnb.Linear4bit base layer: {why}"
    w = base.weight
    qs = getattr(w, "quant_state", None)
    if qs is None:
        return None, "4-bit base weight has no quant_state (not quantized yet: moved to the GPU?)"
    if getattr(qs, "packing_format_for_cpu", False):
        return None, "4-bit base weight is in bitsandbytes' CPU inference packing"
    if w.requires_grad:
        return None, "4-bit base weight requires grad"
    if module.disable_adapters:
        return None, "adapters disabled"
    active = [a for a in module.active_adapters if a in module.lora_A]
    if len(active) > 1:
        return None, f"lora.bnb.Linear4bit with {len(active)} active adapters"
    if not active:
        return None, "no active adapter"
    name = active[0]
    drop = module.lora_dropout[name]
    if not isinstance(drop, nn.Identity | nn.Dropout) or (type(drop) is nn.Dropout and call_reason(drop)):
        return None, f"lora.bnb.Linear4bit dropout is {type(drop).__name__}"
    adapter, why = adapter_parts(module, name, "lora.bnb.Linear4bit")
    if adapter is None:
        return None, why
    return QLoRAParts(w, qs, base.bias, base.compute_dtype, *adapter,
                      bool(getattr(module, "cast_input_dtype_enabled", True)),
                      None if isinstance(drop, nn.Identity) else drop), ""


def _tensor_reason(parts: QLoRAParts, x: torch.Tensor) -> str:
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        return f"input is {getattr(x, 'dtype', type(x).__name__)}"
    if parts.weight.device != x.device or parts.lora_a.device != x.device:
        return f"4-bit weight on {parts.weight.device}, activations on {x.device} (offloaded weights)"
    if x.shape[-1] != parts.quant_state.shape[1]:
        return f"4-bit weight {tuple(parts.quant_state.shape)} does not take input size {x.shape[-1]}"
    if x.numel() == 0:
        return "empty input"
    ac = autocast_state(x.device.type)
    if ac is not None and ac[1] and x.dtype not in (torch.float32, ac[2]):
        # PEFT's sum of a base output in x's dtype and an adapter output in autocast's dtype promotes
        return f"input {x.dtype} under {ac[2]} autocast"
    return ""


def dequantize(weight: torch.Tensor, quant_state: Any, dtype: torch.dtype) -> torch.Tensor:
    """bitsandbytes' dequantization of a 4-bit weight ([out, in], NF4/FP4, nested absmax included) in ``dtype``."""
    bnbf = importlib.import_module("bitsandbytes.functional")
    return bnbf.dequantize_4bit(weight.data, quant_state).to(dtype)


def _compute_dtype(parts: QLoRAParts, x: torch.Tensor) -> torch.dtype:
    return x.dtype if parts.compute_dtype is None else parts.compute_dtype


class QLoRALinearFunction(torch.autograd.Function):
    """``y = x Wq^T + b + scaling * (x' A^T) B^T`` with ``Wq`` the dequantized 4-bit weight: see the module
    docstring.

    Inputs: x [..., in], xd (the adapter's operand after dropout, [..., in], or None: derived from x), the packed
    weight, its quant state, bias [out] or None, lora_a [r, in], lora_b [out, r], scaling, cast_input, the
    compute dtype. Output [..., out] in x's dtype.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, xd: torch.Tensor | None, weight: torch.Tensor, quant_state: Any,
                bias: torch.Tensor | None, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float,
                cast_input: bool, compute: torch.dtype) -> torch.Tensor:
        ac = autocast_state(x.device.type)
        xb = ac_cast(x.to(compute), ac)  # bitsandbytes' operand, then autocast's cast (its F.linear)
        w = ac_cast(dequantize(weight, quant_state, compute), ac)  # [out, in], dropped after the GEMM
        # bitsandbytes casts the bias to x's dtype (in place, on its module) and then to the compute dtype
        bc = None if bias is None else ac_cast(bias.to(x.dtype).to(compute), ac)
        xl = lora_input(x, lora_a.dtype, cast_input, ac) if xd is None else ac_cast(xd, ac)
        a = F.linear(xl, ac_cast(lora_a, ac))  # [..., r]
        sb = scaled_b(lora_b, scaling, ac)
        if xb.dtype == x.dtype:
            y = linear_adapter(xb, w, bc, a, sb).to(x.dtype)
        else:
            # x wider than the compute dtype (fp32 activations over a bf16 compute dtype; adapters fp32 or bf16,
            # autocast or not): PEFT's base output comes back cast up to x's dtype and the adapter's is added to
            # it there, so the sum is not rounded to the compute dtype; one [tokens, out] buffer in the wider of
            # x's and the adapter's dtypes
            y = F.linear(xb, w, bc).to(torch.promote_types(x.dtype, a.dtype))
            rows(y).addmm_(rows(a).to(y.dtype), sb.t().to(y.dtype))
            y = y.to(x.dtype)
        ctx.autocast, ctx.scaling, ctx.x_dtype, ctx.x_shape = ac, scaling, x.dtype, x.shape
        ctx.quant_state, ctx.w_dtype, ctx.cast_input = quant_state, w.dtype, cast_input
        ctx.xd_dtype = None if xd is None else xd.dtype
        del w, xb
        # lora_A's operand for its gradient: without dropout it is x itself or a cast of it (made again in
        # backward: no copy kept); after dropout it is that tensor
        ctx.save_for_backward(x if xd is None else xl, weight, bias, lora_a, lora_b, a)
        return y

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> tuple:
        xs, weight, bias, lora_a, lora_b, a = ctx.saved_tensors
        need_x, need_xd = ctx.needs_input_grad[:2]
        need_b, need_la, need_lb = ctx.needs_input_grad[4:7]
        ac, s = ctx.autocast, ctx.scaling
        dy2 = rows(dy)
        dx = dxd = db = dla = None
        dlb, da = adapter_grads(dy2, rows(a), lora_b, s, ac, need_lb, need_la or need_x or need_xd)
        if need_la:
            # without dropout, the forward's lora_A operand again (the same casts of the same x: the same values)
            xl = lora_input(xs, lora_a.dtype, ctx.cast_input, ac) if ctx.xd_dtype is None else xs
            dla = torch.mm(da.t().to(xl.dtype), rows(xl)).to(lora_a.dtype)  # [r, in]
            del xl
        if need_b:
            db = dy2.sum(0).to(bias.dtype)
        if need_x or need_xd:
            w = dequantize(weight, ctx.quant_state, ctx.w_dtype)  # [out, in]: made again, never saved
            la = ac_cast(lora_a, ac)
            if ctx.xd_dtype is None:
                dx = grad_input_adapter(dy2, w, da, la)  # dy W + da A, one sum
            else:
                dx = torch.matmul(dy2.to(w.dtype), w)
                dxd = torch.matmul(da.to(la.dtype), la).reshape(ctx.x_shape).to(ctx.xd_dtype)
            del w
            dx = dx.reshape(ctx.x_shape).to(ctx.x_dtype) if need_x else None
        return dx, dxd, None, None, db, dla, dlb, None, None, None


def qlora_linear_reason(module: nn.Module, x: Any) -> tuple[QLoRAParts | None, str]:
    """(parts, "") when :class:`QLoRALinearFunction` computes ``module(x)`` here, else (None, why)."""
    parts, why = qlora_parts(module)
    if parts is None:
        return None, why
    why = _tensor_reason(parts, x)
    if why:
        return None, why
    if not routing.use_kernel(OP, x.device, tokens=routing.leading_rows(x), in_features=x.shape[-1],
                              out_features=parts.quant_state.shape[0],
                              grad=routing.records_grad(x, parts.lora_a, parts.lora_b)):
        return None, "routed to PEFT's forward (routing table)"
    return parts, ""


def qlora_linear_forward(self: nn.Module, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """Replacement forward for a PEFT ``lora.bnb.Linear4bit`` instance: the fused node, or PEFT's forward."""
    if not args and not kwargs:
        parts, why = qlora_linear_reason(self, x)
        if parts is not None:
            base = self.base_layer
            if not base.compute_type_is_set:
                # what bitsandbytes' forward does at its first call (it may pick x's dtype as compute dtype)
                base.set_compute_type(x)
                base.compute_type_is_set = True
            compute = _compute_dtype(parts._replace(compute_dtype=base.compute_dtype), x)
            xd = None
            if parts.dropout is not None:
                # PEFT's operand: cast to lora_A's dtype unless CUDA autocast is on, then its dropout module
                pre = x
                if not torch.is_autocast_enabled("cuda") and parts.cast_input and x.dtype != parts.lora_a.dtype:
                    pre = x.to(parts.lora_a.dtype)
                xd = parts.dropout(pre)
            return QLoRALinearFunction.apply(x, xd, parts.weight, parts.quant_state, parts.bias, parts.lora_a,
                                             parts.lora_b, parts.scaling, parts.cast_input, compute)
        if why not in QUIET and not why.startswith("routed"):
            warn_once(f"qlora_linear:{why}", f"hf_fastkern: a QLoRA linear runs PEFT's forward: {why}.")
    return type(self).forward(self, x, *args, **kwargs)
