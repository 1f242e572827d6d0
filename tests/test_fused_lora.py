"""LoRALinearFunction: PEFT ``lora.Linear`` in one autograd node (issue 12).

- output and every gradient (input, lora_A, lora_B, and the base weight/bias when trainable) vs PEFT's own
  forward (PyTorch's same-dtype baseline) and the fp64 oracle, in fp32, bf16, a bf16 base with fp32 adapters
  (PEFT's default) without autocast, and under bf16 autocast over fp32 or bf16 bases; odd sizes, 1-D and empty
  inputs;
- what takes PEFT's forward instead (dropout, DoRA, two adapters, merged, ``adapter_names``, disabled adapters)
  and stays exactly PEFT's result;
- saved memory: three projections of one input keep that input once, not three bf16 copies;
- apply/revert on a LoRA Llama (report counts, patch-before-PEFT then again after);
- ``gpu``: Llama-3-8B MLP projection sizes, bf16 base + fp32 adapters under autocast, with times printed.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

import hf_fastkern
from hf_fastkern import apply_fast_kernels, revert_fast_kernels
from hf_fastkern.kernels.dispatch import FastKernFallbackWarning, reset_warnings
from hf_fastkern.layers import fused_lora
from tests.harness import time_fwd_bwd_gpu
from tests.test_fused_mlp import _compare, saved_bytes
from tests.test_fused_mlp import _Count as _CountApply
from tests.test_patch_archs import ARCHS, build

peft = pytest.importorskip("peft")

IN, OUT, R = 24, 40, 3
TOKENS = (5, 7)  # 35 tokens


class _Proj(nn.Module):
    def __init__(self, bias: bool, n: int = 1, d_in: int = IN, d_out: int = OUT) -> None:
        super().__init__()
        self.names = [f"p{i}" for i in range(n)]
        for name in self.names:
            setattr(self, name, nn.Linear(d_in, d_out, bias=bias))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sum(getattr(self, n)(x) for n in self.names)


def _wrapped(bias: bool = True, n: int = 1, dropout: float = 0.0, d_in: int = IN, d_out: int = OUT,
             r: int = R, **kw) -> nn.Module:
    torch.manual_seed(0)
    m = _Proj(bias, n, d_in, d_out)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0.0, 0.3)
    cfg = peft.LoraConfig(r=r, lora_alpha=2 * r + 1, target_modules=m.names, lora_dropout=dropout,
                          init_lora_weights="gaussian", **kw)
    w = peft.get_peft_model(m, cfg)
    with torch.no_grad():  # lora_B starts at zero: give it values so both directions are exercised
        for i, (name, p) in enumerate(w.named_parameters()):
            if "lora_B" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(i)))
    return w.train()


def _patch(w: nn.Module) -> nn.Module:
    report = apply_fast_kernels(w, attention=False, cross_entropy=False)
    assert report.count("lora_linear") == len(w.base_model.model.names), str(report)
    return w


def _run(w: nn.Module, x: torch.Tensor, autocast: bool, seed: int = 5) -> list[torch.Tensor]:
    """[y, dx, grads of the trainable parameters in name order] for the loss <y, fixed random>."""
    w.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_()
    torch.manual_seed(seed)  # dropout masks
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=autocast):
        y = w(x)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(2)).to(y.device, y.dtype)
    y.backward(dy)
    return [y.detach(), x.grad] + [p.grad for _, p in w.named_parameters() if p.requires_grad]


def _Count(monkeypatch: pytest.MonkeyPatch):
    """Counts LoRALinearFunction.apply calls (which calls took the fused node)."""
    return _CountApply(monkeypatch, fused_lora.LoRALinearFunction)


# mode: (base dtype, adapter dtype, input dtype, autocast, tolerance dtype)
MODES = {
    "fp32": (torch.float32, torch.float32, torch.float32, False, torch.float32),
    "bf16": (torch.bfloat16, torch.bfloat16, torch.bfloat16, False, torch.bfloat16),
    "bf16_base_fp32_adapters": (torch.bfloat16, torch.float32, torch.bfloat16, False, torch.bfloat16),
    # PEFT's default adapters (autocast_adapter_dtype=True keeps them fp32) in a plain fp16 loop (issue 21)
    "fp16_base_fp32_adapters": (torch.float16, torch.float32, torch.float16, False, torch.float16),
    "autocast_fp32": (torch.float32, torch.float32, torch.float32, True, torch.bfloat16),
    "autocast_bf16_base": (torch.bfloat16, torch.float32, torch.bfloat16, True, torch.bfloat16),
}


def _setup(mode: str, bias: bool, base_trainable: bool, **kw) -> nn.Module:
    base_dt, lora_dt, _, _, _ = MODES[mode]
    w = _wrapped(bias, **kw)
    for name, p in w.named_parameters():
        p.data = p.data.to(lora_dt if "lora_" in name else base_dt)
        if base_trainable and "base_layer" in name:
            p.requires_grad_(True)
    return w


@pytest.mark.parametrize("shape", [TOKENS, (1,), ()], ids=["tokens", "one", "vector"])
@pytest.mark.parametrize("base_trainable", [False, True], ids=["frozen", "trainable_base"])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("mode", list(MODES))
def test_lora_linear_matches_peft(mode, bias, base_trainable, shape, monkeypatch):
    _, _, x_dt, autocast, tol = MODES[mode]
    w = _setup(mode, bias, base_trainable)
    oracle_m = copy.deepcopy(w).double()
    base_m = copy.deepcopy(w)
    _patch(w)
    count = _Count(monkeypatch)
    x = torch.randn(*shape, IN, generator=torch.Generator().manual_seed(1))
    got = _run(w, x.to(x_dt), autocast)
    assert count.n == 1
    base = _run(base_m, x.to(x_dt), autocast)
    oracle = _run(oracle_m, x.double(), autocast)
    trainable = [n for n, p in w.named_parameters() if p.requires_grad]
    assert len(got) == 2 + len(trainable) and len(trainable) == (2 + (1 + bias) * base_trainable)
    _compare(got, oracle, base, tol, f"{mode} bias={bias} base_trainable={base_trainable} {shape}")


def test_lora_linear_empty_input(monkeypatch):
    w = _patch(_wrapped())
    count = _Count(monkeypatch)
    x = torch.zeros(0, IN, requires_grad=True)
    y = w(x)
    y.sum().backward()
    assert count.n == 1 and y.shape == (0, OUT) and x.grad.shape == (0, IN)
    grads = [p.grad for n, p in w.named_parameters() if "lora_" in n]
    assert len(grads) == 2 and all(g is not None and not g.any() for g in grads)


def _two_adapters(w: nn.Module) -> None:
    torch.manual_seed(4)
    w.add_adapter("second", peft.LoraConfig(r=2, target_modules=["p0"], init_lora_weights="gaussian"))
    w.base_model.model.p0.set_adapter(["default", "second"])
    with torch.no_grad():
        w.base_model.model.p0.lora_B["second"].weight.normal_()


@pytest.mark.parametrize("case", ["dropout", "dora", "two_adapters", "merged", "adapter_names", "merged_after_patch"])
def test_lora_linear_unsupported_runs_peft(case, monkeypatch):
    """What the fused node does not cover runs PEFT's forward, PEFT's exact result. A layer whose structure rules
    the node out when it is patched (dropout, DoRA, two adapters, merged) is not bound: the report lists it under
    "left" with the reason, never under "patched". A bound layer that falls back later (merged after patching)
    warns once and the report lists it as a fallback; ``adapter_names`` (a per-call argument) runs PEFT's forward
    silently."""
    w = _wrapped(dropout=0.1 if case == "dropout" else 0.0, **({"use_dora": True} if case == "dora" else {}))
    if case == "two_adapters":
        _two_adapters(w)
    if case == "merged":
        w.base_model.model.p0.merge()
    ref = copy.deepcopy(w)
    structural = case in ("dropout", "dora", "two_adapters", "merged")
    report = apply_fast_kernels(w, attention=False, cross_entropy=False)
    if structural:
        assert report.count("lora_linear") == 0, str(report)
        assert any(what.startswith("lora_linear") for what, _ in report.skipped), str(report)
    else:
        assert report.count("lora_linear") == 1, str(report)
    if case == "merged_after_patch":
        w.base_model.model.p0.merge()
        ref.base_model.model.p0.merge()
        assert any("merged" in why for _, why in hf_fastkern.report(w).fallbacks)
    count = _Count(monkeypatch)
    reset_warnings()
    x = torch.randn(*TOKENS, IN, generator=torch.Generator().manual_seed(1))
    if case == "adapter_names":
        proj, ref_proj = w.base_model.model.p0, ref.base_model.model.p0
        names = ["default"] * TOKENS[0]
        got, want = proj(x, adapter_names=names), ref_proj(x, adapter_names=names)
        assert torch.equal(got, want)
    else:
        if structural:
            got = _run(w, x, False)
        else:
            with pytest.warns(FastKernFallbackWarning, match="a LoRA linear runs PEFT's forward"):
                got = _run(w, x, False)
        want = _run(ref, x, False)
        # (a merged adapter gets no gradient, None in both)
        assert len(got) == len(want) and all(a is b is None or torch.equal(a, b) for a, b in zip(got, want)), case
    assert count.n == 0


def test_lora_linear_disabled_adapters(monkeypatch, recwarn):
    """``with model.disable_adapter()`` (DPO's reference pass): the base linear alone, silently."""
    w = _patch(_wrapped())
    ref = _wrapped()
    count = _Count(monkeypatch)
    reset_warnings()
    x = torch.randn(*TOKENS, IN)
    with w.disable_adapter(), ref.disable_adapter(), torch.no_grad():
        assert torch.equal(w(x), ref(x))
    assert count.n == 0
    assert not [r for r in recwarn if issubclass(r.category, FastKernFallbackWarning)]


def test_lora_linear_hooked_base_runs_peft(monkeypatch):
    """A forward hook on the base layer (what a hook library adds): PEFT's forward, so the hook runs."""
    w = _patch(_wrapped())
    calls = []
    w.base_model.model.p0.base_layer.register_forward_hook(lambda *a: calls.append(1))
    count = _Count(monkeypatch)
    reset_warnings()
    with pytest.warns(FastKernFallbackWarning, match="module hooks"):
        w(torch.randn(3, IN))
    assert calls == [1] and count.n == 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_lora_linear_no_autocast_saves_no_fp32_copy(dtype):
    """fp32 adapters on a bf16/fp16 base without autocast (issue 21): PEFT's lora_A keeps an fp32 copy of the
    input per projection (``_cast_input_dtype``); the fused node keeps the input itself, once, and casts it
    again in backward (the same values: the cast is exact)."""
    tokens = TOKENS[0] * TOKENS[1]
    mode = "bf16_base_fp32_adapters" if dtype == torch.bfloat16 else "fp16_base_fp32_adapters"

    def call(patched: bool):
        w = _setup(mode, bias=False, base_trainable=False, n=3)
        if patched:
            _patch(w)
        x = torch.randn(*TOKENS, IN).to(dtype).requires_grad_()
        return lambda: (w(x), w)

    fused, unfused = saved_bytes(call(True)), saved_bytes(call(False))
    # PEFT: three fp32 copies of x (4 bytes an element); fused: x itself, once (not a parameter: counted)
    assert unfused - fused >= 3 * tokens * IN * 4 - tokens * IN * dtype.itemsize, (unfused, fused)


def test_lora_linear_saves_input_once_under_autocast():
    """Three projections of one bf16 input under autocast: PEFT's lora_A layers each keep their own bf16 copy
    of the input (the cast back from PEFT's fp32 up-cast); the fused node keeps the input itself, once."""
    tokens = TOKENS[0] * TOKENS[1]

    def call(patched: bool):
        w = _setup("autocast_bf16_base", bias=False, base_trainable=False, n=3)
        if patched:
            _patch(w)
        x = torch.randn(*TOKENS, IN).to(torch.bfloat16).requires_grad_()

        def f():
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return w(x), w
        return f

    fused, unfused = saved_bytes(call(True)), saved_bytes(call(False))
    # PEFT: 3 copies of x; fused: x once (x is not a parameter: counted); the rank-r and weight-cast tensors
    # are the same or smaller in the fused node
    assert unfused - fused >= 2 * tokens * IN * 2, (unfused, fused)


def test_apply_revert_and_patch_before_peft():
    """Report counts on a LoRA Llama; revert restores PEFT's forward; patching before ``get_peft_model`` binds
    nothing, and a second call after it binds the new layers."""
    from tests.test_peft import lora_with_dropout

    llama = ARCHS[0]
    m = lora_with_dropout(build(llama), 0.0)
    layers = m.config.num_hidden_layers
    report = apply_fast_kernels(m)
    assert report.patched.get("lora_linear") == 7 * layers, str(report)
    lin = m.base_model.model.model.layers[0].self_attn.q_proj
    assert "forward" in lin.__dict__
    revert_fast_kernels(m)
    assert "forward" not in lin.__dict__

    m = build(llama)
    first = apply_fast_kernels(m)
    assert "lora_linear" not in first.patched
    m = lora_with_dropout(m, 0.0)
    second = apply_fast_kernels(m)
    assert second.patched.get("lora_linear") == 7 * layers and second.already.get("norm"), str(second)


@pytest.mark.gpu
@pytest.mark.parametrize("autocast", [True, False], ids=["autocast", "no_autocast"])
def test_lora_linear_gpu_real_size(autocast):
    """Llama-3-8B up projection (4096 -> 14336) over 8192 tokens, r 16, bf16 base + fp32 adapters under bf16
    autocast or in a plain loop (issue 21): fused vs PEFT vs an fp64 oracle; fwd+bwd times and peak memory
    printed (-s), not asserted."""
    t, d_in, d_out = 8192, 4096, 14336
    w = _wrapped(bias=False, d_in=d_in, d_out=d_out, r=16)
    with torch.no_grad():
        for name, p in w.named_parameters():
            if "base_layer" in name:
                p.normal_(0.0, 0.02)
            if "lora_B" in name:
                p.normal_(0.0, 0.02)
            p.data = p.data.to("cuda", torch.float32 if "lora_" in name else torch.bfloat16)
    oracle_m, base_m = copy.deepcopy(w).double(), copy.deepcopy(w)
    _patch(w)
    x = torch.randn(t, d_in, device="cuda")
    got = _run(w, x.bfloat16(), autocast)
    base = _run(base_m, x.bfloat16(), autocast)
    oracle = _run(oracle_m, x.bfloat16().double(), autocast)
    _compare(got, oracle, base, torch.bfloat16, f"gpu 8b up_proj autocast={autocast}")
    xb = x.bfloat16().requires_grad_()
    dy = torch.randn(t, d_out, device="cuda", dtype=torch.bfloat16)  # made once: the timing is the layer's
    ms, peak = time_fwd_bwd_gpu({"peft": base_m, "fused": w}, xb, dy, autocast)
    print(f"\n8B up_proj LoRA fwd+bwd (autocast={autocast}): PEFT {ms['peft']:.2f} ms {peak['peft']:.2f} GiB, "
          f"fused {ms['fused']:.2f} ms {peak['fused']:.2f} GiB")
