"""Pure-PyTorch versions of every op: the CPU fallback and the test oracle.

Each function computes in float32 internally (float64 when given float64, which is how the tests build
their oracle) and returns the dtype documented on it.
Nothing here is fused or fast; everything here is obviously right. Kernels, tests, benchmarks and
``dispatch`` import these; nobody re-declares them.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _f(t: torch.Tensor) -> torch.Tensor:
    """Upcast to the compute dtype: fp32, or fp64 when the test oracle passes fp64 copies."""
    return t if t.dtype == torch.float64 else t.float()

# ----------------------------------------------------------------------------------------------------------
# normalisation


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float = 1e-6, offset: float = 0.0,
             cast_before_weight: bool = True) -> torch.Tensor:
    """RMSNorm over the last dimension.

    x: [..., hidden] fp32/bf16/fp16; weight: [hidden] or None.
    ``cast_before_weight=True`` is Llama's order: statistics in fp32, cast back to ``x.dtype``, then
    ``(offset + weight) * y`` in the promoted dtype of x and weight (fp32 weights give an fp32 result, as HF does).
    ``cast_before_weight=False`` is Gemma's order: ``y * (offset + weight)`` in fp32, then cast to ``x.dtype``.
    Gemma uses ``offset=1.0`` (its weight is stored as ``weight - 1``).
    """
    in_dtype = x.dtype
    h = _f(x)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    if weight is None:
        return h.to(in_dtype)
    if cast_before_weight:
        w = weight + offset if offset != 0.0 else weight
        return w * h.to(in_dtype)
    return (h * (offset + _f(weight))).to(in_dtype)


def layer_norm(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
               eps: float = 1e-5) -> torch.Tensor:
    """LayerNorm over the last dimension, statistics and affine in fp32, result in ``x.dtype``.

    x: [..., hidden]; weight, bias: [hidden] or None.
    """
    w = _f(weight) if weight is not None else None
    b = _f(bias) if bias is not None else None
    return F.layer_norm(_f(x), (x.shape[-1],), w, b, eps).to(x.dtype)


# ----------------------------------------------------------------------------------------------------------
# activations (computed in fp32, rounded once to the input dtype)


def gelu(x: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    """GELU; ``approximate='none'`` is the exact erf form, ``'tanh'`` is GPT-2's ``gelu_new``."""
    return F.gelu(_f(x), approximate=approximate).to(x.dtype)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up``; gate, up: [..., intermediate] of one dtype."""
    return (F.silu(_f(gate)) * _f(up)).to(gate.dtype)


def geglu(gate: torch.Tensor, up: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    """``gelu(gate) * up`` with the erf (``'none'``) or tanh (``'tanh'``) GELU."""
    return (F.gelu(_f(gate), approximate=approximate) * _f(up)).to(gate.dtype)


# ----------------------------------------------------------------------------------------------------------
# attention


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
              scale: float | None = None, sliding_window: int | None = None, softcap: float | None = None,
              key_padding_mask: torch.Tensor | None = None, return_lse: bool = False):
    """Dense softmax attention, the oracle for the flash kernel.

    q: [batch, heads, q_len, head_dim]; k, v: [batch, kv_heads, k_len, head_dim] (heads % kv_heads == 0;
    query head h reads kv head h // (heads // kv_heads)). Returns [batch, heads, q_len, head_dim] in q.dtype.

    - causal is aligned bottom-right: query i sits at key position i + k_len - q_len (KV-cache decoding).
    - sliding_window W (transformers' convention): a query sees keys with ``0 <= q_pos - k_pos < W``.
    - softcap c: scores become ``c * tanh(scores / c)`` after scaling, before masking.
    - key_padding_mask: [batch, k_len] bool, True where the key is real.
    A query row that sees no key returns zeros (and lse = -inf), never NaN.
    """
    b, h, sq, d = q.shape
    hk, sk = k.shape[1], k.shape[2]
    if scale is None:
        scale = 1.0 / math.sqrt(d)
    group = h // hk
    kf = _f(k).repeat_interleave(group, dim=1)
    vf = _f(v).repeat_interleave(group, dim=1)
    s = torch.matmul(_f(q), kf.transpose(-1, -2)) * scale  # [b, h, sq, sk]
    if softcap is not None and softcap > 0:
        s = softcap * torch.tanh(s / softcap)
    q_pos = torch.arange(sq, device=q.device)[:, None] + (sk - sq)
    k_pos = torch.arange(sk, device=q.device)[None, :]
    allowed = torch.ones(sq, sk, dtype=torch.bool, device=q.device)
    if causal:
        allowed &= k_pos <= q_pos
    if sliding_window is not None and sliding_window > 0:
        allowed &= (q_pos - k_pos) < sliding_window
        if not causal:
            allowed &= (k_pos - q_pos) < sliding_window
    allowed = allowed[None, None].expand(b, h, sq, sk)
    if key_padding_mask is not None:
        allowed = allowed & key_padding_mask[:, None, None, :].bool()
    s = s.masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)  # [b, h, sq]
    p = torch.exp(s - lse[..., None].masked_fill(torch.isinf(lse[..., None]), 0.0))
    p = p.masked_fill(~allowed, 0.0)
    out = torch.matmul(p, vf).to(q.dtype)
    if return_lse:
        return out, lse
    return out


def attention_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                     cu_seqlens_k: torch.Tensor, *, causal: bool = False, scale: float | None = None,
                     sliding_window: int | None = None, softcap: float | None = None) -> torch.Tensor:
    """Packed (padding-free) attention: sequence i owns rows ``cu_seqlens[i]:cu_seqlens[i+1]``.

    q: [total_q, heads, head_dim]; k, v: [total_k, kv_heads, head_dim]; cu_seqlens_*: [n_seq + 1] int32.
    Returns [total_q, heads, head_dim]. Each sequence is attended on its own (causal bottom-right per sequence).
    """
    out = torch.zeros_like(q)
    cq = cu_seqlens_q.tolist()
    ck = cu_seqlens_k.tolist()
    for i in range(len(cq) - 1):
        qs, qe, ks, ke = cq[i], cq[i + 1], ck[i], ck[i + 1]
        if qe == qs:
            continue
        o = attention(q[qs:qe].transpose(0, 1)[None], k[ks:ke].transpose(0, 1)[None],
                      v[ks:ke].transpose(0, 1)[None], causal=causal, scale=scale,
                      sliding_window=sliding_window, softcap=softcap)
        out[qs:qe] = o[0].transpose(0, 1)
    return out


# ----------------------------------------------------------------------------------------------------------
# cross-entropy


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor, *, ignore_index: int = -100,
                  reduction: str = "mean", label_smoothing: float = 0.0, z_loss: float = 0.0,
                  softcap: float | None = None, num_items_in_batch: int | torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy of ``logits`` [tokens, vocab] against ``labels`` [tokens], all in fp32.

    Per token: ``(1 - ls) * (lse - z_y) + ls * (lse - mean_j z_j) + z_loss * lse**2`` with ``z`` the
    (optionally soft-capped ``c * tanh(z / c)``) logits; ignored tokens contribute 0.
    reduction: 'none' -> [tokens] fp32; 'sum'; 'mean' divides by the number of non-ignored tokens, or by
    ``num_items_in_batch`` when given (gradient accumulation). A 'mean' over zero valid tokens is NaN (0/0),
    exactly as ``torch.nn.functional.cross_entropy``.
    """
    z = _f(logits)
    if softcap is not None and softcap > 0:
        z = softcap * torch.tanh(z / softcap)
    valid = labels != ignore_index
    safe = torch.where(valid, labels, torch.zeros_like(labels))
    lse = torch.logsumexp(z, dim=-1)
    nll = lse - z.gather(-1, safe[:, None]).squeeze(-1)
    loss = nll
    if label_smoothing > 0:
        loss = (1.0 - label_smoothing) * nll + label_smoothing * (lse - z.mean(-1))
    if z_loss > 0:
        loss = loss + z_loss * lse * lse
    loss = torch.where(valid, loss, torch.zeros_like(loss))
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    if reduction != "mean":
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    denom = num_items_in_batch if num_items_in_batch is not None else valid.sum()
    if isinstance(denom, torch.Tensor):
        denom = denom.to(loss.device, loss.dtype)
    return loss.sum() / denom


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                         bias: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
    """``cross_entropy(hidden @ weight.T + bias, labels)`` with the logits materialised in fp32.

    hidden: [tokens, hidden]; weight: [vocab, hidden]; bias: [vocab] or None; labels: [tokens].
    Keyword arguments are those of :func:`cross_entropy`.
    """
    logits = _f(hidden) @ _f(weight).t()
    if bias is not None:
        logits = logits + _f(bias)
    return cross_entropy(logits, labels, **kwargs)


# ----------------------------------------------------------------------------------------------------------
# rotary position embedding


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """``cat(-x2, x1)`` over the last dimension (transformers' ``rotate_half``)."""
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
         unsqueeze_dim: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' ``apply_rotary_pos_emb``, op for op: ``x * cos + rotate_half(x) * sin`` for q and k."""
    cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
    return (q * cos) + (rotate_half(q) * sin), (k * cos) + (rotate_half(k) * sin)
