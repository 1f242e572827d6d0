"""FlashAttention-2 in Triton: forward and backward, dense and varlen, causal, GQA/MQA, sliding window, softcap.

What: ``flash_attention`` (q [batch, q_len, heads, head_dim]) and ``flash_attention_varlen`` (packed
q [total_q, heads, head_dim] with ``cu_seqlens``) compute ``softmax(softcap(q k^T * scale) + mask) v``
without materializing the [q_len, k_len] score matrix.

Design (FlashAttention-2, Dao 2023):
- Forward: one program per (BLOCK_M query rows, batch*head). Online softmax in base 2 with
  ``qk_scale = scale * log2(e)`` folded once. The key loop is split into (a) leading masked blocks
  (sliding window edge), (b) fully visible blocks run without any mask arithmetic, (c) trailing masked
  blocks (causal diagonal, k_len edge). Blocks nobody in the tile can see are never visited (causal and
  window block skipping). The log-sum-exp (natural log, fp32) is saved for the backward.
- Backward: ``delta = rowsum(dO * O)`` in a small preprocessing kernel, then a dK/dV kernel (program per
  key block and KV head; it loops over the query heads of its GQA group and their query blocks, so dK/dV of
  a group are summed in registers: no atomics, no repeated K/V) and a separate dQ kernel (program per query
  block and head). Both recompute P from the saved lse; both use the same three-range block split.
- Dense and varlen share every kernel: the dense case is a stride-based batch index, varlen reads
  ``cu_seqlens`` (IS_VARLEN constexpr). Any strides are accepted (transformers hands transposed views of
  [batch, heads, seq, dim]); only the head_dim stride must be 1.
- Causal is aligned bottom-right (query i sits at key position i + k_len - q_len: KV-cache decoding);
  sliding window W follows transformers: a query sees keys with 0 <= q_pos - k_pos < W (and, when not
  causal, |q_pos - k_pos| < W, as ``reference.attention``). Rows that see no key give zeros, zero grads.
- head_dim 80/96 are padded to the next power of two inside the kernel with masks (HEAD_DIM_PAD).
- Every tl.dot goes through ``mma`` (exact under the CPU interpreter for bf16).
- Registered as ``hf_fastkern::flash_attn_fwd`` / ``hf_fastkern::flash_attn_bwd`` custom ops with fake and
  autograd registrations, so ``torch.compile`` traces through. Eager calls take ``FlashAttnFunction`` over the
  same launchers instead (custom-op dispatch costs several times an autograd.Function's host time, which
  decides host-bound training steps); it also takes transformers' [batch, heads, seq, head_dim] tensors and
  transposes them inside the node. After the first launch per autotune key, ``TunedLaunch`` skips the
  autotuner wrapper.

Limits: bf16/fp16 only (fp32 and dropout > 0 fall back to the PyTorch reference; the transformers
integration uses ``attention_supported`` to fall back to SDPA instead); head_dim in {16, 32, 64, 80, 96,
128, 256}; no TMA / warp specialization (not measured to pay yet, see docs/attention.md).
"""
import functools
import math
import os
from typing import Optional

import torch
import triton
import triton.language as tl

from hf_fastkern.kernels import dispatch, reference
from hf_fastkern.kernels._triton_utils import (
    INTERPRET,
    UNDER_PYTEST,
    DirectLaunch,
    TunedLaunch,
    autotune,
    cdiv,
    mma,
    next_pow2,
    tune_configs,
)

SUPPORTED_HEAD_DIMS = (16, 32, 64, 80, 96, 128, 256)
KERNEL_DTYPES = (torch.bfloat16, torch.float16)
LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453

# ----------------------------------------------------------------------------------------------------------
# launch configs


def _seq_bucket(n: int) -> int:
    """Autotune key for sequence length: powers of two, so nearby lengths share a tuned config."""
    return next_pow2(max(int(n), 16))


def _smem_ok(bm: int, bn: int, d: int, stages: int, tiles_per_stage: int) -> bool:
    # A rough shared-memory estimate (bytes, 16-bit operands): one resident [bm, d] tile plus
    # `stages` pipelined copies of the streamed tiles. H100 gives a block 227 KiB; stay under 200.
    return (bm * d + stages * tiles_per_stage * bn * d) * 2 <= 200 * 1024


def _first_under_pytest(configs: list) -> list:
    # GPU tests exercise many flag combinations: one surviving config each keeps compile time bounded
    # (correctness does not depend on which tile wins; the interpreter tests cover 16x16 tiles).
    # Read at call time: pytest sets PYTEST_CURRENT_TEST only while a test runs, after this module loaded.
    return configs[:1] if (UNDER_PYTEST or "PYTEST_CURRENT_TEST" in os.environ) else configs


def _prune_fwd(configs, named_args, **kwargs):
    """Drop tiles larger than the (bucketed) sequence and those that cannot fit shared memory."""
    args = {**named_args, **kwargs}
    d = args["HEAD_DIM_PAD"]
    seq = args["SEQ_BUCKET"]
    keep = [c for c in configs
            if c.kwargs["BLOCK_M"] <= max(seq, 16) and c.kwargs["BLOCK_N"] <= max(seq, 16)
            and _smem_ok(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], d, c.num_stages, 2)]
    return _first_under_pytest(keep or configs[-1:])


def _prune_bwd(configs, named_args, **kwargs):
    """Same filter for the backward kernels (dK/dV streams q and dO; dQ streams k and v)."""
    args = {**named_args, **kwargs}
    d = args["HEAD_DIM_PAD"]
    seq = args["SEQ_BUCKET"]
    keep = [c for c in configs
            if c.kwargs["BLOCK_M"] <= max(seq, 16) and c.kwargs["BLOCK_N"] <= max(seq, 16)
            and _smem_ok(max(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]), min(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]),
                         d, c.num_stages, 2)
            # Two fp32 [tile, head_dim] accumulators must stay in registers (dK and dV): 256-wide heads need
            # the smaller tiles.
            and not (d >= 256 and max(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]) > 64)]
    return _first_under_pytest(keep or configs[-1:])


def _cfg(bm: int, bn: int, warps: int, stages: int) -> triton.Config:
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=warps, num_stages=stages)


