"""Fused RoPE: the kernel vs transformers' expression (fp64 oracle), and the Llama-family attention forward
that uses it (layers/rope_attention.py): probe, delegation to the class forward, report.

Kernel cases: q/k in the strided layout the attention forward gives them (``view(...).transpose(1, 2)``), GQA
head counts, head_dim 2/64/80/128, cos/sin broadcast over the batch or per batch (packed position_ids), in the
q dtype or fp32 (autocast over fp32 weights: the output is fp32, as the unfused expression's); forward and
the gradients of q and k. ``gpu``: Llama-3-8B sizes.
"""
from __future__ import annotations

import pytest
import torch

from hf_fastkern import apply_fast_kernels
from hf_fastkern.kernels import reference
from hf_fastkern.kernels import rope as rope_mod
from hf_fastkern.kernels.dispatch import FastKernFallbackWarning, reset_warnings
from hf_fastkern.layers import rope_attention
from tests.harness import check_op
from tests.test_patch_archs import ARCHS, batch, build
from tests.tolerances import assert_close

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DT_IDS = ["fp32", "bf16", "fp16"]
# (batch, seq, q heads, kv heads, head_dim, cos per batch)
SHAPES = [(1, 1, 1, 1, 2, False), (2, 7, 4, 2, 64, False), (1, 33, 3, 1, 80, False), (2, 5, 2, 2, 128, True)]
SHAPE_IDS = ["tiny", "gqa64", "odd80", "perbatch128"]


