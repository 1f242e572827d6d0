"""Gated MLP output projection that recomputes SwiGLU/GeGLU in backward instead of storing it (issues 12, 7).

``y = down(act(g, u))`` with ``g = gate(x)``, ``u = up(x)`` (or the two halves of one ``gate_up(x)``, Phi-3).
Unfused, autograd keeps ``g`` and ``u`` (for the activation's backward) *and* ``h = act(g, u)``
``[tokens, intermediate]``: ``down``'s linear saves it for its weight gradient and a LoRA ``lora_A`` saves it
for the adapter gradient. :class:`GLUDownFunction` saves ``g``, ``u`` (or the one ``gate_up`` output), the
parameters (no copy) and, with LoRA, the rank-r ``a = h A^T``; backward recomputes ``h`` with the Triton
activation forward (one bandwidth-bound elementwise pass) when a weight gradient reads it, and then:

    dW  = dy^T h                    only when W requires grad: a frozen base runs no weight-gradient matmul
    dB  = s dy^T a,  dA = s (dy B)^T h   only when the adapter requires grad
    db  = sum_tokens dy             only when the bias requires grad
    dh  = dy @ W                    (+ s (dy B) A, the adapter's share); h is dropped before dh exists
    dg, du = act_backward(dh, g, u) the existing Triton backward (it recomputes act(g) again, never stores it)

With a frozen down weight and no adapter on it (LoRA on the other projections) nothing reads h: no recompute.

Supported ``down`` projections (checked per call: PEFT may wrap the model after it was patched):
- ``nn.Linear`` (bias or not) whose forward is nn.Linear's, with no hooks and a plain floating weight;
- PEFT ``lora.Linear`` over such a linear with at most one active adapter, dropout 0 (``nn.Identity``), no DoRA
  or other variant, not merged, no ``lora_bias``, not ``fan_in_fan_out`` (GPT-2's Conv1D).
Anything else (LoRA dropout > 0, DoRA, several adapters, merged, Conv1D, a quantized or sharded base, hooks on
the projection) takes the unfused path, which is correct, just not lean; a warning names the reason once.

Numerics are the unfused path's, op for op, except for the adapter: the forward runs the same ``F.linear`` calls
under the caller's autocast state, and the backward runs its matmuls under the forward's autocast state (what
``torch.amp.custom_bwd`` does), so fp32 master weights are cast to bf16 exactly as autocast casts them and
weight gradients reach the parameters in their own dtype. The adapter's share is summed in the GEMM epilogue
(the rank-r product first, the base GEMM accumulating into it) and PEFT's exact up-cast of ``h`` before
autocast's down-cast is skipped, as in :mod:`hf_fastkern.fused_lora`. The weights are saved as the parameters
themselves and cast again in backward, where the unfused path under autocast keeps a bf16 copy of every weight.

Limits: the Triton recompute runs where the activation kernel runs (CUDA, or CPU under ``TRITON_INTERPRET=1``);
elsewhere the pure-PyTorch reference is recomputed (same saving). Under torch.compile the activation goes
through the registered custom ops (``hf_fastkern::glu_act_fwd`` / ``glu_act_bwd``).
"""
from __future__ import annotations

import contextlib
import weakref
from typing import Any, NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from hf_fastkern.kernels import activations as _act
from hf_fastkern.kernels import reference
from hf_fastkern.kernels.dispatch import device_check, use_kernel, warn_once

# activation name as the registry's factories spell it -> (kernel code, GELU approximation for the reference)
_CODES = {("swiglu", None): _act.SILU, ("geglu", "none"): _act.GELU_ERF, ("geglu", "tanh"): _act.GELU_TANH}
_APPROX = {_act.GELU_ERF: "none", _act.GELU_TANH: "tanh"}