# Hopper: 128-row query tiles with 8 warps keep wgmma busy; the forward streams 64- or 128-key tiles.
FWD_CONFIGS = tune_configs(
    full=[_cfg(128, 64, 8, 3), _cfg(128, 128, 8, 3), _cfg(128, 64, 4, 4), _cfg(64, 64, 4, 3)],
    quick=[_cfg(16, 16, 4, 1)] if INTERPRET else [_cfg(128, 64, 8, 3), _cfg(64, 64, 4, 2), _cfg(64, 32, 4, 2)],
)
# dK/dV: BLOCK_N keys stay resident (k, v, dk, dv), BLOCK_M query rows stream (FA2 uses 128 x 64 at d=128).
DKDV_CONFIGS = tune_configs(
    full=[_cfg(64, 128, 8, 2), _cfg(64, 128, 8, 3), _cfg(32, 128, 8, 3), _cfg(64, 64, 4, 3), _cfg(32, 64, 4, 2)],
    quick=[_cfg(16, 16, 4, 1)] if INTERPRET else [_cfg(64, 128, 8, 2), _cfg(32, 64, 4, 2)],
)
# dQ: BLOCK_M query rows stay resident (q, dO, dq), BLOCK_N keys stream.
DQ_CONFIGS = tune_configs(
    full=[_cfg(128, 64, 8, 2), _cfg(128, 64, 8, 3), _cfg(128, 32, 8, 3), _cfg(64, 64, 4, 3), _cfg(64, 32, 4, 2)],
    quick=[_cfg(16, 16, 4, 1)] if INTERPRET else [_cfg(128, 64, 8, 2), _cfg(64, 32, 4, 2)],
)
TUNE_KEY = ["HEAD_DIM_PAD", "CAUSAL", "HAS_WINDOW", "HAS_SOFTCAP", "IS_VARLEN", "SEQ_BUCKET"]

# ----------------------------------------------------------------------------------------------------------
# jit helpers


@triton.jit
def _tanh(x):
    # tanh through exp2: portable across Triton 3.2-3.9 and the interpreter (no libdevice import).
    return 1.0 - 2.0 / (tl.exp2(x * (2.0 * 1.4426950408889634)) + 1.0)


@triton.jit
def _scores(qk, sm_scale, qk_scale, softcap, HAS_SOFTCAP: tl.constexpr):
    """Raw q.k -> log2-domain scores, and tanh(score/softcap) (needed by the backward) when capped."""
    if HAS_SOFTCAP:
        t = _tanh(qk * (sm_scale / softcap))
        s = t * (softcap * 1.4426950408889634)
    else:
        t = qk
        s = qk * qk_scale
    return s, t


@triton.jit
def _visible(q_pos, k_pos, k_len, window, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr):
    """[rows, cols] bool: key k_pos (< k_len) visible from query at key-space position q_pos."""
    ok = k_pos < k_len
    if CAUSAL:
        ok = ok & (k_pos <= q_pos)
    if HAS_WINDOW:
        ok = ok & ((q_pos - k_pos) < window)
        if not CAUSAL:
            ok = ok & ((k_pos - q_pos) < window)
    return ok


