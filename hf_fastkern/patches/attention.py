"""Registers ``attn_implementation="fastkern"`` with transformers: an attention function and its mask function.

What the model hands over (the mask side, ``fastkern_mask``). Registered in ``AttentionMaskInterface`` so the
model never builds a dense ``[batch, 1, q_len, kv_len]`` mask for us. It returns one of:

- ``None``: no padding, no packing. The kernel runs dense, causal from ``module.is_causal`` (bottom-right
  aligned, so KV-cache decoding and chunked prefill are right), sliding window from the ``sliding_window`` kwarg.
- a 2-D **bool** padding mask ``[batch, kv_len]`` (True = real token): the attention unpads the real tokens into
  varlen form (``cu_seqlens``), runs the varlen kernel and pads back. Left padding during ``generate()`` included.
- a 2-D **int32** segment-id tensor ``[batch, seq]``: packed sequences (``DataCollatorWithFlattening``-style
  ``position_ids`` restarting at 0), one varlen sequence per run of equal ids.
- a 4-D bool mask, built by transformers' own ``sdpa_mask``, for every pattern the kernel does not know (custom
  ``or``/``and`` overlays, chunked attention, block-wise overlays, static caches, decoder models switched to
  bidirectional through ``config.is_causal=False``). The attention then falls back to SDPA with that mask.

What the attention function does (``fastkern_attention_forward``, same contract as transformers'
``sdpa_attention_forward``): validates the inputs (``ValueError`` naming the tensor and the expected shape), then
either calls ``hf_fastkern.kernels.attention.flash_attention[_varlen]`` or falls back to SDPA (or to an eager
softmax when ``softcap`` is set, which SDPA cannot do) for that call, with one warning per reason. It never
returns a result computed under a pattern it did not check.

Host synchronisation: the dense path has none. Unpadding and packed sequences need the per-sequence lengths on
the host (``nonzero`` and the max length), once per forward: the metadata is cached across layers keyed on the
identity of the mask tensor (the model passes the same object to every layer). The mask function reads
``attention_mask.all()`` once per forward to return ``None`` for unpadded batches, as transformers' flash mask
does. Under ``torch.compile`` those value-dependent branches are the only graph breaks; the dense path traces.

Version notes (transformers 5.17 on the GPU image, 5.24 in CI): the attention-interface call and the
mask-interface call are the same in both. Recognising the mask pattern reads the closures built by
``transformers.masking_utils`` (``and_masks``, ``sliding_window_overlay``, ``packed_sequence_mask_function``,
and 5.24's ``remap_positions_for_packed_sequence``): private structure, isolated in ``_classify_mask_function``,
where anything not recognised means "dense mask + SDPA", never a guess.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from hf_fastkern.kernels import attention as _kernels
from hf_fastkern.kernels import decode_attention as _decode
from hf_fastkern.kernels import dispatch, routing
from hf_fastkern.patches import training_cache

NAME = "fastkern"
# head_dims the kernel is built for (the kernel's own ``attention_supported`` is the authority once it exists).
SUPPORTED_HEAD_DIMS = (16, 32, 64, 80, 96, 128, 256)


# ----------------------------------------------------------------------------------------------------------
# mask side


def _closure_vars(fn) -> dict:
    code = getattr(fn, "__code__", None)
    cells = getattr(fn, "__closure__", None) or ()
    if code is None:
        return {}
    return {name: cell.cell_contents for name, cell in zip(code.co_freevars, cells)}


@dataclass
class _Pattern:
    supported: bool = True
    causal: bool | None = None
    packed: torch.Tensor | None = None  # [batch, seq] segment ids from transformers' packing detection
    opaque: bool = False  # while compiling: a closure we may not open


def _classify_mask_function(fn, pattern: _Pattern) -> None:
    """Walk transformers' mask-function tree; mark ``pattern.supported = False`` on anything not recognised.

    Private structure of ``transformers.masking_utils`` (same in 5.17 and 5.24; 5.24 adds
    ``remap_positions_for_packed_sequence``). The sliding-window overlay is accepted because the model passes the
    same ``config.sliding_window`` to the attention call as ``sliding_window``.
    """
    from transformers import masking_utils as mu

    if fn is mu.causal_mask_function:
        pattern.causal = True if pattern.causal is None else pattern.causal
        return
    if fn is getattr(mu, "bidirectional_mask_function", None):
        pattern.causal = False
        return
    if torch.compiler.is_compiling():
        # Dynamo cannot read ``__closure__`` of functions built inside the trace: handled by fastkern_mask.
        pattern.supported = False
        pattern.opaque = True
        return
    qual = getattr(fn, "__qualname__", "")
    free = _closure_vars(fn)
    if qual == "and_masks.<locals>.and_mask" and "mask_functions" in free:
        for f in free["mask_functions"]:
            _classify_mask_function(f, pattern)
        return
    if qual.startswith("remap_positions_for_packed_sequence.") and "mask_function" in free:
        _classify_mask_function(free["mask_function"], pattern)
        return
    if qual.startswith("packed_sequence_mask_function.") and isinstance(free.get("packed_sequence_mask"),
                                                                         torch.Tensor):
        pattern.packed = free["packed_sequence_mask"]
        return
    if qual.startswith("sliding_window_overlay."):
        return
    # or_masks, chunked / block-wise / bidirectional-window overlays, user functions: not the kernel's business.
    pattern.supported = False


def _packed_causal_while_compiling(mask_function, q_length: int, kv_length: int, config, kwargs) -> bool:
    """Is this, while compiling, transformers' ``and_masks(causal, packed)`` and nothing else? Sliding windows
    (``local_size``), chunked attention and user overlays (``use_vmap``) are not, and go dense."""
    # plain attribute access: dynamo answers getattr(fn, name, default) with the default for nested functions
    return (callable(mask_function) and mask_function.__qualname__ == "and_masks.<locals>.and_mask"
            and not kwargs.get("use_vmap", False) and kwargs.get("local_size") is None
            and getattr(config, "attention_chunk_size", None) is None
            and getattr(config, "is_causal", True) is not False
            and q_length == kv_length and q_length > 1)


def _is_tracing(t: torch.Tensor | None) -> bool:
    if torch.compiler.is_compiling():
        return True
    return t is not None and not isinstance(t, torch.Tensor)


def fastkern_mask(batch_size: int, q_length: int, kv_length: int, q_offset=0, kv_offset: int = 0,
                  mask_function=None, attention_mask: torch.Tensor | None = None, **kwargs):
    """Mask function registered under "fastkern" in ``AttentionMaskInterface`` (see the module docstring).

    attention_mask: [batch, seen + q_length] bool (True = real token) or None. Returns None, a 2-D bool padding
    mask [batch, kv_length], a 2-D int32 segment-id tensor [batch, q_length], or a 4-D bool mask from
    transformers' ``sdpa_mask`` when the pattern is not one the kernel handles.
    """
    from transformers import masking_utils as mu

    if mask_function is None:
        mask_function = mu.causal_mask_function
    pattern = _Pattern()
    _classify_mask_function(mask_function, pattern)
    config = kwargs.get("config")
    if pattern.opaque and _packed_causal_while_compiling(mask_function, q_length, kv_length, config, kwargs):
        # Under torch.compile transformers always wraps the causal function with its packing overlay (it cannot
        # look at position_ids values). Probe the mask on neighbouring positions for the sequence boundaries:
        # (t, t-1) is allowed exactly when both tokens belong to one sequence.
        dev = kwargs.get("device", "cpu")
        bi = torch.arange(batch_size, device=dev)[:, None]
        t = torch.arange(1, q_length, device=dev)[None, :]
        same = mask_function(bi, torch.zeros_like(bi), t, t - 1).expand(batch_size, q_length - 1)
        seg = F.pad((~same).to(torch.int32).cumsum(-1, dtype=torch.int32), (1, 0))
        if attention_mask is None:
            return seg
    if pattern.causal is False and config is not None and getattr(config, "is_causal", True) is False:
        # A decoder switched to bidirectional through the config: its attention modules still say is_causal=True.
        pattern.supported = False
    # Static caches hand over a tensor q_offset and keys past the written positions; rolling sliding buffers are
    # not in position order. The kernel needs keys that end at the last query (kv_offset + kv_len == q_end).
    if isinstance(q_offset, torch.Tensor) or kv_offset + kv_length != q_offset + q_length:
        pattern.supported = False
    if pattern.packed is not None and (attention_mask is not None or pattern.packed.shape[-1] != kv_length):
        pattern.supported = False
    if not pattern.supported:
        sdpa_kwargs = {k: v for k, v in kwargs.items()
                       if k not in ("allow_is_causal_skip", "allow_is_bidirectional_skip")}
        return mu.sdpa_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                            kv_offset=kv_offset, mask_function=mask_function, attention_mask=attention_mask,
                            allow_is_causal_skip=False, allow_is_bidirectional_skip=False, **sdpa_kwargs)
    if pattern.packed is not None:
        return pattern.packed.expand(batch_size, -1).to(torch.int32)
    if attention_mask is None:
        return None
    # The cache (dynamic or dynamic-sliding) holds key positions [kv_offset, kv_offset + kv_length).
    mask = attention_mask[:, kv_offset:kv_offset + kv_length].to(torch.bool)
    if mask.shape[-1] < kv_length:
        mask = F.pad(mask, (0, kv_length - mask.shape[-1]), value=False)
    # One host sync per forward (not per layer), as transformers' flash mask does; skipped while tracing.
    if not _is_tracing(mask) and bool(mask.all()):
        return None
    return mask


# ----------------------------------------------------------------------------------------------------------
# validation


def _validate(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
              attention_mask: torch.Tensor | None) -> None:
    for name, t in (("query", query), ("key", key), ("value", value)):
        dispatch.check_floating(name, t)
        if t.dim() != 4:
            raise ValueError(f"{name} must have shape [batch, heads, seq, head_dim] (4 dims), got {tuple(t.shape)}")
    b, h, sq, d = query.shape
    _, hk, sk, _ = key.shape
    if key.dtype != query.dtype or value.dtype != query.dtype:
        raise ValueError(f"query, key and value must share one dtype, got query {query.dtype}, key {key.dtype}, "
                         f"value {value.dtype}")
    dispatch.check_same_device(query=query, key=key, value=value)
    if key.shape[-1] != d:
        raise ValueError(f"key must have shape ({b}, kv_heads, kv_len, {d}) (head_dim of query), "
                         f"got {tuple(key.shape)}")
    if key.shape[0] != b:
        raise ValueError(f"key must have shape ({b}, {hk}, {sk}, {d}) (batch of query), got {tuple(key.shape)}")
    if tuple(value.shape[:3]) != (b, hk, sk):
        raise ValueError(f"value must have shape ({b}, {hk}, {sk}, head_dim) like key, got {tuple(value.shape)}")
    if hk == 0 or h % hk != 0:
        raise ValueError(f"the number of query heads ({h}) must be divisible by the number of key/value heads "
                         f"({hk}); key has shape {tuple(key.shape)}")
    if attention_mask is None:
        return
    m = attention_mask
    if m.dim() == 2:
        if m.dtype == torch.int32:
            # segment ids from fastkern_mask: one packed token stream, queries == keys
            if tuple(m.shape) != (b, sk) or sq != sk:
                raise ValueError(f"attention_mask (packed segment ids) must have shape ({b}, {sk}) with "
                                 f"q_len == kv_len, got {tuple(m.shape)} for q_len {sq}")
        elif tuple(m.shape) != (b, sk):
            raise ValueError(f"attention_mask (2-D padding mask) must have shape ({b}, {sk}) = (batch, kv_len), "
                             f"got {tuple(m.shape)}")
    elif m.dim() == 4:
        ok = (m.shape[0] in (1, b) and m.shape[1] in (1, h) and m.shape[2] in (1, sq) and m.shape[3] == sk)
        if not ok:
            raise ValueError(f"attention_mask (4-D) must have shape ({b}, 1, {sq}, {sk}) = "
                             f"(batch, 1, q_len, kv_len) or broadcast to it, got {tuple(m.shape)}")
    else:
        raise ValueError(f"attention_mask must have shape ({b}, {sk}) (padding) or ({b}, 1, {sq}, {sk}), "
                         f"got {tuple(m.shape)}")


def _kernel_check(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, dropout: float) -> tuple[bool, str]:
    """(ok, reason) for running the Triton kernel; q/k/v in [batch, seq, heads, head_dim]."""
    check = getattr(_kernels, "attention_supported", None)
    if check is not None:
        return check(query, key, value, dropout=dropout)
    # Same checks as the kernel's own, until hf_fastkern.kernels.attention provides attention_supported.
    if dropout > 0.0:
        return False, "attention dropout > 0 in training is not implemented in the kernel"
    ok, why = dispatch.device_check((query, key, value), dispatch.LOW_PRECISION_DTYPES)
    if not ok:
        return False, why
    if query.shape[-1] not in SUPPORTED_HEAD_DIMS:
        return False, f"head_dim {query.shape[-1]} is not one of {SUPPORTED_HEAD_DIMS}"
    return True, ""


# Attention backend: "auto" (default), "triton" or "sdpa".
# "auto" reads the routing table measured on this GPU class (hf_fastkern/kernels/routing.py, issue 21): per case
# (dense / KV-cache decoding / padded / packed, head_dim, lengths, window, softcap, training or not) our kernel
# runs only where the table measured it faster than the path unpatched transformers takes (SDPA, or eager for
# softcap); elsewhere, on GPUs without a table and outside the measured grid, that stock path runs.
# "triton": our kernel for every case it supports. "sdpa": SDPA for the plain dense case, the table elsewhere.
# Deterministic algorithms keep the kernel (its backward is deterministic; cuDNN's and FA2's accumulate dQ with
# atomics).
ATTENTION_BACKEND_ENV = "HF_FASTKERN_ATTENTION"


def _dense_backend() -> str:
    mode = dispatch.env_get(ATTENTION_BACKEND_ENV, "auto")
    if mode not in ("auto", "triton", "sdpa"):
        raise ValueError(f"{ATTENTION_BACKEND_ENV} must be 'auto', 'triton' or 'sdpa', got {mode!r}")
    return mode


def _attention_kind(attention_mask: torch.Tensor | None, packed: bool, causal: bool, sq: int, sk: int) -> str:
    """The routing table's ``kind`` of a call (hf_fastkern.kernels.routing)."""
    if packed or (attention_mask is not None and attention_mask.dtype == torch.int32):
        return "packed"
    if causal and sq < sk:
        return "decode"
    return "dense" if attention_mask is None else "padded"