class DownParts(NamedTuple):
    """What the lean path reads from a ``down`` projection: ``y = h W^T + b + scaling * (h' A^T) B^T`` where
    ``h' = h.to(A.dtype)`` when ``cast_input`` (PEFT's ``_cast_input_dtype``). lora_a/lora_b None: no adapter."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    lora_a: torch.Tensor | None
    lora_b: torch.Tensor | None
    scaling: float
    cast_input: bool


# Set by the registry on every replacement forward it binds: an instance-level forward carrying it is this
# plugin's own (a PEFT lora.Linear bound to hf_fastkern.fused_lora), not a hook library's.
PATCH_FLAG = "_hf_fastkern_forward"


def _global_hooks() -> bool:
    """Module hooks registered for every module (``nn.modules.module.register_module_forward_hook`` ...)."""
    mod = nn.modules.module
    return any(getattr(mod, n, None) for n in ("_global_forward_hooks", "_global_forward_pre_hooks",
                                                "_global_backward_hooks", "_global_backward_pre_hooks"))


def _call_reason(m: nn.Module) -> str:
    """Why calling ``m`` does more than its class forward ("" when it does not): skipping the call would skip
    an accelerate device hook, a PEFT ``adapter_names`` pre-hook, a tensor-parallel hook..."""
    if "forward" in m.__dict__ and not getattr(getattr(m.__dict__["forward"], "__func__", None), PATCH_FLAG, False):
        return f"{type(m).__name__} has an instance-level forward (a hook library such as accelerate)"
    if m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks:
        return f"{type(m).__name__} has module hooks"
    if _global_hooks():
        return "global module hooks are registered (nn.modules.module.register_module_*_hook)"
    return ""


def _linear_reason(m: nn.Module, what: str) -> str:
    """"" when ``m`` computes exactly ``F.linear(x, m.weight, m.bias)`` with a plain floating weight."""
    if not isinstance(m, nn.Linear) or type(m).forward is not nn.Linear.forward:
        return f"{what} is {type(m).__name__}, not nn.Linear (quantized or custom linear)"
    why = _call_reason(m)
    if why:
        return f"{what}: {why}"
    w = m.weight
    # Params4bit / Int8Params / DTensor and other subclasses hold something other than the dense weight
    if type(w) not in (nn.Parameter, torch.Tensor) or not w.is_floating_point() or w.dim() != 2:
        return f"{what} weight is a {type(w).__name__} {w.dtype} (quantized or sharded)"
    b = m.bias
    if b is not None and (type(b) not in (nn.Parameter, torch.Tensor) or b.dtype != w.dtype):
        return f"{what} bias is a {type(b).__name__} {b.dtype}"
    return ""


def _is_lora_linear(m: nn.Module) -> bool:
    # By name, not isinstance: no peft import here (optional dependency), and only this exact class, whose
    # forward is the one reproduced below (PEFT's bnb/gptq/tp LoRA layers are other classes).
    cls = type(m)
    return cls.__qualname__ == "Linear" and cls.__module__ == "peft.tuners.lora.layer"


def down_parts(down: nn.Module) -> tuple[DownParts | None, str]:
    """The lean path's view of ``down``, or (None, why it takes the unfused path). Structure only; the
    per-call tensor checks (device, dtypes) are in :func:`glu_down`."""
    if not _is_lora_linear(down):
        why = _linear_reason(down, type(down).__name__)
        if why:
            return None, why
        return DownParts(down.weight, down.bias, None, None, 1.0, True), ""
    why = _call_reason(down)
    if why:
        return None, f"lora.Linear: {why}"
    if down.merged:
        return None, "lora.Linear with a merged adapter"
    if getattr(down, "fan_in_fan_out", False):
        return None, "lora.Linear with fan_in_fan_out (Conv1D base)"
    base = down.base_layer
    why = _linear_reason(base, "lora.Linear base layer")
    if why:
        return None, why
    if down.disable_adapters:
        return DownParts(base.weight, base.bias, None, None, 1.0, True), ""
    active = [a for a in down.active_adapters if a in down.lora_A]
    if len(active) > 1:
        return None, f"lora.Linear with {len(active)} active adapters"
    if not active:
        return DownParts(base.weight, base.bias, None, None, 1.0, True), ""
    name = active[0]
    if name in getattr(down, "lora_variant", {}) or getattr(down, "use_dora", {}).get(name, False):
        return None, "lora.Linear with DoRA or another LoRA variant"
    if not isinstance(down.lora_dropout[name], nn.Identity):
        return None, "lora.Linear with lora_dropout > 0"
    if getattr(down, "lora_bias", {}).get(name, False):
        return None, "lora.Linear with lora_bias"
    la, lb = down.lora_A[name], down.lora_B[name]
    why = _linear_reason(la, "lora_A") or _linear_reason(lb, "lora_B")
    if why:
        return None, why
    if la.bias is not None or lb.bias is not None:
        return None, "lora.Linear with a bias on lora_A/lora_B"
    scaling = down.scaling[name]
    if not isinstance(scaling, float | int):
        return None, f"lora.Linear scaling is a {type(scaling).__name__}"
    return DownParts(base.weight, base.bias, la.weight, lb.weight, float(scaling),
                     bool(getattr(down, "cast_input_dtype_enabled", True))), ""


# Per-module cache of down_parts for plain nn.Linear projections: the structural walk costs ~8 us per call on the
# CI CPU (several times that on the H100 host), once per decoder layer and step. An entry is reused only while
# the module's state key (below) is unchanged; LoRA layers (adapters toggled, merged, set_adapter ...) take the
# full walk every call.
_PARTS_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _linear_state(m: nn.Module) -> tuple | None:
    """What down_parts' verdict on a plain nn.Linear depends on, cheaply: its class and instance forward, its
    hooks and the global ones, and its parameters (object identity, dtype, shape). None for other modules."""
    if type(m) is not nn.Linear:
        return None
    p = m._parameters
    w, b = p.get("weight"), p.get("bias")
    return (m.__dict__.get("forward"), len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks),
            len(m._backward_pre_hooks), _global_hooks(), id(w), type(w), getattr(w, "dtype", None),
            getattr(w, "shape", None), id(b), type(b), getattr(b, "dtype", None))


def down_parts_cached(down: nn.Module) -> tuple[DownParts | None, str]:
    """``down_parts(down)``, reused across calls while a plain nn.Linear's state key is unchanged."""
    if torch.compiler.is_compiling():
        # Dynamo would guard on the weak dictionary's entries (and fail building those guards); a compiled
        # graph runs this walk once, at trace time, anyway
        return down_parts(down)
    state = _linear_state(down)
    if state is None:
        return down_parts(down)
    hit = _PARTS_CACHE.get(down)
    if hit is not None and hit[0] == state:
        return hit[1]
    res = down_parts(down)
    _PARTS_CACHE[down] = (state, res)
    return res


