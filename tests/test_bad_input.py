"""Bad input across the public API (issue 8, part 4).

Every case either raises a Python ``ValueError``/``TypeError`` whose message names the offending argument,
or (for inputs that have a well-defined answer: non-contiguous and strided views, zero-length batches) returns
the correct result, forward and gradients, held to the tolerance table. Never a silent wrong value, never a
device-side assert. Device mixes use a ``meta`` tensor as the second device so they run on a CPU-only machine.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import torch

import hf_fastkern
from hf_fastkern.kernels import reference
from hf_fastkern.kernels.activations import geglu, gelu, swiglu
from hf_fastkern.kernels.attention import flash_attention, flash_attention_varlen
from hf_fastkern.kernels.cross_entropy import cross_entropy, fused_linear_cross_entropy
from hf_fastkern.kernels.layer_norm import layer_norm
from hf_fastkern.kernels.rms_norm import rms_norm
from tests.harness import check_op

ERRORS = (ValueError, TypeError)
H = 24  # hidden size of the norm/activation cases


def raises_naming(fn, *names: str) -> str:
    """``fn()`` raises ValueError/TypeError and the message names one of ``names`` (as a word)."""
    with pytest.raises(ERRORS) as info:
        fn()
    msg = str(info.value)
    assert any(re.search(rf"(?<![A-Za-z0-9_]){re.escape(n)}(?![A-Za-z0-9_])", msg) for n in names), (
        f"error does not name any of {names}: {type(info.value).__name__}: {msg}")
    return msg


def r(*shape, dtype=torch.bfloat16, device="cpu"):
    return torch.randn(shape, device=device).to(dtype)


def meta_like(t: torch.Tensor) -> torch.Tensor:
    return torch.empty(t.shape, dtype=t.dtype, device="meta")


# ----------------------------------------------------------------------------------------------------------
# errors: each case is (id, thunk builder(device) -> callable, names any of which the message must contain)

def _attn(device, b=2, s=8, h=4, hk=2, d=16, dtype=torch.bfloat16):
    return r(b, s, h, d, dtype=dtype, device=device), r(b, s, hk, d, dtype=dtype, device=device), \
        r(b, s, hk, d, dtype=dtype, device=device)


def _varlen(device, total=10, h=4, hk=2, d=16):
    q, k, v = (r(total, n, d, device=device) for n in (h, hk, hk))
    cu = torch.tensor([0, 4, total], dtype=torch.int32, device=device)
    return q, k, v, cu


ERROR_CASES = {
    # --- rms_norm
    "rms_norm/x-int": (lambda d: lambda: rms_norm(torch.ones(3, H, dtype=torch.int32, device=d), r(H, device=d)), ["x"]),
    "rms_norm/weight-int": (lambda d: lambda: rms_norm(r(3, H, device=d), torch.ones(H, dtype=torch.long, device=d)), ["weight"]),
    "rms_norm/weight-hidden-mismatch": (lambda d: lambda: rms_norm(r(3, H, device=d), r(H - 1, device=d)), ["weight"]),
    "rms_norm/weight-2d": (lambda d: lambda: rms_norm(r(3, H, device=d), r(1, H, device=d)), ["weight"]),
    "rms_norm/x-0d": (lambda d: lambda: rms_norm(r(device=d), r(1, device=d)), ["x"]),
    "rms_norm/weight-other-device": (lambda d: lambda: rms_norm(r(3, H, device=d), meta_like(r(H))), ["weight"]),
    "rms_norm/x-other-device": (lambda d: lambda: rms_norm(meta_like(r(3, H)), r(H, device=d)), ["x", "weight"]),
    # --- layer_norm
    "layer_norm/x-int": (lambda d: lambda: layer_norm(torch.ones(3, H, dtype=torch.int64, device=d), r(H, device=d), r(H, device=d)), ["x"]),
    "layer_norm/weight-hidden-mismatch": (lambda d: lambda: layer_norm(r(3, H, device=d), r(H + 1, device=d), r(H, device=d)), ["weight"]),
    "layer_norm/bias-hidden-mismatch": (lambda d: lambda: layer_norm(r(3, H, device=d), r(H, device=d), r(H - 2, device=d)), ["bias"]),
    "layer_norm/bias-int": (lambda d: lambda: layer_norm(r(3, H, device=d), r(H, device=d), torch.zeros(H, dtype=torch.int32, device=d)), ["bias"]),
    "layer_norm/x-0d": (lambda d: lambda: layer_norm(r(device=d), None, None), ["x"]),
    "layer_norm/bias-other-device": (lambda d: lambda: layer_norm(r(3, H, device=d), r(H, device=d), meta_like(r(H))), ["bias"]),
    # --- activations
    "swiglu/shape-mismatch": (lambda d: lambda: swiglu(r(3, H, device=d), r(3, H + 1, device=d)), ["gate", "up"]),
    "swiglu/rows-mismatch": (lambda d: lambda: swiglu(r(3, H, device=d), r(4, H, device=d)), ["gate", "up"]),
    "swiglu/gate-int": (lambda d: lambda: swiglu(torch.ones(3, H, dtype=torch.int32, device=d), r(3, H, device=d)), ["gate"]),
    "swiglu/up-int": (lambda d: lambda: swiglu(r(3, H, device=d), torch.ones(3, H, dtype=torch.int32, device=d)), ["up"]),
    "swiglu/up-other-device": (lambda d: lambda: swiglu(r(3, H, device=d), meta_like(r(3, H))), ["up", "gate"]),
    "geglu/shape-mismatch": (lambda d: lambda: geglu(r(3, H, device=d), r(2, H, device=d)), ["gate", "up"]),
    "geglu/bad-approximate": (lambda d: lambda: geglu(r(3, H, device=d), r(3, H, device=d), approximate="fast"), ["approximate"]),
    "gelu/bad-approximate": (lambda d: lambda: gelu(r(3, H, device=d), approximate="erf"), ["approximate"]),
    "gelu/x-int": (lambda d: lambda: gelu(torch.ones(3, H, dtype=torch.int32, device=d)), ["x"]),
    # --- flash_attention ([batch, seq, heads, head_dim])
    "flash_attention/q-3d": (lambda d: lambda: flash_attention(r(8, 4, 16, device=d), *_attn(d)[1:]), ["q"]),
    "flash_attention/k-head_dim-mismatch": (lambda d: lambda: flash_attention(_attn(d)[0], r(2, 8, 2, 32, device=d), r(2, 8, 2, 32, device=d)), ["k"]),
    "flash_attention/heads-not-multiple": (lambda d: lambda: flash_attention(r(2, 8, 5, 16, device=d), *_attn(d)[1:]), ["q", "k", "heads"]),
    "flash_attention/dtype-mismatch": (lambda d: lambda: flash_attention(_attn(d)[0], *_attn(d, dtype=torch.float16)[1:]), ["q", "k", "v"]),
    "flash_attention/q-int": (lambda d: lambda: flash_attention(torch.ones(2, 8, 4, 16, dtype=torch.int32, device=d), *_attn(d)[1:]), ["q"]),
    "flash_attention/k-other-device": (lambda d: lambda: flash_attention(_attn(d)[0], meta_like(_attn(d)[1]), _attn(d)[2]), ["k"]),
    "flash_attention/batch-mismatch": (lambda d: lambda: flash_attention(_attn(d)[0], r(3, 8, 2, 16, device=d), r(3, 8, 2, 16, device=d)), ["k"]),
    "flash_attention/v-seq-mismatch": (lambda d: lambda: flash_attention(_attn(d)[0], _attn(d)[1], r(2, 7, 2, 16, device=d)), ["v"]),
    "flash_attention/v-heads-mismatch": (lambda d: lambda: flash_attention(_attn(d)[0], _attn(d)[1], r(2, 8, 4, 16, device=d)), ["v"]),
    # --- flash_attention_varlen ([total, heads, head_dim] + cu_seqlens int32 [n_seq + 1])
    "varlen/q-4d": (lambda d: lambda: flash_attention_varlen(r(1, 10, 4, 16, device=d), *_varlen(d)[1:3], _varlen(d)[3], _varlen(d)[3], 6, 6), ["q"]),
    "varlen/cu_seqlens-float": (lambda d: lambda: flash_attention_varlen(*_varlen(d)[:3], _varlen(d)[3].float(), _varlen(d)[3], 6, 6), ["cu_seqlens_q"]),
    "varlen/cu_seqlens-2d": (lambda d: lambda: flash_attention_varlen(*_varlen(d)[:3], _varlen(d)[3][None], _varlen(d)[3], 6, 6), ["cu_seqlens_q"]),
    "varlen/cu_seqlens-count-mismatch": (lambda d: lambda: flash_attention_varlen(*_varlen(d)[:3], _varlen(d)[3], torch.tensor([0, 10], dtype=torch.int32, device=d), 6, 10), ["cu_seqlens_k", "cu_seqlens_q"]),
    "varlen/cu_seqlens-past-total": (lambda d: lambda: flash_attention_varlen(*_varlen(d)[:3], torch.tensor([0, 4, 13], dtype=torch.int32, device=d), torch.tensor([0, 4, 13], dtype=torch.int32, device=d), 9, 9), ["cu_seqlens_q", "cu_seqlens_k"]),
    "varlen/k-head_dim-mismatch": (lambda d: lambda: flash_attention_varlen(_varlen(d)[0], r(10, 2, 8, device=d), r(10, 2, 8, device=d), _varlen(d)[3], _varlen(d)[3], 6, 6), ["k"]),
    # --- fused_linear_cross_entropy (hidden [tokens, hidden], weight [vocab, hidden], labels [tokens])
    "flce/hidden-int": (lambda d: lambda: fused_linear_cross_entropy(torch.ones(4, H, dtype=torch.int32, device=d), r(11, H, device=d), torch.zeros(4, dtype=torch.long, device=d)), ["hidden"]),
    "flce/weight-hidden-mismatch": (lambda d: lambda: fused_linear_cross_entropy(r(4, H, device=d), r(11, H + 3, device=d), torch.zeros(4, dtype=torch.long, device=d)), ["weight"]),
    "flce/labels-float": (lambda d: lambda: fused_linear_cross_entropy(r(4, H, device=d), r(11, H, device=d), torch.zeros(4, device=d)), ["labels"]),
    "flce/labels-count-mismatch": (lambda d: lambda: fused_linear_cross_entropy(r(4, H, device=d), r(11, H, device=d), torch.zeros(5, dtype=torch.long, device=d)), ["labels"]),
    "flce/label-too-large": (lambda d: lambda: fused_linear_cross_entropy(r(4, H, device=d), r(11, H, device=d), torch.tensor([0, 11, 2, 3], device=d)), ["labels"]),
    "flce/label-negative": (lambda d: lambda: fused_linear_cross_entropy(r(4, H, device=d), r(11, H, device=d), torch.tensor([0, 1, -5, 3], device=d)), ["labels"]),
    "flce/bias-shape": (lambda d: lambda: fused_linear_cross_entropy(r(4, H, device=d), r(11, H, device=d), torch.zeros(4, dtype=torch.long, device=d), r(10, device=d)), ["bias"]),
    "flce/weight-other-device": (lambda d: lambda: fused_linear_cross_entropy(r(4, H, device=d), meta_like(r(11, H)), torch.zeros(4, dtype=torch.long, device=d)), ["weight"]),
    "flce/bad-reduction": (lambda d: lambda: fused_linear_cross_entropy(r(4, H, device=d), r(11, H, device=d), torch.zeros(4, dtype=torch.long, device=d), reduction="avg"), ["reduction"]),
    # --- cross_entropy (logits [tokens, vocab], labels [tokens])
    "ce/logits-0d": (lambda d: lambda: cross_entropy(r(device=d), torch.zeros(1, dtype=torch.long, device=d)), ["logits"]),
    "ce/logits-1d-labels-mismatch": (lambda d: lambda: cross_entropy(r(11, device=d), torch.zeros(3, dtype=torch.long, device=d)), ["logits", "labels"]),
    "ce/logits-int": (lambda d: lambda: cross_entropy(torch.ones(4, 11, dtype=torch.int32, device=d), torch.zeros(4, dtype=torch.long, device=d)), ["logits"]),
    "ce/labels-count-mismatch": (lambda d: lambda: cross_entropy(r(4, 11, device=d), torch.zeros(3, dtype=torch.long, device=d)), ["labels"]),
    "ce/labels-float": (lambda d: lambda: cross_entropy(r(4, 11, device=d), torch.zeros(4, device=d)), ["labels"]),
    "ce/label-too-large": (lambda d: lambda: cross_entropy(r(4, 11, device=d), torch.tensor([0, 1, 2, 40], device=d)), ["labels"]),
    "ce/label-negative": (lambda d: lambda: cross_entropy(r(4, 11, device=d), torch.tensor([-1, 1, 2, 3], device=d)), ["labels"]),
    "ce/labels-other-device": (lambda d: lambda: cross_entropy(r(4, 11, device=d), torch.zeros(4, dtype=torch.long, device="meta")), ["labels", "logits"]),
    "ce/bad-reduction": (lambda d: lambda: cross_entropy(r(4, 11, device=d), torch.zeros(4, dtype=torch.long, device=d), reduction="max"), ["reduction"]),
    # --- apply_fast_kernels
    "apply_fast_kernels/not-a-module": (lambda d: lambda: hf_fastkern.apply_fast_kernels("meta-llama/Llama-3-8B"), ["model"]),
    "revert_fast_kernels/not-a-module": (lambda d: lambda: hf_fastkern.revert_fast_kernels(42), ["model"]),
}


# Cases where a missing check reads out of bounds (an illegal memory access on the GPU, a segfault in the
# interpreter): run in a child process so a crash is reported as this test's failure, not the suite's death.
OUT_OF_BOUNDS = {"varlen/cu_seqlens-past-total"}


# Genuine bugs found by these tests and not fixed by their owners at the time of writing (issue 8 report).
# strict=True: the day one is fixed, its xfail turns into a failure and must be removed here.
KNOWN_BUGS = {
}


def _params(ids):
    return [pytest.param(c, id=c, marks=[pytest.mark.xfail(strict=True, reason=KNOWN_BUGS[c])] if c in KNOWN_BUGS
                         else []) for c in ids]


@pytest.mark.parametrize("case", _params(ERROR_CASES))
def test_bad_input_raises_naming_argument(case, device):
    build, names = ERROR_CASES[case]
    if case in OUT_OF_BOUNDS:
        code = ("import sys; import tests.test_bad_input as t; b, n = t.ERROR_CASES[sys.argv[1]]; "
                "t.raises_naming(b(sys.argv[2]), *n)")
        env = {**os.environ, "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET", "0")}
        p = subprocess.run([sys.executable, "-c", code, case, device], capture_output=True, text=True, env=env,
                           cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), timeout=300)
        assert p.returncode == 0, f"{case}: child exited with {p.returncode} (negative = killed by a signal)\n" \
                                  f"{p.stderr[-2000:]}"
        return
    raises_naming(build(device), *names)


def test_out_of_range_label_message_says_value_and_position(device):
    """Not a device assert: the message gives the offending value (and where it is)."""
    labels = torch.tensor([0, 1, 2, 3, 4, 57, 6], device=device)
    msg = raises_naming(lambda: cross_entropy(r(7, 13, device=device), labels), "labels")
    assert "57" in msg, msg


# ----------------------------------------------------------------------------------------------------------
# inputs with a correct answer: strided / non-contiguous views, dtype mixes, zero-length batches


def _views(device):
    """(id, kernel_fn, reference_fn, leaf inputs, dtype): the view is taken inside the functions so the
    gradient flows back through it to the contiguous leaf."""
    bf = torch.bfloat16
    big = r(6, 2 * H, dtype=bf, device=device)
    tall = r(H, 5, dtype=bf, device=device)
    w, bias = r(H, dtype=bf, device=device), r(H, dtype=bf, device=device)
    w2 = r(2 * H, dtype=bf, device=device)
    x3 = r(2, 5, H, dtype=bf, device=device)
    qkv = r(2, 4, 9, 3 * 16, dtype=bf, device=device)  # [batch, heads, seq, 3*head_dim] one projection
    logits_big = r(5, 40, dtype=bf, device=device)
    labels = torch.tensor([0, 3, -100, 17, 9], device=device)
    hid = r(H, 5, dtype=bf, device=device)
    wt = r(H, 19, dtype=bf, device=device)
    lab5 = torch.tensor([0, 18, 3, -100, 7], device=device)

    def split_attn(fn):
        # transformers' layout: [batch, heads, seq, head_dim] views handed over as [batch, seq, heads, head_dim]
        return lambda t: fn(t[..., :16].transpose(1, 2), t[..., 16:32].transpose(1, 2), t[..., 32:].transpose(1, 2))

    return [
        ("rms_norm/x-strided-last-dim", lambda t, w: rms_norm(t[:, ::2], w), lambda t, w: reference.rms_norm(t[:, ::2], w), [big, w]),
        ("rms_norm/x-transposed", lambda t, w: rms_norm(t.t(), w), lambda t, w: reference.rms_norm(t.t(), w), [tall, w]),
        ("rms_norm/x-3d-sliced", lambda t, w: rms_norm(t[:, 1:], w), lambda t, w: reference.rms_norm(t[:, 1:], w), [x3, w]),
        ("rms_norm/weight-strided", lambda t, w: rms_norm(t[:, :H], w[::2]), lambda t, w: reference.rms_norm(t[:, :H], w[::2]), [big, w2]),
        ("rms_norm/bf16-x-fp32-weight", lambda t, w: rms_norm(t, w), lambda t, w: reference.rms_norm(t, w), [x3, w.float()]),
        ("layer_norm/x-strided-last-dim", lambda t, w, b: layer_norm(t[:, 1::2], w, b), lambda t, w, b: reference.layer_norm(t[:, 1::2], w, b), [big, w, bias]),
        ("layer_norm/weight-bias-strided", lambda t, w: layer_norm(t[:, :H], w[::2], w[1::2]), lambda t, w: reference.layer_norm(t[:, :H], w[::2], w[1::2]), [big, w2]),
        ("layer_norm/x-transposed", lambda t: layer_norm(t.t(), None, None), lambda t: reference.layer_norm(t.t(), None, None), [tall]),
        ("swiglu/fused-gate-up-halves", lambda t: swiglu(*t.chunk(2, -1)), lambda t: reference.swiglu(*t.chunk(2, -1)), [big]),
        ("swiglu/transposed", lambda a, b: swiglu(a.t(), b.t()), lambda a, b: reference.swiglu(a.t(), b.t()), [tall, tall.clone()]),
        ("geglu/fused-halves-tanh", lambda t: geglu(*t.chunk(2, -1), approximate="tanh"), lambda t: reference.geglu(*t.chunk(2, -1), approximate="tanh"), [big]),
        ("gelu/strided", lambda t: gelu(t[:, ::3]), lambda t: reference.gelu(t[:, ::3]), [big]),
        ("flash_attention/qkv-views-of-one-projection", split_attn(lambda q, k, v: flash_attention(q, k, v, causal=True)),
         split_attn(lambda q, k, v: reference.attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True).transpose(1, 2)), [qkv]),
        ("cross_entropy/logits-vocab-slice", lambda z: cross_entropy(z[:, :33], labels), lambda z: reference.cross_entropy(z[:, :33], labels), [logits_big]),
        ("flce/hidden-and-weight-transposed", lambda h, w: fused_linear_cross_entropy(h.t(), w.t(), lab5),
         lambda h, w: reference.linear_cross_entropy(h.t(), w.t(), lab5), [hid, wt]),
    ]


_VIEW_IDS = [c[0] for c in _views("cpu")]


@pytest.mark.parametrize("case", _params(_VIEW_IDS))
def test_views_give_correct_results(case, device):
    (_, fn, ref, ins), = [c for c in _views(device) if c[0] == case]
    check_op(fn, ref, ins, torch.bfloat16, case)


def _zero(device):
    bf = torch.bfloat16
    return [
        ("rms_norm/zero-rows", lambda: [r(0, H, dtype=bf, device=device), r(H, dtype=bf, device=device)], lambda x, w: rms_norm(x, w)),
        ("rms_norm/zero-batch-3d", lambda: [r(0, 7, H, dtype=bf, device=device), r(H, dtype=bf, device=device)], lambda x, w: rms_norm(x, w)),
        ("layer_norm/zero-rows", lambda: [r(0, H, dtype=bf, device=device), r(H, dtype=bf, device=device), r(H, dtype=bf, device=device)], lambda x, w, b: layer_norm(x, w, b)),
        ("swiglu/zero-rows", lambda: [r(0, H, dtype=bf, device=device), r(0, H, dtype=bf, device=device)], swiglu),
        ("geglu/zero-rows", lambda: [r(0, H, dtype=bf, device=device), r(0, H, dtype=bf, device=device)], geglu),
        ("gelu/zero-rows", lambda: [r(0, 3, H, dtype=bf, device=device)], gelu),
        ("flash_attention/zero-batch", lambda: [r(0, 8, 4, 16, device=device), r(0, 8, 2, 16, device=device), r(0, 8, 2, 16, device=device)], flash_attention),
        ("flash_attention/zero-q_len", lambda: [r(2, 0, 4, 16, device=device), r(2, 8, 2, 16, device=device), r(2, 8, 2, 16, device=device)], flash_attention),
        ("cross_entropy/zero-tokens-sum", lambda: [r(0, 11, dtype=bf, device=device)],
         lambda z: cross_entropy(z, torch.zeros(0, dtype=torch.long, device=device), reduction="sum")),
        ("flce/zero-tokens-sum", lambda: [r(0, H, dtype=bf, device=device), r(11, H, dtype=bf, device=device)],
         lambda h, w: fused_linear_cross_entropy(h, w, torch.zeros(0, dtype=torch.long, device=device), reduction="sum")),
    ]


_ZERO_IDS = [c[0] for c in _zero("cpu")]


@pytest.mark.parametrize("case", _ZERO_IDS, ids=_ZERO_IDS)
def test_zero_length_batches(case, device):
    """An empty batch returns an empty (or zero) result of the right shape and dtype, and backward gives
    gradients of the inputs' shapes: empty for the batch, zeros for parameters."""
    (_, make, fn), = [c for c in _zero(device) if c[0] == case]
    ins = [t.requires_grad_(True) for t in make()]
    out = fn(*ins)
    assert torch.isfinite(out).all()
    if out.dim() == 0:
        assert float(out) == 0.0, "sum over zero tokens must be 0"
    else:
        assert 0 in out.shape
    out.sum().backward()
    for i, t in enumerate(ins):
        g = t.grad if t.grad is not None else torch.zeros_like(t)
        assert g.shape == t.shape and (g == 0).all(), f"{case}: gradient of input {i}"