def _cos_sin(b: int, s: int, d: int, per_batch: bool, dtype: torch.dtype, device) -> tuple:
    ang = 3.0 * torch.randn(b if per_batch else 1, s, d // 2, generator=torch.Generator().manual_seed(3))
    emb = torch.cat([ang, ang], dim=-1)  # transformers' layout: the frequencies twice
    return emb.cos().to(device, dtype), emb.sin().to(device, dtype)


def _fns(cos, sin):
    """Kernel and reference taking q, k as [batch, seq, heads, head_dim] (transposed inside, as in attention);
    one output: q_embed and k_embed concatenated over heads."""

    def kernel(q, k):
        return torch.cat(rope_mod.apply_rope(q.transpose(1, 2), k.transpose(1, 2), cos, sin), dim=1)

    def ref(q, k):
        c, s = (cos.double(), sin.double()) if q.dtype == torch.float64 else (cos, sin)
        return torch.cat(reference.rope(q.transpose(1, 2), k.transpose(1, 2), c, s), dim=1)

    return kernel, ref


@pytest.mark.parametrize("cos_fp32", [False, True], ids=["cos_same", "cos_fp32"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_rope_matches_reference(shape, dtype, cos_fp32, device):
    _check(shape, dtype, cos_fp32, device)


def _check(shape, dtype, cos_fp32, device):
    b, s, hq, hk, d, per_batch = shape
    cos, sin = _cos_sin(b, s, d, per_batch, torch.float32 if cos_fp32 else dtype, device)
    kernel, ref = _fns(cos, sin)
    q = torch.randn(b, s, hq, d, device=device).to(dtype)
    k = torch.randn(b, s, hk, d, device=device).to(dtype)
    check_op(kernel, ref, [q, k], dtype, f"rope {shape} {dtype} cos_fp32={cos_fp32}")


@pytest.mark.parametrize("cos_fp32", [False, True], ids=["cos_same", "cos_fp32"])
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_rope_one_token_per_program(shape, cos_fp32, device, monkeypatch):
    """The GPU's launch (one token per program) under the interpreter too, whose own launch packs many tokens
    into one program (rope.launch_config; the cases above, with a masked tail of tokens: 14 and 33 tokens)."""
    config = rope_mod.launch_config
    monkeypatch.setattr(rope_mod, "launch_config", lambda *a: (1, *config(*a)[1:]))
    _check(shape, torch.bfloat16, cos_fp32, device)


def test_rope_output_layout_and_dtype():
    """The output keeps q's memory layout (heads and positions interleaved) and the unfused result dtype."""
    q = torch.randn(2, 5, 4, 8).bfloat16().transpose(1, 2)
    k = torch.randn(2, 5, 2, 8).bfloat16().transpose(1, 2)
    cos, sin = _cos_sin(2, 5, 8, False, torch.float32, "cpu")
    got, want = rope_mod.apply_rope(q, k, cos, sin), reference.rope(q, k, cos, sin)
    for g, w in zip(got, want):
        assert g.dtype == w.dtype == torch.float32 and g.stride() == w.stride()


def test_rope_q_and_k_one_launch_one_node(monkeypatch):
    """Eager path: q and k share one launch forward and one backward, under one autograd node; when only one
    output is used, its gradient alone is rotated (the other input gets none, as with the reference)."""
    launches = []
    real = rope_mod._ROPE

    def count(grid, *args, **kw):
        launches.append(grid)
        return real(grid, *args, **kw)

    monkeypatch.setattr(rope_mod, "_ROPE", count)
    q = torch.randn(2, 5, 4, 8).bfloat16().transpose(1, 2).requires_grad_()
    k = torch.randn(2, 5, 2, 8).bfloat16().transpose(1, 2).requires_grad_()
    cos, sin = _cos_sin(2, 5, 8, False, torch.bfloat16, "cpu")
    qe, ke = rope_mod.apply_rope(q, k, cos, sin)
    assert len(launches) == 1 and qe.grad_fn is ke.grad_fn and type(qe.grad_fn).__name__ == "RopeQKFunctionBackward"
    (qe.float().sum() + 2 * ke.float().sum()).backward()
    assert len(launches) == 2
    qr, kr = (t.detach().clone().requires_grad_() for t in (q, k))
    rq, rk = reference.rope(qr, kr, cos, sin)
    (rq.float().sum() + 2 * rk.float().sum()).backward()
    oracle = [t.detach().double().requires_grad_() for t in (q, k)]
    oq, ok_ = reference.rope(*oracle, cos.double(), sin.double())
    (oq.sum() + 2 * ok_.sum()).backward()
    for got, want, base, name in ((q.grad, oracle[0].grad, qr.grad, "dq"), (k.grad, oracle[1].grad, kr.grad, "dk")):
        assert_close(got, want, base, torch.bfloat16, "grad", f"fused rope {name}")
    q.grad = k.grad = None
    qe, ke = rope_mod.apply_rope(q, k, cos, sin)
    ke.float().pow(2).sum().backward()  # q_embed unused
    assert q.grad is None and k.grad is not None and len(launches) == 4
    q.grad = k.grad = None

    class _DropGrads(torch.autograd.Function):  # passes y on, gives x (and so q_embed, k_embed) no gradient
        @staticmethod
        def forward(ctx, a, b, y):
            return y * 1.0

        @staticmethod
        def backward(ctx, g):
            return None, None, g

    y = torch.ones(3, requires_grad=True)
    qe, ke = rope_mod.apply_rope(q, k, cos, sin)
    _DropGrads.apply(qe, ke, y).sum().backward()  # RopeQKFunction's backward gets (None, None)
    assert y.grad is not None and q.grad is None and k.grad is None


def test_rope_q_k_batch_mismatch_runs_reference():
    """q and k of different batch sizes (cos broadcast over both): the one launch walks q's batch, so the call
    takes the reference expression instead (with the warning), never a launch."""
    q, k = torch.randn(2, 2, 5, 8), torch.randn(1, 1, 5, 8)
    cos, sin = _cos_sin(1, 5, 8, False, torch.float32, "cpu")
    reset_warnings()
    with pytest.warns(FastKernFallbackWarning, match="batch"):
        got = rope_mod.apply_rope(q, k, cos, sin)
    assert all(torch.equal(a, b) for a, b in zip(got, reference.rope(q, k, cos, sin)))


@pytest.mark.parametrize("case", ["partial_rotary", "cos_requires_grad", "unsqueeze_dim"])
def test_rope_unsupported_runs_reference(case):
    """What the kernel does not take runs the reference expression (gradients to cos/sin included), warning."""
    q, k = torch.randn(1, 2, 5, 8, requires_grad=True), torch.randn(1, 1, 5, 8, requires_grad=True)
    cos, sin = _cos_sin(1, 5, 4 if case == "partial_rotary" else 8, False, torch.float32, "cpu")
    dim = 1
    if case == "cos_requires_grad":
        cos.requires_grad_(True)
    if case == "unsqueeze_dim":  # q/k as [batch, seq, heads, head_dim]
        q, k = q.detach().transpose(1, 2).requires_grad_(), k.detach().transpose(1, 2).requires_grad_()
        dim = 2
    reset_warnings()
    if case == "partial_rotary":  # the reference itself cannot broadcast a narrower cos: transformers splits
        with pytest.warns(FastKernFallbackWarning, match="rope falls back"), pytest.raises(RuntimeError):
            rope_mod.apply_rope(q, k, cos, sin, dim)
        return
    with pytest.warns(FastKernFallbackWarning, match="rope falls back"):
        got = rope_mod.apply_rope(q, k, cos, sin, dim)
    want = reference.rope(q, k, cos, sin, dim)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    if case == "cos_requires_grad":
        got[0].sum().backward()
        assert cos.grad is not None


ROPE_ARCHS = [a for a in ARCHS if a.name in ("llama", "mistral", "qwen2", "qwen3")]


class _CountRope:
    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.n = 0
        orig = rope_attention.apply_rope

        def counted(*args, **kw):
            self.n += 1
            return orig(*args, **kw)

        monkeypatch.setattr(rope_attention, "apply_rope", counted)


@pytest.mark.parametrize("arch", ROPE_ARCHS, ids=[a.name for a in ROPE_ARCHS])
def test_rope_attention_fast_path_and_delegation(arch, monkeypatch):
    """Training forward: every layer's attention runs the fused RoPE forward; generation (a cache is passed):
    every call goes to the class forward, and greedy tokens equal the unpatched model's."""
    ref, model = build(arch), build(arch)
    report = apply_fast_kernels(model)
    layers = model.config.num_hidden_layers
    assert report.patched.get("rope") == layers, str(report)
    count = _CountRope(monkeypatch)
    ids, labels = batch()
    model.train()
    model(input_ids=ids, labels=labels).loss.backward()
    assert count.n == layers
    count.n = 0
    model.eval()
    ref.eval()
    prompt = ids[:1, :5]
    with torch.no_grad():
        got = model.generate(prompt, max_new_tokens=4, do_sample=False)
        want = ref.generate(prompt, max_new_tokens=4, do_sample=False)
    assert count.n == 0
    assert torch.equal(got, want)


def test_rope_attention_probe_refuses_changed_arithmetic(monkeypatch):
    """A replacement that does not compute what the class forward computes is not bound (here: the rotation
    turned the other way, as a transformers release changing its RoPE convention would look)."""
    def wrong(q, k, cos, sin, unsqueeze_dim=1):
        return reference.rope(q, k, cos, -sin, unsqueeze_dim)

    monkeypatch.setattr(rope_attention, "apply_rope", wrong)
    model = build(ROPE_ARCHS[0])
    report = apply_fast_kernels(model)
    assert "rope" not in report.patched
    assert any("rope" in what and "does not compute" in why for what, why in report.skipped), str(report)


def test_rope_attention_revert():
    from hf_fastkern import revert_fast_kernels

    model = build(ROPE_ARCHS[0])
    apply_fast_kernels(model)
    attn = model.model.layers[0].self_attn
    assert "forward" in attn.__dict__
    revert_fast_kernels(model)
    assert "forward" not in attn.__dict__


@pytest.mark.gpu
@pytest.mark.parametrize("cos_fp32", [False, True], ids=["bf16", "cos_fp32"])
def test_rope_gpu_llama8b(cos_fp32):
    """Llama-3-8B attention at 4 x 2048 tokens (32 q heads, 8 kv heads, head_dim 128), bf16 q/k."""
    b, s, hq, hk, d = 4, 2048, 32, 8, 128
    cos, sin = _cos_sin(b, s, d, False, torch.float32 if cos_fp32 else torch.bfloat16, "cuda")
    kernel, ref = _fns(cos, sin)
    q = torch.randn(b, s, hq, d, device="cuda").bfloat16()
    k = torch.randn(b, s, hk, d, device="cuda").bfloat16()
    check_op(kernel, ref, [q, k], torch.bfloat16, f"rope gpu cos_fp32={cos_fp32}")


def test_rope_without_autograd_skips_the_node(monkeypatch):
    """No graph to record (generate(), eval): the launcher runs without RopeQKFunction, with the outputs the
    Function path gives, bitwise; with a graph, or under forward-mode AD (dual tensors do not require grad), the
    Function runs. The checks run once per call signature: a second call of a signature does not repeat them."""
    import torch.autograd.forward_ad as fwad

    q = torch.randn(2, 5, 4, 8).bfloat16().transpose(1, 2).requires_grad_()
    k = torch.randn(2, 5, 2, 8).bfloat16().transpose(1, 2)
    cos, sin = _cos_sin(2, 5, 8, False, torch.bfloat16, "cpu")
    applied, checked = [], []
    real_apply, real_check = rope_mod.RopeQKFunction.apply, rope_mod._unsupported
    monkeypatch.setattr(rope_mod.RopeQKFunction, "apply", lambda *a: applied.append(1) or real_apply(*a))
    monkeypatch.setattr(rope_mod, "_unsupported", lambda *a: checked.append(1) or real_check(*a))
    with torch.no_grad():
        q0, k0 = rope_mod.apply_rope(q, k, cos, sin)
        rope_mod.apply_rope(q, k, cos, sin)
    assert applied == [] and len(checked) == 1
    q1, k1 = rope_mod.apply_rope(q, k, cos, sin)
    assert applied == [1] and q1.grad_fn is not None and len(checked) == 2  # grad mode is part of the signature
    assert torch.equal(q0, q1.detach()) and torch.equal(k0, k1)
    with torch.no_grad(), fwad.dual_level():
        qd = fwad.make_dual(q.detach(), torch.ones_like(q))
        with pytest.raises(RuntimeError, match="jvp"):  # the Function says it has no jvp: loud, not a lost tangent
            rope_mod.apply_rope(qd, k, cos, sin)

