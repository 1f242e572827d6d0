"""flash_attention / flash_attention_varlen against the fp64 oracle (kernels/reference.py), with PyTorch's
SDPA in the same low precision as the baseline (FlashAttention's rule: our error <= 2x/3x SDPA's error,
tests/tolerances.py). CPU cases run the Triton kernels in the interpreter at tiny sizes; `gpu` cases run
real sizes on the device."""
import math
import warnings

import pytest
import torch
import torch.nn.functional as F

from hf_fastkern.kernels import attention as attn_mod
from hf_fastkern.kernels import dispatch, reference
from hf_fastkern.kernels.attention import (
    FlashAttnFunction,
    _flash_attn_fwd_op,
    attention_supported,
    flash_attention,
    flash_attention_heads_first,
    flash_attention_varlen,
)
from tests.harness import (
    BF,
    ERROR_CASES,
    HUGE_DEV,
    HUGE_SIZES,
    I32,
    LOW,
    VIEW_IDS,
    ZERO_IDS,
    case_ids,
    case_params,
    check_bitwise_case,
    check_error_case,
    check_op,
    check_view_case,
    check_zero_length_case,
    dtype_ids,
    huge_randn,
    huge_slices,
    huge_sync,
    kw_if_supported,
)
from tests.tolerances import assert_close

DTYPES = [pytest.param(torch.bfloat16, id="bf16"), pytest.param(torch.float16, id="fp16")]


# ----------------------------------------------------------------------------------------------------------
# same-dtype baselines (PyTorch's own low-precision attention) and the fp64 oracle, in [B, S, H, D] layout


def _allowed(sq: int, sk: int, causal: bool, window, device) -> torch.Tensor:
    """[sq, sk] bool visibility, the same rule as reference.attention (bottom-right causal, window)."""
    q_pos = torch.arange(sq, device=device)[:, None] + (sk - sq)
    k_pos = torch.arange(sk, device=device)[None, :]
    ok = torch.ones(sq, sk, dtype=torch.bool, device=device)
    if causal:
        ok &= k_pos <= q_pos
    if window:
        ok &= (q_pos - k_pos) < window
        if not causal:
            ok &= (k_pos - q_pos) < window
    return ok


def _sdpa_bshd(q, k, v, causal=True, scale=None, window=None, softcap=None):
    """SDPA (or eager when softcapped: SDPA has no softcap) in the inputs' dtype. Rows that see no key are
    unmasked for the computation and zeroed after, so the baseline has no NaN (and zero grads there)."""
    b, sq, h, d = q.shape
    sk, hk = k.shape[1], k.shape[2]
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    kt = kt.repeat_interleave(h // hk, dim=1)
    vt = vt.repeat_interleave(h // hk, dim=1)
    ok = _allowed(sq, sk, causal, window, q.device)
    empty = ~ok.any(-1, keepdim=True)  # [sq, 1]
    ok = ok | empty
    scale = scale if scale is not None else 1.0 / math.sqrt(d)
    if softcap:
        s = (qt @ kt.transpose(-1, -2)) * scale
        s = softcap * torch.tanh(s / softcap)
        s = s.masked_fill(~ok, float("-inf"))
        o = torch.softmax(s.float(), dim=-1).to(q.dtype) @ vt
    else:
        o = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=ok, scale=scale)
    o = torch.where(empty, torch.zeros((), dtype=o.dtype, device=o.device), o)
    return o.transpose(1, 2)


def _ref_bshd(q, k, v, causal=True, scale=None, window=None, softcap=None):
    o = reference.attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=causal, scale=scale,
                            sliding_window=window, softcap=softcap)
    return o.transpose(1, 2)


def _make(b, sq, sk, h, hk, d, dtype, device, layout="bshd"):
    """q/k/v in [B, S, H, D]; layout "bhsd" gives transposed views of [B, H, S, D] storage (what
    transformers hands over)."""
    def one(s, heads):
        if layout == "bhsd":
            return torch.randn(b, heads, s, d, device=device).to(dtype).transpose(1, 2)
        return torch.randn(b, s, heads, d, device=device).to(dtype)
    return one(sq, h), one(sk, hk), one(sk, hk)


