"""Split-KV attention for KV-cache decoding (flash-decoding): a few queries against a long cache (issue 22).

Why: the FlashAttention-2 forward (:mod:`hf_fastkern.kernels.attention`) runs one program per (query block,
head). A decoding step has 1-16 queries, so it runs ``batch * heads`` programs, each reading the whole cache
alone: at batch 1 that is 32 programs for 132 SMs, and every query head of a GQA group reads the same K/V
again. Here:

- one program per (key chunk, batch, kv head, row tile): the cache is split into chunks so that all SMs read
  it at once, and the rows of a tile are the ``group x q_len`` queries of *every* query head that shares the kv
  head, so each K/V block is loaded once for the whole group;
- each program writes its chunk's normalised output and log-sum-exp (fp32); a second small kernel combines
  the chunks (the usual ``exp(lse_i - lse)`` weighting) into ``[batch, q_len, heads, head_dim]``. With one
  chunk the first kernel writes the output itself;
- a padding mask (batched generation, left padding or any holes) is read by the kernel, one byte per key, so
  nothing is unpadded or copied and the host never reads it.

Semantics are those of ``reference.attention``: causal aligned bottom-right (query i sits at key position
``i + k_len - q_len``), sliding window ``0 <= q_pos - k_pos < W`` (and ``|q_pos - k_pos| < W`` when not causal),
softcap ``c * tanh(s / c)`` after scaling; a row that sees no key gives zeros. Positions are cache indices, as
transformers' masks measure them. Inference only: no backward (callers that need gradients take the
FlashAttention-2 kernel).

Speed is not assumed: the transformers integration runs this only where the routing table
(``hf_fastkern/kernels/routing``, kind ``decode``) measured it faster than SDPA on that GPU class.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from hf_fastkern.kernels._triton_utils import INTERPRET, DirectLaunch, cdiv, device_props, mma, next_pow2
from hf_fastkern.kernels.attention import (
    LOG2E,
    _norm_opts,
    _scores,
    _unit_last,
    _visible,
    attention_supported,
)

LOG2E_C: tl.constexpr = tl.constexpr(LOG2E)  # a global a @triton.jit function may read

# Most queries per call this path takes (transformers' speculative / assisted decoding uses up to ~16).
MAX_Q_LEN = 16
# Rows of one program: the group's query heads x q_len, tiled by at most this many (a 64 x head_dim fp32
# accumulator stays in registers at 4 warps up to head_dim 128; 16 under the interpreter keeps tiles cheap there).
MAX_BLOCK_M = 64 if not INTERPRET else 16
# Chunks the combine kernel reads per step: 16 x head_dim 256 fp32 is 32 values per thread at 4 warps.
COMBINE_BLOCK_S = 16
# Launch configuration of the split kernel (plan() reads it): keys per loop step (None: _block_n), warps,
# pipeline stages and programs per SM the chunking aims at. A decoding step is memory-bound (K/V read once); 4
# warps and a 2-stage pipeline are FlashAttention's decoding defaults. ``bench_attention --parts decode-configs``
# sweeps these on the GPU (GPU time from CUDA-graph replays).
LAUNCH = {"block_n": None, "num_warps": 4, "num_stages": 2, "progs_per_sm": 2}


# ----------------------------------------------------------------------------------------------------------
# kernels


@triton.jit(do_not_specialize=["seqlen_q", "seqlen_k", "k_base", "chunk", "window"])
def _decode_split_kernel(
    Q, K, V, KMASK, OP, LP, O,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_mb,
    stride_pb, stride_ph, stride_pm, stride_ps,
    stride_lb, stride_lh, stride_lm,
    stride_ob, stride_om, stride_oh,
    seqlen_q, seqlen_k, HK, GROUP, k_base, chunk,
    sm_scale, softcap, window,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, HAS_KMASK: tl.constexpr, SPLIT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Program (chunk s, b * HK + hk, row tile m): rows are (query head of kv head hk, query) pairs; keys
    [k_base + s * chunk, k_base + (s + 1) * chunk). SPLIT: write the chunk's normalised output and base-2
    log-sum-exp to OP/LP; else (one chunk) the final output to O."""
    pid_s = tl.program_id(0)
    pid_bhk = tl.program_id(1)
    pid_m = tl.program_id(2)
    b = pid_bhk // HK
    hk = pid_bhk % HK
    n_rows = GROUP * seqlen_q
    if pid_m * BLOCK_M >= n_rows:
        return
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    r_ok = rows < n_rows
    h = hk * GROUP + rows // seqlen_q  # [BM] query head of each row
    i = rows % seqlen_q  # [BM] query index of each row
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    d_ok = offs_d < HEAD_DIM
    b64 = b.to(tl.int64)
    q_ptrs = Q + b64 * stride_qb + h.to(tl.int64)[:, None] * stride_qh + i.to(tl.int64)[:, None] * stride_qm \
        + offs_d[None, :]
    q = tl.load(q_ptrs, mask=r_ok[:, None] & d_ok[None, :], other=0.0)  # [BM, D]
    q_pos = i + (seqlen_k - seqlen_q)  # key-space position of each row (bottom-right aligned)
    qk_scale = sm_scale * LOG2E_C
    # keys of this chunk, narrowed to what some row can see
    lo = k_base + pid_s * chunk
    hi = tl.minimum(lo + chunk, seqlen_k)
    first = lo * 0
    if HAS_WINDOW:
        # the earliest key any row sees (the first row's window edge); no row sees past seqlen_k
        first = tl.maximum(first, seqlen_k - seqlen_q - window + 1)
    start = tl.maximum(lo, (first // BLOCK_N) * BLOCK_N)
    K_ptr = K + b64 * stride_kb + hk.to(tl.int64) * stride_kh
    V_ptr = V + b64 * stride_vb + hk.to(tl.int64) * stride_vh
    acc = tl.zeros([BLOCK_M, HEAD_DIM_PAD], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    offs_n0 = tl.arange(0, BLOCK_N)
    for start_n in range(start, hi, BLOCK_N):
        offs_n = start_n + offs_n0
        n_ok = (offs_n < hi) & (offs_n >= first)
        if HAS_KMASK:
            n_ok = n_ok & (tl.load(KMASK + b64 * stride_mb + offs_n, mask=n_ok, other=0) != 0)
        kT = tl.load(K_ptr + offs_n.to(tl.int64)[None, :] * stride_kn + offs_d[:, None],
                     mask=d_ok[:, None] & n_ok[None, :], other=0.0)  # [D, BN]
        qk = mma(q, kT, tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32))
        s, _t = _scores(qk, sm_scale, qk_scale, softcap, HAS_SOFTCAP)
        vis = _visible(q_pos[:, None], offs_n[None, :], hi, window, CAUSAL, HAS_WINDOW) & n_ok[None, :]
        s = tl.where(vis, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_sub[:, None])
        alpha = tl.exp2(m_i - m_sub)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        v = tl.load(V_ptr + offs_n.to(tl.int64)[:, None] * stride_vn + offs_d[None, :],
                    mask=n_ok[:, None] & d_ok[None, :], other=0.0)  # [BN, D]
        acc = mma(p.to(v.dtype), v, acc)
        m_i = m_new
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    acc = acc / l_safe[:, None]
    h64 = h.to(tl.int64)
    i64 = i.to(tl.int64)
    if SPLIT:
        lse2 = tl.where(empty, float("-inf"), m_i + tl.log2(l_safe))
        op = OP + b64 * stride_pb + h64[:, None] * stride_ph + i64[:, None] * stride_pm + pid_s * stride_ps \
            + offs_d[None, :]
        tl.store(op, acc, mask=r_ok[:, None] & d_ok[None, :])
        tl.store(LP + b64 * stride_lb + h64 * stride_lh + i64 * stride_lm + pid_s, lse2, mask=r_ok)
    else:
        o = O + b64 * stride_ob + h64[:, None] * stride_oh + i64[:, None] * stride_om + offs_d[None, :]
        tl.store(o, acc.to(O.dtype.element_ty), mask=r_ok[:, None] & d_ok[None, :])


@triton.jit
def _decode_combine_kernel(
    OP, LP, O,
    stride_pb, stride_ph, stride_pm, stride_ps,
    stride_lb, stride_lh, stride_lm,
    stride_ob, stride_om, stride_oh,
    H, seqlen_q, n_splits,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """Program per (batch, head, query): out = sum_s 2^(lse_s - lse) * out_s, with lse = log2 sum_s 2^lse_s,
    over the chunks in blocks of BLOCK_S (a bounded tile at any chunk count). Chunks that saw no key have
    lse_s = -inf and weigh 0; a row no chunk saw gives zeros."""
    pid = tl.program_id(0)
    i = pid % seqlen_q
    bh = pid // seqlen_q
    h = bh % H
    b = bh // H
    offs_s0 = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    d_ok = offs_d < HEAD_DIM
    row_l = LP + b.to(tl.int64) * stride_lb + h.to(tl.int64) * stride_lh + i.to(tl.int64) * stride_lm
    row_p = OP + b.to(tl.int64) * stride_pb + h.to(tl.int64) * stride_ph + i.to(tl.int64) * stride_pm
    mx = tl.full([BLOCK_S], float("-inf"), dtype=tl.float32)
    for s0 in range(0, n_splits, BLOCK_S):
        offs_s = s0 + offs_s0
        mx = tl.maximum(mx, tl.load(row_l + offs_s, mask=offs_s < n_splits, other=float("-inf")))
    m = tl.max(mx, 0)
    m_sub = tl.where(m == float("-inf"), 0.0, m)
    tot = tl.zeros([BLOCK_S], dtype=tl.float32)
    acc = tl.zeros([HEAD_DIM_PAD], dtype=tl.float32)
    for s0 in range(0, n_splits, BLOCK_S):
        offs_s = s0 + offs_s0
        s_ok = offs_s < n_splits
        w = tl.exp2(tl.load(row_l + offs_s, mask=s_ok, other=float("-inf")) - m_sub)  # [S], 0 for empty chunks
        tot += w
        parts = tl.load(row_p + offs_s[:, None] * stride_ps + offs_d[None, :], mask=s_ok[:, None] & d_ok[None, :],
                        other=0.0)  # [S, D]
        acc += tl.sum(parts * w[:, None], 0)
    t = tl.sum(tot, 0)
    out = acc / tl.where(t == 0.0, 1.0, t)
    o = O + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh + i.to(tl.int64) * stride_om
    tl.store(o + offs_d, out.to(O.dtype.element_ty), mask=d_ok)


# ----------------------------------------------------------------------------------------------------------
# host side

_SPLIT = DirectLaunch(_decode_split_kernel)
_COMBINE = DirectLaunch(_decode_combine_kernel)


def _block_n(d: int) -> int:
    """Keys per loop step: 64 (a 64 x 128 bf16 K tile and V tile, 32 KiB, two stages in shared memory), 32 at
    head_dim 256 (the same bytes); 16 under the interpreter."""
    if INTERPRET:
        return 16
    return 64 if d <= 128 else 32


def plan(batch: int, kv_heads: int, group: int, q_len: int, k_len: int, d: int, window: int,
         device: torch.device) -> dict:
    """The launch geometry: row tile, key block, first key block, chunk length (a multiple of the key block)
    and the number of chunks. Chunks are chosen so that about ``LAUNCH["progs_per_sm"]`` programs run per SM."""
    block_n = LAUNCH["block_n"] or _block_n(d)
    block_m = max(16, min(MAX_BLOCK_M, next_pow2(group * q_len)))
    m_tiles = cdiv(group * q_len, block_m)
    first = max(0, k_len - q_len - window + 1) if window > 0 else 0
    k_base = (first // block_n) * block_n
    blocks = max(1, cdiv(k_len - k_base, block_n))
    progs = batch * kv_heads * m_tiles
    want = max(1, cdiv(LAUNCH["progs_per_sm"] * device_props(device)["sms"], progs))
    per_chunk = cdiv(blocks, min(blocks, want))
    chunk = per_chunk * block_n
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, m_tiles=m_tiles, k_base=k_base, chunk=chunk,
                splits=cdiv(blocks, per_chunk))


def decode_supported(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[bool, str]:
    """Can the split-KV kernel take this call? q [batch, heads, q_len, head_dim] (heads first)."""
    ok, why = attention_supported(q, k, v)
    if not ok:
        return ok, why
    if q.shape[2] > MAX_Q_LEN:
        return False, f"q_len {q.shape[2]} > {MAX_Q_LEN} (the prefill kernel takes it)"
    return True, ""


def flash_decode_heads_first(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *, causal: bool = True,
                             scale: float | None = None, sliding_window: int | None = None,
                             softcap: float | None = None, key_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Attention of a few queries against a KV cache, without gradients.

    query: [batch, heads, q_len, head_dim] with q_len <= ``MAX_Q_LEN``; key, value: [batch, kv_heads, k_len,
    head_dim] (transformers' cache layout, any strides with unit head_dim stride), bf16/fp16, heads a multiple of
    kv_heads. key_mask: optional [batch, k_len] bool (True = a real key), transformers' 2-D padding mask; masked
    keys are never attended. Returns [batch, q_len, heads, head_dim] contiguous in query.dtype. Callers check
    :func:`decode_supported` and validate shapes (the transformers integration does both); a caller that needs
    gradients takes :func:`hf_fastkern.kernels.attention.flash_attention_heads_first`.
    """
    if query.dim() != 4 or key.dim() != 4 or value.shape != key.shape:
        raise ValueError(f"query [batch, heads, q_len, head_dim] and key/value [batch, kv_heads, k_len, head_dim] of "
                         f"one shape expected, got {tuple(query.shape)}, {tuple(key.shape)}, {tuple(value.shape)}")
    b, h, sq, d = query.shape
    hk, sk = key.shape[1], key.shape[2]
    if key.shape[0] != b or key.shape[3] != d or hk == 0 or h % hk:
        raise ValueError(f"key must have shape ({b}, kv_heads dividing {h}, k_len, {d}), got {tuple(key.shape)}")
    if key_mask is not None and tuple(key_mask.shape) != (b, sk):
        raise ValueError(f"key_mask must have shape ({b}, {sk}) = (batch, k_len), got {tuple(key_mask.shape)}")
    scale, window, cap = _norm_opts(d, scale, sliding_window, softcap)
    q, k, v = _unit_last(query), _unit_last(key), _unit_last(value)
    out = torch.empty(b, sq, h, d, device=q.device, dtype=q.dtype)
    if out.numel() == 0:
        return out
    if sk == 0:
        return out.zero_()
    group = h // hk
    p = plan(b, hk, group, sq, sk, d, window, q.device)
    split = p["splits"] > 1
    if split:
        o_part = torch.empty(b, h, sq, p["splits"], d, device=q.device, dtype=torch.float32)
        l_part = torch.empty(b, h, sq, p["splits"], device=q.device, dtype=torch.float32)
        ps, ls = o_part.stride()[:4], l_part.stride()[:3]
    else:
        o_part = l_part = out  # unused by the kernel (SPLIT=False)
        ps, ls = (0, 0, 0, 0), (0, 0, 0)
    if key_mask is not None:
        km = key_mask.view(torch.uint8) if key_mask.dtype == torch.bool else (key_mask != 0).view(torch.uint8)
        if km.stride(-1) != 1:
            km = km.contiguous()
        km_stride = km.stride(0)
    else:
        km, km_stride = q, 0
    flags = dict(HEAD_DIM=d, HEAD_DIM_PAD=next_pow2(d), CAUSAL=bool(causal),
                 HAS_WINDOW=window > 0, HAS_SOFTCAP=cap > 0.0, HAS_KMASK=key_mask is not None, SPLIT=split,
                 BLOCK_M=p["BLOCK_M"], BLOCK_N=p["BLOCK_N"])
    _SPLIT((p["splits"], b * hk, p["m_tiles"]),
        q, k, v, km, o_part, l_part, out,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        km_stride,
        *ps, *ls,
        out.stride(0), out.stride(1), out.stride(2),
        sq, sk, hk, group, p["k_base"], p["chunk"],
        scale, cap, window,
        num_warps=LAUNCH["num_warps"], num_stages=LAUNCH["num_stages"], **flags)
    if split:
        _COMBINE((b * h * sq,),
            o_part, l_part, out, *ps, *ls, out.stride(0), out.stride(1), out.stride(2),
            h, sq, p["splits"],
            HEAD_DIM=d, HEAD_DIM_PAD=next_pow2(d),
            BLOCK_S=min(COMBINE_BLOCK_S, max(2, next_pow2(p["splits"]))), num_warps=4)
    return out
