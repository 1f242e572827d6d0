"""Llama-family attention with the fused RoPE kernel, bound per instance (issues 7 and 12).

Why a replacement attention forward: transformers' attention forwards call the module-global
``apply_rotary_pos_emb`` of their ``modeling_*.py``, and the only other ways to swap it are assigning that global
(process-wide, what Liger does; STYLE.md rules it out) or a per-instance forward. This is the per-instance forward,
built to survive transformers releases rather than copied from one:

- it is *generic*: it composes the module's own submodules (``q_proj``/``k_proj``/``v_proj``/``o_proj``, optional
  ``q_norm``/``k_norm`` on the head dimension) and the attention interface the config names (looked up in the
  mapping the caller passes: transformers' ``ALL_ATTENTION_FUNCTIONS``, handed in by
  :mod:`hf_fastkern.patches.factories` so this floor imports no transformers; or the modeling module's own
  ``eager_attention_forward``), exactly as the
  Llama, Mistral, Qwen2 and Qwen3 forwards do, with :func:`hf_fastkern.kernels.rope.apply_rope` for the
  rotation;
- it is *probed*: before binding, the instance's current forward and this one run on a small random input and
  must agree (the RMSNorm recipes do the same). A release that changes the attention arithmetic leaves the
  module alone, with the reason in the report;
- it *delegates*: whenever a cache (``past_key_values`` / ``cache`` or any other parameter the class forward
  names beyond hidden states, position embeddings and mask) is given, or anything else is unusual, the class
  forward runs unchanged. So generation, caches and versions' signature differences (``past_key_values`` in
  5.17, ``cache`` in 5.24) never reach the replacement.
"""
from __future__ import annotations

import inspect
import sys
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn as nn

from hf_fastkern.kernels.rope import apply_rope
from hf_fastkern.layers.common import Unsupported
from hf_fastkern.layers.shared_cast import share_cast

# parameters of the class forward the replacement reads itself; every other named parameter must be None
_OWN = ("self", "hidden_states", "position_embeddings", "attention_mask")
# cache arguments under any name a release has used (one may arrive in **kwargs, renamed by a deprecation shim)
_CACHES = ("past_key_values", "past_key_value", "cache", "layer_past", "cache_position")


def _interface(module: nn.Module, eager: Callable | None, functions: Mapping[str, Callable]) -> Callable | None:
    """The attention function the class forward would call (None: one it does not know; it then runs)."""
    impl = getattr(module.config, "_attn_implementation", None) or "eager"
    if impl == "eager":
        return eager
    return functions[impl] if impl in functions else None