@triton.jit
def _key_ranges(m0, q_len, k_len, window, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr):
    """For query rows [m0, m0+BLOCK_M): key-block bounds (lo, full_lo, full_hi, hi), multiples of BLOCK_N
    except hi. [lo, full_lo) and [full_hi, hi) need masks; [full_lo, full_hi) is visible to every row."""
    diff = k_len - q_len
    p0 = m0 + diff                   # key-space position of the first row
    p1 = m0 + BLOCK_M - 1 + diff     # and of the last row
    lo = m0 * 0
    hi = k_len
    f_lo = lo
    f_hi = k_len
    if CAUSAL:
        hi = tl.minimum(hi, p1 + 1)
        f_hi = tl.minimum(f_hi, p0 + 1)
    if HAS_WINDOW:
        lo = tl.maximum(lo, p0 - window + 1)
        f_lo = tl.maximum(f_lo, p1 - window + 1)
        if not CAUSAL:
            hi = tl.minimum(hi, p1 + window)
            f_hi = tl.minimum(f_hi, p0 + window)
    # Clamp before dividing: integer division of negatives differs between the GPU and the interpreter.
    lo = (lo // BLOCK_N) * BLOCK_N
    f_lo = tl.maximum(f_lo, lo)
    f_lo = ((f_lo + BLOCK_N - 1) // BLOCK_N) * BLOCK_N
    f_hi = (tl.maximum(f_hi, 0) // BLOCK_N) * BLOCK_N
    has_full = f_hi > f_lo
    f_lo = tl.where(has_full, f_lo, lo)
    f_hi = tl.where(has_full, f_hi, lo)
    return lo, f_lo, f_hi, hi


@triton.jit
def _query_ranges(n0, q_len, k_len, window, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr):
    """For keys [n0, n0+BLOCK_N): query-block bounds (lo, full_lo, full_hi, hi) in rows, multiples of
    BLOCK_M except hi. Rows in [full_lo, full_hi) see every key of the block; the rest need masks."""
    diff = k_len - q_len
    n1 = n0 + BLOCK_N - 1
    lo = n0 * 0
    hi = q_len
    f_lo = lo
    f_hi = q_len
    if CAUSAL:
        lo = tl.maximum(lo, n0 - diff)
        f_lo = tl.maximum(f_lo, n1 - diff)
    if HAS_WINDOW:
        hi = tl.minimum(hi, n1 + window - diff)
        f_hi = tl.minimum(f_hi, n0 + window - diff)
        if not CAUSAL:
            lo = tl.maximum(lo, n0 - window + 1 - diff)
            f_lo = tl.maximum(f_lo, n1 - window + 1 - diff)
    # A key block that runs past k_len is never "fully visible".
    f_hi = tl.where(n1 < k_len, f_hi, 0)
    lo = (lo // BLOCK_M) * BLOCK_M
    f_lo = tl.maximum(f_lo, lo)
    f_lo = ((f_lo + BLOCK_M - 1) // BLOCK_M) * BLOCK_M
    f_hi = (tl.maximum(f_hi, 0) // BLOCK_M) * BLOCK_M
    has_full = f_hi > f_lo
    f_lo = tl.where(has_full, f_lo, lo)
    f_hi = tl.where(has_full, f_hi, lo)
    return lo, f_lo, f_hi, hi


@triton.jit
def _seq_bounds(b, CU_Q, CU_K, seqlen_q, seqlen_k, IS_VARLEN: tl.constexpr):
    """(q_start, q_len, k_start, k_len) of sequence b: from cu_seqlens (varlen) or the dense lengths."""
    if IS_VARLEN:
        q_start = tl.load(CU_Q + b)
        q_len = tl.load(CU_Q + b + 1) - q_start
        k_start = tl.load(CU_K + b)
        k_len = tl.load(CU_K + b + 1) - k_start
    else:
        q_start = b * 0
        q_len = seqlen_q + b * 0
        k_start = b * 0
        k_len = seqlen_k + b * 0
    return q_start, q_len, k_start, k_len


# ----------------------------------------------------------------------------------------------------------
# forward


@triton.jit
def _fwd_inner(acc, l_i, m_i, q, K_ptr, V_ptr, stride_kn, stride_vn, offs_n0, offs_d, q_pos,
               start, end, k_len, sm_scale, qk_scale, softcap, window,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
               HEAD_DIM_PAD: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr,
               HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr):
    d_ok = offs_d < HEAD_DIM
    for start_n in range(start, end, BLOCK_N):
        offs_n = start_n + offs_n0
        kT_ptrs = K_ptr + offs_n.to(tl.int64)[None, :] * stride_kn + offs_d[:, None]
        v_ptrs = V_ptr + offs_n.to(tl.int64)[:, None] * stride_vn + offs_d[None, :]
        if MASKED:
            kT = tl.load(kT_ptrs, mask=d_ok[:, None] & (offs_n[None, :] < k_len), other=0.0)  # [D, BN]
        else:
            kT = tl.load(kT_ptrs, mask=d_ok[:, None], other=0.0)
        qk = mma(q, kT, tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32))  # [BM, BN]
        s, _t = _scores(qk, sm_scale, qk_scale, softcap, HAS_SOFTCAP)
        if MASKED:
            vis = _visible(q_pos[:, None], offs_n[None, :], k_len, window, CAUSAL, HAS_WINDOW)
            s = tl.where(vis, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            # A row that has seen no key yet keeps m = -inf: subtract 0 instead, so exp2 gives 0, not NaN.
            m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_sub = m_new
        p = tl.exp2(s - m_sub[:, None])  # [BM, BN]
        alpha = tl.exp2(m_i - m_sub)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        if MASKED:
            v = tl.load(v_ptrs, mask=d_ok[None, :] & (offs_n[:, None] < k_len), other=0.0)  # [BN, D]
        else:
            v = tl.load(v_ptrs, mask=d_ok[None, :], other=0.0)
        acc = mma(p.to(v.dtype), v, acc)
        m_i = m_new
    return acc, l_i, m_i


@autotune(FWD_CONFIGS, key=TUNE_KEY, prune_configs_by={"early_config_prune": _prune_fwd})
@triton.jit(do_not_specialize=["seqlen_q", "seqlen_k", "window"])
def _attn_fwd_kernel(
    Q, K, V, O, LSE, CU_Q, CU_K,
    stride_qb, stride_qm, stride_qh,
    stride_kb, stride_kn, stride_kh,
    stride_vb, stride_vn, stride_vh,
    stride_ob, stride_om, stride_oh,
    stride_lb, stride_lh,
    seqlen_q, seqlen_k, H, GROUP,
    sm_scale, softcap, window, SEQ_BUCKET,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr, IS_VARLEN: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # Heaviest causal tiles (last query rows) first: better tail balance across SMs.
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    hk = h // GROUP
    q_start, q_len, k_start, k_len = _seq_bounds(b, CU_Q, CU_K, seqlen_q, seqlen_k, IS_VARLEN)
    m0 = pid_m * BLOCK_M
    if m0 >= q_len:
        return
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    d_ok = offs_d < HEAD_DIM
    m_ok = offs_m < q_len
    b64 = b.to(tl.int64)
    Q_ptr = Q + b64 * stride_qb + h.to(tl.int64) * stride_qh + q_start.to(tl.int64) * stride_qm
    K_ptr = K + b64 * stride_kb + hk.to(tl.int64) * stride_kh + k_start.to(tl.int64) * stride_kn
    V_ptr = V + b64 * stride_vb + hk.to(tl.int64) * stride_vh + k_start.to(tl.int64) * stride_vn
    q = tl.load(Q_ptr + offs_m.to(tl.int64)[:, None] * stride_qm + offs_d[None, :],
                mask=m_ok[:, None] & d_ok[None, :], other=0.0)  # [BM, D]
    qk_scale = sm_scale * 1.4426950408889634
    q_pos = offs_m + (k_len - q_len)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_PAD], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    lo, f_lo, f_hi, hi = _key_ranges(m0, q_len, k_len, window, BLOCK_M, BLOCK_N, CAUSAL, HAS_WINDOW)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, K_ptr, V_ptr, stride_kn, stride_vn, offs_n0, offs_d, q_pos,
                               lo, f_lo, k_len, sm_scale, qk_scale, softcap, window,
                               BLOCK_M, BLOCK_N, HEAD_DIM, HEAD_DIM_PAD, True, CAUSAL, HAS_WINDOW, HAS_SOFTCAP)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, K_ptr, V_ptr, stride_kn, stride_vn, offs_n0, offs_d, q_pos,
                               f_lo, f_hi, k_len, sm_scale, qk_scale, softcap, window,
                               BLOCK_M, BLOCK_N, HEAD_DIM, HEAD_DIM_PAD, False, CAUSAL, HAS_WINDOW, HAS_SOFTCAP)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, K_ptr, V_ptr, stride_kn, stride_vn, offs_n0, offs_d, q_pos,
                               f_hi, hi, k_len, sm_scale, qk_scale, softcap, window,
                               BLOCK_M, BLOCK_N, HEAD_DIM, HEAD_DIM_PAD, True, CAUSAL, HAS_WINDOW, HAS_SOFTCAP)
    # Rows that saw no key: l = 0 -> output 0 and lse = -inf (never NaN).
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    acc = acc / l_safe[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.log2(l_safe)) * 0.6931471805599453)
    O_ptr = O + b64 * stride_ob + h.to(tl.int64) * stride_oh + q_start.to(tl.int64) * stride_om
    tl.store(O_ptr + offs_m.to(tl.int64)[:, None] * stride_om + offs_d[None, :], acc.to(O.dtype.element_ty),
             mask=m_ok[:, None] & d_ok[None, :])
    L_ptr = LSE + b64 * stride_lb + h.to(tl.int64) * stride_lh + q_start.to(tl.int64)
    tl.store(L_ptr + offs_m, lse, mask=m_ok)


# ----------------------------------------------------------------------------------------------------------
# backward


@triton.jit(do_not_specialize=["seqlen_q"])
def _attn_bwd_preprocess(
    O, DO, DELTA, CU_Q,
    stride_ob, stride_om, stride_oh,
    stride_dob, stride_dom, stride_doh,
    stride_lb, stride_lh,
    seqlen_q, H,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, IS_VARLEN: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """delta[b, h, i] = sum_d dO * O (fp32): the softmax-backward row term, computed once."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    q_start, q_len, _ks, _kl = _seq_bounds(b, CU_Q, CU_Q, seqlen_q, seqlen_q, IS_VARLEN)
    m0 = pid_m * BLOCK_M
    if m0 >= q_len:
        return
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    mask = (offs_m < q_len)[:, None] & (offs_d < HEAD_DIM)[None, :]
    b64 = b.to(tl.int64)
    rows = (q_start + offs_m).to(tl.int64)
    o = tl.load(O + b64 * stride_ob + h.to(tl.int64) * stride_oh + rows[:, None] * stride_om + offs_d[None, :],
                mask=mask, other=0.0).to(tl.float32)
    do = tl.load(DO + b64 * stride_dob + h.to(tl.int64) * stride_doh + rows[:, None] * stride_dom
                 + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
    delta = tl.sum(o * do, 1)
    tl.store(DELTA + b64 * stride_lb + h.to(tl.int64) * stride_lh + rows, delta, mask=offs_m < q_len)


@triton.jit
def _dkdv_inner(dk, dv, k, v, Q_ptr, DO_ptr, L_ptr, D_ptr, stride_qm, stride_dom, offs_n, offs_m0, offs_d,
                start, end, q_len, k_len, sm_scale, qk_scale, softcap, window,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
                MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr):
    d_ok = offs_d < HEAD_DIM
    diff = k_len - q_len
    for start_m in range(start, end, BLOCK_M):
        offs_m = start_m + offs_m0
        rows = offs_m.to(tl.int64)
        if MASKED:
            m_ok = offs_m < q_len
            qT = tl.load(Q_ptr + rows[None, :] * stride_qm + offs_d[:, None], mask=d_ok[:, None] & m_ok[None, :],
                         other=0.0)  # [D, BM]
            do = tl.load(DO_ptr + rows[:, None] * stride_dom + offs_d[None, :], mask=m_ok[:, None] & d_ok[None, :],
                         other=0.0)  # [BM, D]
            lse = tl.load(L_ptr + rows, mask=m_ok, other=0.0)
            delta = tl.load(D_ptr + rows, mask=m_ok, other=0.0)
        else:
            qT = tl.load(Q_ptr + rows[None, :] * stride_qm + offs_d[:, None], mask=d_ok[:, None], other=0.0)
            do = tl.load(DO_ptr + rows[:, None] * stride_dom + offs_d[None, :], mask=d_ok[None, :], other=0.0)
            lse = tl.load(L_ptr + rows)
            delta = tl.load(D_ptr + rows)
        qkT = mma(k, qT, tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32))  # [BN, BM]
        sT, tT = _scores(qkT, sm_scale, qk_scale, softcap, HAS_SOFTCAP)
        pT = tl.exp2(sT - (lse * 1.4426950408889634)[None, :])
        if MASKED:
            vis = _visible((offs_m + diff)[None, :], offs_n[:, None], k_len, window, CAUSAL, HAS_WINDOW)
            vis = vis & (offs_m < q_len)[None, :]
            # where(), not multiply: a fully masked row has lse = -inf and exp2 gives inf there.
            pT = tl.where(vis, pT, 0.0)
        dv = mma(pT.to(do.dtype), do, dv)
        dpT = mma(v, tl.trans(do), tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32))  # [BN, BM]
        dsT = pT * (dpT - delta[None, :])
        if HAS_SOFTCAP:
            dsT = dsT * (1.0 - tT * tT)
        dk = mma(dsT.to(qT.dtype), tl.trans(qT), dk)
    return dk, dv


@autotune(DKDV_CONFIGS, key=TUNE_KEY, prune_configs_by={"early_config_prune": _prune_bwd})
@triton.jit(do_not_specialize=["seqlen_q", "seqlen_k", "window"])
def _attn_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, CU_Q, CU_K,
    stride_qb, stride_qm, stride_qh,
    stride_kb, stride_kn, stride_kh,
    stride_vb, stride_vn, stride_vh,
    stride_dob, stride_dom, stride_doh,
    stride_dkb, stride_dkn, stride_dkh,
    stride_dvb, stride_dvn, stride_dvh,
    stride_lb, stride_lh,
    seqlen_q, seqlen_k, HK, GROUP,
    sm_scale, softcap, window, SEQ_BUCKET,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr, IS_VARLEN: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // HK
    hk = pid_bh % HK
    q_start, q_len, k_start, k_len = _seq_bounds(b, CU_Q, CU_K, seqlen_q, seqlen_k, IS_VARLEN)
    n0 = pid_n * BLOCK_N
    if n0 >= k_len:
        return
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    d_ok = offs_d < HEAD_DIM
    n_mask = (offs_n < k_len)[:, None] & d_ok[None, :]
    b64 = b.to(tl.int64)
    rows_n = (k_start + offs_n).to(tl.int64)
    k = tl.load(K + b64 * stride_kb + hk.to(tl.int64) * stride_kh + rows_n[:, None] * stride_kn + offs_d[None, :],
                mask=n_mask, other=0.0)  # [BN, D]
    v = tl.load(V + b64 * stride_vb + hk.to(tl.int64) * stride_vh + rows_n[:, None] * stride_vn + offs_d[None, :],
                mask=n_mask, other=0.0)  # [BN, D]
    dk = tl.zeros([BLOCK_N, HEAD_DIM_PAD], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM_PAD], dtype=tl.float32)
    qk_scale = sm_scale * 1.4426950408889634
    lo, f_lo, f_hi, hi = _query_ranges(n0, q_len, k_len, window, BLOCK_M, BLOCK_N, CAUSAL, HAS_WINDOW)
    # GQA: this program owns KV head hk, so it sums the contributions of every query head of its group here
    # (no atomics, K/V never repeated).
    for g in range(0, GROUP):
        h = (hk * GROUP + g).to(tl.int64)
        Q_ptr = Q + b64 * stride_qb + h * stride_qh + q_start.to(tl.int64) * stride_qm
        DO_ptr = DO + b64 * stride_dob + h * stride_doh + q_start.to(tl.int64) * stride_dom
        L_ptr = LSE + b64 * stride_lb + h * stride_lh + q_start.to(tl.int64)
        D_ptr = DELTA + b64 * stride_lb + h * stride_lh + q_start.to(tl.int64)
        dk, dv = _dkdv_inner(dk, dv, k, v, Q_ptr, DO_ptr, L_ptr, D_ptr, stride_qm, stride_dom, offs_n, offs_m0,
                             offs_d, lo, f_lo, q_len, k_len, sm_scale, qk_scale, softcap, window,
                             BLOCK_M, BLOCK_N, HEAD_DIM, True, CAUSAL, HAS_WINDOW, HAS_SOFTCAP)
        dk, dv = _dkdv_inner(dk, dv, k, v, Q_ptr, DO_ptr, L_ptr, D_ptr, stride_qm, stride_dom, offs_n, offs_m0,
                             offs_d, f_lo, f_hi, q_len, k_len, sm_scale, qk_scale, softcap, window,
                             BLOCK_M, BLOCK_N, HEAD_DIM, False, CAUSAL, HAS_WINDOW, HAS_SOFTCAP)
        dk, dv = _dkdv_inner(dk, dv, k, v, Q_ptr, DO_ptr, L_ptr, D_ptr, stride_qm, stride_dom, offs_n, offs_m0,
                             offs_d, f_hi, hi, q_len, k_len, sm_scale, qk_scale, softcap, window,
                             BLOCK_M, BLOCK_N, HEAD_DIM, True, CAUSAL, HAS_WINDOW, HAS_SOFTCAP)
    dk = dk * sm_scale
    tl.store(DK + b64 * stride_dkb + hk.to(tl.int64) * stride_dkh + rows_n[:, None] * stride_dkn + offs_d[None, :],
             dk.to(DK.dtype.element_ty), mask=n_mask)
    tl.store(DV + b64 * stride_dvb + hk.to(tl.int64) * stride_dvh + rows_n[:, None] * stride_dvn + offs_d[None, :],
             dv.to(DV.dtype.element_ty), mask=n_mask)


@triton.jit
def _dq_inner(dq, q, do, lse2, delta, K_ptr, V_ptr, stride_kn, stride_vn, offs_n0, offs_d, q_pos,
              start, end, k_len, sm_scale, qk_scale, softcap, window,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
              MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr):
    d_ok = offs_d < HEAD_DIM
    for start_n in range(start, end, BLOCK_N):
        offs_n = start_n + offs_n0
        cols = offs_n.to(tl.int64)
        if MASKED:
            mask = d_ok[:, None] & (offs_n[None, :] < k_len)
        else:
            mask = d_ok[:, None]
        kT = tl.load(K_ptr + cols[None, :] * stride_kn + offs_d[:, None], mask=mask, other=0.0)  # [D, BN]
        vT = tl.load(V_ptr + cols[None, :] * stride_vn + offs_d[:, None], mask=mask, other=0.0)  # [D, BN]
        qk = mma(q, kT, tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32))
        s, t = _scores(qk, sm_scale, qk_scale, softcap, HAS_SOFTCAP)
        p = tl.exp2(s - lse2[:, None])
        if MASKED:
            vis = _visible(q_pos[:, None], offs_n[None, :], k_len, window, CAUSAL, HAS_WINDOW)
            p = tl.where(vis, p, 0.0)
        dp = mma(do, vT, tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32))
        ds = p * (dp - delta[:, None])
        if HAS_SOFTCAP:
            ds = ds * (1.0 - t * t)
        dq = mma(ds.to(kT.dtype), tl.trans(kT), dq)
    return dq


@autotune(DQ_CONFIGS, key=TUNE_KEY, prune_configs_by={"early_config_prune": _prune_bwd})
@triton.jit(do_not_specialize=["seqlen_q", "seqlen_k", "window"])
def _attn_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, CU_Q, CU_K,
    stride_qb, stride_qm, stride_qh,
    stride_kb, stride_kn, stride_kh,
    stride_vb, stride_vn, stride_vh,
    stride_dob, stride_dom, stride_doh,
    stride_dqb, stride_dqm, stride_dqh,
    stride_lb, stride_lh,
    seqlen_q, seqlen_k, H, GROUP,
    sm_scale, softcap, window, SEQ_BUCKET,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr, IS_VARLEN: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    hk = h // GROUP
    q_start, q_len, k_start, k_len = _seq_bounds(b, CU_Q, CU_K, seqlen_q, seqlen_k, IS_VARLEN)
    m0 = pid_m * BLOCK_M
    if m0 >= q_len:
        return
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    d_ok = offs_d < HEAD_DIM
    m_ok = offs_m < q_len
    mask = m_ok[:, None] & d_ok[None, :]
    b64 = b.to(tl.int64)
    rows = (q_start + offs_m).to(tl.int64)
    q = tl.load(Q + b64 * stride_qb + h.to(tl.int64) * stride_qh + rows[:, None] * stride_qm + offs_d[None, :],
                mask=mask, other=0.0)
    do = tl.load(DO + b64 * stride_dob + h.to(tl.int64) * stride_doh + rows[:, None] * stride_dom
                 + offs_d[None, :], mask=mask, other=0.0)
    lrow = b64 * stride_lb + h.to(tl.int64) * stride_lh + rows
    lse2 = tl.load(LSE + lrow, mask=m_ok, other=0.0) * 1.4426950408889634
    delta = tl.load(DELTA + lrow, mask=m_ok, other=0.0)
    K_ptr = K + b64 * stride_kb + hk.to(tl.int64) * stride_kh + k_start.to(tl.int64) * stride_kn
    V_ptr = V + b64 * stride_vb + hk.to(tl.int64) * stride_vh + k_start.to(tl.int64) * stride_vn
    qk_scale = sm_scale * 1.4426950408889634
    q_pos = offs_m + (k_len - q_len)
    dq = tl.zeros([BLOCK_M, HEAD_DIM_PAD], dtype=tl.float32)
    lo, f_lo, f_hi, hi = _key_ranges(m0, q_len, k_len, window, BLOCK_M, BLOCK_N, CAUSAL, HAS_WINDOW)
    dq = _dq_inner(dq, q, do, lse2, delta, K_ptr, V_ptr, stride_kn, stride_vn, offs_n0, offs_d, q_pos,
                   lo, f_lo, k_len, sm_scale, qk_scale, softcap, window,
                   BLOCK_M, BLOCK_N, HEAD_DIM, True, CAUSAL, HAS_WINDOW, HAS_SOFTCAP)
    dq = _dq_inner(dq, q, do, lse2, delta, K_ptr, V_ptr, stride_kn, stride_vn, offs_n0, offs_d, q_pos,
                   f_lo, f_hi, k_len, sm_scale, qk_scale, softcap, window,
                   BLOCK_M, BLOCK_N, HEAD_DIM, False, CAUSAL, HAS_WINDOW, HAS_SOFTCAP)
    dq = _dq_inner(dq, q, do, lse2, delta, K_ptr, V_ptr, stride_kn, stride_vn, offs_n0, offs_d, q_pos,
                   f_hi, hi, k_len, sm_scale, qk_scale, softcap, window,
                   BLOCK_M, BLOCK_N, HEAD_DIM, True, CAUSAL, HAS_WINDOW, HAS_SOFTCAP)
    dq = dq * sm_scale
    tl.store(DQ + b64 * stride_dqb + h.to(tl.int64) * stride_dqh + rows[:, None] * stride_dqm + offs_d[None, :],
             dq.to(DQ.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------------------
# launchers


def _unit_last(t: torch.Tensor) -> torch.Tensor:
    # Kernels index head_dim with unit stride; any other layout (rare) is copied once.
    return t if t.stride(-1) == 1 else t.contiguous()


def _strides3(t: torch.Tensor, varlen: bool) -> tuple[int, int, int]:
    """(batch, row, head) strides; varlen tensors have no batch axis (stride 0, rows from cu_seqlens)."""
    if varlen:
        return 0, t.stride(0), t.stride(1)
    return t.stride(0), t.stride(1), t.stride(2)


def _geometry(q, k, cu_seqlens_q, max_seqlen_q, max_seqlen_k):
    varlen = q.dim() == 3
    if varlen:
        batch = cu_seqlens_q.numel() - 1
        heads, d = q.shape[1], q.shape[2]
        kv_heads = k.shape[1]
        seqlen_q, seqlen_k = max_seqlen_q, max_seqlen_k
    else:
        batch, seqlen_q, heads, d = q.shape
        seqlen_k, kv_heads = k.shape[1], k.shape[2]
    return varlen, batch, heads, kv_heads, d, seqlen_q, seqlen_k


def _lse_empty(q: torch.Tensor, varlen: bool, batch: int, heads: int, seqlen_q: int) -> torch.Tensor:
    if varlen:
        return torch.empty(heads, q.shape[0], device=q.device, dtype=torch.float32)
    return torch.empty(batch, heads, seqlen_q, device=q.device, dtype=torch.float32)


def _lse_strides(lse: torch.Tensor, varlen: bool) -> tuple[int, int]:
    return (0, lse.stride(0)) if varlen else (lse.stride(0), lse.stride(1))


@functools.lru_cache(maxsize=None)
def _flags(d: int, causal: bool, window: int, softcap: float, varlen: bool) -> dict:
    """The kernels' constexpr flags, cached per combination (read-only: callers only unpack it)."""
    return dict(HEAD_DIM=d, HEAD_DIM_PAD=next_pow2(d), CAUSAL=bool(causal),
                HAS_WINDOW=window > 0, HAS_SOFTCAP=softcap > 0.0, IS_VARLEN=varlen)


# Launch paths that skip the autotuner wrapper once it has chosen a config (_triton_utils.TunedLaunch). Their key is
# the autotuner's own: TUNE_KEY's values (d determines HEAD_DIM_PAD) and the dtype of every tensor argument
# (q/k/v/out/dq.. share q's dtype, dO has its own, lse/delta are fp32, cu_seqlens int32 or q when dense).
_FWD = TunedLaunch(_attn_fwd_kernel)
_PRE = DirectLaunch(_attn_bwd_preprocess)
_DKDV = TunedLaunch(_attn_bwd_dkdv_kernel)
_DQ = TunedLaunch(_attn_bwd_dq_kernel)
_PRE_BLOCK = 64 if not INTERPRET else 16


def _fwd_impl(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale, window, softcap):
    q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
    varlen, batch, heads, kv_heads, d, seqlen_q, seqlen_k = _geometry(q, k, cu_seqlens_q, max_seqlen_q,
                                                                       max_seqlen_k)
    # varlen rows outside every cu_seqlens range are never visited: zeros keep them defined.
    out = torch.zeros(q.shape, device=q.device, dtype=q.dtype) if varlen else torch.empty(
        q.shape, device=q.device, dtype=q.dtype)
    lse = _lse_empty(q, varlen, batch, heads, seqlen_q)
    if out.numel() == 0 or batch == 0 or seqlen_q == 0:
        lse.fill_(float("-inf"))
        return out, lse
    cu_q = cu_seqlens_q if varlen else q
    cu_k = cu_seqlens_k if varlen else q
    bucket = _seq_bucket(max(seqlen_q, seqlen_k))
    key = (d, bool(causal), window > 0, softcap > 0.0, varlen, bucket, q.dtype)
    cfg = _FWD.chosen(key)
    bh = batch * heads
    grid = ((cdiv(seqlen_q, cfg["BLOCK_M"]), bh) if cfg is not None
            else lambda meta: (triton.cdiv(seqlen_q, meta["BLOCK_M"]), bh))
    _FWD(key, grid,
         q, k, v, out, lse, cu_q, cu_k,
         *_strides3(q, varlen), *_strides3(k, varlen), *_strides3(v, varlen), *_strides3(out, varlen),
         *_lse_strides(lse, varlen),
         seqlen_q, seqlen_k, heads, heads // kv_heads,
         scale, softcap, window, bucket,
         **_flags(d, causal, window, softcap, varlen))
    return out, lse


def _bwd_impl(do, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale,
              window, softcap):
    do, q, k, v, out = (_unit_last(t) for t in (do, q, k, v, out))
    varlen, batch, heads, kv_heads, d, seqlen_q, seqlen_k = _geometry(q, k, cu_seqlens_q, max_seqlen_q,
                                                                       max_seqlen_k)
    alloc = torch.zeros if varlen else torch.empty
    dq = alloc(q.shape, device=q.device, dtype=q.dtype)
    dk = alloc(k.shape, device=k.device, dtype=k.dtype)
    dv = alloc(v.shape, device=v.device, dtype=v.dtype)
    if batch == 0 or q.numel() == 0 or k.numel() == 0 or seqlen_q == 0 or seqlen_k == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    cu_q = cu_seqlens_q if varlen else q
    cu_k = cu_seqlens_k if varlen else q
    delta = torch.empty_like(lse)
    lse_strides = _lse_strides(lse, varlen)
    flags = _flags(d, causal, window, softcap, varlen)
    _PRE((cdiv(seqlen_q, _PRE_BLOCK), batch * heads),
        out, do, delta, cu_q, *_strides3(out, varlen), *_strides3(do, varlen), *lse_strides, seqlen_q, heads,
        HEAD_DIM=d, HEAD_DIM_PAD=flags["HEAD_DIM_PAD"], IS_VARLEN=varlen, BLOCK_M=_PRE_BLOCK,
    )
    bucket = _seq_bucket(max(seqlen_q, seqlen_k))
    key = (d, bool(causal), window > 0, softcap > 0.0, varlen, bucket, q.dtype, do.dtype)
    cfg = _DKDV.chosen(key)
    bkv = batch * kv_heads
    grid_kv = ((cdiv(seqlen_k, cfg["BLOCK_N"]), bkv) if cfg is not None
               else lambda meta: (triton.cdiv(seqlen_k, meta["BLOCK_N"]), bkv))
    _DKDV(key, grid_kv,
          q, k, v, do, lse, delta, dk, dv, cu_q, cu_k,
          *_strides3(q, varlen), *_strides3(k, varlen), *_strides3(v, varlen), *_strides3(do, varlen),
          *_strides3(dk, varlen), *_strides3(dv, varlen), *lse_strides,
          seqlen_q, seqlen_k, kv_heads, heads // kv_heads,
          scale, softcap, window, bucket, **flags)
    cfg = _DQ.chosen(key)
    bh = batch * heads
    grid_q = ((cdiv(seqlen_q, cfg["BLOCK_M"]), bh) if cfg is not None
              else lambda meta: (triton.cdiv(seqlen_q, meta["BLOCK_M"]), bh))
    _DQ(key, grid_q,
        q, k, v, do, lse, delta, dq, cu_q, cu_k,
        *_strides3(q, varlen), *_strides3(k, varlen), *_strides3(v, varlen), *_strides3(do, varlen),
        *_strides3(dq, varlen), *lse_strides,
        seqlen_q, seqlen_k, heads, heads // kv_heads,
        scale, softcap, window, bucket, **flags)
    return dq, dk, dv


# ----------------------------------------------------------------------------------------------------------
# torch.library custom ops (what torch.compile traces; FlashAttention's flash_attn/utils/library.py idea), and
# the eager autograd.Function over the same launchers: custom-op dispatch costs ~4x the host time of an
# autograd.Function (rms_norm.py), and the attention of a host-bound step is called once per layer.


@torch.library.custom_op("hf_fastkern::flash_attn_fwd", mutates_args=())
def _flash_attn_fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: Optional[torch.Tensor],
                       cu_seqlens_k: Optional[torch.Tensor], max_seqlen_q: int, max_seqlen_k: int, causal: bool,
                       scale: float, window: int, softcap: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (out like q, contiguous; lse fp32 natural log: [batch, heads, q_len] or [heads, total_q])."""
    return _fwd_impl(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale, window,
                     softcap)


@_flash_attn_fwd_op.register_fake
def _(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale, window, softcap):
    out = torch.empty(q.shape, device=q.device, dtype=q.dtype)
    if q.dim() == 3:
        lse = q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)
    else:
        lse = q.new_empty((q.shape[0], q.shape[2], q.shape[1]), dtype=torch.float32)
    return out, lse


@torch.library.custom_op("hf_fastkern::flash_attn_bwd", mutates_args=())
def _flash_attn_bwd_op(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                       lse: torch.Tensor, cu_seqlens_q: Optional[torch.Tensor],
                       cu_seqlens_k: Optional[torch.Tensor], max_seqlen_q: int, max_seqlen_k: int, causal: bool,
                       scale: float, window: int, softcap: float
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (dq, dk, dv), contiguous, in the shapes and dtypes of q, k, v."""
    return _bwd_impl(do, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal,
                     scale, window, softcap)


@_flash_attn_bwd_op.register_fake
def _(do, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale, window,
      softcap):
    return (torch.empty(q.shape, device=q.device, dtype=q.dtype),
            torch.empty(k.shape, device=k.device, dtype=k.dtype),
            torch.empty(v.shape, device=v.device, dtype=v.dtype))


def _setup_context(ctx, inputs, output):
    q, k, v, cu_q, cu_k, max_q, max_k, causal, scale, window, softcap = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k)
    ctx.args = (max_q, max_k, causal, scale, window, softcap)
    ctx.mark_non_differentiable(lse)


def _backward(ctx, dout, _dlse):
    q, k, v, out, lse, cu_q, cu_k = ctx.saved_tensors
    dq, dk, dv = _flash_attn_bwd_op(dout, q, k, v, out, lse, cu_q, cu_k, *ctx.args)
    return dq, dk, dv, None, None, None, None, None, None, None, None


_flash_attn_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def _heads_first(t: torch.Tensor) -> torch.Tensor:
    """[batch, heads, seq, head_dim] -> the kernels' [batch, seq, heads, head_dim] (a view)."""
    return t.transpose(1, 2)


class FlashAttnFunction(torch.autograd.Function):
    """Eager autograd path over the same launchers as the custom ops: one graph node per call.

    Inputs as ``_flash_attn_fwd_op`` plus ``heads_first``: q/k/v given as [batch, heads, seq, head_dim]
    (transformers' layout) are transposed here, inside the node, so the three transpose views of the caller
    add no autograd nodes; their gradients go back in that layout. Returns out [batch, q_len, heads, head_dim]
    (dense) or [total_q, heads, head_dim] (varlen), contiguous, q.dtype.
    """

    @staticmethod
    def forward(ctx, q, k, v, cu_q, cu_k, max_q, max_k, causal, scale, window, softcap, heads_first):
        qs, ks, vs = (_heads_first(q), _heads_first(k), _heads_first(v)) if heads_first else (q, k, v)
        out, lse = _fwd_impl(qs, ks, vs, cu_q, cu_k, max_q, max_k, causal, scale, window, softcap)
        # the caller's tensors are saved (inputs and the output), the transposed views are rebuilt in backward
        ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k)
        ctx.args = (max_q, max_k, causal, scale, window, softcap)
        ctx.heads_first = heads_first
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, cu_q, cu_k = ctx.saved_tensors
        if ctx.heads_first:
            q, k, v = _heads_first(q), _heads_first(k), _heads_first(v)
        dq, dk, dv = _bwd_impl(dout, q, k, v, out, lse, cu_q, cu_k, *ctx.args)
        if ctx.heads_first:
            dq, dk, dv = _heads_first(dq), _heads_first(dk), _heads_first(dv)
        return dq, dk, dv, None, None, None, None, None, None, None, None, None


def _run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_q: Optional[torch.Tensor],
         cu_k: Optional[torch.Tensor], max_q: int, max_k: int, causal: bool, scale: float, window: int,
         softcap: float, heads_first: bool = False) -> torch.Tensor:
    """The kernel on validated inputs: the custom op while torch.compile traces, else the eager Function.
    q/k/v: [batch, seq, heads, head_dim] ([batch, heads, seq, head_dim] when heads_first) or varlen
    [total, heads, head_dim]. Returns out [batch, q_len, heads, head_dim] / [total_q, heads, head_dim]."""
    if torch.compiler.is_compiling():
        if heads_first:
            q, k, v = _heads_first(q), _heads_first(k), _heads_first(v)
        return _flash_attn_fwd_op(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale, window, softcap)[0]
    return FlashAttnFunction.apply(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale, window, softcap, heads_first)


