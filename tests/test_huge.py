"""Huge sizes (issue 8, part 3; GPU only): index arithmetic past 2**31 elements.

Each case makes one tensor the kernel indexes hold more than 2**31 elements, so any offset computed in int32
(``row * stride``, ``batch * stride_b``, ``pid * BLOCK``) wraps and reads or writes the wrong place: an
illegal memory access or a silently wrong slice at the end of the tensor. The kernel runs once on the whole
tensor; the reference runs chunk by chunk (it could not hold the whole problem) on the first slice and on
the slices past the 2**31 boundary, plus every reduction over the whole tensor (weight gradients). The
comparison is the tolerance table (tests/tolerances.py) with an fp32 oracle (the fp64 oracle of the CPU tests
is too slow at this size; fp32's error is ~1e-7, far below the bf16 bound) and PyTorch's same-dtype result
as the baseline. Sized for an 80 GB H100 (peak ~40 GB); each case frees its memory before the next.
"""
from __future__ import annotations

import inspect
import os

import pytest
import torch
import torch.nn.functional as F

from hf_fastkern.kernels import reference
from hf_fastkern.kernels.activations import swiglu
from hf_fastkern.kernels.attention import flash_attention, flash_attention_varlen
from hf_fastkern.kernels.cross_entropy import cross_entropy, fused_linear_cross_entropy
from hf_fastkern.kernels.layer_norm import layer_norm
from hf_fastkern.kernels.rms_norm import rms_norm
from tests.tolerances import assert_close

pytestmark = pytest.mark.gpu
BF = torch.bfloat16
# HF_FASTKERN_HUGE_DRYRUN=1 shrinks every size around a fake "2**31" of 2**13 and runs on the CPU (with
# TRITON_INTERPRET=1), to check this file's own slicing and bookkeeping without a GPU. Not a test mode.
DRY = os.environ.get("HF_FASTKERN_HUGE_DRYRUN", "0") == "1"
DEV = "cpu" if DRY else "cuda"
I32 = 2**13 if DRY else 2**31
S = dict(
    norm_hidden=64, norm_extra=8, norm_chunk=16,
    inter=96, inter_extra=4, act_chunk=8,
    attn=(20, 32, 2, 16), attn_chunk=2,
    varlen_hd=(2, 16), varlen_pattern=[32, 17, 48, 0, 7, 32, 1], varlen_extra=64, varlen_seqs=3,
    vocab=301, ce_extra=6, ce_chunk=4,
    flce=(64, 16, 301), flce_chunk=16,
) if DRY else dict(
    norm_hidden=4096, norm_extra=256, norm_chunk=32768,
    inter=14336, inter_extra=64, act_chunk=8192,
    attn=(1040, 1024, 16, 128), attn_chunk=16,
    varlen_hd=(16, 128), varlen_pattern=[1024, 513, 1536, 0, 7, 1024, 1], varlen_extra=64 * 1024, varlen_seqs=8,
    vocab=128256, ce_extra=64, ce_chunk=1024,
    flce=(32768, 1024, 128256), flce_chunk=2048,
)


def _sync():
    if DEV == "cuda":
        torch.cuda.synchronize()


@pytest.fixture(autouse=True)
def _free():
    torch.cuda.empty_cache()
    yield
    _sync()  # surface an illegal memory access inside the test that caused it
    torch.cuda.empty_cache()


def _kw_if_supported(fn, **kw):
    """Keyword arguments the entry point accepts (e.g. require_kernel=True: never fall back silently here)."""
    params = inspect.signature(fn).parameters
    return {k: v for k, v in kw.items() if k in params}


def _randn(*shape, dtype=BF, scale=1.0):
    t = torch.empty(*shape, device=DEV, dtype=dtype)
    return t.normal_(0.0, scale)


