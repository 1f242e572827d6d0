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
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from hf_fastkern.kernels import activations as _act
from hf_fastkern.kernels import reference
from hf_fastkern.kernels.dispatch import device_check, use_kernel, warn_once
from hf_fastkern.kernels.routing import leading_rows
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

# activation name as the patch factories spell it -> (kernel code, GELU approximation for the reference)
_CODES = {("swiglu", None): _act.SILU, ("geglu", "none"): _act.GELU_ERF, ("geglu", "tanh"): _act.GELU_TANH}
_APPROX = {_act.GELU_ERF: "none", _act.GELU_TANH: "tanh"}


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
        ac = autocast_state(gate.device.type)
        # The unfused path's ops, in its order, under the caller's autocast state (autocast is active here).
        a = None
        if lora_a is not None:
            # [..., r]: small, saved instead of recomputing h A^T; no copies of h for PEFT's input cast
            a = F.linear(lora_input(h, lora_a.dtype, cast_input, ac), ac_cast(lora_a, ac))
            y0 = y = linear_adapter(ac_cast(h, ac), ac_cast(weight, ac), ac_cast(bias, ac), a,
                                    scaled_b(lora_b, scaling, ac))
        else:
            y0 = y = F.linear(h, ac_cast(weight, ac), ac_cast(bias, ac))
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
                    dla = torch.matmul(rows(da).t(), rows(xl)).to(lora_a.dtype)  # [r, I]
                    del xl
                if need_w:
                    dw = torch.matmul(rows(dy0).t(), rows(h)).to(weight.dtype)  # [H, I]
                del h
            if need_b:
                db = rows(dy0).sum(0).to(bias.dtype)
            if need_h:
                if da is not None:  # the adapter's share of dh, in the same GEMM where the dtypes agree
                    dh = grad_input_adapter(dy0, ac_cast(weight, ac), da, ac_cast(lora_a, ac)).to(ctx.h_dtype)
                else:
                    dh = torch.matmul(dy0, ac_cast(weight, ac)).to(ctx.h_dtype)  # [..., I]
                dg, du = _act_bwd(dh, g, u, ctx.code, ctx.kernel)
                del dh
                if up is None:
                    dgate = torch.cat([dg, du], dim=-1)
                else:
                    dgate, dup = dg, du
        return dgate, dup, dw, db, dla, dlb, None, None, None, None


# Below this many tokens per call a CUDA MLP runs the unfused down(act(g, u)) (act in the inputs' dtype where the
# routing table keeps it on PyTorch, so it saves what the unpatched MLP saves) instead of recomputing h: there h
# is at most RECOMPUTE_MIN_TOKENS x intermediate elements per layer (64 MiB at 8192 bf16), while the recompute
# node costs host time on every call. Not while the checkpoint planner decides the layer (recompute_min_tokens).
# Measured on the H100 (benchmarks/bench_guard.py --profile, 2026-12-07, issue21-small-llama2048-B1x128, 4
# layers): GLUDownFunction ~0.45 ms forward + ~0.84 ms backward of host time per layer against ~0.3 ms for the
# unfused down(act(g, u)), which made that step 0.87x sdpa; from 2048 tokens (B2x1024) the step ran 1.01x with
# the recompute on (2048-4096 not measured). CPU tensors (tests, the interpreter) keep it.
RECOMPUTE_MIN_TOKENS = 4096

# Instance attribute on a patched MLP module: True while the checkpoint planner (hf_fastkern.memory.checkpoint_plan)
# keeps this layer's activations ("keep" mode), so the MLP stores h instead of recomputing it in backward.
STORE_ACTIVATION = "_hf_fastkern_store_activation"


def recompute_min_tokens(module: nn.Module) -> int:
    """The ``min_tokens`` a patched MLP forward passes to :func:`glu_down`: RECOMPUTE_MIN_TOKENS, or 0 while the
    checkpoint planner decides this layer (its "cheap" mode recomputes h at any size, and its calibration
    measures that at a few hundred tokens)."""
    return 0 if STORE_ACTIVATION in module.__dict__ else RECOMPUTE_MIN_TOKENS