# ----------------------------------------------------------------------------------------------------------
# validation, support check, functional entries


def _check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, varlen: bool) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        dispatch.check_floating(name, t)
    dispatch.check_same_device(q=q, k=k, v=v)
    nd = 3 if varlen else 4
    layout = "[total, heads, head_dim]" if varlen else "[batch, seq, heads, head_dim]"
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != nd:
            raise ValueError(f"{name} must be {nd}-D {layout}, got shape {tuple(t.shape)}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k, v must share one dtype, got q {q.dtype}, k {k.dtype}, v {v.dtype}")
    d = q.shape[-1]
    dispatch.check_shape("v", v, tuple(k.shape))
    if k.shape[-1] != d:
        raise ValueError(f"k must have head_dim {d} like q, expected shape "
                         f"{tuple(k.shape[:-1]) + (d,)}, got {tuple(k.shape)}")
    heads, kv_heads = q.shape[-2], k.shape[-2]
    if kv_heads == 0 or heads % kv_heads != 0:
        raise ValueError(f"q heads ({heads}) must be a multiple of k/v heads ({kv_heads}); "
                         f"k has shape {tuple(k.shape)}")
    if not varlen and k.shape[0] != q.shape[0]:
        raise ValueError(f"k must have batch {q.shape[0]} like q, got shape {tuple(k.shape)}")


