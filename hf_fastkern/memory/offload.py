"""Activation offload for long sequences: checkpointed hidden states in pinned host memory.

Activation offload (:func:`enable_activation_offload`, ``apply_fast_kernels(offload_activations=True)``)
    With gradient checkpointing, what a decoder stack keeps on the GPU between forward and backward is, per
    layer, the layer's input ``[batch, seq, hidden]`` (saved by ``torch.utils.checkpoint``, reentrant or not,
    through autograd's saved-tensor mechanism). A pair of ``torch.autograd.graph.saved_tensors_hooks`` active
    around the decoder stack's forward (forward pre-hook / always-called forward hook on the module that owns
    the layers) moves each such tensor to pinned host memory on a side CUDA stream as soon as it is saved, and
    brings it back in backward: unpacking layer ``k``'s input starts the host-to-device copy of layer ``k-1``'s,
    so the transfer overlaps layer ``k``'s recompute and backward. Inside a checkpointed layer the checkpoint's
    own hooks are innermost and win, so nothing else is moved. Context is then bounded by host memory (one
    ``[seq, hidden]`` per layer) instead of GPU memory.

    Which tensors: floating point, not parameters, at least ``min_bytes``, and whose last dimension is the
    model's hidden size (the residual stream; RoPE cos/sin and masks stay). The same tensor saved twice shares
    one host copy. Only active in training with grad enabled and checkpointing on for some layer; without
    checkpointing every activation would go through PCIe, so nothing happens (say so once).

    On the CPU the "host copy" is a plain ``clone()`` (no streams): the bookkeeping runs and is tested (the
    restored tensors are bit-identical, losses/gradients equal the run without offload).

Chunked recompute lives in :mod:`hf_fastkern.memory.recompute`; per-layer offload chosen against a memory budget
in :mod:`hf_fastkern.memory.checkpoint_plan`.
"""
from __future__ import annotations

import warnings
import weakref
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

# attribute on the stack module holding its offload state (plain attribute: never reaches the state dict)
_OFFLOAD_ATTR = "_hf_fastkern_offload"
DEFAULT_MIN_BYTES = 1 << 20


@dataclass
class OffloadStats:
    """Counters of one offloader (reset with :meth:`ActivationOffloader.reset_stats`)."""

    packed: int = 0
    """tensors moved to host memory (after deduplication)."""
    shared: int = 0
    """saves that reused an already moved tensor."""
    kept: int = 0
    """saves left where they were (too small, parameters, not the hidden size...)."""
    unpacked: int = 0
    bytes: int = 0
    """bytes moved to host memory."""
    prefetched: int = 0
    """host-to-device copies started ahead of need."""


class _Handle:
    """One offloaded tensor: its host copy, its device, and a GPU copy brought back ahead of need."""

    __slots__ = ("host", "device", "prev", "left", "gpu", "ready")

    def __init__(self, host: torch.Tensor, device: torch.device, prev: _Handle | None) -> None:
        self.host = host
        self.device = device
        # the tensor saved just before this one in the same forward: backward needs it next. A backward
        # chain (no cycle), so handles are freed by reference counting as soon as autograd drops them.
        self.prev = prev
        self.left = 1  # unpacks expected before the GPU copy is handed over for good
        self.gpu: torch.Tensor | None = None
        self.ready: torch.cuda.Event | None = None