def _route_to_stock(query: torch.Tensor, kind: str, causal: bool, sq: int, sk: int, window: int | None,
                    softcap: float | None) -> bool:
    """Should this call run the stock path (SDPA, eager for softcap) instead of our kernel?"""
    mode = _dense_backend()
    if mode == "triton" or torch.are_deterministic_algorithms_enabled():
        return False
    plain = kind == "dense" and window is None and not softcap
    if mode == "sdpa" and plain:
        return True
    grad = torch.is_grad_enabled() and query.requires_grad
    return not routing.use_kernel("attention", query.device, kind=kind, head_dim=query.shape[-1], q_len=sq,
                                  kv_len=sk, causal=causal, window=window is not None, softcap=bool(softcap),
                                  grad=grad)


def _route_dense_to_sdpa(query: torch.Tensor, causal: bool, sq: int, sk: int) -> bool:
    """The plain dense case (no mask, window or softcap): does it run SDPA? (KV-cache calls are ``decode``.)"""
    kind = "decode" if causal and sq < sk else "dense"
    return _route_to_stock(query, kind, causal, sq, sk, None, None)


def dense_backend_summary(device: torch.device | str | None = None) -> str:
    """What ``attn_implementation="fastkern"`` runs on ``device`` (for ``hf-fastkern info``): the
    ``HF_FASTKERN_ATTENTION`` mode and where the choice comes from."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    try:
        mode = _dense_backend()
    except ValueError as e:
        return str(e)
    if mode == "triton":
        return f"triton: the Triton kernel for every supported case ({ATTENTION_BACKEND_ENV}=triton)"
    table = "the routing table below"
    if mode == "sdpa":
        return f"sdpa: SDPA for the plain dense case ({ATTENTION_BACKEND_ENV}=sdpa); {table} for the rest"
    if device.type != "cuda":
        return f"auto: the Triton kernel (routing applies to CUDA devices, this one is {device.type})"
    return f"auto: kernel or SDPA/eager per case from {table} (stock where it has no measurement)"


def _sdpa_dense(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, causal: bool, scaling: float):
    """q [b, h, s, d], k/v [b, hk, s, d] -> [b, s, h, d] contiguous, through SDPA with native GQA."""
    out = F.scaled_dot_product_attention(query, key, value, is_causal=causal, scale=scaling,
                                         enable_gqa=query.shape[1] != key.shape[1])
    return out.transpose(1, 2).contiguous()


# ----------------------------------------------------------------------------------------------------------
# unpad / pad metadata, cached across layers


@dataclass
class _Varlen:
    idx_q: torch.Tensor | None  # [total_q] int64 rows of the flattened [batch * q_len] queries; None = all
    idx_k: torch.Tensor | None  # [total_k] int64 rows of the flattened [batch * kv_len] keys; None = all
    cu_q: torch.Tensor  # [n_seq + 1] int32
    cu_k: torch.Tensor  # [n_seq + 1] int32
    max_q: int
    max_k: int
    contiguous: bool  # every sequence's real keys are one contiguous run (needed for sliding windows)


_cache: dict = {}


def _cached(mask: torch.Tensor, key: tuple, build):
    """One-entry cache keyed on the mask object itself (a strong reference, so its id cannot be reused)."""
    if torch.compiler.is_compiling():
        return build()
    hit = _cache.get("entry")
    if hit is not None and hit[0] is mask and hit[1] == (mask._version, *key):
        return hit[2]
    meta = build()
    _cache["entry"] = (mask, (mask._version, *key), meta)
    return meta


def _padding_meta(mask: torch.Tensor, q_len: int, causal: bool) -> _Varlen:
    """mask: [batch, kv_len] bool. Causal: the queries are the last q_len key positions, unpadded like the keys.
    Bidirectional: every query row is kept (it attends to the real keys), only the keys are unpadded."""
    b, kv_len = mask.shape
    dev = mask.device
    k_lens = mask.sum(dim=1, dtype=torch.int32)
    cu_k = F.pad(torch.cumsum(k_lens, 0, dtype=torch.int32), (1, 0))
    pos = torch.arange(kv_len, device=dev)
    first = torch.where(mask, pos, kv_len).amin(dim=1)
    last = torch.where(mask, pos, -1).amax(dim=1)
    contiguous = ((last - first + 1 == k_lens) | (k_lens == 0)).all()
    idx_k = mask.reshape(-1).nonzero().squeeze(1)
    if causal:
        qm = mask[:, kv_len - q_len:]
        q_lens = qm.sum(dim=1, dtype=torch.int32)
        idx_q = qm.reshape(-1).nonzero().squeeze(1)
    else:
        q_lens = torch.full((b,), q_len, dtype=torch.int32, device=dev)
        idx_q = None
    cu_q = F.pad(torch.cumsum(q_lens, 0, dtype=torch.int32), (1, 0))
    # the one host read of this forward: both max lengths and the contiguity flag together
    max_q, max_k, contig = torch.stack([q_lens.max(), k_lens.max(), contiguous.to(torch.int32)]).tolist()
    return _Varlen(idx_q, idx_k, cu_q, cu_k, int(max_q), int(max_k), bool(contig))


def _segments_from_positions(pos: torch.Tensor) -> torch.Tensor:
    """pos: [batch, seq] position ids -> [batch, seq] segment ids; a sequence restarts wherever the position does
    not follow its predecessor by one (transformers' ``find_packed_sequence_indices`` rule)."""
    diff = torch.diff(pos, prepend=pos[:, :1] - 1, dim=-1)
    return (diff != 1).cumsum(-1).to(torch.int32)


def _segment_meta(seg: torch.Tensor) -> _Varlen:
    """seg: [batch, seq] int32 segment ids; a new sequence starts where the id changes or a row starts."""
    b, s = seg.shape
    flat = seg.reshape(-1)
    start = torch.ones_like(flat, dtype=torch.bool)
    start[1:] = flat[1:] != flat[:-1]
    start.view(b, s)[:, 0] = True
    starts = start.nonzero().squeeze(1).to(torch.int32)
    cu = torch.cat([starts, torch.tensor([b * s], dtype=torch.int32, device=seg.device)])
    max_len = int(cu.diff().max().item())
    return _Varlen(None, None, cu, cu, max_len, max_len, True)


# ----------------------------------------------------------------------------------------------------------
# fallbacks


def _dense_mask(attention_mask: torch.Tensor | None, b: int, q_len: int, kv_len: int, causal: bool,
                window: int | None, device: torch.device, explicit: bool = False) -> torch.Tensor | None:
    """[batch, 1, q_len, kv_len] bool (True = attend) from what fastkern_mask returned, or None when SDPA's
    own is_causal / no mask is exact (never None for a causal call when ``explicit``: the eager path has no
    is_causal). Queries sit at key positions kv_len - q_len + i (bottom-right)."""
    if attention_mask is not None and attention_mask.dim() == 4:
        return attention_mask
    if attention_mask is None and window is None and (not causal or (q_len == kv_len and not explicit)):
        return None
    q_pos = torch.arange(q_len, device=device)[:, None] + (kv_len - q_len)
    k_pos = torch.arange(kv_len, device=device)[None, :]
    allowed = torch.ones(q_len, kv_len, dtype=torch.bool, device=device)
    if causal:
        allowed &= k_pos <= q_pos
        if window is not None:
            allowed &= (q_pos - k_pos) < window
    elif window is not None:
        # transformers' bidirectional sliding window is inclusive: |q - k| <= window
        allowed &= (q_pos - k_pos).abs() <= window
    allowed = allowed[None, None].expand(b, 1, q_len, kv_len)
    if attention_mask is not None:
        if attention_mask.dtype == torch.int32:
            seg = attention_mask
            allowed = allowed & (seg[:, None, :, None] == seg[:, None, None, :])
        else:
            allowed = allowed & attention_mask[:, None, None, :].to(torch.bool)
    return allowed


def _eager(query, key, value, mask, dropout, scaling, softcap, training):
    """Eager softmax attention for what SDPA cannot do (softcap). q [b, h, sq, d], k/v [b, hk, sk, d]."""
    group = query.shape[1] // key.shape[1]
    k = key.repeat_interleave(group, dim=1)
    v = value.repeat_interleave(group, dim=1)
    s = torch.matmul(query, k.transpose(-1, -2)).float() * scaling
    s = softcap * torch.tanh(s / softcap)
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else s + mask
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)
    p = F.dropout(p, p=dropout, training=training).to(value.dtype)
    return torch.matmul(p, v)