def attention_supported(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout: float = 0.0,
                        **kwargs) -> tuple[bool, str]:
    """Can the Triton kernel run this call? ``(ok, reason)``; the transformers integration falls back to
    SDPA when not ok. q: [..., heads, head_dim]; extra keyword arguments (e.g. an unsupported mask kind)
    with a non-None value make the call unsupported, naming the argument."""
    if dropout and dropout > 0.0:
        return False, f"dropout={dropout} > 0 is not implemented in the kernel"
    ok, why = dispatch.device_check((q, k, v), KERNEL_DTYPES)
    if not ok:
        return ok, why
    d = q.shape[-1]
    if d not in SUPPORTED_HEAD_DIMS:
        return False, f"head_dim {d} is not supported (supported: {SUPPORTED_HEAD_DIMS})"
    for key, val in kwargs.items():
        if val is not None:
            return False, f"argument {key} is not supported by the kernel"
    return True, ""


def _norm_opts(d: int, scale: float | None, sliding_window: int | None, softcap: float | None):
    scale = float(scale) if scale is not None else 1.0 / math.sqrt(d)
    window = int(sliding_window) if sliding_window is not None and sliding_window > 0 else 0
    cap = float(softcap) if softcap is not None and softcap > 0 else 0.0
    return scale, window, cap


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = True,
                    scale: float | None = None, sliding_window: int | None = None, softcap: float | None = None,
                    require_kernel: bool = False) -> torch.Tensor:
    """Fused attention. q: [batch, q_len, heads, head_dim]; k, v: [batch, k_len, kv_heads, head_dim], bf16/fp16
    (fp32 falls back to the reference), any strides with unit head_dim stride preferred.

    Returns [batch, q_len, heads, head_dim] contiguous in q.dtype. Causal is aligned bottom-right; query head
    h reads kv head ``h // (heads // kv_heads)``; ``sliding_window`` W lets a query see keys with
    ``0 <= q_pos - k_pos < W``; ``softcap`` c applies ``c * tanh(s / c)`` after scaling.
    ``require_kernel=True`` raises ValueError instead of falling back.
    """
    _check_qkv(q, k, v, varlen=False)
    scale_, window, cap = _norm_opts(q.shape[-1], scale, sliding_window, softcap)
    check = attention_supported(q, k, v)
    if require_kernel and not check[0]:
        raise ValueError(f"flash_attention cannot run the kernel on q of shape {tuple(q.shape)}: {check[1]}")
    if not dispatch.use_kernel("flash_attention", check):
        o = reference.attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=causal,
                                scale=scale_, sliding_window=window or None, softcap=cap or None)
        return o.transpose(1, 2).contiguous()
    return _run(q, k, v, None, None, q.shape[1], k.shape[1], bool(causal), scale_, window, cap)