def rope_attention_factory(attention_functions: Mapping[str, Callable],
                           sliding_window: str | None = None) -> Callable:
    """Factory for Llama-family attention modules.

    attention_functions: name -> attention function (transformers' ``ALL_ATTENTION_FUNCTIONS``), read per call.
    sliding_window: where the class forward reads the ``sliding_window`` it passes to the attention interface:
    ``"module"`` (``self.sliding_window``: Qwen2, Qwen3), ``"config"`` (``config.sliding_window``: Mistral), or
    None (not passed: Llama).
    """

    def factory(module: nn.Module, config: Any) -> Callable:
        for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
            if not isinstance(getattr(module, n, None), nn.Module):
                raise Unsupported(f"{type(module).__name__} has no {n} (fused qkv or another layout)")
        for n in ("head_dim", "scaling", "config"):
            if not hasattr(module, n):
                raise Unsupported(f"{type(module).__name__} has no {n}")
        if "forward" in module.__dict__:
            raise Unsupported("has an instance-level forward (a hook library such as accelerate)")
        cls_forward = type(module).forward
        sig = inspect.signature(cls_forward)
        params = sig.parameters
        var_kw = next((n for n, p in params.items() if p.kind is p.VAR_KEYWORD), None)  # the **kwargs name
        if not all(n in params for n in _OWN[1:]) or var_kw is None:
            raise Unsupported(f"{type(module).__name__}.forward{sig} is not the Llama-family signature")
        others = tuple(n for n, p in params.items() if n not in _OWN and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL))
        qk_norm = isinstance(getattr(module, "q_norm", None), nn.Module)
        # the modeling file's own eager function (read, never assigned), resolved once here, not per call
        eager = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
        delegate = others + _CACHES  # any of these given (not None): the class forward runs

        def forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
            if not args and any(kwargs.get(n) is not None for n in delegate):
                # a cached step (generate()): the class forward, before any other work (host time per layer)
                return cls_forward(self, **kwargs)
            if args:  # the decoder layers pass keywords; anything positional is mapped by the class signature
                kw = dict(sig.bind(self, *args, **kwargs).arguments)
                kw.pop("self")
                kw.update(kw.pop(var_kw, {}))
            else:
                kw = dict(kwargs)
            x, pe, mask = kw.get("hidden_states"), kw.get("position_embeddings"), kw.get("attention_mask")
            attn = _interface(self, eager, attention_functions)
            if pe is None or attn is None or any(kw.get(n) is not None for n in delegate) or \
                    not isinstance(x, torch.Tensor):
                return cls_forward(self, *args, **kwargs)
            for n in _OWN[1:] + others + _CACHES:
                kw.pop(n, None)
            shape = (*x.shape[:-1], -1, self.head_dim)
            # one autocast cast of x for the three projections, saved once (hf_fastkern.shared_cast)
            xq, xk, xv = share_cast(x, (self.q_proj, self.k_proj, self.v_proj))
            q, k, v = self.q_proj(xq).view(shape), self.k_proj(xk).view(shape), self.v_proj(xv).view(shape)
            if qk_norm:
                q, k = self.q_norm(q), self.k_norm(k)
            q, k = apply_rope(q.transpose(1, 2), k.transpose(1, 2), *pe)
            if sliding_window == "module":
                kw["sliding_window"] = self.sliding_window
            elif sliding_window == "config":
                kw["sliding_window"] = getattr(self.config, "sliding_window", None)
            dropout = 0.0 if not self.training else getattr(self, "attention_dropout", 0.0)
            out, weights = attn(self, q, k, v.transpose(1, 2), mask, dropout=dropout, scaling=self.scaling, **kw)
            return self.o_proj(out.reshape(*x.shape[:-1], -1).contiguous()), weights

        forward.__signature__ = sig  # callers that inspect the forward (and the ledger's signature check) see the class's
        _probe(module, forward, cls_forward)
        return forward

    return factory


def _probe(module: nn.Module, forward: Callable, cls_forward: Callable) -> None:
    """Raise Unsupported unless ``forward`` gives the class forward's output on a small random input."""
    w = module.q_proj.weight if isinstance(getattr(module.q_proj, "weight", None), torch.Tensor) else None
    if w is None:
        w = next(module.parameters(), None)
    if w is None or w.device.type == "meta":
        return  # nothing to run on the meta device; the recipe is trusted
    hidden = getattr(module.config, "hidden_size", None) or module.q_proj.in_features
    gen = torch.Generator().manual_seed(0)
    seq, d = 5, module.head_dim
    dtype = w.dtype if w.is_floating_point() else torch.float32
    x = torch.randn(1, seq, hidden, generator=gen).to(w.device, dtype)
    ang = torch.randn(1, seq, d // 2, generator=gen)
    emb = torch.cat([ang, ang], dim=-1)
    pe = (emb.cos().to(w.device, dtype), emb.sin().to(w.device, dtype))
    modes = {m: m.training for m in module.modules()}
    module.eval()  # no dropout (LoRA or attention) in the comparison
    try:
        with torch.no_grad():
            want = cls_forward(module, hidden_states=x, position_embeddings=pe, attention_mask=None)[0]
            got = forward(module, hidden_states=x, position_embeddings=pe, attention_mask=None)[0]
    except Exception as e:
        raise Unsupported(f"probe forward failed ({type(e).__name__}: {str(e)[:120]})") from e
    finally:
        for m, t in modes.items():
            m.training = t
    tol = 1e-4 if dtype in (torch.float32, torch.float64) else 3e-2
    scale = want.double().abs().max().item()
    err = (got.double() - want.double()).abs().max().item()
    if got.shape != want.shape or not err <= tol * scale + 1e-5:
        raise Unsupported(f"{type(module).__name__}.forward does not compute the Llama-family attention the fused "
                          f"RoPE forward computes (max difference {err:.3g} of {scale:.3g}; changed transformers "
                          f"version?)")
