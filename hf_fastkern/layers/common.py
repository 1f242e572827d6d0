"""What the fused layers share: autocast's casting rule, the structure of a (LoRA) linear, and the refusal type.

Used by :mod:`hf_fastkern.layers.fused_mlp`, :mod:`hf_fastkern.layers.fused_lora`,
:mod:`hf_fastkern.layers.shared_cast` and the patch factories (:mod:`hf_fastkern.patches.factories`), so none of
them reads another's private helpers.

- autocast: :func:`autocast_state`, :func:`ac_dtype`, :func:`ac_cast` reproduce the cast autocast makes for a
  matmul operand, so a fused node computes on exactly the operands the unfused modules would see.
- linear structure: :func:`down_parts` (cached per module by :func:`down_parts_cached`) reads a plain
  ``nn.Linear`` or a PEFT ``lora.Linear`` as ``y = x W^T + b + scaling * (x' A^T) B^T``, or says in words why a
  module is not that (hooks, DoRA, dropout, Conv1D ``fan_in_fan_out``...). :func:`tensor_reason` adds the
  per-call checks (devices, dtypes).
- the LoRA GEMM pieces shared by the fused LoRA linear and the lean MLP: :func:`lora_input`, :func:`scaled_b`,
  :func:`linear_adapter`, :func:`adapter_grads`, :func:`grad_input_adapter`.
- :class:`Unsupported`: a layer or factory that cannot take over a module raises it with the reason, which the
  patch ledger reports.
"""
from __future__ import annotations

import weakref
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F


class Unsupported(Exception):
    """Raised by a factory or layer that cannot take over this module; the message goes into the report."""


