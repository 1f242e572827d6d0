"""Property-based tests (issue 8, part 4): random shapes, dtypes, flags and value scales against the reference.

Shapes: rows 0-9 (zero included), hidden/vocab 1-300 (odd sizes, not powers of two); dtypes fp32/bf16/fp16;
every flag of each op. Forward and every input gradient go through tests/harness.check_op (fp64 oracle,
the tolerance table). Bounded run time under the interpreter: ``derandomize=True`` (the same examples on every
run, so CI never flakes), ``max_examples`` per test from ``HF_FASTKERN_HYPOTHESIS_EXAMPLES`` (default 25;
raise it for a longer local search), a per-example ``deadline`` of DEADLINE (a hang guard: an example takes
seconds), no example database, and no shrinking unless ``HF_FASTKERN_HYPOTHESIS_SHRINK=1``: a failure is
reported as the example that failed, instead of minutes of shrinking in CI (issue 20).
"""
from __future__ import annotations

import os
from datetime import timedelta

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from hf_fastkern.kernels import reference  # noqa: E402
from hf_fastkern.kernels.activations import geglu, swiglu  # noqa: E402
from hf_fastkern.kernels.cross_entropy import cross_entropy  # noqa: E402
from hf_fastkern.kernels.layer_norm import layer_norm  # noqa: E402
from hf_fastkern.kernels.rms_norm import rms_norm  # noqa: E402
from tests.harness import check_op  # noqa: E402

