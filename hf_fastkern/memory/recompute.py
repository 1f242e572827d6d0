"""Chunked recompute for long sequences: an MLP run over token chunks, replayed chunk by chunk in backward.

:func:`chunked_recompute` (``apply_fast_kernels(mlp_chunk_tokens=N)``) runs ``fn`` (an MLP forward, adapters
included) over the tokens of ``x`` in chunks of ``N`` under no-grad, keeping only ``x``; backward replays each chunk with grad (same RNG and autocast state, so LoRA dropout
masks match) and accumulates the input and parameter gradients. No ``[seq, intermediate]`` tensor for the
whole sequence ever exists. Limits: ``fn`` must act on tokens independently (an MLP does), and its
backward runs a nested ``torch.autograd.grad`` (torch.compile graph-breaks there).
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any

import torch


def _rng_devices(x: torch.Tensor) -> list[int]:
    return [x.device.index if x.device.index is not None else torch.cuda.current_device()] \
        if x.device.type == "cuda" else []


class _ChunkedRecompute(torch.autograd.Function):
    """y = cat(fn(x[c]) for chunks c), keeping only x; backward replays each chunk with grad."""

    @staticmethod
    def forward(ctx: Any, fn: Callable[[torch.Tensor], torch.Tensor], chunk: int, x: torch.Tensor,
                *params: torch.Tensor) -> torch.Tensor:
        ctx.fn, ctx.chunk, ctx.n_params = fn, chunk, len(params)
        dev = x.device.type
        ctx.autocast = (dev, torch.is_autocast_enabled(dev), torch.get_autocast_dtype(dev)) \
            if torch.amp.is_autocast_available(dev) else None
        # the RNG state at the start: the replay draws the same dropout masks in the same chunk order
        ctx.devices = _rng_devices(x)
        ctx.cpu_rng = torch.get_rng_state()
        ctx.cuda_rng = [torch.cuda.get_rng_state(d) for d in ctx.devices]
        flat = x.reshape(-1, x.shape[-1])
        outs = []
        with torch.no_grad():
            for s in range(0, flat.shape[0], chunk):
                outs.append(fn(flat[s:s + chunk]))
        y = torch.cat(outs, 0)
        ctx.save_for_backward(x)
        return y.reshape(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx: Any, grad_y: torch.Tensor) -> tuple:
        (x,) = ctx.saved_tensors
        params = ctx.fn.params
        flat = x.detach().reshape(-1, x.shape[-1])
        gflat = grad_y.reshape(-1, grad_y.shape[-1])
        gx = torch.empty_like(flat) if ctx.needs_input_grad[2] else None
        gparams: list[torch.Tensor | None] = [None] * len(params)
        wanted = [p for p, need in zip(params, ctx.needs_input_grad[3:]) if need]
        # the forward's autocast state (backward runs outside any autocast region)
        autocast = torch.autocast(ctx.autocast[0], dtype=ctx.autocast[2], enabled=ctx.autocast[1]) \
            if ctx.autocast else contextlib.nullcontext()
        with torch.random.fork_rng(devices=ctx.devices, enabled=True), torch.enable_grad():
            torch.set_rng_state(ctx.cpu_rng)
            for d, st in zip(ctx.devices, ctx.cuda_rng):
                torch.cuda.set_rng_state(st, d)
            with autocast:
                for s in range(0, flat.shape[0], ctx.chunk):
                    xc = flat[s:s + ctx.chunk].requires_grad_(gx is not None)
                    yc = ctx.fn(xc)
                    inputs = ([xc] if gx is not None else []) + wanted
                    if not inputs:
                        continue
                    grads = torch.autograd.grad(yc, inputs, gflat[s:s + ctx.chunk], allow_unused=True)
                    if gx is not None:
                        gx[s:s + ctx.chunk] = grads[0]
                        grads = grads[1:]
                    i = 0
                    for j, need in enumerate(ctx.needs_input_grad[3:]):
                        if not need:
                            continue
                        g = grads[i]
                        i += 1
                        if g is not None:
                            gparams[j] = g if gparams[j] is None else gparams[j] + g
        gx_out = gx.reshape(x.shape) if gx is not None else None
        return (None, None, gx_out, *gparams)


def chunked_recompute(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, chunk_tokens: int,
                      params: Sequence[torch.Tensor]) -> torch.Tensor:
    """``fn(x)`` token-chunk by token-chunk, storing only ``x`` for backward (see the module docstring).

    fn: maps ``[n, hidden]`` to ``[n, out]`` and treats tokens independently (an MLP, adapters included).
    x: ``[..., hidden]`` any float dtype. params: the tensors ``fn`` uses that may need gradients (e.g. the
    module's parameters with ``requires_grad``); their gradients are summed over chunks and returned through
    autograd (``torch.autograd.grad`` sees them like any other). Returns ``[..., out]``.
    """
    if chunk_tokens <= 0:
        raise ValueError(f"chunk_tokens must be positive, got {chunk_tokens}")
    params = tuple(params)
    if not torch.is_grad_enabled() or not (x.requires_grad or any(p.requires_grad for p in params)):
        return fn(x)
    if x.numel() <= chunk_tokens * x.shape[-1]:
        # one chunk: the whole call is already within the bound, and recomputing it would only cost time
        return fn(x)
    return _ChunkedRecompute.apply(_Bound(fn, params), chunk_tokens, x, *params)


class _Bound:
    """fn plus the parameter list the backward differentiates (ctx keeps it without saving tensors twice)."""

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor], params: tuple[torch.Tensor, ...]) -> None:
        self.fn, self.params = fn, params

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)
