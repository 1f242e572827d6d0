"""The split-KV decoding kernel (hf_fastkern/kernels/decode_attention.py) against the fp64 oracle, with PyTorch's
SDPA in the same low precision as the baseline (tests/tolerances.py), and its place in the transformers
integration: KV-cache calls without gradients take it, everything else keeps the FlashAttention-2 kernel.
CPU cases run in Triton's interpreter at tiny sizes; ``gpu`` cases run cache lengths 4K-128K on the device."""
import math

import pytest
import torch
import torch.nn.functional as F

from hf_fastkern.kernels import attention as attn_mod
from hf_fastkern.kernels import decode_attention as dec
from hf_fastkern.kernels import reference
from hf_fastkern.patches import attention as fk
from tests.harness import CallCounter, dtype_ids
from tests.test_attention import _allowed
from tests.tolerances import assert_close

LOW = [torch.bfloat16, torch.float16]


def _visible(sq: int, sk: int, causal: bool, window, key_mask, device) -> torch.Tensor:
    """[b or 1, 1, sq, sk] bool: reference.attention's rule (bottom-right causal, window) and the padding."""
    ok = _allowed(sq, sk, causal, window, device)[None, None]
    if key_mask is not None:
        ok = ok & key_mask[:, None, None, :]
    return ok


def _sdpa(q, k, v, causal, scale, window, softcap, key_mask):
    """PyTorch in the inputs' dtype ([b, h, s, d] in, [b, s, h, d] out); rows that see no key give zeros."""
    group = q.shape[1] // k.shape[1]
    kt, vt = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    ok = _visible(q.shape[2], k.shape[2], causal, window, key_mask, q.device)
    empty = ~ok.any(-1, keepdim=True)
    ok = ok | empty
    if softcap:
        s = (q @ kt.transpose(-1, -2)) * scale
        s = (softcap * torch.tanh(s / softcap)).masked_fill(~ok, float("-inf"))
        o = torch.softmax(s.float(), dim=-1).to(q.dtype) @ vt
    else:
        o = F.scaled_dot_product_attention(q, kt, vt, attn_mask=ok, scale=scale)
    o = torch.where(empty, torch.zeros((), dtype=o.dtype, device=o.device), o)
    return o.transpose(1, 2)


def _check(b, h, hk, sq, sk, d, dtype, device, causal=True, window=None, softcap=None, key_mask=None,
           scale=None, name=""):
    gen = torch.Generator(device="cpu").manual_seed(sk * 31 + sq)
    q, k, v = (torch.randn(b, n, s, d, generator=gen).to(device, dtype)
               for n, s in ((h, sq), (hk, sk), (hk, sk)))
    scale_ = scale if scale is not None else 1.0 / math.sqrt(d)
    out = dec.flash_decode_heads_first(q, k, v, causal=causal, scale=scale, sliding_window=window,
                                       softcap=softcap, key_mask=key_mask)
    assert out.shape == (b, sq, h, d) and out.dtype == dtype and out.is_contiguous()
    oracle = reference.attention(q.double(), k.double(), v.double(), causal=causal, scale=scale_,
                                 sliding_window=window, softcap=softcap, key_padding_mask=key_mask).transpose(1, 2)
    base = _sdpa(q, k, v, causal, scale_, window, softcap, key_mask)
    assert_close(out, oracle, base, dtype, "output", name or f"decode b{b} h{h}/{hk} q{sq} k{sk} d{d}")
    return out


# (b, h, hk, sq, sk, d, opts): odd lengths, GQA/MQA/MHA, every feature, q_len 1..16
CASES = [
    pytest.param((1, 4, 2, 1, 37, 32, {}), id="q1-gqa2-k37"),
    pytest.param((2, 8, 2, 3, 100, 64, {}), id="q3-gqa4-k100-d64"),
    pytest.param((2, 4, 4, 1, 61, 16, {}), id="q1-mha-d16"),
    pytest.param((1, 4, 1, 5, 70, 80, dict(window=20)), id="q5-mqa-window20-d80"),
    pytest.param((2, 4, 2, 2, 90, 32, dict(softcap=5.0, scale=0.2)), id="q2-softcap-scale"),
    pytest.param((2, 6, 2, 16, 50, 32, {}), id="q16-group3"),
    pytest.param((1, 2, 2, 4, 4, 32, {}), id="q4-k4-prefill-like"),
    pytest.param((1, 2, 1, 4, 50, 32, dict(causal=False, window=7)), id="bidirectional-window7"),
    pytest.param((1, 2, 1, 3, 40, 96, dict(causal=False)), id="bidirectional-d96"),
]