def _slices(n: int, boundary_row: int, chunk: int) -> list[slice]:
    """The first chunk, and every chunk from just before the int32 boundary to the end."""
    start = max(chunk, (boundary_row // chunk) * chunk - chunk)
    return [slice(0, chunk)] + [slice(i, min(i + chunk, n)) for i in range(start, n, chunk)]


# ----------------------------------------------------------------------------------------------------------
# norms: tokens * hidden > 2**31


@pytest.mark.parametrize("op", ["rms_norm", "layer_norm"])
def test_norm_tokens_times_hidden_over_2_31(op):
    hidden = S["norm_hidden"]
    rows = I32 // hidden + S["norm_extra"]  # 524544 rows x 4096 = 2.15e9 elements (4.3 GB per bf16 tensor)
    assert rows * hidden > I32
    x = _randn(rows, hidden)
    w = (_randn(hidden, dtype=torch.float32) * 0.1 + 1).to(BF).requires_grad_(True)
    b = _randn(hidden).requires_grad_(True) if op == "layer_norm" else None
    x.requires_grad_(True)
    if op == "rms_norm":
        fn = lambda x, w, b: rms_norm(x, w, 1e-6)
        ref = lambda x, w, b: reference.rms_norm(x, w, 1e-6)
    else:
        fn = lambda x, w, b: layer_norm(x, w, b, 1e-5)
        ref = lambda x, w, b: reference.layer_norm(x, w, b, 1e-5)
    y = fn(x, w, b)
    dy = _randn(rows, hidden)
    y.backward(dy)
    _sync()
    params = [w] + ([b] if b is not None else [])
    chunk = S["norm_chunk"]
    dparam_oracle = [torch.zeros(hidden, device=DEV, dtype=torch.float32) for _ in params]
    dparam_base = [torch.zeros(hidden, device=DEV, dtype=torch.float32) for _ in params]
    checked = {(s.start, s.stop) for s in _slices(rows, I32 // hidden, chunk)}
    for i in range(0, rows, chunk):
        s = slice(i, min(i + chunk, rows))
        xo = x.detach()[s].float().requires_grad_(True)
        po = [p.detach().float().requires_grad_(True) for p in params]
        xb = x.detach()[s].clone().requires_grad_(True)
        pb = [p.detach().clone().requires_grad_(True) for p in params]
        yo = ref(xo, *po, *([None] * (2 - len(po))))
        yb = ref(xb, *pb, *([None] * (2 - len(pb))))
        yo.backward(dy[s].float())
        yb.backward(dy[s])
        for acc, p in zip(dparam_oracle, po):
            acc += p.grad
        for acc, p in zip(dparam_base, pb):
            acc += p.grad.float()
        if (s.start, s.stop) in checked:
            assert_close(y.detach()[s], yo.detach(), yb.detach(), BF, "output", f"{op} rows {s.start}:{s.stop}")
            assert_close(x.grad[s], xo.grad, xb.grad, BF, "grad", f"{op} dx rows {s.start}:{s.stop}")
    for i, p in enumerate(params):
        assert_close(p.grad, dparam_oracle[i], dparam_base[i].to(BF), BF, "grad", f"{op} dparam[{i}] over all rows")


def test_swiglu_numel_over_2_31():
    inter = S["inter"]
    rows = I32 // inter + S["inter_extra"]  # 149860 rows x 14336 = 2.15e9 elements
    assert rows * inter > I32
    gate = _randn(rows, inter).requires_grad_(True)
    up = _randn(rows, inter).requires_grad_(True)
    out = swiglu(gate, up)
    dout = _randn(rows, inter)
    out.backward(dout)
    _sync()
    for s in _slices(rows, I32 // inter, S["act_chunk"]):
        go, uo = (t.detach()[s].float().requires_grad_(True) for t in (gate, up))
        gb, ub = (t.detach()[s].clone().requires_grad_(True) for t in (gate, up))
        yo, yb = reference.swiglu(go, uo), reference.swiglu(gb, ub)
        yo.backward(dout[s].float())
        yb.backward(dout[s])
        assert_close(out.detach()[s], yo.detach(), yb.detach(), BF, "output", f"swiglu rows {s.start}:{s.stop}")
        assert_close(gate.grad[s], go.grad, gb.grad, BF, "grad", f"swiglu dgate rows {s.start}:{s.stop}")
        assert_close(up.grad[s], uo.grad, ub.grad, BF, "grad", f"swiglu dup rows {s.start}:{s.stop}")


# ----------------------------------------------------------------------------------------------------------
# attention: batch * heads * seq * head_dim > 2**31


def _sdpa_bshd(q, k, v, causal):
    o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal)
    return o.transpose(1, 2)


def _ref_bshd(q, k, v, causal):
    return reference.attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=causal).transpose(1, 2)


def test_attention_elements_over_2_31():
    b, s, h, d = S["attn"]  # 1040 * 1024 * 16 * 128 = 2.18e9 elements per q/k/v/o (4.4 GB each)
    assert b * s * h * d > I32
    q, k, v = (_randn(b, s, h, d).requires_grad_(True) for _ in range(3))
    out = flash_attention(q, k, v, causal=True, **_kw_if_supported(flash_attention, require_kernel=True))
    dout = _randn(b, s, h, d)
    out.backward(dout)
    _sync()
    for sl in _slices(b, I32 // (s * h * d), S["attn_chunk"]):
        qo, ko, vo = (t.detach()[sl].float().requires_grad_(True) for t in (q, k, v))
        qb, kb, vb = (t.detach()[sl].clone().requires_grad_(True) for t in (q, k, v))
        yo, yb = _ref_bshd(qo, ko, vo, True), _sdpa_bshd(qb, kb, vb, True)
        yo.backward(dout[sl].float())
        yb.backward(dout[sl])
        name = f"attention batches {sl.start}:{sl.stop}"
        assert_close(out.detach()[sl], yo.detach(), yb.detach(), BF, "output", name)
        for g, go, gb, n in ((q.grad, qo.grad, qb.grad, "dq"), (k.grad, ko.grad, kb.grad, "dk"),
                             (v.grad, vo.grad, vb.grad, "dv")):
            assert_close(g[sl], go, gb, BF, "grad", f"{name} {n}")


def test_attention_varlen_tokens_over_2_31():
    h, d = S["varlen_hd"]
    pattern = S["varlen_pattern"]
    lens = []
    while sum(lens) * h * d <= I32 + S["varlen_extra"] * h * d:
        lens.extend(pattern)
    total = sum(lens)
    assert total * h * d > I32
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device=DEV)
    mx = max(lens)
    q, k, v = (_randn(total, h, d).requires_grad_(True) for _ in range(3))
    out = flash_attention_varlen(q, k, v, cu, cu, mx, mx, causal=True,
                                 **_kw_if_supported(flash_attention_varlen, require_kernel=True))
    dout = _randn(total, h, d)
    out.backward(dout)
    _sync()
    starts = cu.tolist()
    boundary = I32 // (h * d)
    seqs = list(range(0, S["varlen_seqs"])) + [i for i in range(len(lens)) if starts[i + 1] > boundary - 2 * mx]
    for i in seqs:
        a, e = starts[i], starts[i + 1]
        if a == e:
            continue
        sl = slice(a, e)
        qo, ko, vo = (t.detach()[sl].float()[None].requires_grad_(True) for t in (q, k, v))
        qb, kb, vb = (t.detach()[sl][None].clone().requires_grad_(True) for t in (q, k, v))
        yo, yb = _ref_bshd(qo, ko, vo, True), _sdpa_bshd(qb, kb, vb, True)
        yo.backward(dout[sl][None].float())
        yb.backward(dout[sl][None])
        name = f"varlen sequence {i} tokens {a}:{e}"
        assert_close(out.detach()[sl], yo.detach()[0], yb.detach()[0], BF, "output", name)
        for g, go, gb, n in ((q.grad, qo.grad, qb.grad, "dq"), (k.grad, ko.grad, kb.grad, "dk"),
                             (v.grad, vo.grad, vb.grad, "dv")):
            assert_close(g[sl], go[0], gb[0], BF, "grad", f"{name} {n}")


# ----------------------------------------------------------------------------------------------------------
# cross-entropy: tokens * vocab > 2**31


def test_cross_entropy_logits_over_2_31():
    vocab = S["vocab"]
    tokens = I32 // vocab + S["ce_extra"]  # 16807 x 128256 = 2.16e9 logits (4.3 GB bf16)
    assert tokens * vocab > I32
    logits = _randn(tokens, vocab, scale=2.0).requires_grad_(True)
    labels = torch.randint(0, vocab, (tokens,), device=DEV)
    labels[-S["ce_extra"]:] = vocab - 1  # the very last elements of the tensor
    labels[::7] = -100
    loss = cross_entropy(logits, labels, reduction="none")
    dloss = torch.rand(tokens, device=DEV)
    loss.backward(dloss)
    _sync()
    for s in _slices(tokens, I32 // vocab, S["ce_chunk"]):
        zo = logits.detach()[s].float().requires_grad_(True)
        zb = logits.detach()[s].clone().requires_grad_(True)
        lo = reference.cross_entropy(zo, labels[s], reduction="none")
        lb = reference.cross_entropy(zb, labels[s], reduction="none")
        lo.backward(dloss[s])
        lb.backward(dloss[s])
        name = f"cross_entropy rows {s.start}:{s.stop}"
        assert_close(loss.detach()[s], lo.detach(), lb.detach(), BF, "output", name)
        assert_close(logits.grad[s], zo.grad, zb.grad, BF, "grad", name + " dlogits")


def test_fused_linear_cross_entropy_tokens_times_vocab_over_2_31():
    tokens, hidden, vocab = S["flce"]  # 4.2e9 logits never materialised
    assert tokens * vocab > I32
    x = _randn(tokens, hidden).requires_grad_(True)
    w = _randn(vocab, hidden, scale=0.05).requires_grad_(True)
    labels = torch.randint(0, vocab, (tokens,), device=DEV)
    labels[-8:] = vocab - 1 - torch.arange(8, device=DEV)
    labels[::11] = -100
    loss = fused_linear_cross_entropy(x, w, labels, reduction="sum")
    loss.backward()
    _sync()
    chunk = S["flce_chunk"]
    dw_o = torch.zeros(vocab, hidden, device=DEV)
    dw_b = torch.zeros(vocab, hidden, device=DEV)
    total_o = torch.zeros((), device=DEV, dtype=torch.float64)
    total_b = torch.zeros((), device=DEV, dtype=torch.float64)
    wo = w.detach().float().requires_grad_(True)
    wb = w.detach().clone().requires_grad_(True)
    for i in range(0, tokens, chunk):
        s = slice(i, i + chunk)
        xo = x.detach()[s].float().requires_grad_(True)
        xb = x.detach()[s].clone().requires_grad_(True)
        lo = reference.linear_cross_entropy(xo, wo, labels[s], reduction="sum")
        lb = reference.linear_cross_entropy(xb, wb, labels[s], reduction="sum")
        lo.backward()
        lb.backward()
        total_o += lo.detach().double()
        total_b += lb.detach().double()
        dw_o += wo.grad
        dw_b += wb.grad.float()
        wo.grad = None
        wb.grad = None
        if i == 0 or i + chunk == tokens:
            assert_close(x.grad[s], xo.grad, xb.grad, BF, "grad", f"flce dhidden rows {i}:{i + chunk}")
    loss = loss.detach()
    rel = abs(float(loss) - float(total_o)) / abs(float(total_o))
    assert rel <= 1e-4, f"fused linear CE loss {float(loss):.6e} vs fp32 reference {float(total_o):.6e}: rel {rel:.2e}"
    assert_close(w.grad, dw_o, dw_b.to(BF), BF, "grad", "flce dweight over all tokens")