EXAMPLES = int(os.environ.get("HF_FASTKERN_HYPOTHESIS_EXAMPLES", "25"))
DEADLINE = timedelta(seconds=120)
PHASES = tuple(p for p in Phase if p is not Phase.shrink or os.environ.get("HF_FASTKERN_HYPOTHESIS_SHRINK") == "1")
_COMMON = dict(deadline=DEADLINE, derandomize=True, database=None, phases=PHASES,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
BOUNDED = settings(max_examples=EXAMPLES, **_COMMON)

dtypes = st.sampled_from([torch.float32, torch.bfloat16, torch.float16])
rows = st.integers(0, 9)
hidden = st.integers(1, 300)
seeds = st.integers(0, 2**31 - 1)
scales = st.sampled_from([1e-2, 1.0, 30.0])
lead = st.sampled_from(["2d", "3d"])


def _x(seed: int, n: int, h: int, scale: float, layout: str, device: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, h, generator=g) * scale
    if layout == "3d" and n % 3 == 0:
        x = x.view(3, n // 3, h)
    return x.to(device)


@BOUNDED
@given(dtype=dtypes, n=rows, h=hidden, seed=seeds, scale=scales, layout=lead, has_w=st.booleans(),
       offset=st.sampled_from([0.0, 1.0]), cast_before=st.booleans())
def test_rms_norm_property(dtype, n, h, seed, scale, layout, has_w, offset, cast_before, device):
    x = _x(seed, n, h, scale, layout, device).to(dtype)
    ins = [x]
    if has_w:
        ins.append((torch.rand(h, generator=torch.Generator().manual_seed(seed + 1)) + 0.5).to(device, dtype))
    kw = dict(offset=offset, cast_before_weight=cast_before)
    check_op(lambda x, w=None: rms_norm(x, w, 1e-6, **kw), lambda x, w=None: reference.rms_norm(x, w, 1e-6, **kw),
             ins, dtype, f"rms_norm {tuple(x.shape)} {dtype} w={has_w} {kw}")


@BOUNDED
@given(dtype=dtypes, n=rows, h=hidden, seed=seeds, scale=scales, layout=lead, has_w=st.booleans(),
       has_b=st.booleans())
def test_layer_norm_property(dtype, n, h, seed, scale, layout, has_w, has_b, device):
    g = torch.Generator().manual_seed(seed + 1)
    x = _x(seed, n, h, scale, layout, device).to(dtype)
    w = torch.randn(h, generator=g).to(device, dtype) if has_w else None
    b = torch.randn(h, generator=g).to(device, dtype) if has_b else None
    ins = [x] + [t for t in (w, b) if t is not None]

    def split(args):
        it = iter(args[1:])
        return args[0], (next(it) if has_w else None), (next(it) if has_b else None)

    check_op(lambda *a: layer_norm(*split(a), 1e-5), lambda *a: reference.layer_norm(*split(a), 1e-5),
             ins, dtype, f"layer_norm {tuple(x.shape)} {dtype} w={has_w} b={has_b}")


@BOUNDED
@given(dtype=dtypes, n=rows, h=hidden, seed=seeds, scale=scales, layout=lead,
       act=st.sampled_from(["swiglu", "geglu-none", "geglu-tanh"]))
def test_glu_property(dtype, n, h, seed, scale, layout, act, device):
    gate = _x(seed, n, h, scale, layout, device).to(dtype)
    up = _x(seed + 7, n, h, 1.0, layout, device).to(dtype)
    if act == "swiglu":
        fn, ref = swiglu, reference.swiglu
    else:
        approx = act.split("-")[1]
        fn = lambda a, b: geglu(a, b, approximate=approx)
        ref = lambda a, b: reference.geglu(a, b, approximate=approx)
    check_op(fn, ref, [gate, up], dtype, f"{act} {tuple(gate.shape)} {dtype}")


@BOUNDED
@given(dtype=dtypes, n=rows, vocab=hidden, seed=seeds, scale=scales,
       reduction=st.sampled_from(["mean", "sum", "none"]), ignore_frac=st.sampled_from([0.0, 0.3, 1.0]),
       label_smoothing=st.sampled_from([0.0, 0.1]), z_loss=st.sampled_from([0.0, 1e-4]),
       softcap=st.sampled_from([None, 30.0]))
def test_cross_entropy_property(dtype, n, vocab, seed, scale, reduction, ignore_frac, label_smoothing, z_loss,
                                softcap, device):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(n, vocab, generator=g) * scale).to(device, dtype)
    labels = torch.randint(0, vocab, (n,), generator=g)
    labels[torch.rand(n, generator=g) < ignore_frac] = -100
    labels = labels.to(device)
    if reduction == "mean" and not (labels != -100).any():
        reduction = "sum"  # 'mean' over no valid token is NaN by contract (tested in test_bad_input.py)
    kw = dict(reduction=reduction, label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap)
    check_op(lambda z: cross_entropy(z, labels, **kw), lambda z: reference.cross_entropy(z, labels, **kw),
             [logits], dtype, f"cross_entropy {tuple(logits.shape)} {dtype} {kw}")


@settings(max_examples=max(4, EXAMPLES // 3), **_COMMON)
@given(dtype=st.sampled_from([torch.bfloat16, torch.float16]), b=st.integers(1, 2), sq=st.integers(1, 40),
       extra_k=st.integers(0, 9), group=st.sampled_from([1, 2]), hk=st.integers(1, 2),
       d=st.sampled_from([16, 32]), causal=st.booleans(), window=st.sampled_from([None, 1, 7]),
       softcap=st.sampled_from([None, 20.0]), seed=seeds)
def test_flash_attention_property(dtype, b, sq, extra_k, group, hk, d, causal, window, softcap, seed, device):
    """Dense attention over random q_len/k_len (k_len >= q_len: decode-style bottom-right causal included),
    GQA groups, head_dim, window and softcap, forward and dq/dk/dv against the reference."""
    from hf_fastkern.kernels.attention import flash_attention

    if window is not None and not causal:
        window = None  # bidirectional windows are a separate (SDPA-fallback) case in the integration
    sk = sq + extra_k
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, sq, hk * group, d, generator=g).to(device, dtype)
    k = torch.randn(b, sk, hk, d, generator=g).to(device, dtype)
    v = torch.randn(b, sk, hk, d, generator=g).to(device, dtype)
    kw = dict(causal=causal, sliding_window=window, softcap=softcap)

    def ref(q, k, v):
        return reference.attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), **kw).transpose(1, 2)

    check_op(lambda q, k, v: flash_attention(q, k, v, **kw), ref, [q, k, v], dtype,
             f"flash_attention q{tuple(q.shape)} k{tuple(k.shape)} {dtype} {kw}")