def _fallback(module, query, key, value, attention_mask, dropout, scaling, causal, window, softcap, reason,
              kwargs):
    """SDPA (eager with softcap) with a dense mask; ``reason`` None: routed here, not a fallback (no warning)."""
    if reason is not None:
        dispatch.warn_once(f"attention:{reason}",
                           f"hf_fastkern: attention '{NAME}' falls back to {'eager' if softcap else 'SDPA'} "
                           f"for such calls: {reason}.")
    b, _, sq, _ = query.shape
    sk = key.shape[2]
    if kwargs.get("position_bias") is not None and softcap is None and window is None and (
            attention_mask is None or attention_mask.dim() == 4):
        from transformers.integrations.sdpa_attention import sdpa_attention_forward
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=causal, **kwargs)
    mask = _dense_mask(attention_mask, b, sq, sk, causal, window, query.device, explicit=bool(softcap))
    if softcap:
        out = _eager(query, key, value, mask, dropout, scaling, softcap, True)
    else:
        group = query.shape[1] // key.shape[1]
        if group > 1:
            key = key.repeat_interleave(group, dim=1)
            value = value.repeat_interleave(group, dim=1)
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=dropout, scale=scaling,
                                             is_causal=bool(causal and mask is None and sq > 1))
    return out.transpose(1, 2).contiguous(), None