def flash_attention_heads_first(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, causal: bool,
                                scale: float | None, sliding_window: int | None,
                                softcap: float | None) -> torch.Tensor:
    """``flash_attention`` for a caller that has validated its inputs and had ``attention_supported`` say yes
    (the transformers integration does both per call): no second round of checks. query: [batch, heads, q_len,
    head_dim]; key, value: [batch, kv_heads, k_len, head_dim] bf16/fp16, transformers' layout (the transpose
    happens inside the autograd node). Returns [batch, q_len, heads, head_dim] contiguous, query.dtype."""
    scale_, window, cap = _norm_opts(query.shape[-1], scale, sliding_window, softcap)
    return _run(query, key, value, None, None, query.shape[2], key.shape[2], bool(causal), scale_, window, cap,
                heads_first=True)


_CU_CHECKED: dict = {}


def _check_cu_seqlens(name: str, cu: torch.Tensor, total: int, max_seqlen: int) -> None:
    """cu must be non-decreasing from 0, end at or before ``total`` rows and have no sequence longer than
    ``max_seqlen``; otherwise the kernel would read out of bounds or skip rows. This reads cu on the host
    (one sync for a CUDA tensor), so a result is cached per tensor and version: a model's layers share one
    cu_seqlens tensor per forward, and pay for one check."""
    key = (cu.data_ptr(), cu._version, cu.numel(), total, max_seqlen)
    if _CU_CHECKED.get(name) == key:
        return
    vals = cu.detach().to("cpu", torch.int64)
    if vals.numel() == 0:
        return
    lens = vals[1:] - vals[:-1]
    if int(vals[0]) != 0 or (lens.numel() and int(lens.min()) < 0):
        raise ValueError(f"{name} must start at 0 and be non-decreasing, got {vals.tolist()[:16]}")
    if int(vals[-1]) > total:
        raise ValueError(f"{name}[-1] = {int(vals[-1])} exceeds the {total} rows of its tensor")
    if lens.numel() and int(lens.max()) > max_seqlen:
        raise ValueError(f"a sequence of {int(lens.max())} rows in {name} is longer than its max_seqlen "
                         f"{max_seqlen}")
    _CU_CHECKED[name] = key