# ----------------------------------------------------------------------------------------------------------
# the activation, forward and backward: Triton (eager launcher, or custom op under torch.compile) or reference


def _act_fwd(g: torch.Tensor, u: torch.Tensor, code: int, kernel: bool) -> torch.Tensor:
    if not kernel:
        if code == _act.SILU:
            return reference.swiglu(g, u)
        return reference.geglu(g, u, _APPROX[code])
    if torch.compiler.is_compiling():
        return _act.glu_act_fwd(g, u, code)
    return _act._glu_act_fwd_impl(g, u, code)


def _act_bwd(dh: torch.Tensor, g: torch.Tensor, u: torch.Tensor, code: int,
             kernel: bool) -> tuple[torch.Tensor, torch.Tensor]:
    if kernel:
        if torch.compiler.is_compiling():
            return _act.glu_act_bwd(dh, g, u, code)
        return _act._glu_act_bwd_impl(dh, g, u, code)
    # Autograd's own formulas for reference.swiglu/geglu, op for op (the unfused reference path's gradients):
    # (act(gf) * uf).to(dtype) -> d uf = dhf * act(gf), d act = dhf * uf, then silu/gelu_backward; no
    # torch.autograd.grad, so torch.compile traces it.
    gf = g if g.dtype == torch.float64 else g.float()
    uf = u if u.dtype == torch.float64 else u.float()
    dhf = dh.to(gf.dtype)
    if code == _act.SILU:
        a = F.silu(gf)
        dgf = torch.ops.aten.silu_backward(dhf * uf, gf)
    else:
        a = F.gelu(gf, approximate=_APPROX[code])
        dgf = torch.ops.aten.gelu_backward(dhf * uf, gf, approximate=_APPROX[code])
    return dgf.to(g.dtype), (dhf * a).to(u.dtype)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """[..., n] -> [tokens, n] (a view for the contiguous tensors seen here)."""
    return t.reshape(-1, t.shape[-1])


def _autocast_state(device_type: str) -> tuple[str, bool, torch.dtype] | None:
    if not torch.amp.is_autocast_available(device_type):
        return None
    return device_type, torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type)