def _stock(module, query, key, value, attention_mask, dropout, scaling, causal, window, softcap, kwargs):
    """The path unpatched ``sdpa`` transformers takes, where the routing table chose it: SDPA without a mask
    where its own causal flag is exact (q_len == kv_len, or one query that sees every key), else SDPA (eager with
    softcap) with the dense mask built from ``attention_mask``. q [b, h, sq, d] -> ([b, sq, h, d], None)."""
    sq, sk = query.shape[2], key.shape[2]
    if attention_mask is None and window is None and not softcap and (not causal or sq == sk or sq == 1):
        return _sdpa_dense(query, key, value, causal and sq == sk and sq > 1, scaling), None
    return _fallback(module, query, key, value, attention_mask, dropout, scaling, causal, window, softcap, None,
                     kwargs)


def _options(module, kwargs: dict, sk: int) -> tuple[bool, int | None, float | None]:
    """(causal, window, softcap) of a call, popped from ``kwargs`` (else read from the module); a window that
    masks nothing is None."""
    is_causal = kwargs.pop("is_causal", None)
    causal = bool(is_causal if is_causal is not None else getattr(module, "is_causal", True))
    window = kwargs.pop("sliding_window", None)
    if window is None:
        window = getattr(module, "sliding_window", None)
    if window is not None and (window <= 0 or (causal and window >= sk)):
        # Causal: the farthest key a query sees is sk - 1 positions back, so such a window masks nothing.
        window = None
    return causal, window, kwargs.pop("softcap", None)