class DownParts(NamedTuple):
    """What the lean path reads from a ``down`` projection: ``y = h W^T + b + scaling * (h' A^T) B^T`` where
    ``h' = h.to(A.dtype)`` when ``cast_input`` (PEFT's ``_cast_input_dtype``). lora_a/lora_b None: no adapter."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    lora_a: torch.Tensor | None
    lora_b: torch.Tensor | None
    scaling: float
    cast_input: bool


# Set by the patch ledger on every replacement forward it binds: an instance-level forward carrying it is this
# plugin's own (a PEFT lora.Linear bound to hf_fastkern.fused_lora), not a hook library's.
PATCH_FLAG = "_hf_fastkern_forward"


def global_hooks() -> bool:
    """Module hooks registered for every module (``nn.modules.module.register_module_forward_hook`` ...)."""
    mod = nn.modules.module
    return any(getattr(mod, n, None) for n in ("_global_forward_hooks", "_global_forward_pre_hooks",
                                                "_global_backward_hooks", "_global_backward_pre_hooks"))


def call_reason(m: nn.Module) -> str:
    """Why calling ``m`` does more than its class forward ("" when it does not): skipping the call would skip
    an accelerate device hook, a PEFT ``adapter_names`` pre-hook, a tensor-parallel hook..."""
    if "forward" in m.__dict__ and not getattr(getattr(m.__dict__["forward"], "__func__", None), PATCH_FLAG, False):
        return f"{type(m).__name__} has an instance-level forward (a hook library such as accelerate)"
    if m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks:
        return f"{type(m).__name__} has module hooks"
    if global_hooks():
        return "global module hooks are registered (nn.modules.module.register_module_*_hook)"
    return ""


def linear_reason(m: nn.Module, what: str) -> str:
    """"" when ``m`` computes exactly ``F.linear(x, m.weight, m.bias)`` with a plain floating weight."""
    if not isinstance(m, nn.Linear) or type(m).forward is not nn.Linear.forward:
        return f"{what} is {type(m).__name__}, not nn.Linear (quantized or custom linear)"
    why = call_reason(m)
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


def is_lora_linear(m: nn.Module) -> bool:
    # By name, not isinstance: no peft import here (optional dependency), and only this exact class, whose
    # forward is the one reproduced below (PEFT's bnb/gptq/tp LoRA layers are other classes).
    cls = type(m)
    return cls.__qualname__ == "Linear" and cls.__module__ == "peft.tuners.lora.layer"


def is_qlora_linear(m: nn.Module) -> bool:
    """PEFT's LoRA layer over a bitsandbytes 4-bit base (``peft.tuners.lora.bnb.Linear4bit``), by name: neither
    peft nor bitsandbytes is imported here (:mod:`hf_fastkern.layers.fused_qlora` takes it)."""
    cls = type(m)
    return cls.__qualname__ == "Linear4bit" and cls.__module__ == "peft.tuners.lora.bnb"


def down_parts(down: nn.Module) -> tuple[DownParts | None, str]:
    """The lean path's view of ``down``, or (None, why it takes the unfused path). Structure only; the
    per-call tensor checks (device, dtypes) are in :func:`glu_down`."""
    if is_qlora_linear(down):
        return None, "QLoRA down projection (lora.bnb.Linear4bit: it runs the fused QLoRA linear on its own)"
    if not is_lora_linear(down):
        why = linear_reason(down, type(down).__name__)
        if why:
            return None, why
        return DownParts(down.weight, down.bias, None, None, 1.0, True), ""
    why = call_reason(down)
    if why:
        return None, f"lora.Linear: {why}"
    if down.merged:
        return None, "lora.Linear with a merged adapter"
    if getattr(down, "fan_in_fan_out", False):
        return None, "lora.Linear with fan_in_fan_out (Conv1D base)"
    base = down.base_layer
    why = linear_reason(base, "lora.Linear base layer")
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
    if not isinstance(down.lora_dropout[name], nn.Identity):
        return None, "lora.Linear with lora_dropout > 0"
    adapter, why = adapter_parts(down, name, "lora.Linear")
    if adapter is None:
        return None, why
    return DownParts(base.weight, base.bias, *adapter, bool(getattr(down, "cast_input_dtype_enabled", True))), ""


def adapter_parts(module: nn.Module, name: str, what: str) -> tuple[tuple[torch.Tensor, torch.Tensor, float] | None,
                                                                     str]:
    """Adapter ``name`` of a PEFT LoRA layer as the fused nodes compute it, ``(lora_A.weight, lora_B.weight,
    scaling)``, or (None, why) for a structure they do not: a LoRA variant (DoRA), ``lora_bias``, biased or
    non-plain A/B, a tensor scaling. ``what`` names the layer class in the reason."""
    if name in getattr(module, "lora_variant", {}) or getattr(module, "use_dora", {}).get(name, False):
        return None, f"{what} with DoRA or another LoRA variant"
    if getattr(module, "lora_bias", {}).get(name, False):
        return None, f"{what} with lora_bias"
    la, lb = module.lora_A[name], module.lora_B[name]
    why = linear_reason(la, "lora_A") or linear_reason(lb, "lora_B")
    if why:
        return None, why
    if la.bias is not None or lb.bias is not None:
        return None, f"{what} with a bias on lora_A/lora_B"
    scaling = module.scaling[name]
    if not isinstance(scaling, float | int):
        return None, f"{what} scaling is a {type(scaling).__name__}"
    return (la.weight, lb.weight, float(scaling)), ""


# Per-module cache of down_parts: the structural walk costs ~8 us per call for a plain nn.Linear on the CI CPU
# and several times that for a PEFT lora.Linear (several times more on the H100 host), once per projection and
# step. An entry is reused only while the module's state key (below) is unchanged: for LoRA that includes what
# set_adapter, merge/unmerge, enable/disable_adapters and update_layer change.
_PARTS_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _linear_state(m: nn.Module) -> tuple | None:
    """What down_parts' verdict on a plain nn.Linear depends on, cheaply: its class and instance forward, its
    hooks and the global ones, and its parameters (object identity, dtype, shape). None for other modules."""
    if type(m) is not nn.Linear:
        return None
    p = m._parameters
    w, b = p.get("weight"), p.get("bias")
    return (m.__dict__.get("forward"), len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks),
            len(m._backward_pre_hooks), global_hooks(), id(w), type(w), getattr(w, "dtype", None),
            getattr(w, "shape", None), id(b), type(b), getattr(b, "dtype", None))


def _lora_state(m: nn.Module) -> tuple | None:
    """What down_parts' verdict on a PEFT lora.Linear depends on: its own forward and hooks, the PEFT flags
    (``_active_adapter``, ``merged_adapters``, ``_disable_adapters``, fan_in_fan_out, the input cast), and per
    active adapter its layers' states, dropout type, scaling, variant and bias flags; the base layer's state."""
    if not is_lora_linear(m):
        return None
    d = m.__dict__
    mods = m._modules
    la, lb, drop = mods["lora_A"]._modules, mods["lora_B"]._modules, mods["lora_dropout"]._modules
    active = m._active_adapter  # a class attribute until set_adapter sets it on the instance
    names = (active,) if isinstance(active, str) else tuple(active or ())
    per = tuple((n, _linear_state(la[n]) if n in la else None, _linear_state(lb[n]) if n in lb else None,
                 type(drop.get(n)), d["scaling"].get(n), n in d.get("lora_variant", {}),
                 d.get("use_dora", {}).get(n), d.get("lora_bias", {}).get(n)) for n in names)
    return (d.get("forward"), len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks),
            len(m._backward_pre_hooks), global_hooks(), tuple(d.get("merged_adapters", ())),
            m._disable_adapters, d.get("fan_in_fan_out"), d.get("cast_input_dtype_enabled"),
            tuple(la), _linear_state(mods["base_layer"]), per)


def down_parts_cached(down: nn.Module) -> tuple[DownParts | None, str]:
    """``down_parts(down)``, reused across calls while the module's state key is unchanged (a plain
    nn.Linear or a PEFT lora.Linear; other modules take the walk every call)."""
    if torch.compiler.is_compiling():
        # Dynamo would guard on the weak dictionary's entries (and fail building those guards); a compiled
        # graph runs this walk once, at trace time, anyway
        return down_parts(down)
    state = _linear_state(down)
    if state is None:
        try:
            state = _lora_state(down)
        except (KeyError, AttributeError, TypeError):  # a PEFT version laid out otherwise: no cache
            state = None
    if state is None:
        return down_parts(down)
    hit = _PARTS_CACHE.get(down)
    if hit is not None and hit[0] == state:
        return hit[1]
    res = down_parts(down)
    _PARTS_CACHE[down] = (state, res)
    return res


def rows(t: torch.Tensor) -> torch.Tensor:
    """[..., n] -> [tokens, n] (a view for the contiguous tensors seen here)."""
    return t.reshape(-1, t.shape[-1])


def autocast_state(device_type: str) -> tuple[str, bool, torch.dtype] | None:
    if not torch.amp.is_autocast_available(device_type):
        return None
    return device_type, torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type)


def ac_dtype(t: torch.Tensor | None, ac: tuple[str, bool, torch.dtype] | None) -> torch.dtype | None:
    """The dtype autocast casts ``t`` to as a matmul operand (floating, not fp64, on the autocast device, not
    already in autocast's dtype), or None when it leaves ``t`` as it is."""
    if t is None or ac is None or not ac[1] or t.device.type != ac[0] or not t.is_floating_point() \
            or t.dtype in (torch.float64, ac[2]):
        return None
    return ac[2]


def ac_cast(t: torch.Tensor | None, ac: tuple[str, bool, torch.dtype] | None) -> torch.Tensor | None:
    """``t`` cast as autocast casts a matmul operand (:func:`ac_dtype`), without autocast's weight cache: that
    cache keeps the bf16 copy of every trainable fp32 weight until the autocast region ends (the whole forward);
    this copy is freed right after its matmul. Same rounding (``.to``)."""
    dtype = ac_dtype(t, ac)
    return t if dtype is None else t.to(dtype)


def exact_cast(src: torch.dtype, dst: torch.dtype) -> bool:
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
        if not (autocast_casts and exact_cast(x.dtype, lora_dtype)):
            x = x.to(lora_dtype)
    return ac_cast(x, ac)


def scaled_b(lora_b: torch.Tensor, scaling: float, ac: tuple[str, bool, torch.dtype] | None) -> torch.Tensor:
    """``scaling * B`` in fp32 (or B's dtype), then cast as autocast casts B: one rounding of a tiny [out, r]."""
    return ac_cast(lora_b * scaling, ac)


def linear_adapter(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, a: torch.Tensor,
                   b_scaled: torch.Tensor) -> torch.Tensor:
    """``x W^T + bias + a b_scaled^T`` ([..., out]), operands already cast.

    One dtype throughout (the usual autocast case): the rank-r product (with the bias) is written first and the
    big GEMM accumulates into it (``addmm_``, beta 1): the epilogue's read of that output is hidden in a
    compute-bound GEMM, where adding the adapter after the base GEMM costs a memory-bound read-and-write pass
    of the whole output. Mixed dtypes (no autocast, fp32 adapters over a bf16 base): PEFT's order and dtypes."""
    if not (x.dtype == weight.dtype == a.dtype == b_scaled.dtype and (bias is None or bias.dtype == x.dtype)):
        # PEFT's dtypes: the base output in its dtype, the adapter product and the sum in the adapter's (fp32),
        # rounded once to the base output's dtype; one fp32 [tokens, out] buffer where PEFT makes three
        # (lora_B's output, its product with the scaling, the sum)
        y = F.linear(x, weight, bias)
        acc = rows(y).to(torch.promote_types(y.dtype, a.dtype))
        acc.addmm_(rows(a).to(acc.dtype), b_scaled.t().to(acc.dtype))
        return acc.to(y.dtype).reshape(y.shape)
    a2 = rows(a)
    y = torch.mm(a2, b_scaled.t()) if bias is None else torch.addmm(bias, a2, b_scaled.t())
    y.addmm_(rows(x), weight.t())
    return y.reshape(*x.shape[:-1], weight.shape[0])


def adapter_grads(dy: torch.Tensor, a: torch.Tensor, lora_b: torch.Tensor, scaling: float,
                  ac: tuple[str, bool, torch.dtype] | None, need_lb: bool,
                  need_da: bool) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(dB, da) of ``y += a (sB)^T``: ``dB = s dy^T a`` ([out, r], in B's dtype) and ``da = dy (sB)``
    ([..., r], in a's dtype), each only when asked; the scaling goes on the rank-r products, never on dy."""
    dlb = da = None
    # one cast of dy for both products (an fp32 copy of a bf16 dy with fp32 adapters and no autocast)
    dyc = dy.to(a.dtype) if need_lb else dy
    if need_lb:
        dlb = (torch.matmul(rows(dyc).t(), rows(a)) * scaling).to(lora_b.dtype)
    if need_da:
        lb = scaled_b(lora_b, scaling, ac)
        da = torch.matmul((dyc if dyc.dtype == lb.dtype else dy.to(lb.dtype)), lb).to(a.dtype)
    return dlb, da


def grad_input_adapter(dy: torch.Tensor, weight: torch.Tensor, da: torch.Tensor,
                       lora_a: torch.Tensor) -> torch.Tensor:
    """``dy W + da A`` ([..., in]) in the order of :func:`linear_adapter` (small product first, the big GEMM
    accumulating into it) when the dtypes agree; else the two products summed in ``dy W``'s dtype."""
    if dy.dtype == weight.dtype == da.dtype == lora_a.dtype:
        dx = torch.mm(rows(da), lora_a)
        dx.addmm_(rows(dy), weight)
        return dx.reshape(*dy.shape[:-1], weight.shape[1])
    dx = torch.matmul(dy.to(weight.dtype), weight)
    return dx + torch.matmul(da.to(lora_a.dtype), lora_a).to(dx.dtype)


def tensor_reason(parts: DownParts, g: torch.Tensor) -> str:
    """Per-call checks: where the unfused path would raise or do something else, it runs as it is."""
    w = parts.weight
    if w.device != g.device:
        return f"down weight on {w.device}, activations on {g.device} (offloaded weights)"
    if w.shape[1] != g.shape[-1]:
        return f"down weight {tuple(w.shape)} does not take intermediate size {g.shape[-1]}"
    ac = autocast_state(g.device.type)
    if ac is None or not ac[1]:
        if w.dtype != g.dtype:
            return f"down weight {w.dtype} and activations {g.dtype} without autocast"
        if parts.lora_a is not None:
            xl = parts.lora_a.dtype if parts.cast_input else g.dtype
            if not (xl == parts.lora_a.dtype == parts.lora_b.dtype):
                return f"lora_A/lora_B dtypes {parts.lora_a.dtype}/{parts.lora_b.dtype}, input {xl}"
    return ""