def flash_attention_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                           cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int, *, causal: bool = True,
                           scale: float | None = None, sliding_window: int | None = None,
                           softcap: float | None = None, require_kernel: bool = False) -> torch.Tensor:
    """Packed attention. q: [total_q, heads, head_dim]; k, v: [total_k, kv_heads, head_dim]; cu_seqlens_*:
    int32 [n_seq + 1] (sequence i owns rows cu[i]:cu[i+1], lengths may be 0); max_seqlen_*: python ints
    >= the longest sequence. Same features as ``flash_attention``; returns [total_q, heads, head_dim]."""
    _check_qkv(q, k, v, varlen=True)
    for name, cu in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        if not isinstance(cu, torch.Tensor) or cu.dim() != 1 or cu.numel() < 1 or cu.is_floating_point():
            raise ValueError(f"{name} must be an integer tensor of shape [n_seq + 1], got "
                             f"{getattr(cu, 'shape', type(cu).__name__)}")
    if cu_seqlens_k.numel() != cu_seqlens_q.numel():
        raise ValueError(f"cu_seqlens_k must have shape ({cu_seqlens_q.numel()},) like cu_seqlens_q, "
                         f"got {tuple(cu_seqlens_k.shape)}")
    if not torch.compiler.is_compiling():
        _check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, q.shape[0], max_seqlen_q)
        _check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, k.shape[0], max_seqlen_k)
    scale_, window, cap = _norm_opts(q.shape[-1], scale, sliding_window, softcap)
    check = attention_supported(q, k, v)
    if require_kernel and not check[0]:
        raise ValueError(f"flash_attention_varlen cannot run the kernel on q of shape {tuple(q.shape)}: {check[1]}")
    if not dispatch.use_kernel("flash_attention_varlen", check):
        return reference.attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, causal=causal, scale=scale_,
                                          sliding_window=window or None, softcap=cap or None)
    cu_q = cu_seqlens_q.to(device=q.device, dtype=torch.int32)
    cu_k = cu_seqlens_k.to(device=q.device, dtype=torch.int32)
    return _run(q, k, v, cu_q, cu_k, int(max_seqlen_q), int(max_seqlen_k), bool(causal), scale_, window, cap)