class ActivationOffloader:
    """``saved_tensors_hooks`` pack/unpack pair that moves large activations to (pinned) host memory.

    Use as a context manager around a forward (``with ActivationOffloader(hidden_size=4096): loss = f(x)``), or
    through :func:`enable_activation_offload`, which enters it around a model's decoder stack. One offloader
    serves many forward passes; each ``__enter__`` starts a new session (a new prefetch chain).
    """

    def __init__(self, hidden_size: int | None = None, min_bytes: int = DEFAULT_MIN_BYTES) -> None:
        self.hidden_size = hidden_size
        self.min_bytes = min_bytes
        self.stats = OffloadStats()
        self.warned_no_ckpt = False  # the "checkpointing is off" warning, once per model
        self._last: _Handle | None = None
        self._by_key: dict[tuple, tuple[weakref.ref, _Handle]] = {}
        self._hooks: torch.autograd.graph.saved_tensors_hooks | None = None
        self._streams: dict[torch.device, torch.cuda.Stream] = {}

    # ---------------------------------------------------------------------------------------------- selection

    def wants(self, t: torch.Tensor) -> bool:
        """Is ``t`` a hidden state worth moving (floating, not a parameter, large, hidden-sized last dim)?"""
        if isinstance(t, nn.Parameter) or not t.is_floating_point() or t.dim() < 2:
            return False
        if t.device.type not in ("cuda", "cpu") or t.numel() * t.element_size() < self.min_bytes:
            return False
        return self.hidden_size is None or t.shape[-1] == self.hidden_size

    def _stream(self, device: torch.device) -> torch.cuda.Stream:
        s = self._streams.get(device)
        if s is None:
            s = self._streams[device] = torch.cuda.Stream(device=device)
        return s

    # ---------------------------------------------------------------------------------------------- hooks

    def pack(self, t: torch.Tensor) -> Any:
        """Saved-tensor pack hook: a :class:`_Handle` for a moved tensor, the tensor itself otherwise."""
        if not self.wants(t):
            self.stats.kept += 1
            return t
        # The same tensor saved twice shares one host copy. The version counter is part of the key (an in-place
        # change in between makes it a different value), and the first tensor must still be alive: once freed,
        # its memory may hold a new tensor of the same shape at the same address.
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype,
               t._version)
        hit = self._by_key.get(key)
        if hit is not None and hit[0]() is not None:
            h = hit[1]
            h.left += 1
            self.stats.shared += 1
            return h
        if t.device.type == "cuda":
            main = torch.cuda.current_stream(t.device)
            side = self._stream(t.device)
            # the side stream must see t fully written by the work queued so far on the main stream
            side.wait_stream(main)
            with torch.cuda.stream(side):
                host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
                host.copy_(t, non_blocking=True)
            # t may be freed on the main stream before the copy ran: the allocator must wait for the side stream
            t.record_stream(side)
        else:
            # CPU: a real copy, so that the bookkeeping (dedup, order, restore) is exercised and tested
            host = t.clone()
        h = _Handle(host, t.device, self._last)
        self._last = h
        self._by_key[key] = (weakref.ref(t), h)
        self.stats.packed += 1
        self.stats.bytes += t.numel() * t.element_size()
        return h

    def _fetch(self, h: _Handle) -> None:
        """Start bringing ``h`` back to its device (asynchronously on CUDA)."""
        if h.gpu is not None:
            return
        if h.device.type == "cuda":
            main = torch.cuda.current_stream(h.device)
            # allocated on the main stream (the one that uses and frees it), written on the side stream
            buf = torch.empty(h.host.shape, dtype=h.host.dtype, device=h.device)
            side = self._stream(h.device)
            side.wait_stream(main)
            with torch.cuda.stream(side):
                buf.copy_(h.host, non_blocking=True)
                h.ready = torch.cuda.Event()
                h.ready.record(side)
            h.gpu = buf
        else:
            h.gpu = h.host.clone()

    def unpack(self, h: Any) -> torch.Tensor:
        """Saved-tensor unpack hook: the tensor back on its device, bit-identical to what was saved."""
        if not isinstance(h, _Handle):
            return h
        self.stats.unpacked += 1
        self._fetch(h)
        # backward runs the layers in reverse: bring the previous layer's input while this one computes
        prev = h.prev
        if prev is not None and prev.gpu is None and prev.left > 0:
            self._fetch(prev)
            self.stats.prefetched += 1
        out = h.gpu
        if h.ready is not None:
            torch.cuda.current_stream(h.device).wait_event(h.ready)
        h.left -= 1
        if h.left <= 0:
            # autograd owns the tensor now; a further unpack (retain_graph) copies from the host again
            h.gpu, h.ready, h.left = None, None, 0
        return out

    # ---------------------------------------------------------------------------------------------- sessions

    def begin(self) -> None:
        """Start a session (a new prefetch chain) without installing the hooks: the caller enters
        ``saved_tensors_hooks(self.pack, self.unpack)`` around the parts it wants moved (the checkpoint planner
        does so around its offloaded layers only)."""
        self._last, self._by_key = None, {}

    def finish(self, ok: bool = True) -> None:
        """End the session; when the forward went through, start bringing back the last tensor saved (the first
        one backward needs)."""
        last = self._last
        self._last, self._by_key = None, {}
        if last is not None and ok:
            self._fetch(last)

    def __enter__(self) -> ActivationOffloader:
        self.begin()
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        hooks, self._hooks = self._hooks, None
        if hooks is not None:
            hooks.__exit__(*exc)
        self.finish(exc[0] is None)

    def reset_stats(self) -> None:
        self.stats = OffloadStats()