def _ac_dtype(t: torch.Tensor | None, ac: tuple[str, bool, torch.dtype] | None) -> torch.dtype | None:
    """The dtype autocast casts ``t`` to as a matmul operand (floating, not fp64, on the autocast device, not
    already in autocast's dtype), or None when it leaves ``t`` as it is."""
    if t is None or ac is None or not ac[1] or t.device.type != ac[0] or not t.is_floating_point() \
            or t.dtype in (torch.float64, ac[2]):
        return None
    return ac[2]


def _ac_cast(t: torch.Tensor | None, ac: tuple[str, bool, torch.dtype] | None) -> torch.Tensor | None:
    """``t`` cast as autocast casts a matmul operand (:func:`_ac_dtype`), without autocast's weight cache: that
    cache keeps the bf16 copy of every trainable fp32 weight until the autocast region ends (the whole forward);
    this copy is freed right after its matmul. Same rounding (``.to``)."""
    dtype = _ac_dtype(t, ac)
    return t if dtype is None else t.to(dtype)


def _exact_cast(src: torch.dtype, dst: torch.dtype) -> bool:
    """Every ``src`` value is representable in ``dst`` (the cast changes no value)."""
    return src == dst or dst == torch.float64 or (dst == torch.float32 and src in (torch.bfloat16, torch.float16))


def lora_input(x: torch.Tensor, lora_dtype: torch.dtype, cast_input: bool,
               ac: tuple[str, bool, torch.dtype] | None) -> torch.Tensor:
    """The operand ``lora_A``'s matmul sees in PEFT's forward: ``x.to(lora_A.dtype)`` (``_cast_input_dtype``,
    when ``cast_input``) and then autocast's cast. When the first cast is exact and autocast casts again to a
    dtype ``x`` already has (bf16 activations, fp32 adapters, bf16 autocast), the round trip is the identity
    and ``x`` itself is returned: no two ``[tokens, in]`` copies."""
    if cast_input and x.dtype != lora_dtype:
        # autocast casts both dtypes to its own (neither is fp64): round(x.to(lora), D) == round(x, D) when the
        # first cast is exact
        autocast_casts = ac is not None and ac[1] and x.device.type == ac[0] \
            and torch.float64 not in (x.dtype, lora_dtype)
        if not (autocast_casts and _exact_cast(x.dtype, lora_dtype)):
            x = x.to(lora_dtype)
    return _ac_cast(x, ac)


def scaled_b(lora_b: torch.Tensor, scaling: float, ac: tuple[str, bool, torch.dtype] | None) -> torch.Tensor:
    """``scaling * B`` in fp32 (or B's dtype), then cast as autocast casts B: one rounding of a tiny [out, r]."""
    return _ac_cast(lora_b * scaling, ac)


def linear_adapter(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, a: torch.Tensor,
                   b_scaled: torch.Tensor) -> torch.Tensor:
    """``x W^T + bias + a b_scaled^T`` ([..., out]), operands already cast.

    One dtype throughout (the usual autocast case): the rank-r product (with the bias) is written first and the
    big GEMM accumulates into it (``addmm_``, beta 1): the epilogue's read of that output is hidden in a
    compute-bound GEMM, where adding the adapter after the base GEMM costs a memory-bound read-and-write pass
    of the whole output. Mixed dtypes (no autocast, fp32 adapters over a bf16 base): PEFT's order and dtypes."""
    if not (x.dtype == weight.dtype == a.dtype == b_scaled.dtype and (bias is None or bias.dtype == x.dtype)):
        return (F.linear(x, weight, bias) + F.linear(a, b_scaled)).to(torch.result_type(x, weight))
    a2 = _rows(a)
    y = torch.mm(a2, b_scaled.t()) if bias is None else torch.addmm(bias, a2, b_scaled.t())
    y.addmm_(_rows(x), weight.t())
    return y.reshape(*x.shape[:-1], weight.shape[0])