@pytest.mark.parametrize("fn", ["cross_entropy", "fused_linear_cross_entropy"])
def test_mean_over_no_valid_token_is_nan_like_torch(fn, device):
    """Documented: 'mean' over zero valid tokens is 0/0 = NaN, exactly torch.nn.functional.cross_entropy."""
    labels = torch.full((4,), -100, device=device)
    torch_val = torch.nn.functional.cross_entropy(torch.randn(4, 11), labels.cpu())
    if fn == "cross_entropy":
        out = cross_entropy(r(4, 11, device=device), labels)
    else:
        out = fused_linear_cross_entropy(r(4, H, device=device), r(11, H, device=device), labels)
    assert torch.isnan(torch_val) and torch.isnan(out)


def test_apply_fast_kernels_on_a_plain_module_does_not_raise():
    """Unknown architecture (no config at all): generic parts or nothing, a report, never an exception, and
    the module still computes the same function."""
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.LayerNorm(16), torch.nn.GELU(), torch.nn.Linear(16, 4))
    x = torch.randn(3, 8)
    before = m(x)
    report = hf_fastkern.apply_fast_kernels(m)
    assert report is not None and str(report)
    torch.testing.assert_close(m(x), before)
    hf_fastkern.revert_fast_kernels(m)
    assert torch.equal(m(x), before)


@pytest.mark.parametrize("fn", ["cross_entropy", "fused_linear_cross_entropy"])
def test_unchecked_out_of_range_label_is_nan_not_a_read_out_of_bounds(fn, device, monkeypatch):
    """With the documented opt-out HF_FASTKERN_SKIP_LABEL_CHECK=1 (no host sync), an out-of-range label reads
    nothing and makes the loss NaN: loud, never a silently plausible value or a device assert."""
    monkeypatch.setenv("HF_FASTKERN_SKIP_LABEL_CHECK", "1")
    labels = torch.tensor([0, 1, 1000, 3], device=device)
    if fn == "cross_entropy":
        out = cross_entropy(r(4, 11, device=device), labels)
    else:
        out = fused_linear_cross_entropy(r(4, H, device=device), r(11, H, device=device), labels)
    assert torch.isnan(out), f"{fn} with an unchecked out-of-range label gave {float(out)}"