def recompute_for(module: nn.Module, recompute: bool) -> bool:
    """The ``recompute`` a patched MLP forward passes to :func:`glu_down` now: its bound option, unless the
    checkpoint planner set :data:`STORE_ACTIVATION` on the module for this forward."""
    return recompute and not module.__dict__.get(STORE_ACTIVATION, False)


def _code(kind: str, approximate: str | None) -> int:
    code = _CODES.get((kind, approximate if kind == "geglu" else None))
    if code is None:
        raise ValueError(f"kind must be 'swiglu' or 'geglu' (approximate 'none' or 'tanh'), got {kind!r}, "
                         f"{approximate!r}")
    return code


def _unfused(g: torch.Tensor, u: torch.Tensor, down: nn.Module, kind: str, approximate: str | None) -> torch.Tensor:
    h = _act.swiglu(g, u) if kind == "swiglu" else _act.geglu(g, u, approximate or "none")
    return down(h)


def glu_down(gate: torch.Tensor, up: torch.Tensor | None, down: nn.Module, kind: str = "swiglu",
             approximate: str | None = None, recompute: bool = True, inference: bool = False,
             min_tokens: int = 0) -> torch.Tensor:
    """``down(swiglu(gate, up))`` or ``down(geglu(gate, up, approximate))``, recomputing the activation in
    backward instead of storing it when ``down`` allows it (see the module docstring).

    gate, up: [..., intermediate] fp32/bf16/fp16, one dtype (any row strides); or ``gate`` the fused
    [..., 2 * intermediate] ``gate_up`` output (halves ``[gate | up]``) and ``up`` None.
    down: nn.Linear [hidden, intermediate] or PEFT lora.Linear over one; anything else runs unfused.
    recompute=False: the unfused path ``down(act(gate, up))`` (autograd stores ``h``).
    inference=True (the module is in eval mode) and no autograd: the unfused path too (nothing to save). Not for
    a training module: reentrant checkpointing's first pass runs without autograd and must match its recompute.
    min_tokens: on CUDA, calls of fewer tokens take the unfused path (patched MLPs pass
    :func:`recompute_min_tokens`).
    Returns [..., hidden] in the dtype the unfused path returns.
    """
    code = _code(kind, approximate)
    g, u = gate.chunk(2, dim=-1) if up is None else (gate, up)
    if min_tokens and g.device.type == "cuda" and leading_rows(g) < min_tokens:
        recompute = False  # small steps: store h (see RECOMPUTE_MIN_TOKENS)
    if not recompute or (inference and not torch.is_grad_enabled()):
        # inference without autograd stores nothing, so there is nothing to save: the plain path, without this
        # node's per-call checks and autograd.Function overhead (generate(): every decoded token, every layer)
        return _unfused(g, u, down, kind, approximate)
    parts, why = down_parts_cached(down)
    if parts is not None:
        why = tensor_reason(parts, g)
    if why:
        warn_once(f"mlp_recompute:{why}", f"hf_fastkern: MLP recompute takes the unfused path (the activation "
                                          f"is stored): {why}.")
        return _unfused(g, u, down, kind, approximate)
    _act._check_pair(kind, g, u)
    # Not routed by the glu table: the table compares the activation op with its stock PyTorch op, while the
    # alternative here is the reference *recompute* inside this node (fp32 elementwise passes in backward), which
    # unpatched transformers never runs. With it routed (the seeded table sends 4096-16384 x 14336 to "stock"),
    # the 8B LoRA step measured 1.23x sdpa at 0.736x memory (H100, 2026-12-07); unrouted again, 1.563x / 1.476x
    # at 0.647x the same day (benchmarks/results/h100/micro/lora_2026-12-07.json).
    kernel = use_kernel(kind, device_check((g, u)))
    return GLUDownFunction.apply(gate, up, parts.weight, parts.bias, parts.lora_a, parts.lora_b, code,
                                 parts.scaling, parts.cast_input, kernel)
