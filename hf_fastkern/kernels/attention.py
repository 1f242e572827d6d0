"""PLACEHOLDER (being replaced by the kernel): attention entry points with their final signatures.

flash_attention: q [batch, q_len, heads, head_dim], k/v [batch, k_len, kv_heads, head_dim] (any strides)
  -> [batch, q_len, heads, head_dim] contiguous.
flash_attention_varlen: q [total_q, heads, head_dim], k/v [total_k, kv_heads, head_dim], cu_seqlens_* int32
  -> [total_q, heads, head_dim].
"""
from hf_fastkern.kernels import reference


def flash_attention(q, k, v, *, causal=True, scale=None, sliding_window=None, softcap=None):
    o = reference.attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=causal, scale=scale,
                            sliding_window=sliding_window, softcap=softcap)
    return o.transpose(1, 2).contiguous()


def flash_attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *, causal=True,
                           scale=None, sliding_window=None, softcap=None):
    return reference.attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, causal=causal, scale=scale,
                                      sliding_window=sliding_window, softcap=softcap)