# ----------------------------------------------------------------------------------------------------------
# model-level switch


def checkpointable_stacks(model: nn.Module) -> list[tuple[nn.Module, nn.ModuleList]]:
    """(owner, layers) for every ModuleList whose children are checkpointable layers (``gradient_checkpointing``)."""
    out = []
    for owner in model.modules():
        for child in owner.children():
            if isinstance(child, nn.ModuleList) and len(child) and \
                    all(hasattr(layer, "gradient_checkpointing") for layer in child):
                out.append((owner, child))
    return out


def _hidden_size(model: nn.Module) -> int | None:
    config = getattr(model, "config", None)
    for attr in ("hidden_size", "n_embd", "d_model"):
        v = getattr(config, attr, None)
        if isinstance(v, int):
            return v
    return None


def enable_activation_offload(model: nn.Module, min_bytes: int = DEFAULT_MIN_BYTES) -> ActivationOffloader | None:
    """Offload the checkpointed layer inputs of ``model``'s decoder stack(s) to pinned host memory.

    model: a transformers model (or the module under a PEFT wrapper). Hooks go on the module(s) that own the
    checkpointable layer list (``LlamaModel`` for Llama, ``GPT2Model`` for GPT-2 ...): each of their forwards
    runs inside an :class:`ActivationOffloader` session, but only while training with grad enabled and gradient
    checkpointing on for some layer (Trainer's ``gradient_checkpointing=True`` may switch it on later: the check
    is per call). Returns the offloader (its ``stats`` count what moved), or None when the model has no
    checkpointable layer list. Idempotent; :func:`disable_activation_offload` removes it.
    """
    existing = model.__dict__.get(_OFFLOAD_ATTR)
    if existing is not None:
        return existing[0]
    stacks = checkpointable_stacks(model)
    if not stacks:
        return None
    offloader = ActivationOffloader(hidden_size=_hidden_size(model), min_bytes=min_bytes)
    handles = []
    for owner, layers in stacks:
        handles += _hook_stack(owner, layers, offloader)
    object.__setattr__(model, _OFFLOAD_ATTR, (offloader, handles))
    return offloader


def _hook_stack(owner: nn.Module, layers: nn.ModuleList, offloader: ActivationOffloader) -> list:
    active: list[bool] = []

    def pre(module: nn.Module, args: tuple) -> None:
        on = module.training and torch.is_grad_enabled() and \
            any(getattr(layer, "gradient_checkpointing", False) for layer in layers)
        # once per model (not per process: another model in the process still gets its warning)
        if module.training and torch.is_grad_enabled() and not on and not offloader.warned_no_ckpt:
            offloader.warned_no_ckpt = True
            warnings.warn("hf_fastkern: activation offload acts on checkpointed layer inputs only; gradient "
                          "checkpointing is off, so nothing is offloaded (enable it, e.g. Trainer's "
                          "gradient_checkpointing=True)", stacklevel=2)
        if on:
            offloader.__enter__()
        active.append(on)

    def post(module: nn.Module, args: tuple, output: Any) -> None:
        # always_call=True: also runs when the forward raised, so the hooks never leak past the stack
        if active and active.pop():
            offloader.__exit__(None, None, None)

    return [owner.register_forward_pre_hook(pre), owner.register_forward_hook(post, always_call=True)]


def disable_activation_offload(model: nn.Module) -> bool:
    """Remove what :func:`enable_activation_offload` added; True when something was removed."""
    entry = model.__dict__.pop(_OFFLOAD_ATTR, None)
    if entry is None:
        return False
    for handle in entry[1]:
        handle.remove()
    return True


def activation_offloader(model: nn.Module) -> ActivationOffloader | None:
    """The offloader enabled on ``model`` (None when offload is off)."""
    entry = model.__dict__.get(_OFFLOAD_ATTR)
    return entry[0] if entry is not None else None