def _decode_to_stock(module, query, key, value, attention_mask, dropout, scaling, kwargs):
    """The stock path's result for a KV-cache call (q_len < kv_len, causal) the routing table sends there, else
    None (``kwargs`` is not changed)."""
    kw = dict(kwargs)
    sq, sk = query.shape[2], key.shape[2]
    causal, window, softcap = _options(module, kw, sk)
    if not causal or not _route_to_stock(query, "decode", causal, sq, sk, window, softcap):
        return None
    if scaling is None:
        scaling = 1.0 / math.sqrt(query.shape[-1])
    return _stock(module, query, key, value, attention_mask, dropout, scaling, causal, window, softcap, kw)


def _segments_from_cu(cu: torch.Tensor, total: int) -> torch.Tensor:
    """cu_seqlens [n + 1] -> [1, total] int32 segment ids (no host read)."""
    pos = torch.arange(total, device=cu.device)
    return torch.searchsorted(cu[1:].to(pos.dtype), pos, right=True).to(torch.int32)[None]


# ----------------------------------------------------------------------------------------------------------
# the attention function


_CHECKED = dispatch.PerShape()


def fastkern_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                               value: torch.Tensor, attention_mask: torch.Tensor | None, dropout: float = 0.0,
                               scaling: float | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """Attention with the contract of transformers' ``sdpa_attention_forward``.

    query: [batch, heads, q_len, head_dim]; key, value: [batch, kv_heads, kv_len, head_dim]; bf16/fp16 run the
    Triton kernel, fp32 (outside autocast) falls back to SDPA. attention_mask: what ``fastkern_mask`` returns
    (None, [batch, kv_len] bool padding, [batch, seq] int32 segment ids, or a 4-D mask -> SDPA).
    Keyword arguments read: ``is_causal`` (else ``module.is_causal``), ``sliding_window`` (else
    ``module.sliding_window``), ``softcap``, ``cu_seq_lens_q/k`` with ``max_length_q/k`` (packed batch of one).
    Returns (attn_output [batch, q_len, heads, head_dim] contiguous, None).
    """
    # Under autocast q/k/v may come back fp32 (HF's RoPE multiplies bf16 q/k by fp32 cos/sin; PEFT upcasts),
    # while v stays low precision. SDPA runs all three in the autocast dtype, so do the same, before validating.
    dev_type = query.device.type
    if torch.is_autocast_enabled(dev_type) and torch.float32 in (query.dtype, key.dtype, value.dtype):
        dt = torch.get_autocast_dtype(dev_type)
        query, key, value = query.to(dt), key.to(dt), value.to(dt)
    if (query.dim() == 4 and key.dim() == 4 and query.shape[2] < key.shape[2] and not dropout
            and value.dim() == 4 and key.shape[0] == query.shape[0] and value.shape[:3] == key.shape[:3]
            and key.shape[3] == query.shape[3]
            and query.dtype == key.dtype == value.dtype
            and (attention_mask is None or (attention_mask.dtype == torch.bool
                                            and attention_mask.shape == (query.shape[0], key.shape[2])))
            and kwargs.get("s_aux") is None and kwargs.get("position_bias") is None
            and kwargs.get("cu_seq_lens_q") is None and not torch.compiler.is_compiling()):
        # A KV-cache step (generate()): its cache length, and so its call signature, changes every step. Where the
        # routing table sends it to the stock path (SDPA, as unpatched), that is decided here, before the checks
        # cached per signature, so a routed step costs what unpatched costs plus one lookup. The shape and dtype
        # relations above are the checks that matter for this path (anything else goes the long way, which
        # validates and raises ValueError); SDPA checks the rest.
        res = _decode_to_stock(module, query, key, value, attention_mask, dropout, scaling, kwargs)
        if res is not None:
            return res
    # validation and the kernel check, once per call signature (every layer of a forward shares one)
    sig = dispatch.entry_key(query, key, value, attention_mask)
    sig = None if sig is None else (sig, dropout)
    checked = _CHECKED.get(sig)
    if checked is None:
        _validate(query, key, value, attention_mask)
        checked = _kernel_check(query, key, value, dropout)
        _CHECKED.put(sig, checked)
    if kwargs.get("s_aux") is not None:
        raise ValueError(f"attn_implementation='{NAME}' does not support attention sinks (s_aux); "
                         "use attn_implementation='eager'")
    b, h, sq, d = query.shape
    sk = key.shape[2]
    causal, window, softcap = _options(module, kwargs, sk)
    if scaling is None:
        scaling = 1.0 / math.sqrt(d)

    def fallback(reason: str):
        return _fallback(module, query, key, value, attention_mask, dropout, scaling, causal, window, softcap,
                         reason, kwargs)

    if value.shape[-1] != d:
        return fallback("value head_dim differs from query/key head_dim")
    if kwargs.get("position_bias") is not None:
        return fallback("an additive position_bias is not supported by the kernel")
    if attention_mask is not None and attention_mask.dim() == 4:
        return fallback("the model built a dense 4-D mask (custom mask pattern or static cache)")
    if not causal and window is not None:
        return fallback("bidirectional sliding window")
    # dtype, device and head_dim are all the check reads: the [b, h, s, d] tensors answer like their transposes
    ok, reason = checked
    if not ok:
        return fallback(reason)
    if kwargs.get("output_attentions", False):
        dispatch.warn_once("attention:output_attentions",
                           f"hf_fastkern: attn_implementation='{NAME}' does not return attention weights.")
    opts = dict(causal=causal, scale=scaling, sliding_window=window, softcap=softcap)
    # [b, s, h, d] views for the varlen paths only (the dense path takes [b, h, s, d] as it is: views here would
    # be autograd nodes of their own, host time per layer)
    def bshd():
        return query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)

    def stock(kind: str, mask=lambda: attention_mask):
        """None when the routing table keeps this call on our kernel, else the stock path's result. ``mask``
        builds the mask the stock path needs, only when it runs (packed calls build segment ids from cu_seqlens:
        allocations the kernel path does not need, in every layer)."""
        if not _route_to_stock(query, kind, causal, sq, sk, window, softcap):
            return None
        return _stock(module, query, key, value, mask(), dropout, scaling, causal, window, softcap, kwargs)

    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    if attention_mask is None and cu_q is not None and cu_k is not None:
        # DataCollatorWithFlattening(return_flash_attn_kwargs=True): one packed row, boundaries given.
        if cu_q.numel() < 2 or int(cu_q.shape[0]) != int(cu_k.shape[0]) or sq != sk:
            raise ValueError(f"cu_seq_lens_q / cu_seq_lens_k must have shape (n_seq + 1,) each, with q_len == "
                             f"kv_len, got {tuple(cu_q.shape)}, {tuple(cu_k.shape)} for q_len {sq}, kv_len {sk}")
        if (res := stock("packed", lambda: _segments_from_cu(cu_q, b * sq).view(b, sq))) is not None:
            return res
        max_q, max_k = kwargs.get("max_length_q"), kwargs.get("max_length_k")
        max_q = int(max_q) if max_q is not None else int(cu_q.diff().max())
        max_k = int(max_k) if max_k is not None else int(cu_k.diff().max())
        q, k, v = bshd()
        out = _kernels.flash_attention_varlen(q.reshape(b * sq, h, d), k.reshape(b * sk, -1, d),
                                              v.reshape(b * sk, -1, d), cu_q.to(torch.int32),
                                              cu_k.to(torch.int32), max_q, max_k, **opts)
        return out.view(b, sq, h, d), None

    pos = kwargs.get("position_ids")
    if (attention_mask is None and pos is not None and b == 1 and sq == sk and sq > 1 and pos.numel() == sq
            and not torch.compiler.is_compiling() and not training_cache.packing_checked_upstream()):
        # Packed sequences that the mask side could not see (transformers only looks for packing without a
        # cache, and forward() makes an empty one when use_cache=True): the same detection as its masks, from
        # position_ids that restart. Host reads once per forward, cached across layers on the position_ids object.
        # Not while compiling (it would break the graph in every layer); SDPA does not detect this case either.
        # Not inside a decoder forward that runs without a cache (a patched training forward): transformers has
        # looked there, and a packed batch reached us as segment ids.
        meta = _cached(pos, ("pos",), lambda: _segment_meta(_segments_from_positions(pos.reshape(1, -1))))
        if meta.cu_q.numel() > 2:
            if (res := stock("packed", lambda: _segments_from_cu(meta.cu_q, sq))) is not None:
                return res
            q, k, v = bshd()
            out = _kernels.flash_attention_varlen(q.reshape(sq, h, d), k.reshape(sk, -1, d), v.reshape(sk, -1, d),
                                                  meta.cu_q, meta.cu_k, meta.max_q, meta.max_k, **opts)
            return out.view(b, sq, h, d), None

    kind = _attention_kind(attention_mask, False, causal, sq, sk)
    if (res := stock(kind)) is not None:
        return res
    if (kind == "decode" and sq <= _decode.MAX_Q_LEN and not torch.compiler.is_compiling()
            and not (torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad))):
        # KV-cache decoding without gradients (generate()): the split-KV kernel, which reads a 2-D padding mask
        # itself (no unpadding, no host read). Validated above; dtype, device and head_dim as the check said.
        return _decode.flash_decode_heads_first(query, key, value, causal=causal, scale=scaling,
                                                sliding_window=window, softcap=softcap,
                                                key_mask=attention_mask), None
    if attention_mask is None:
        # validated above and _kernel_check said yes: the kernel's heads-first entry skips a second round of
        # checks and takes [b, h, s, d] as it is (the transposes happen inside its autograd node)
        return _kernels.flash_attention_heads_first(query, key, value, causal, scaling, window, softcap), None

    q, k, v = bshd()
    if attention_mask.dtype == torch.int32:
        meta = _cached(attention_mask, ("seg",), lambda: _segment_meta(attention_mask))
        out = _kernels.flash_attention_varlen(q.reshape(b * sq, h, d), k.reshape(b * sk, -1, d),
                                              v.reshape(b * sk, -1, d), meta.cu_q, meta.cu_k, meta.max_q,
                                              meta.max_k, **opts)
        return out.view(b, sq, h, d), None

    mask = attention_mask.to(torch.bool)
    meta = _cached(attention_mask, ("pad", sq, causal), lambda: _padding_meta(mask, sq, causal))
    if window is not None and not meta.contiguous:
        # Unpadding shifts positions when the real tokens have holes: the window would be measured wrongly.
        return fallback("sliding window with a padding mask that has holes")
    kk = k.reshape(b * sk, -1, d).index_select(0, meta.idx_k)
    vv = v.reshape(b * sk, -1, d).index_select(0, meta.idx_k)
    qf = q.reshape(b * sq, h, d)
    qq = qf if meta.idx_q is None else qf.index_select(0, meta.idx_q)
    out = _kernels.flash_attention_varlen(qq, kk, vv, meta.cu_q, meta.cu_k, meta.max_q, meta.max_k, **opts)
    if meta.idx_q is None:
        return out.view(b, sq, h, d), None
    # padded query rows get zeros (SDPA leaves them undefined; no real token reads them)
    full = out.new_zeros(b * sq, h, d).index_copy(0, meta.idx_q, out)
    return full.view(b, sq, h, d), None