def _check_dense(b, sq, sk, h, hk, d, dtype, device, causal=True, scale=None, window=None, softcap=None,
                 layout="bshd", name=""):
    q, k, v = _make(b, sq, sk, h, hk, d, dtype, device, layout)
    opts = dict(causal=causal, scale=scale, window=window, softcap=softcap)
    check_op(lambda q, k, v: flash_attention(q, k, v, causal=causal, scale=scale, sliding_window=window,
                                             softcap=softcap, require_kernel=True),
             lambda q, k, v: _ref_bshd(q, k, v, **opts), [q, k, v], dtype, name=name,
             baseline_fn=lambda q, k, v: _sdpa_bshd(q, k, v, **opts))


# ----------------------------------------------------------------------------------------------------------
# dense: every feature, forward and dq/dk/dv, bf16 and fp16 (tiny sizes: the interpreter is slow)

DENSE_CASES = [
    # id: (b, sq, sk, h, hk, d, opts)
    pytest.param((2, 37, 37, 2, 2, 32, dict(causal=True)), id="causal-mha-odd"),
    pytest.param((1, 45, 45, 2, 2, 64, dict(causal=False)), id="bidirectional-d64"),
    pytest.param((1, 40, 40, 4, 1, 16, dict(causal=True)), id="mqa-4to1-d16"),
    pytest.param((1, 33, 33, 4, 2, 32, dict(causal=True, window=9)), id="gqa-window9"),
    pytest.param((1, 30, 30, 2, 1, 32, dict(causal=False, window=7)), id="bidir-window7"),
    pytest.param((1, 29, 29, 2, 2, 32, dict(causal=True, softcap=4.0, scale=0.3)), id="softcap-scale"),
    pytest.param((2, 9, 47, 2, 1, 32, dict(causal=True)), id="decode-q9-k47"),
    pytest.param((1, 1, 40, 4, 2, 64, dict(causal=True)), id="decode-q1"),
    pytest.param((1, 1, 40, 2, 1, 32, dict(causal=True, window=16)), id="decode-q1-window"),
    pytest.param((1, 40, 19, 2, 1, 32, dict(causal=True)), id="q-longer-than-k-empty-rows"),
    pytest.param((1, 35, 35, 2, 1, 32, dict(causal=True, layout="bhsd")), id="transposed-bhsd-views"),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", DENSE_CASES)
def test_flash_attention(case, dtype, device):
    b, sq, sk, h, hk, d, opts = case
    opts = dict(opts)
    layout = opts.pop("layout", "bshd")
    _check_dense(b, sq, sk, h, hk, d, dtype, device, layout=layout, name=f"{case}", **opts)


@pytest.mark.parametrize("d", [80, 96])
def test_flash_attention_padded_head_dim(d, device):
    """head_dim 80/96 run with HEAD_DIM_PAD=128 and masked columns."""
    _check_dense(1, 21, 21, 2, 1, d, torch.bfloat16, device, causal=True, name=f"d{d}")


def test_flash_attention_empty_rows_zero(device):
    """Regression (fully masked rows): q_len > k_len with causal gives rows that see no key: zeros and zero
    gradients, never NaN."""
    q, k, v = _make(1, 24, 8, 2, 1, 32, torch.float16, device)
    q.requires_grad_(True)
    k.requires_grad_(True)
    v.requires_grad_(True)
    o = flash_attention(q, k, v, causal=True, require_kernel=True)
    o.float().sum().backward()
    assert torch.isfinite(o).all() and torch.isfinite(q.grad).all()
    assert torch.isfinite(k.grad).all() and torch.isfinite(v.grad).all()
    assert (o[:, :16] == 0).all() and (q.grad[:, :16] == 0).all()
    assert o[:, 16:].abs().sum() > 0


# ----------------------------------------------------------------------------------------------------------
# varlen


def _cu(lengths, device):
    return torch.tensor([0] + list(torch.tensor(lengths).cumsum(0).tolist()), dtype=torch.int32, device=device)


def _sdpa_varlen(q, k, v, cu_q, cu_k, **opts):
    outs = []
    cq, ck = cu_q.tolist(), cu_k.tolist()
    for i in range(len(cq) - 1):
        qs, qe, ks, ke = cq[i], cq[i + 1], ck[i], ck[i + 1]
        if qe == qs:
            continue
        if ke == ks:
            outs.append(torch.zeros_like(q[qs:qe]) * q[qs:qe])
            continue
        outs.append(_sdpa_bshd(q[None, qs:qe], k[None, ks:ke], v[None, ks:ke], **opts)[0])
    return torch.cat(outs, 0)


VARLEN_CASES = [
    pytest.param(([5, 0, 33, 1, 17], None, 2, 2, 32, dict(causal=True)), id="causal-mixed-with-0-and-1"),
    pytest.param(([12, 30, 7], None, 4, 1, 16, dict(causal=False)), id="bidir-mqa"),
    pytest.param(([20, 3, 26], None, 4, 2, 32, dict(causal=True, window=6, softcap=3.0)), id="gqa-window-softcap"),
    pytest.param(([1, 4, 0, 2], [9, 20, 5, 0], 2, 1, 32, dict(causal=True)), id="decode-kv-cache"),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", VARLEN_CASES)
def test_flash_attention_varlen(case, dtype, device):
    lq, lk, h, hk, d, opts = case
    lk = lk or lq
    cu_q, cu_k = _cu(lq, device), _cu(lk, device)
    q = torch.randn(sum(lq), h, d, device=device).to(dtype)
    k = torch.randn(sum(lk), hk, d, device=device).to(dtype)
    v = torch.randn(sum(lk), hk, d, device=device).to(dtype)
    window, softcap, causal = opts.get("window"), opts.get("softcap"), opts["causal"]
    check_op(lambda q, k, v: flash_attention_varlen(q, k, v, cu_q, cu_k, max(lq), max(lk), causal=causal,
                                                    sliding_window=window, softcap=softcap,
                                                    require_kernel=True),
             lambda q, k, v: reference.attention_varlen(q, k, v, cu_q, cu_k, causal=causal, sliding_window=window,
                                                        softcap=softcap),
             [q, k, v], dtype, name=str(case),
             baseline_fn=lambda q, k, v: _sdpa_varlen(q, k, v, cu_q, cu_k, causal=causal, window=window,
                                                      softcap=softcap))


def test_flash_attention_varlen_matches_dense(device):
    """Packing two equal-length sequences gives exactly the dense batch result (same kernels, same tiles)."""
    q, k, v = _make(2, 24, 24, 2, 1, 32, torch.float16, device)
    dense = flash_attention(q, k, v, causal=True, require_kernel=True)
    cu = _cu([24, 24], device)
    packed = flash_attention_varlen(q.reshape(48, 2, 32), k.reshape(48, 1, 32), v.reshape(48, 1, 32), cu, cu, 24,
                                    24, causal=True, require_kernel=True)
    torch.testing.assert_close(packed.reshape(2, 24, 2, 32), dense, rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------------------
# dispatch, fallbacks, bad input, torch.compile


def test_fp32_falls_back_to_reference_with_warning(device):
    dispatch.reset_warnings()
    q, k, v = _make(1, 10, 10, 2, 1, 16, torch.float32, device)
    ok, reason = attention_supported(q, k, v)
    assert not ok and "float32" in reason
    with pytest.warns(dispatch.FastKernFallbackWarning, match="flash_attention"):
        o = flash_attention(q, k, v, causal=True)
    assert_close(o, _ref_bshd(q.double(), k.double(), v.double()), None, torch.float32)
    with pytest.raises(ValueError, match="cannot run the kernel"):
        flash_attention(q, k, v, require_kernel=True)


def test_attention_supported_reasons(device):
    q, k, v = _make(1, 8, 8, 2, 1, 16, torch.bfloat16, device)
    assert attention_supported(q, k, v) == (True, "")
    assert not attention_supported(q, k, v, dropout=0.1)[0]
    assert "head_dim" in attention_supported(*_make(1, 8, 8, 2, 1, 48, torch.bfloat16, device))[1]
    assert "attention_mask" in attention_supported(q, k, v, attention_mask=torch.ones(1))[1]


def test_unsupported_head_dim_falls_back(device):
    dispatch.reset_warnings()
    q, k, v = _make(1, 8, 8, 2, 1, 24, torch.float16, device)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        o = flash_attention(q, k, v)
    assert any("head_dim 24" in str(x.message) for x in w)
    assert o.shape == q.shape


@pytest.mark.parametrize("bad, match", [
    ("dtype", "share one dtype"),
    ("head_dim", "head_dim"),
    ("heads", "multiple of k/v heads"),
    ("v_shape", "v must have shape"),
    ("ndim", "4-D"),
])
def test_flash_attention_bad_input(bad, match, device):
    q, k, v = _make(1, 8, 8, 4, 2, 16, torch.float16, device)
    if bad == "dtype":
        k = k.to(torch.bfloat16)
    elif bad == "head_dim":
        k = torch.randn(1, 8, 2, 32, device=device, dtype=torch.float16)
        v = k.clone()
    elif bad == "heads":
        k = torch.randn(1, 8, 3, 16, device=device, dtype=torch.float16)
        v = k.clone()
    elif bad == "v_shape":
        v = v[:, :5]
    elif bad == "ndim":
        q = q[0]
    with pytest.raises(ValueError, match=match):
        flash_attention(q, k, v)


def test_flash_attention_varlen_bad_cu_seqlens(device):
    q = torch.randn(10, 2, 16, device=device, dtype=torch.float16)
    with pytest.raises(ValueError, match="cu_seqlens_k"):
        flash_attention_varlen(q, q, q, _cu([4, 6], device), _cu([10], device), 6, 10)


def test_custom_op_opcheck_and_compile(device):
    """The custom ops pass torch.library.opcheck (schema, fake, autograd) and torch.compile traces through
    them with fullgraph=True (aot_eager: no C++ toolchain needed on the CPU)."""
    q, k, v = _make(1, 16, 16, 2, 1, 16, torch.float16, device)
    q, k, v = (t.requires_grad_(True) for t in (q, k, v))
    torch.library.opcheck(_flash_attn_fwd_op, (q, k, v, None, None, 16, 16, True, 0.25, 0, 0.0),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
    fn = torch.compile(lambda q, k, v: flash_attention(q, k, v, causal=True), backend="aot_eager",
                       fullgraph=True)
    o = fn(q, k, v)
    o.float().sum().backward()
    eager = flash_attention(q.detach(), k.detach(), v.detach(), causal=True)
    torch.testing.assert_close(o, eager, rtol=0, atol=0)
    assert q.grad is not None and k.grad is not None and v.grad is not None


# ----------------------------------------------------------------------------------------------------------
# eager autograd.Function path vs the custom ops (host cost, issues 6/7): same launchers, so bitwise equal


def _fwd_bwd(fn, leaves, dout):
    leaves = [t.detach().clone().requires_grad_(True) for t in leaves]
    out = fn(*leaves)
    out.backward(dout)
    return out.detach(), [t.grad for t in leaves]


def _assert_function_matches_custom_op(q, k, v, dout, args):
    """The eager autograd.Function and the custom op (what torch.compile traces) give the same bits, forward and
    every gradient. args: (cu_q, cu_k, max_q, max_k, causal, scale, window, softcap)."""
    o1, g1 = _fwd_bwd(lambda q, k, v: FlashAttnFunction.apply(q, k, v, *args, False), (q, k, v), dout)
    o2, g2 = _fwd_bwd(lambda q, k, v: _flash_attn_fwd_op(q, k, v, *args)[0], (q, k, v), dout)
    assert torch.equal(o1, o2)
    for a, b in zip(g1, g2):
        assert torch.equal(a, b)


@pytest.mark.parametrize("opts", [pytest.param((True, 0, 0.0), id="causal"),
                                  pytest.param((True, 5, 0.0), id="window5"),
                                  pytest.param((False, 0, 20.0), id="bidir-softcap")])
def test_eager_function_matches_custom_op_bitwise(opts, device):
    causal, window, cap = opts
    q, k, v = _make(2, 19, 19, 4, 2, 16, torch.bfloat16, device)
    dout = torch.randn(q.shape, device=device).to(q.dtype)
    _assert_function_matches_custom_op(q, k, v, dout, (None, None, 19, 19, causal, 0.25, window, cap))


def test_eager_function_matches_custom_op_bitwise_varlen(device):
    lens = [5, 0, 17]
    cu = _cu(lens, device)
    q = torch.randn(22, 4, 16, device=device).to(torch.float16)
    k = torch.randn(22, 2, 16, device=device).to(torch.float16)
    v = torch.randn(22, 2, 16, device=device).to(torch.float16)
    dout = torch.randn(q.shape, device=device).to(q.dtype)
    _assert_function_matches_custom_op(q, k, v, dout, (cu, cu, 17, 17, True, 0.25, 0, 0.0))


def test_heads_first_is_one_node_and_matches_flash_attention(device):
    """transformers' [b, h, s, d] layout goes in as it is: one autograd node straight to the leaves (no
    transpose nodes), and the same bits as flash_attention on the transposed views."""
    qh = torch.randn(1, 4, 13, 16, device=device).to(torch.bfloat16).requires_grad_(True)
    kh = torch.randn(1, 2, 13, 16, device=device).to(torch.bfloat16).requires_grad_(True)
    vh = torch.randn(1, 2, 13, 16, device=device).to(torch.bfloat16).requires_grad_(True)
    out = flash_attention_heads_first(qh, kh, vh, True, None, None, None)
    assert type(out.grad_fn).__name__ == "FlashAttnFunctionBackward"
    assert all(type(f).__name__ == "AccumulateGrad" for f, _ in out.grad_fn.next_functions[:3])
    dout = torch.randn(out.shape, device=device).to(out.dtype)
    o1, g1 = _fwd_bwd(lambda q, k, v: flash_attention_heads_first(q, k, v, True, None, None, None),
                      (qh, kh, vh), dout)
    o2, g2 = _fwd_bwd(lambda q, k, v: flash_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)),
                      (qh, kh, vh), dout)
    assert torch.equal(o1, o2) and o1.shape == (1, 13, 4, 16)
    for a, b in zip(g1, g2):
        assert a.shape == b.shape and torch.equal(a, b)


def test_tuned_launch_remembers_config(device):
    """After the first launch of an autotune key, later launches skip the autotuner with its chosen config."""
    q, k, v = _make(1, 21, 21, 2, 1, 32, torch.float16, device)
    key = (32, True, False, False, False, attn_mod._seq_bucket(21), torch.float16)
    first = flash_attention(q, k, v)
    assert attn_mod._FWD.chosen(key) is not None
    assert torch.equal(flash_attention(q, k, v), first)


def test_heads_first_compiles(device):
    """While torch.compile traces, the heads-first entry goes through the custom op (fullgraph, aot_eager)
    and gives the eager Function's bits."""
    qh = torch.randn(1, 4, 16, 16, device=device).to(torch.float16).requires_grad_(True)
    kh = torch.randn(1, 2, 16, 16, device=device).to(torch.float16).requires_grad_(True)
    vh = torch.randn(1, 2, 16, 16, device=device).to(torch.float16).requires_grad_(True)
    fn = torch.compile(lambda q, k, v: flash_attention_heads_first(q, k, v, True, 0.25, None, None),
                       backend="aot_eager", fullgraph=True)
    dout = torch.randn(1, 16, 4, 16, device=device).to(torch.float16)
    o1, g1 = _fwd_bwd(fn, (qh, kh, vh), dout)
    o2, g2 = _fwd_bwd(lambda q, k, v: flash_attention_heads_first(q, k, v, True, 0.25, None, None),
                      (qh, kh, vh), dout)
    assert torch.equal(o1, o2)
    for a, b in zip(g1, g2):
        assert torch.equal(a, b)


# ----------------------------------------------------------------------------------------------------------
# GPU: real sizes (run on the device with `pytest -m gpu`)

GPU_CASES = [
    pytest.param((2, 2048, 2048, 32, 8, 128, dict(causal=True)), id="gqa32-8-d128-2k"),
    pytest.param((1, 4096, 4096, 8, 8, 64, dict(causal=True)), id="d64-4k"),
    pytest.param((1, 2048, 2048, 8, 2, 256, dict(causal=True)), id="d256-2k"),
    pytest.param((1, 1024, 1024, 4, 4, 96, dict(causal=False)), id="d96-bidir"),
    pytest.param((1, 4096, 4096, 8, 2, 128, dict(causal=True, window=1000)), id="window1000-4k"),
    pytest.param((1, 3000, 3000, 4, 4, 80, dict(causal=True, softcap=30.0)), id="d80-softcap-odd"),
    pytest.param((4, 1, 4097, 32, 8, 128, dict(causal=True)), id="decode-q1-k4097"),
    pytest.param((1, 16384, 16384, 2, 1, 128, dict(causal=True)), id="16k-causal"),
]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", GPU_CASES)
def test_flash_attention_gpu(case, dtype):
    b, sq, sk, h, hk, d, opts = case
    if sq >= 16384 and dtype == torch.float16:
        pytest.skip("one dtype at 16K keeps the fp64 oracle within the time budget")
    _check_dense(b, sq, sk, h, hk, d, dtype, "cuda", name=str(case), **opts)
    torch.cuda.empty_cache()


@pytest.mark.gpu
def test_eager_function_tuned_launch_matches_custom_op_gpu():
    """On the device: the first eager call autotunes, later ones launch the remembered configs directly
    (TunedLaunch); both give the custom op's bits, forward and backward, in transformers' layout (the 1B
    model's attention shape, batch 4 x 512)."""
    torch.manual_seed(0)
    qh = torch.randn(4, 32, 512, 64, device="cuda", dtype=torch.bfloat16)
    kh = torch.randn(4, 8, 512, 64, device="cuda", dtype=torch.bfloat16)
    vh = torch.randn(4, 8, 512, 64, device="cuda", dtype=torch.bfloat16)
    dout = torch.randn(4, 512, 32, 64, device="cuda", dtype=torch.bfloat16)
    runs = [_fwd_bwd(lambda q, k, v: flash_attention_heads_first(q, k, v, True, None, None, None),
                     (qh, kh, vh), dout) for _ in range(3)]
    runs.append(_fwd_bwd(lambda q, k, v: _flash_attn_fwd_op(q.transpose(1, 2), k.transpose(1, 2),
                                                            v.transpose(1, 2), None, None, 512, 512, True,
                                                            64 ** -0.5, 0, 0.0)[0], (qh, kh, vh), dout))
    o0, g0 = runs[0]
    for o, g in runs[1:]:
        assert torch.equal(o, o0)
        for a, b in zip(g, g0):
            assert torch.equal(a, b)
    key = (64, True, False, False, False, attn_mod._seq_bucket(512), torch.bfloat16)
    assert attn_mod._FWD.chosen(key) is not None and attn_mod._DQ.chosen(key + (torch.bfloat16,)) is not None


@pytest.mark.gpu
@pytest.mark.parametrize("window", [None, 512], ids=["causal", "window512"])
def test_flash_attention_varlen_gpu(window):
    lq = [1000, 3, 2048, 0, 517, 1]
    cu = _cu(lq, "cuda")
    q = torch.randn(sum(lq), 32, 128, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(sum(lq), 8, 128, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(sum(lq), 8, 128, device="cuda", dtype=torch.bfloat16)
    check_op(lambda q, k, v: flash_attention_varlen(q, k, v, cu, cu, max(lq), max(lq), sliding_window=window,
                                                    require_kernel=True),
             lambda q, k, v: reference.attention_varlen(q, k, v, cu, cu, causal=True, sliding_window=window),
             [q, k, v], torch.bfloat16, name=f"varlen-{window}",
             baseline_fn=lambda q, k, v: _sdpa_varlen(q, k, v, cu, cu, causal=True, window=window))


@pytest.mark.gpu
def test_flash_attention_int64_offsets_gpu():
    """batch*seq*heads*head_dim > 2**31: offsets must be int64. Checks the last (batch, head) slice, whose
    elements sit past 2**31, forward and gradients, against the reference on that slice alone."""
    b, s, h, d = 66, 8192, 32, 128
    assert b * s * h * d > 2**31
    q, k, v = (torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16).requires_grad_(True)
               for _ in range(3))
    o = flash_attention(q, k, v, causal=True, require_kernel=True)
    do = torch.randn_like(o)
    o.backward(do)
    sl = (slice(b - 1, b), slice(None), slice(h - 1, h))
    qs, ks, vs = (t.detach()[sl].double().requires_grad_(True) for t in (q, k, v))
    ref = _ref_bshd(qs, ks, vs, causal=True)
    ref.backward(do[sl].double())
    qb, kb, vb = (t.detach()[sl].clone().requires_grad_(True) for t in (q, k, v))
    base = _sdpa_bshd(qb, kb, vb, causal=True)
    base.backward(do[sl])
    assert_close(o[sl], ref, base, torch.bfloat16, "output", "int64 output")
    for ours, r, bs, n in ((q.grad, qs, qb, "dq"), (k.grad, ks, kb, "dk"), (v.grad, vs, vb, "dv")):
        assert_close(ours[sl], r.grad, bs.grad, torch.bfloat16, "grad", f"int64 {n}")


@pytest.mark.gpu
def test_flash_attention_compile_gpu():
    """torch.compile (inductor) traces through the custom ops without graph breaks."""
    q, k, v = (torch.randn(2, 512, 8, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    fn = torch.compile(lambda q, k, v: flash_attention(q, k, v, causal=True) * 2, fullgraph=True)
    o = fn(q, k, v)
    o.sum().backward()
    torch.testing.assert_close(o, 2 * flash_attention(q, k, v, causal=True), rtol=0, atol=0)


# --- edge cases ---


@pytest.mark.parametrize("dtype", LOW, ids=dtype_ids(LOW))
def test_attention_rows_seeing_no_key_are_zero(dtype, device):
    """Causal, bottom-right aligned, q_len > k_len: the first q_len - k_len queries see no key at all."""
    b, sq, sk, h, d = 2, 13, 5, 2, 16
    q = torch.randn(b, sq, h, d, device=device, dtype=dtype, requires_grad=True)
    k = torch.randn(b, sk, h, d, device=device, dtype=dtype, requires_grad=True)
    v = torch.randn(b, sk, h, d, device=device, dtype=dtype, requires_grad=True)
    out = flash_attention(q, k, v, causal=True)
    out.backward(torch.randn_like(out))
    blind = sq - sk
    assert torch.isfinite(out).all() and torch.isfinite(q.grad).all()
    assert torch.isfinite(k.grad).all() and torch.isfinite(v.grad).all()
    assert (out[:, :blind] == 0).all(), "rows that see no key must be exactly zero"
    assert (q.grad[:, :blind] == 0).all(), "dq of rows that see no key must be exactly zero"
    check_op(lambda q, k, v: flash_attention(q, k, v, causal=True),
             lambda q, k, v: _ref_bshd(q, k, v, causal=True),
             [q.detach(), k.detach(), v.detach()], dtype, "attention q_len>k_len causal")


@pytest.mark.parametrize("dtype", LOW, ids=dtype_ids(LOW))
def test_attention_varlen_empty_sequences(dtype, device):
    """Packed batch with sequences of length 0 (an all-padding row after unpadding) and 1."""
    lens = [0, 7, 0, 1, 9, 0]
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device=device)
    total, h, d = sum(lens), 2, 16
    q, k, v = (torch.randn(total, h, d, device=device, dtype=dtype) for _ in range(3))
    mx = max(lens)
    check_op(lambda q, k, v: flash_attention_varlen(q, k, v, cu, cu, mx, mx, causal=True),
             lambda q, k, v: reference.attention_varlen(q, k, v, cu, cu, causal=True),
             [q, k, v], dtype, "varlen with empty sequences")


def test_attention_varlen_all_empty(device):
    """Every sequence empty: a zero-token batch gives an empty result and empty gradients."""
    cu = torch.zeros(4, dtype=torch.int32, device=device)
    q, k, v = (torch.randn(0, 2, 16, device=device, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    out = flash_attention_varlen(q, k, v, cu, cu, 0, 0, causal=True)
    assert out.shape == (0, 2, 16)
    out.sum().backward()
    assert q.grad is not None and q.grad.shape == q.shape


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
@pytest.mark.parametrize("dtype", LOW, ids=dtype_ids(LOW))
def test_attention_huge_scores(dtype, causal, device):
    """Scores of order 1e4 (|q|, |k| ~ 40 per component): the online softmax must subtract the running max
    before exp (exp(1e4) is inf in any dtype). The forward is held to the table; the softmax is one-hot there,
    so the exact dq is ~0 and only finiteness of the gradients is asserted (the FA2 backward's
    dP - rowsum(dO*O) cancels in fp32 at ~1e-7 relative, which the table's near-zero floor cannot absorb)."""
    b, s, h, d = 1, 19, 2, 16
    q = (torch.randn(b, s, h, d, device=device) * 40).to(dtype)
    k = (torch.randn(b, s, h, d, device=device) * 40).to(dtype)
    v = torch.randn(b, s, h, d, device=device).to(dtype)
    check_op(lambda q, k, v: flash_attention(q, k, v, causal=causal),
             lambda q, k, v: _ref_bshd(q, k, v, causal=causal),
             [q, k, v], dtype, f"attention huge scores causal={causal}", grads=False)
    ins = [t.clone().requires_grad_(True) for t in (q, k, v)]
    out = flash_attention(*ins, causal=causal)
    out.backward(torch.randn_like(out))
    assert torch.isfinite(out).all() and all(torch.isfinite(t.grad).all() for t in ins)


# --- huge sizes (GPU): past 2**31 elements ---


def _sdpa_bshd_is_causal(q, k, v, causal):
    o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal)
    return o.transpose(1, 2)


@pytest.mark.gpu
@pytest.mark.usefixtures("free_cuda_memory")
def test_attention_elements_over_2_31():
    b, s, h, d = HUGE_SIZES["attn"]  # 1040 * 1024 * 16 * 128 = 2.18e9 elements per q/k/v/o (4.4 GB each)
    assert b * s * h * d > I32
    q, k, v = (huge_randn(b, s, h, d).requires_grad_(True) for _ in range(3))
    out = flash_attention(q, k, v, causal=True, **kw_if_supported(flash_attention, require_kernel=True))
    dout = huge_randn(b, s, h, d)
    out.backward(dout)
    huge_sync()
    for sl in huge_slices(b, I32 // (s * h * d), HUGE_SIZES["attn_chunk"]):
        qo, ko, vo = (t.detach()[sl].float().requires_grad_(True) for t in (q, k, v))
        qb, kb, vb = (t.detach()[sl].clone().requires_grad_(True) for t in (q, k, v))
        yo, yb = _ref_bshd(qo, ko, vo, True), _sdpa_bshd_is_causal(qb, kb, vb, True)
        yo.backward(dout[sl].float())
        yb.backward(dout[sl])
        name = f"attention batches {sl.start}:{sl.stop}"
        assert_close(out.detach()[sl], yo.detach(), yb.detach(), BF, "output", name)
        for g, go, gb, n in ((q.grad, qo.grad, qb.grad, "dq"), (k.grad, ko.grad, kb.grad, "dk"),
                             (v.grad, vo.grad, vb.grad, "dv")):
            assert_close(g[sl], go, gb, BF, "grad", f"{name} {n}")


@pytest.mark.gpu
@pytest.mark.usefixtures("free_cuda_memory")
def test_attention_varlen_tokens_over_2_31():
    h, d = HUGE_SIZES["varlen_hd"]
    pattern = HUGE_SIZES["varlen_pattern"]
    lens = []
    while sum(lens) * h * d <= I32 + HUGE_SIZES["varlen_extra"] * h * d:
        lens.extend(pattern)
    total = sum(lens)
    assert total * h * d > I32
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device=HUGE_DEV)
    mx = max(lens)
    q, k, v = (huge_randn(total, h, d).requires_grad_(True) for _ in range(3))
    out = flash_attention_varlen(q, k, v, cu, cu, mx, mx, causal=True,
                                 **kw_if_supported(flash_attention_varlen, require_kernel=True))
    dout = huge_randn(total, h, d)
    out.backward(dout)
    huge_sync()
    starts = cu.tolist()
    boundary = I32 // (h * d)
    seqs = list(range(0, HUGE_SIZES["varlen_seqs"])) + [i for i in range(len(lens)) if starts[i + 1] > boundary - 2 * mx]
    for i in seqs:
        a, e = starts[i], starts[i + 1]
        if a == e:
            continue
        sl = slice(a, e)
        qo, ko, vo = (t.detach()[sl].float()[None].requires_grad_(True) for t in (q, k, v))
        qb, kb, vb = (t.detach()[sl][None].clone().requires_grad_(True) for t in (q, k, v))
        yo, yb = _ref_bshd(qo, ko, vo, True), _sdpa_bshd_is_causal(qb, kb, vb, True)
        yo.backward(dout[sl][None].float())
        yb.backward(dout[sl][None])
        name = f"varlen sequence {i} tokens {a}:{e}"
        assert_close(out.detach()[sl], yo.detach()[0], yb.detach()[0], BF, "output", name)
        for g, go, gb, n in ((q.grad, qo.grad, qb.grad, "dq"), (k.grad, ko.grad, kb.grad, "dk"),
                             (v.grad, vo.grad, vb.grad, "dv")):
            assert_close(g[sl], go[0], gb[0], BF, "grad", f"{name} {n}")


# --- bad input ---


@pytest.mark.parametrize("case", case_params(case_ids(ERROR_CASES, "flash_attention/", "varlen/")))
def test_bad_input_raises_naming_argument(case, device):
    check_error_case(case, device)


@pytest.mark.parametrize("case", case_params(case_ids(VIEW_IDS, "flash_attention/", "varlen/")))
def test_views_give_correct_results(case, device):
    check_view_case(case, device)


@pytest.mark.parametrize("case", case_ids(ZERO_IDS, "flash_attention/", "varlen/"), ids=case_ids(ZERO_IDS, "flash_attention/", "varlen/"))
def test_zero_length_batches(case, device):
    check_zero_length_case(case, device)


# --- determinism ---


@pytest.mark.parametrize("case", ["flash_attention_gqa_causal", "flash_attention_window_bidir", "flash_attention_varlen"], ids=["flash_attention_gqa_causal", "flash_attention_window_bidir", "flash_attention_varlen"])
def test_bitwise_identical_gradients(case, device):
    check_bitwise_case(case, device, big=False, runs=2)


@pytest.mark.gpu
@pytest.mark.parametrize("case", ["flash_attention_gqa_causal", "flash_attention_window_bidir", "flash_attention_varlen"], ids=["flash_attention_gqa_causal", "flash_attention_window_bidir", "flash_attention_varlen"])
def test_bitwise_identical_gradients_gpu_real_size(case):
    """Many programs in flight (where atomics would reorder sums): three runs, bit-identical."""
    check_bitwise_case(case, "cuda", big=True, runs=3)
    torch.cuda.empty_cache()