def adapter_grads(dy: torch.Tensor, a: torch.Tensor, lora_b: torch.Tensor, scaling: float,
                  ac: tuple[str, bool, torch.dtype] | None, need_lb: bool,
                  need_da: bool) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(dB, da) of ``y += a (sB)^T``: ``dB = s dy^T a`` ([out, r], in B's dtype) and ``da = dy (sB)``
    ([..., r], in a's dtype), each only when asked; the scaling goes on the rank-r products, never on dy."""
    dlb = da = None
    if need_lb:
        dlb = (torch.matmul(_rows(dy).t().to(a.dtype), _rows(a)) * scaling).to(lora_b.dtype)
    if need_da:
        lb = scaled_b(lora_b, scaling, ac)
        da = torch.matmul(dy.to(lb.dtype), lb).to(a.dtype)
    return dlb, da


def grad_input_adapter(dy: torch.Tensor, weight: torch.Tensor, da: torch.Tensor,
                       lora_a: torch.Tensor) -> torch.Tensor:
    """``dy W + da A`` ([..., in]) in the order of :func:`linear_adapter` (small product first, the big GEMM
    accumulating into it) when the dtypes agree; else the two products summed in ``dy W``'s dtype."""
    if dy.dtype == weight.dtype == da.dtype == lora_a.dtype:
        dx = torch.mm(_rows(da), lora_a)
        dx.addmm_(_rows(dy), weight)
        return dx.reshape(*dy.shape[:-1], weight.shape[1])
    dx = torch.matmul(dy.to(weight.dtype), weight)
    return dx + torch.matmul(da.to(lora_a.dtype), lora_a).to(dx.dtype)


class GLUDownFunction(torch.autograd.Function):
    """``y = down(act(g, u))`` saving g, u (or gate_up), the parameters and ``a = h A^T``; never ``h``.

    Inputs: gate [..., I] (or gate_up [..., 2I] with up None), up [..., I] or None, weight [H, I],
    bias [H] or None, lora_a [r, I] or None, lora_b [H, r] or None, then code (0 SiLU, 1 erf GELU, 2 tanh GELU),
    scaling, cast_input (PEFT's input cast to lora_A's dtype) and kernel (Triton or reference activation).
    Output: [..., H] in the dtype the unfused path gives (the base linear's output dtype).
    """

    @staticmethod
    def forward(ctx: Any, gate: torch.Tensor, up: torch.Tensor | None, weight: torch.Tensor,
                bias: torch.Tensor | None, lora_a: torch.Tensor | None, lora_b: torch.Tensor | None,
                code: int, scaling: float, cast_input: bool, kernel: bool) -> torch.Tensor:
        g, u = gate.chunk(2, dim=-1) if up is None else (gate, up)
        h = _act_fwd(g, u, code, kernel)
        ac = _autocast_state(gate.device.type)
        # The unfused path's ops, in its order, under the caller's autocast state (autocast is active here).
        a = None
        if lora_a is not None:
            # [..., r]: small, saved instead of recomputing h A^T; no copies of h for PEFT's input cast
            a = F.linear(lora_input(h, lora_a.dtype, cast_input, ac), _ac_cast(lora_a, ac))
            y0 = y = linear_adapter(_ac_cast(h, ac), _ac_cast(weight, ac), _ac_cast(bias, ac), a,
                                    scaled_b(lora_b, scaling, ac))
        else:
            y0 = y = F.linear(h, _ac_cast(weight, ac), _ac_cast(bias, ac))
        ctx.code, ctx.scaling, ctx.cast_input, ctx.kernel = code, scaling, cast_input, kernel
        ctx.h_dtype, ctx.y0_dtype = h.dtype, y0.dtype
        ctx.autocast = ac
        ctx.save_for_backward(gate, up, weight, bias, lora_a, lora_b, a)
        return y

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> tuple:
        gate, up, weight, bias, lora_a, lora_b, a = ctx.saved_tensors
        need_g, need_u, need_w, need_b, need_la, need_lb = ctx.needs_input_grad[:6]
        need_h = need_g or need_u
        ac = ctx.autocast
        # the forward's autocast state, so every matmul casts its operands as the forward's did (custom_bwd)
        with torch.autocast(ac[0], dtype=ac[2], enabled=ac[1]) if ac else contextlib.nullcontext():
            g, u = gate.chunk(2, dim=-1) if up is None else (gate, up)
            dw = db = dla = dlb = da = dh = dgate = dup = None
            dy0 = dy.to(ctx.y0_dtype)  # y has y0's dtype (linear_adapter)
            if lora_a is not None:
                dlb, da = adapter_grads(dy0, a, lora_b, ctx.scaling, ac, need_lb, need_la or need_h)
            if need_w or need_la:
                # The recompute that replaces the stored h: only the weight gradients read h (dh does not),
                # and it is dropped before dh, dg, du exist, so the backward never holds h beside them.
                h = _act_fwd(g, u, ctx.code, ctx.kernel)  # [..., I]
                if need_la:
                    xl = lora_input(h, lora_a.dtype, ctx.cast_input, ac)
                    dla = torch.matmul(_rows(da).t(), _rows(xl)).to(lora_a.dtype)  # [r, I]
                    del xl
                if need_w:
                    dw = torch.matmul(_rows(dy0).t(), _rows(h)).to(weight.dtype)  # [H, I]
                del h
            if need_b:
                db = _rows(dy0).sum(0).to(bias.dtype)
            if need_h:
                if da is not None:  # the adapter's share of dh, in the same GEMM where the dtypes agree
                    dh = grad_input_adapter(dy0, _ac_cast(weight, ac), da, _ac_cast(lora_a, ac)).to(ctx.h_dtype)
                else:
                    dh = torch.matmul(dy0, _ac_cast(weight, ac)).to(ctx.h_dtype)  # [..., I]
                dg, du = _act_bwd(dh, g, u, ctx.code, ctx.kernel)
                del dh
                if up is None:
                    dgate = torch.cat([dg, du], dim=-1)
                else:
                    dgate, dup = dg, du
        return dgate, dup, dw, db, dla, dlb, None, None, None, None


def _code(kind: str, approximate: str | None) -> int:
    code = _CODES.get((kind, approximate if kind == "geglu" else None))
    if code is None:
        raise ValueError(f"kind must be 'swiglu' or 'geglu' (approximate 'none' or 'tanh'), got {kind!r}, "
                         f"{approximate!r}")
    return code


def _unfused(g: torch.Tensor, u: torch.Tensor, down: nn.Module, kind: str, approximate: str | None) -> torch.Tensor:
    h = _act.swiglu(g, u) if kind == "swiglu" else _act.geglu(g, u, approximate or "none")
    return down(h)


def _tensor_reason(parts: DownParts, g: torch.Tensor) -> str:
    """Per-call checks: where the unfused path would raise or do something else, it runs as it is."""
    w = parts.weight
    if w.device != g.device:
        return f"down weight on {w.device}, activations on {g.device} (offloaded weights)"
    if w.shape[1] != g.shape[-1]:
        return f"down weight {tuple(w.shape)} does not take intermediate size {g.shape[-1]}"
    ac = _autocast_state(g.device.type)
    if ac is None or not ac[1]:
        if w.dtype != g.dtype:
            return f"down weight {w.dtype} and activations {g.dtype} without autocast"
        if parts.lora_a is not None:
            xl = parts.lora_a.dtype if parts.cast_input else g.dtype
            if not (xl == parts.lora_a.dtype == parts.lora_b.dtype):
                return f"lora_A/lora_B dtypes {parts.lora_a.dtype}/{parts.lora_b.dtype}, input {xl}"
    return ""


def glu_down(gate: torch.Tensor, up: torch.Tensor | None, down: nn.Module, kind: str = "swiglu",
             approximate: str | None = None, recompute: bool = True) -> torch.Tensor:
    """``down(swiglu(gate, up))`` or ``down(geglu(gate, up, approximate))``, recomputing the activation in
    backward instead of storing it when ``down`` allows it (see the module docstring).

    gate, up: [..., intermediate] fp32/bf16/fp16, one dtype (any row strides); or ``gate`` the fused
    [..., 2 * intermediate] ``gate_up`` output (halves ``[gate | up]``) and ``up`` None.
    down: nn.Linear [hidden, intermediate] or PEFT lora.Linear over one; anything else runs unfused.
    recompute=False: the unfused path ``down(act(gate, up))`` (autograd stores ``h``).
    Returns [..., hidden] in the dtype the unfused path returns.
    """
    code = _code(kind, approximate)
    g, u = gate.chunk(2, dim=-1) if up is None else (gate, up)
    if not recompute:
        return _unfused(g, u, down, kind, approximate)
    parts, why = down_parts_cached(down)
    if parts is not None:
        why = _tensor_reason(parts, g)
    if why:
        warn_once(f"mlp_recompute:{why}", f"hf_fastkern: MLP recompute takes the unfused path (the activation "
                                          f"is stored): {why}.")
        return _unfused(g, u, down, kind, approximate)
    _act._check_pair(kind, g, u)
    kernel = use_kernel(kind, device_check((g, u)))
    return GLUDownFunction.apply(gate, up, parts.weight, parts.bias, parts.lora_a, parts.lora_b, code,
                                 parts.scaling, parts.cast_input, kernel)
