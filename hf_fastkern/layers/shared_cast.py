"""One autocast cast of a tensor that several linears read, saved once (issue 7, memory without checkpointing).

Under autocast with fp32 activations (fp32 master weights, the 1.5B end-to-end scenario), each ``nn.Linear``
casts its input to bf16 itself and saves that copy for its weight gradient. A decoder layer feeds one norm
output to q, k and v (and another to gate and up), so autograd keeps five bf16 copies of two tensors: 20 KiB
per token per layer of the ~78 that a 1.5B layer saves without checkpointing (counted in docs/benchmarks.md).

:func:`share_cast` casts once and hands each consumer a view of the one result, so the linears save views of
one storage: two copies instead of five. Numerics are autocast's, bit for bit:

- forward: ``x.to(dtype)`` is the cast autocast would make for each linear (a linear's cast of a tensor that
  already has its dtype is the identity), so every linear sees the same values;
- backward: unfused, each of the n casts returns its bf16 gradient as fp32 and autograd sums the n fp32
  gradients. Here the views' gradients arrive separately (they are separate outputs, so autograd never sums them
  in bf16) and are summed in ``x``'s dtype, latest consumer first, the order in which autograd accumulates them.

It applies only where that argument holds: autocast on for ``x``'s device, ``x`` floating and of another dtype
than autocast's (not fp64, which autocast leaves alone), and every consumer a plain ``nn.Linear`` (its class
forward, no hooks), whose only use of its input is autocast's cast. Anything else (LoRA wrappers, quantized or
hooked linears, autocast off) gets ``x`` itself n times: the unfused path, unchanged.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn

from hf_fastkern.layers.common import ac_dtype, autocast_state


def _plain_linear(m: nn.Module) -> bool:
    # no instance-level forward either: accelerate's hooks (device_map offload) replace it per instance
    return isinstance(m, nn.Linear) and type(m).forward is nn.Linear.forward and "forward" not in m.__dict__ \
        and not m._forward_hooks and not m._forward_pre_hooks and m.weight.is_floating_point()


class _SharedCast(torch.autograd.Function):
    """``x.to(dtype)`` returned as ``n`` views of one tensor; backward sums the views' gradients in x's dtype."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, dtype: torch.dtype, n: int) -> tuple[torch.Tensor, ...]:
        ctx.in_dtype = x.dtype
        c = x.to(dtype)
        return tuple(c.view_as(c) for _ in range(n))

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor | None) -> tuple:
        dx = None
        for g in reversed(grads):  # autograd's order: the consumer called last runs its backward first
            if g is None:
                continue
            g = g.to(ctx.in_dtype)
            dx = g if dx is None else dx + g
        return dx, None, None


def share_cast(x: torch.Tensor, consumers: Sequence[nn.Module]) -> tuple[torch.Tensor, ...]:
    """``len(consumers)`` inputs for the given linears: views of one autocast cast of ``x`` where that is exact
    (see the module docstring), else ``x`` itself for each."""
    n = len(consumers)
    dtype = ac_dtype(x, autocast_state(x.device.type))  # autocast's own rule for a matmul operand
    if dtype is None or n < 2 or not all(_plain_linear(m) for m in consumers):
        return (x,) * n
    if not (torch.is_grad_enabled() and x.requires_grad):
        c = x.to(dtype)  # nothing to differentiate: one cast, the same tensor for all
        return (c,) * n
    return _SharedCast.apply(x, dtype, n)