@pytest.mark.parametrize("splits", ["one-chunk", "split"])
@pytest.mark.parametrize("dtype", LOW, ids=dtype_ids(LOW))
@pytest.mark.parametrize("case", CASES)
def test_decode_matches_reference(case, dtype, splits, monkeypatch):
    b, h, hk, sq, sk, d, opts = case
    # "split": pretend a GPU of 8 SMs, so the cache is cut into several chunks and combined; "one-chunk": 1 SM
    monkeypatch.setattr(dec, "device_props", lambda device: {"sms": 8 if splits == "split" else 0})
    p = dec.plan(b, hk, h // hk, sq, sk, d, opts.get("window") or 0, torch.device("cpu"))
    assert (p["splits"] > 1) == (splits == "split") or sk <= p["BLOCK_N"]
    _check(b, h, hk, sq, sk, d, dtype, "cpu", **opts)


@pytest.mark.parametrize("splits", ["one-chunk", "split"])
@pytest.mark.parametrize("dtype", LOW, ids=dtype_ids(LOW))
def test_decode_padding_mask(dtype, splits, monkeypatch):
    """Left padding, holes, a row with no real key (zeros), and a window over a padded row: the mask is read
    in the kernel, positions stay cache indices (transformers' masks measure the window the same way)."""
    monkeypatch.setattr(dec, "device_props", lambda device: {"sms": 8 if splits == "split" else 0})
    sk = 60
    left = torch.arange(sk)[None, :] >= torch.tensor([0, 10, 59])[:, None]
    _check(3, 4, 2, 1, sk, 32, dtype, "cpu", key_mask=left, name="left padding")
    holes = torch.rand(3, sk, generator=torch.Generator().manual_seed(1)) > 0.3
    holes[1] = False
    holes[2, -1] = True
    out = _check(3, 4, 2, 2, sk, 32, dtype, "cpu", key_mask=holes, window=9, name="holes + window")
    assert torch.count_nonzero(out[1]) == 0


def test_decode_many_chunks_combined_in_blocks(monkeypatch):
    """More chunks than the combine kernel reads per step (COMBINE_BLOCK_S): it walks them in blocks."""
    monkeypatch.setattr(dec, "device_props", lambda device: {"sms": 64})
    p = dec.plan(1, 1, 2, 1, 600, 32, 0, torch.device("cpu"))
    assert p["splits"] > 2 * dec.COMBINE_BLOCK_S
    _check(1, 2, 1, 1, 600, 32, torch.bfloat16, "cpu", name=f"{p['splits']} chunks")


def test_bad_input_raises():
    q = torch.randn(2, 4, 1, 32, dtype=torch.bfloat16)
    k = torch.randn(2, 2, 9, 32, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="key_mask must have shape"):
        dec.flash_decode_heads_first(q, k, k, key_mask=torch.ones(2, 8, dtype=torch.bool))
    with pytest.raises(ValueError, match="key must have shape"):
        dec.flash_decode_heads_first(q, torch.randn(2, 3, 9, 32, dtype=torch.bfloat16),
                                     torch.randn(2, 3, 9, 32, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="one shape"):
        dec.flash_decode_heads_first(q, k, k[:, :, :5])


def test_plan_splits_the_cache_over_the_sms():
    """About two programs per SM, chunks a multiple of the key block, never more chunks than key blocks;
    the window's first block is where the chunks start."""
    cpu = torch.device("cpu")
    real = dec.device_props
    try:
        dec.device_props = lambda device: {"sms": 132}
        p = dec.plan(1, 8, 4, 1, 32768, 128, 0, cpu)
        assert p["splits"] * 8 >= 2 * 132 - 8 and p["chunk"] % p["BLOCK_N"] == 0
        assert p["splits"] * p["chunk"] >= 32768 > (p["splits"] - 1) * p["chunk"]
        p = dec.plan(16, 8, 4, 1, 4096, 128, 0, cpu)  # 128 programs already: few chunks
        assert p["splits"] <= 3
        p = dec.plan(1, 8, 4, 1, 20, 128, 0, cpu)
        assert p["splits"] == dec.cdiv(20, p["BLOCK_N"])
        p = dec.plan(1, 8, 4, 1, 10000, 128, 4096, cpu)
        assert p["k_base"] == ((10000 - 4096) // p["BLOCK_N"]) * p["BLOCK_N"]
        assert p["k_base"] + p["splits"] * p["chunk"] >= 10000
        p = dec.plan(1, 1, 4, 16, 500, 64, 0, cpu)  # 4 query heads x 16 queries: 64 rows
        assert 16 <= p["BLOCK_M"] <= dec.MAX_BLOCK_M and p["m_tiles"] * p["BLOCK_M"] >= 64
    finally:
        dec.device_props = real


def test_decode_supported_reasons():
    q = torch.randn(1, 2, 1, 32, dtype=torch.bfloat16)
    k = torch.randn(1, 2, 9, 32, dtype=torch.bfloat16)
    assert dec.decode_supported(q, k, k) == (True, "")
    assert not dec.decode_supported(q.float(), k.float(), k.float())[0]
    ok, why = dec.decode_supported(torch.randn(1, 2, 17, 32, dtype=torch.bfloat16), k, k)
    assert not ok and "q_len 17" in why
    ok, why = dec.decode_supported(torch.randn(1, 2, 1, 48, dtype=torch.bfloat16),
                                   torch.randn(1, 2, 9, 48, dtype=torch.bfloat16),
                                   torch.randn(1, 2, 9, 48, dtype=torch.bfloat16))
    assert not ok and "head_dim 48" in why


def test_zero_length_cache_gives_zeros():
    q = torch.randn(2, 4, 1, 32, dtype=torch.bfloat16)
    k = torch.randn(2, 2, 0, 32, dtype=torch.bfloat16)
    out = dec.flash_decode_heads_first(q, k, k)
    assert out.shape == (2, 1, 4, 32) and torch.count_nonzero(out) == 0


# ----------------------------------------------------------------------------------------------------------
# the transformers integration: who takes a KV-cache call


def _call(q, k, v, mask=None):
    mod = torch.nn.Module()
    mod.is_causal = True
    return fk.fastkern_attention_forward(mod, q, k, v, mask, scaling=q.shape[-1] ** -0.5)[0]


def test_integration_routes_kv_cache_calls_without_grad(monkeypatch):
    """No gradients and 1-16 queries against more keys: the split-KV kernel; with gradients, or as many queries
    as keys, the FlashAttention-2 kernel (same answer within the table)."""
    spy_dec = CallCounter(dec.flash_decode_heads_first)
    spy_fa = CallCounter(attn_mod.flash_attention_heads_first)
    monkeypatch.setattr(dec, "flash_decode_heads_first", spy_dec)
    monkeypatch.setattr(attn_mod, "flash_attention_heads_first", spy_fa)
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 1, 32, generator=gen).bfloat16()
    k = torch.randn(2, 2, 33, 32, generator=gen).bfloat16()
    v = torch.randn(2, 2, 33, 32, generator=gen).bfloat16()
    with torch.no_grad():
        a = _call(q, k, v)
    assert (spy_dec.calls, spy_fa.calls) == (1, 0)
    b = _call(q.requires_grad_(), k, v)
    assert (spy_dec.calls, spy_fa.calls) == (1, 1)
    _call(q.detach(), k, v.requires_grad_())  # only v needs a gradient: still the FA2 kernel
    assert (spy_dec.calls, spy_fa.calls) == (1, 2)
    q, v = q.detach(), v.detach()
    oracle = reference.attention(q.double(), k.double(), v.double(), causal=True).transpose(1, 2)
    assert_close(a, oracle, b.detach(), torch.bfloat16, "output", "decode path vs FA2 path")
    with torch.no_grad():
        _call(torch.randn(2, 4, 33, 32, generator=gen).bfloat16(), k, v)  # prefill: not decoding
    assert spy_dec.calls == 1


@pytest.mark.parametrize("window", [None, 9], ids=["no-window", "window9"])
def test_integration_padded_decode_matches_reference(window, monkeypatch):
    """A padded batch's cached step (left padding and a hole) through the integration, with and without a
    window shorter than the cache: the decode kernel runs and matches the oracle with SDPA's same-dtype error
    (the path unpatched transformers takes) as the baseline."""
    spy = CallCounter(dec.flash_decode_heads_first)
    monkeypatch.setattr(dec, "flash_decode_heads_first", spy)
    gen = torch.Generator().manual_seed(5)
    q = torch.randn(2, 4, 2, 32, generator=gen).bfloat16()
    k = torch.randn(2, 2, 40, 32, generator=gen).bfloat16()
    v = torch.randn(2, 2, 40, 32, generator=gen).bfloat16()
    mask = torch.ones(2, 40, dtype=torch.bool)
    mask[1, :6] = False
    mask[0, 30] = False
    mod = torch.nn.Module()
    mod.is_causal = True
    with torch.no_grad():
        out = fk.fastkern_attention_forward(mod, q, k, v, mask, scaling=32 ** -0.5, sliding_window=window)[0]
    assert spy.calls == 1
    oracle = reference.attention(q.double(), k.double(), v.double(), causal=True, sliding_window=window,
                                 key_padding_mask=mask).transpose(1, 2)
    base = _sdpa(q, k, v, True, 32 ** -0.5, window, None, mask)
    assert_close(out, oracle, base, torch.bfloat16, "output", f"padded decode window={window}")


@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_generate_left_padded_runs_the_decode_kernel(arch, monkeypatch):
    """generate() with left padding: every step after the prompt goes through the split-KV kernel, and the
    greedy tokens equal unpatched sdpa's."""
    from tests.test_patch_attention import VOCAB, model_pair

    spy = CallCounter(dec.flash_decode_heads_first)
    monkeypatch.setattr(dec, "flash_decode_heads_first", spy)
    ref, fast = model_pair(arch)
    ref, fast = ref.to(torch.bfloat16), fast.to(torch.bfloat16)
    ids = torch.randint(1, VOCAB, (2, 7), generator=torch.Generator().manual_seed(3))
    am = torch.ones_like(ids)
    am[1, :3] = 0
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=None)
    a = ref.generate(ids, attention_mask=am, **kw)
    b = fast.generate(ids, attention_mask=am, **kw)
    layers = fast.config.num_hidden_layers
    assert spy.calls == 5 * layers, f"{spy.calls} decode calls for 5 cached steps x {layers} layers"
    assert torch.equal(a, b), f"{arch}: sdpa {a[:, 7:].tolist()} vs fastkern {b[:, 7:].tolist()}"


# ----------------------------------------------------------------------------------------------------------
# GPU: real cache lengths (issue 22's decode grid)

GPU_CASES = [
    pytest.param((1, 32, 8, 1, 4096, 128, {}), id="b1-q1-4k-gqa"),
    pytest.param((16, 32, 8, 1, 4096, 128, {}), id="b16-q1-4k-gqa"),
    pytest.param((1, 32, 8, 1, 32768, 128, {}), id="b1-q1-32k-gqa"),
    pytest.param((1, 32, 8, 16, 32768, 128, {}), id="b1-q16-32k-gqa"),
    pytest.param((1, 32, 8, 1, 131072, 128, {}), id="b1-q1-128k-gqa"),
    pytest.param((4, 16, 16, 1, 8191, 256, dict(softcap=50.0)), id="b4-d256-softcap-odd"),
    pytest.param((2, 32, 8, 4, 20000, 128, dict(window=4096)), id="b2-q4-window4096"),
    pytest.param((2, 32, 32, 1, 5000, 64, {}), id="b2-mha-d64"),
]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", LOW, ids=dtype_ids(LOW))
@pytest.mark.parametrize("case", GPU_CASES)
def test_gpu_decode_matches_reference(case, dtype):
    b, h, hk, sq, sk, d, opts = case
    _check(b, h, hk, sq, sk, d, dtype, "cuda", **opts)


@pytest.mark.gpu
def test_gpu_decode_left_padded_batch():
    sk = 4099
    mask = torch.arange(sk, device="cuda")[None, :] >= torch.tensor([0, 7, 1000, 4098], device="cuda")[:, None]
    _check(4, 32, 8, 1, sk, 128, torch.bfloat16, "cuda", key_mask=mask, name="left padded b4")