# ----------------------------------------------------------------------------------------------------------
# registration


def attention_status(model: torch.nn.Module, previous=None) -> str:
    """Why the switched attention runs SDPA for this model's calls now ("" when the kernel can take them), for
    the report: float32 q/k/v projections hand the kernel float32 q/k/v, which fall back to SDPA unless the
    forward runs under bf16/fp16 autocast (then q/k/v are cast first; the report cannot know which a caller uses,
    so the line says both). Per-case routing (``hf-fastkern info``) is not
    repeated here: it is a per-call choice of the faster path, not a fallback."""
    p = next((q for n, q in model.named_parameters() if any(k in n for k in _QKV_NAMES)), None)
    if p is None:
        p = next((q for q in model.parameters() if q.is_floating_point()), None)
    if p is not None and p.dtype == torch.float32:
        return ("float32 q/k/v projections: calls outside bf16/fp16 autocast run SDPA (under autocast q/k/v are "
                "cast and the kernel runs)")
    return ""


# parameter-name parts of the attention input projections across the recipes (Llama-family, GPT-2, GPT-NeoX, Phi-3)
_QKV_NAMES = ("q_proj", "qkv_proj", "c_attn", "query_key_value", "Wqkv")


def register_fastkern_attention() -> None:
    """Idempotent: registers "fastkern" in AttentionInterface and AttentionMaskInterface, together."""
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface
    except ImportError:  # transformers is a dependency; without it there is nothing to register with
        return
    AttentionInterface.register(NAME, fastkern_attention_forward)
    AttentionMaskInterface.register(NAME, fastkern_mask)
