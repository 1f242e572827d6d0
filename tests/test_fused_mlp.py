"""glu_down / GLUDownFunction: the gated MLP that recomputes SwiGLU/GeGLU in backward instead of storing it.

- forward and every gradient (input, gate/up/down weights and biases, LoRA A/B) vs the unfused path (PyTorch's
  same-dtype baseline) and the fp64 oracle, for SwiGLU and both GeGLUs, separate gate/up and the fused
  ``gate_up`` (Phi-3), in fp32, bf16 and bf16 autocast over fp32 master weights;
- PEFT LoRA on the down projection: dropout 0 takes the lean path, dropout 0.1 / DoRA / two active adapters /
  a merged adapter do not (and stay correct); the frozen base runs no weight-gradient matmul;
- the saved-tensor bytes: the lean path saves exactly ``tokens x intermediate x itemsize`` less per MLP;
- a tiny patched Llama + PEFT LoRA on all seven projections equals the unpatched PEFT model, with and without
  gradient checkpointing (reentrant and not), and compiles (aot_eager);
- ``gpu``: the same at Llama-3-8B MLP sizes (8192 tokens, 4096 -> 14336), bf16.
CPU cases run the Triton kernels under the interpreter at tiny, odd sizes.
"""
from __future__ import annotations

import copy
import types

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from hf_fastkern import apply_fast_kernels, revert_fast_kernels
from hf_fastkern.kernels.dispatch import FastKernFallbackWarning, reset_warnings
from hf_fastkern.layers import common, fused_mlp
from hf_fastkern.patches.factories import fused_gated_mlp_factory, gated_mlp_factory
from tests.test_patch_archs import ARCHS, batch, build
from tests.tolerances import assert_close

peft = pytest.importorskip("peft")

HIDDEN, INTER, SHAPE = 40, 72, (2, 7)  # odd token count, widths not powers of two
ACTS = ["silu", "gelu", "gelu_pytorch_tanh"]
MODES = ["fp32", "bf16", "autocast"]  # autocast: bf16 autocast over fp32 weights and inputs
LLAMA = ARCHS[0]


class _MLP(nn.Module):
    """Llama-style (gate_proj/up_proj/down_proj) or Phi-3-style (gate_up_proj/down_proj) gated MLP."""

    def __init__(self, fused: bool, bias: bool, hidden: int = HIDDEN, inter: int = INTER) -> None:
        super().__init__()
        if fused:
            self.gate_up_proj = nn.Linear(hidden, 2 * inter, bias=bias)
        else:
            self.gate_proj = nn.Linear(hidden, inter, bias=bias)
            self.up_proj = nn.Linear(hidden, inter, bias=bias)
        self.down_proj = nn.Linear(inter, hidden, bias=bias)


def _patched(mlp: nn.Module, act: str, recompute: bool) -> nn.Module:
    """Bind the registry's replacement forward, as apply_fast_kernels does, on this instance."""
    fused = hasattr(mlp, "gate_up_proj")
    factory = fused_gated_mlp_factory() if fused else gated_mlp_factory()
    fn = factory(mlp, types.SimpleNamespace(hidden_act=act), recompute=recompute)
    mlp.forward = types.MethodType(fn, mlp)
    return mlp


def _mlp(fused: bool, bias: bool, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    m = _MLP(fused, bias)
    with torch.no_grad():  # std 0.3: activations in the range where silu/gelu bend
        for p in m.parameters():
            p.normal_(0.0, 0.3)
    return m


def _x(dtype=torch.float32, hidden: int = HIDDEN, shape=SHAPE, device="cpu") -> torch.Tensor:
    return (torch.randn(*shape, hidden, generator=torch.Generator().manual_seed(1))).to(device, dtype)


def _run(model: nn.Module, x: torch.Tensor, autocast: bool) -> list[torch.Tensor]:
    """[y, dx, grads of the trainable parameters in name order] for the loss <y, fixed random>."""
    model.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_()
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=autocast):
        y = model(x)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(2)).to(y.device, y.dtype)
    y.backward(dy)
    return [y.detach(), x.grad] + [p.grad for _, p in model.named_parameters() if p.requires_grad]


class _Count:
    """Counts ``fn.apply`` calls (default GLUDownFunction: which calls took the lean path)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, fn: type | None = None) -> None:
        self.n = 0
        fn = fn or fused_mlp.GLUDownFunction
        orig = fn.apply

        def apply(*args):
            self.n += 1
            return orig(*args)

        monkeypatch.setattr(fn, "apply", apply)


def _compare(got, oracle, base, dtype, tag):
    assert len(got) == len(oracle) == len(base)
    for i, (g, o, b) in enumerate(zip(got, oracle, base)):
        if b is None:  # a parameter the unfused path gives no gradient either (a merged adapter)
            assert g is None and o is None, f"{tag}: tensor {i} got a gradient the unfused path does not give"
            continue
        assert g is not None and g.dtype == b.dtype, f"{tag}: tensor {i} dtype {g is not None and g.dtype} vs {b.dtype}"
        assert_close(g, o, b, dtype, "output" if i == 0 else "grad", f"{tag} tensor {i}")


# ----------------------------------------------------------------------------------------------------------
# plain nn.Linear down projection


@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("fused", [False, True], ids=["gate_up_separate", "gate_up_fused"])
@pytest.mark.parametrize("act", ACTS)
def test_glu_down_matches_unfused(act, fused, mode, bias, monkeypatch):
    """Output and the gradients of x and every weight and bias: lean vs fp64 oracle, unfused as baseline."""
    dtype = torch.bfloat16 if mode == "bf16" else torch.float32
    autocast = mode == "autocast"
    tol = torch.bfloat16 if mode != "fp32" else torch.float32
    mlp = _mlp(fused, bias).to(dtype)
    count = _Count(monkeypatch)
    got = _run(_patched(copy.deepcopy(mlp), act, True), _x(dtype), autocast)
    assert count.n == 1
    base = _run(_patched(copy.deepcopy(mlp), act, False), _x(dtype), autocast)
    assert count.n == 1, "recompute=False took the lean path"
    oracle = _run(_patched(copy.deepcopy(mlp).double(), act, False), _x(torch.float64), autocast)
    _compare(got, oracle, base, tol, f"{act} fused={fused} {mode} bias={bias}")


@pytest.mark.parametrize("mode", ["fp32", "bf16"])
@pytest.mark.parametrize("act", ACTS)
def test_glu_down_reference_backward(act, mode, monkeypatch):
    """HF_FASTKERN_FORCE_REFERENCE=1 (and CPUs without Triton): the lean path recomputes with the reference
    and differentiates it with autograd's own formulas, op for op."""
    monkeypatch.setenv("HF_FASTKERN_FORCE_REFERENCE", "1")
    dtype = torch.bfloat16 if mode == "bf16" else torch.float32
    mlp = _mlp(False, bias=True).to(dtype)
    count = _Count(monkeypatch)
    got = _run(_patched(copy.deepcopy(mlp), act, True), _x(dtype), False)
    assert count.n == 1
    base = _run(_patched(copy.deepcopy(mlp), act, False), _x(dtype), False)
    oracle = _run(_patched(copy.deepcopy(mlp).double(), act, False), _x(torch.float64), False)
    _compare(got, oracle, base, dtype, f"reference {act} {mode}")


def test_glu_down_hooks_take_unfused_path(monkeypatch):
    """A forward hook on down_proj (or a global module hook) must run: such a call takes the unfused path."""
    mlp = _patched(_mlp(False, bias=False), "silu", True)
    seen = []
    handle = mlp.down_proj.register_forward_hook(lambda m, a, out: seen.append(out.shape))
    count = _Count(monkeypatch)
    mlp(_x())
    assert count.n == 0 and seen == [(*SHAPE, HIDDEN)]
    handle.remove()
    handle = torch.nn.modules.module.register_module_forward_hook(lambda m, a, out: None)
    try:
        mlp(_x())
    finally:
        handle.remove()
    assert count.n == 0
    mlp(_x())
    assert count.n == 1


def test_glu_down_parts_cache_follows_module_changes(monkeypatch):
    """down_parts is cached per nn.Linear (host cost per call, issue 7) but every change its verdict depends on
    is seen at the next call: hooks added and removed, an instance forward, a replaced weight."""
    mlp = _patched(_mlp(False, bias=False), "silu", True)
    down = mlp.down_proj
    count = _Count(monkeypatch)
    mlp(_x())
    assert count.n == 1
    assert common.down_parts_cached(down) is common.down_parts_cached(down)  # a hit: no new walk
    seen = []
    handle = down.register_forward_hook(lambda m, a, out: seen.append(1))
    mlp(_x())
    assert count.n == 1 and seen == [1]
    handle.remove()
    mlp(_x())
    assert count.n == 2
    down.forward = types.MethodType(nn.Linear.forward, down)
    mlp(_x())
    assert count.n == 2
    del down.forward
    # a new weight object: the lean path must read it, not the cached one
    down.weight = nn.Parameter(down.weight.detach() * 2)
    got = mlp(_x())
    assert count.n == 3
    want = _patched(copy.deepcopy(mlp), "silu", False)(_x())
    assert torch.equal(got, want)
    assert common.down_parts_cached(down)[0].weight is down.weight


def test_glu_down_inference_mode():
    mlp = _patched(_mlp(False, bias=True), "gelu", True)
    want = _patched(copy.deepcopy(mlp), "gelu", False)
    with torch.inference_mode():
        assert torch.equal(mlp(_x()), want(_x()))


def test_glu_down_autocast_keeps_grad_dtypes():
    """bf16 autocast over fp32 weights: the output is bf16 and the weight gradients fp32, as unfused."""
    mlp = _patched(_mlp(False, True), "silu", True)
    y, dx, *grads = _run(mlp, _x(), autocast=True)
    assert y.dtype == torch.bfloat16 and dx.dtype == torch.float32
    assert all(g.dtype == torch.float32 for g in grads)


def test_glu_down_no_grad_and_empty():
    mlp = _patched(_mlp(False, False), "silu", True)
    with torch.no_grad():
        y = mlp(_x())
    assert y.shape == (*SHAPE, HIDDEN) and not y.requires_grad
    empty = _x(shape=(0,)).requires_grad_()
    out = mlp(empty)
    out.sum().backward()
    assert out.shape == (0, HIDDEN) and empty.grad.shape == (0, HIDDEN)


def test_glu_down_bad_kind():
    with pytest.raises(ValueError, match="kind"):
        fused_mlp.glu_down(torch.randn(3, 4), torch.randn(3, 4), nn.Linear(4, 2), "relu")


# ----------------------------------------------------------------------------------------------------------
# PEFT LoRA on the projections


def _lora(mlp: nn.Module, dropout: float = 0.0, targets=("gate_proj", "up_proj", "down_proj"), **kw) -> nn.Module:
    """PEFT LoRA on ``mlp``'s projections (frozen base), lora_B non-zero so both directions are exercised."""
    torch.manual_seed(3)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=list(targets), lora_dropout=dropout,
                          init_lora_weights="gaussian", **kw)
    wrapped = peft.get_peft_model(nn.Sequential(mlp), cfg).train()
    with torch.no_grad():
        for i, (n, p) in enumerate(wrapped.named_parameters()):
            if "lora_B" in n:
                p.copy_(0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(i)))
    return wrapped


def _inner(wrapped: nn.Module) -> nn.Module:
    return wrapped.base_model.model[0]


def _lora_run(wrapped: nn.Module, x: torch.Tensor, autocast: bool, seed: int = 5) -> list[torch.Tensor]:
    torch.manual_seed(seed)  # the dropout masks
    return _run(_inner(wrapped), x, autocast)


@pytest.mark.parametrize("mode", ["fp32", "bf16_base", "autocast"])
@pytest.mark.parametrize("fused", [False, True], ids=["gate_up_separate", "gate_up_fused"])
def test_glu_down_lora(fused, mode, monkeypatch):
    """LoRA (dropout 0) on every projection: lean path; x and all A/B gradients; the frozen base gets none.
    bf16_base: a bf16 model with PEFT's fp32 adapters (autocast_adapter_dtype), no autocast."""
    targets = ("gate_up_proj", "down_proj") if fused else ("gate_proj", "up_proj", "down_proj")
    dtype = torch.bfloat16 if mode == "bf16_base" else torch.float32
    tol = torch.float32 if mode == "fp32" else torch.bfloat16
    wrapped = _lora(_mlp(fused, bias=True).to(dtype), targets=targets)
    count = _Count(monkeypatch)
    _patched(_inner(wrapped), "silu", True)
    got = _lora_run(wrapped, _x(dtype), mode == "autocast")
    assert count.n == 1
    names = [n for n, p in _inner(wrapped).named_parameters() if p.requires_grad]
    assert names and all("lora_" in n for n in names) and len(names) == 2 * len(targets)
    assert all(p.grad is None for n, p in _inner(wrapped).named_parameters() if "lora_" not in n)
    base_model = copy.deepcopy(wrapped)
    _patched(_inner(base_model), "silu", False)
    base = _lora_run(base_model, _x(dtype), mode == "autocast")
    oracle_model = copy.deepcopy(wrapped).double()
    _patched(_inner(oracle_model), "silu", False)
    oracle = _lora_run(oracle_model, _x(torch.float64), mode == "autocast")
    assert count.n == 1
    _compare(got, oracle, base, tol, f"lora fused={fused} {mode}")


@pytest.mark.parametrize("case", ["dropout", "dora", "two_adapters", "merged"])
def test_glu_down_lora_unsupported_takes_unfused_path(case, monkeypatch):
    """LoRA dropout 0.1, DoRA, two active adapters, a merged adapter: unfused (h stored), still correct."""
    kw = {"use_dora": True} if case == "dora" else {}
    wrapped = _lora(_mlp(False, bias=False), dropout=0.1 if case == "dropout" else 0.0, **kw)
    inner = _inner(wrapped)
    if case == "two_adapters":
        torch.manual_seed(4)
        wrapped.add_adapter("second", peft.LoraConfig(r=2, target_modules=["down_proj"], init_lora_weights="gaussian"))
        inner.down_proj.set_adapter(["default", "second"])
        with torch.no_grad():
            inner.down_proj.lora_B["second"].weight.normal_()
    if case == "merged":
        inner.down_proj.merge()
    _, why = common.down_parts(inner.down_proj)
    assert why, case
    count = _Count(monkeypatch)
    oracle_model = copy.deepcopy(wrapped).double()
    base_model = copy.deepcopy(wrapped)
    _patched(inner, "silu", True)
    reset_warnings()
    with pytest.warns(FastKernFallbackWarning, match="MLP recompute takes the unfused path"):
        got = _lora_run(wrapped, _x(), False)
    assert count.n == 0, case
    for m in (oracle_model, base_model):
        _patched(_inner(m), "silu", False)
    oracle = _lora_run(oracle_model, _x(torch.float64), False)
    base = _lora_run(base_model, _x(), False)
    _compare(got, oracle, base, torch.float32, f"unsupported {case}")


def test_glu_down_lora_disabled_adapters_lean(monkeypatch):
    """``with model.disable_adapter()`` (e.g. DPO's reference pass): the lean path over the base alone."""
    wrapped = _lora(_mlp(False, bias=True))
    count = _Count(monkeypatch)
    ref = copy.deepcopy(wrapped)
    _patched(_inner(ref), "silu", False)
    _patched(_inner(wrapped), "silu", True)
    x = _x()
    with wrapped.disable_adapter(), ref.disable_adapter(), torch.no_grad():
        got = _inner(wrapped)(x)
        want = _inner(ref)(x)
    assert count.n == 1 and torch.equal(got, want)


def test_frozen_down_weight_runs_no_weight_gradient_matmul():
    """With the down weight frozen the backward runs exactly one ``tokens x hidden x intermediate`` matmul
    fewer (2 T H I FLOPs): dW = dy^T h is skipped, not computed and dropped."""
    from torch.utils.flop_counter import FlopCounterMode

    def backward_flops(frozen: bool) -> int:
        mlp = _patched(_mlp(False, bias=False), "silu", True)
        mlp.down_proj.weight.requires_grad_(not frozen)
        y = mlp(_x().requires_grad_())
        with FlopCounterMode(display=False) as fc:
            y.sum().backward()
        assert (mlp.down_proj.weight.grad is None) == frozen
        return fc.get_total_flops()

    tokens = SHAPE[0] * SHAPE[1]
    assert backward_flops(False) - backward_flops(True) == 2 * tokens * HIDDEN * INTER


def test_frozen_down_without_adapter_skips_recompute(monkeypatch):
    """No weight gradient reads h (down frozen, no adapter on it: LoRA on the other projections): backward
    computes dh = dy W alone and does not recompute the activation."""
    calls = []
    orig = fused_mlp._act_fwd
    monkeypatch.setattr(fused_mlp, "_act_fwd", lambda *a: calls.append(1) or orig(*a))
    wrapped = _lora(_mlp(False, bias=False), targets=("gate_proj", "up_proj"))
    mlp = _patched(_inner(wrapped), "silu", True)
    y = mlp(_x())
    assert len(calls) == 1
    y.sum().backward()
    assert len(calls) == 1 and all(p.grad is not None for n, p in mlp.named_parameters() if "lora_" in n)


# ----------------------------------------------------------------------------------------------------------
# what is saved for backward


def saved_bytes(fn) -> int:
    """Bytes of the distinct non-parameter storages autograd saves while ``fn()`` runs (a storage saved twice,
    or two views of one storage, count once: that is the memory held)."""
    storages: dict[int, int] = {}
    params: set[int] = set()

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out, model = fn()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    del out
    return sum(n for ptr, n in storages.items() if ptr not in params)


@pytest.mark.parametrize("setup", ["full_fp32", "full_bf16", "lora_fp32", "gate_up_fused_fp32"])
def test_lean_path_saves_h_less(setup):
    """Unfused minus lean saved bytes = tokens x intermediate x itemsize (the activation ``h``), exactly."""
    dtype = torch.bfloat16 if "bf16" in setup else torch.float32
    fused = "gate_up_fused" in setup

    def make(recompute: bool) -> nn.Module:
        mlp = _mlp(fused, bias=False).to(dtype)
        if "lora" in setup:
            mlp = _inner(_lora(mlp))
        return _patched(mlp, "silu", recompute)

    x = _x(dtype).requires_grad_()

    def call(recompute):
        model = make(recompute)
        return (lambda: (model(x), model))

    lean, unfused = saved_bytes(call(True)), saved_bytes(call(False))
    tokens = SHAPE[0] * SHAPE[1]
    assert unfused - lean == tokens * INTER * dtype.itemsize, (setup, unfused, lean)


def _autocast_saving(tokens: int, hidden: int, inter: int, lora_down: bool, r: int = 4) -> int:
    """Bytes the lean path saves less under bf16 autocast over fp32 weights: h (bf16) and the bf16 copies of
    the down weight (and of lora_A / lora_B) that the unfused path's matmuls keep for backward. With LoRA the
    base is frozen, so the unfused base matmul does not save h, but lora_A saves its bf16 cast of it."""
    return 2 * (tokens * inter + hidden * inter + ((r * inter + hidden * r) if lora_down else 0))


@pytest.mark.parametrize("lora_down", [False, True], ids=["full", "lora"])
def test_lean_path_saves_less_under_autocast(lora_down):
    """bf16 autocast over fp32 weights: h (bf16) is not saved, nor the bf16 weight copies."""
    def call(recompute):
        mlp = _mlp(False, bias=False)
        if lora_down:
            mlp = _inner(_lora(mlp, targets=("down_proj",)))
        model = _patched(mlp, "silu", recompute)

        def f():
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return model(_x().requires_grad_()), model
        return f

    lean, unfused = saved_bytes(call(True)), saved_bytes(call(False))
    assert unfused - lean == _autocast_saving(SHAPE[0] * SHAPE[1], HIDDEN, INTER, lora_down), (unfused, lean)


# ----------------------------------------------------------------------------------------------------------
# the patched model


def _gc(model, reentrant: bool):
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    return model.train()


@pytest.mark.parametrize("ckpt", ["none", "non_reentrant", "reentrant"])
def test_patched_llama_lora_matches_peft(ckpt, monkeypatch):
    """Tiny Llama, LoRA (dropout 0) on q/k/v/o/gate/up/down: loss and every adapter gradient vs the unpatched
    PEFT model (fp64 oracle); every MLP call took the lean path (forward, checkpoint recompute)."""
    from tests.test_peft import check_step, lora_with_dropout

    def make():
        m = lora_with_dropout(build(LLAMA), 0.0)
        if ckpt != "none":
            m = _gc(m, ckpt == "reentrant")
        return m.train()

    peft_ref, patched = make(), make()
    report = apply_fast_kernels(patched)
    assert report.patched.get("mlp_recompute") == 2, str(report)
    count = _Count(monkeypatch)
    check_step(patched, peft_ref, f"llama lora ckpt={ckpt}")
    # check_step runs the patched model once: 2 layers, each MLP forward, and its recompute under checkpointing
    # per layer: the forward and, with checkpointing, its recompute (reentrant checkpointing's first pass runs
    # without autograd in training mode: the lean node still runs there, so both passes compute the same)
    assert count.n == 2 * (1 if ckpt == "none" else 2)


def test_lean_mlp_with_chunks_and_offload(monkeypatch):
    """mlp_chunk_tokens (the chunk replay differentiates through the lean node) and offload_activations,
    with non-reentrant checkpointing and LoRA: still the unpatched PEFT model's loss and adapter grads."""
    from tests.test_peft import CHUNK, check_step, lora_with_dropout

    peft_ref = _gc(lora_with_dropout(build(LLAMA), 0.0), False)
    patched = _gc(lora_with_dropout(build(LLAMA), 0.0), False)
    report = apply_fast_kernels(patched, offload_activations=True, mlp_chunk_tokens=CHUNK)
    assert report.patched.get("mlp_recompute") == 2 and report.patched.get("offload") == 1, str(report)
    count = _Count(monkeypatch)
    check_step(patched, peft_ref, "lean + chunks + offload")
    # per layer: forward chunks (no grad), checkpoint recompute chunks, backward replay chunks
    n_tokens = batch()[0].numel()
    assert count.n == 2 * 3 * -(-n_tokens // CHUNK)


def test_report_and_recompute_off(monkeypatch):
    """The report counts the lean MLPs and explains the others; mlp_recompute=False is the unfused path."""
    from tests.test_peft import lora_with_dropout

    model = lora_with_dropout(build(LLAMA), 0.1)
    report = apply_fast_kernels(model)
    assert report.patched["mlp"] == 2 and "mlp_recompute" not in report.patched, str(report)
    # the MLP is bound; its lean path falls back while down_proj has dropout: a fallback, with the reason
    assert any(w.startswith("mlp LlamaMLP") and "lora_dropout" in why for w, why in report.fallbacks), str(report)
    revert_fast_kernels(model)
    model = build(LLAMA)
    report = apply_fast_kernels(model, mlp_recompute=False)
    assert report.patched["mlp"] == 2 and "mlp_recompute" not in report.patched, str(report)
    # the only fallback: the fp32 model's attention (SDPA without autocast); no MLP is listed
    assert [w for w, _ in report.fallbacks] == ["attention"], str(report)
    count = _Count(monkeypatch)
    ids, labels = batch()
    model(input_ids=ids, labels=labels).loss.backward()
    assert count.n == 0


def test_patched_phi3_lean(monkeypatch):
    """Phi-3 (one gate_up_proj): lean path, full fine-tuning, loss and every gradient vs unpatched."""
    from tests.test_peft import step

    arch = next(a for a in ARCHS if a.name == "phi3")
    ref = build(arch).train()
    patched = build(arch).train()
    report = apply_fast_kernels(patched)
    assert report.patched.get("mlp_recompute") == 2, str(report)
    count = _Count(monkeypatch)
    oracle, base, got = step(copy.deepcopy(ref).double()), step(ref), step(patched)
    assert count.n == 2
    assert_close(got[0], oracle[0], base[0], torch.float32, "output", "phi3 loss")
    assert got[1].keys() == base[1].keys()
    for n in got[1]:
        assert_close(got[1][n], oracle[1][n], base[1][n], torch.float32, "grad", f"phi3 {n}")


def test_compile_lean_mlp():
    """torch.compile (aot_eager: forward and backward graphs, no C++ toolchain) traces the lean MLP with LoRA
    without a graph break and gives the eager loss and adapter gradients."""
    from tests.test_peft import lora_with_dropout, step

    model = lora_with_dropout(build(LLAMA), 0.0).train()
    apply_fast_kernels(model)
    eager = step(model)
    torch._dynamo.reset()
    ids, labels = batch()
    assert torch._dynamo.explain(model)(input_ids=ids, labels=labels).graph_break_count == 0
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager")
    loss, grads = step(compiled)
    grads = {n.removeprefix("_orig_mod."): g for n, g in grads.items()}
    assert_close(loss, eager[0], None, torch.float32, "output", "compiled loss")
    assert grads.keys() == eager[1].keys()
    for n, g in eager[1].items():
        assert_close(grads[n], g, None, torch.float32, "grad", f"compiled {n}")


# ----------------------------------------------------------------------------------------------------------
# GPU: Llama-3-8B MLP sizes (8192 tokens, hidden 4096, intermediate 14336), bf16


GPU_T, GPU_H, GPU_I = 8192, 4096, 14336


def _gpu_mlp(lora_down: bool, autocast: bool) -> nn.Module:
    torch.manual_seed(0)
    with torch.device("cuda"):
        mlp = _MLP(False, bias=False, hidden=GPU_H, inter=GPU_I)
    with torch.no_grad():
        for p in mlp.parameters():
            p.normal_(0.0, 0.02)
    if not autocast:
        mlp = mlp.to(torch.bfloat16)
    if lora_down:
        mlp = _inner(_lora(mlp, targets=("down_proj",)))
    return mlp


@pytest.mark.gpu
@pytest.mark.parametrize("act", ["silu", "gelu_pytorch_tanh"])
@pytest.mark.parametrize("setup", ["bf16_full", "autocast_lora_down"])
def test_glu_down_gpu(setup, act):
    """Lean vs unfused vs fp64 oracle at real sizes: output, dx and every trainable gradient."""
    autocast = setup.startswith("autocast")
    mlp = _gpu_mlp(lora_down="lora" in setup, autocast=autocast)
    dtype = torch.float32 if autocast else torch.bfloat16
    x = _x(dtype, hidden=GPU_H, shape=(GPU_T,), device="cuda")
    got = _run(_patched(copy.deepcopy(mlp), act, True), x, autocast)
    base = _run(_patched(copy.deepcopy(mlp), act, False), x, autocast)
    oracle = _run(_patched(copy.deepcopy(mlp).double(), act, False), x.double(), autocast)
    _compare(got, oracle, base, torch.bfloat16, f"gpu {setup} {act}")


@pytest.mark.gpu
@pytest.mark.parametrize("setup", ["bf16_full", "autocast_lora_down"])
def test_glu_down_gpu_memory_and_time(setup):
    """Saved bytes drop by exactly T x I x 2 (bf16 h), plus the bf16 weight copies under autocast; the memory
    held from forward to backward drops by at least that. The fwd+bwd peak of one MLP alone and the times are
    printed (-s), not asserted: the backward recomputes h, so one MLP's own peak barely moves; the saving is
    that every layer waiting for its backward holds g and u but not h."""
    autocast = setup.startswith("autocast")
    lora_down = "lora" in setup
    dtype = torch.float32 if autocast else torch.bfloat16
    x = _x(dtype, hidden=GPU_H, shape=(GPU_T,), device="cuda").requires_grad_()
    saved, held, peak, ms = {}, {}, {}, {}
    for recompute in (False, True):
        model = _patched(_gpu_mlp(lora_down=lora_down, autocast=autocast), "silu", recompute)

        def fwd(model=model):
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
                return model(x), model

        saved[recompute] = saved_bytes(fwd)
        for _ in range(2):  # warm-up (autotune), then measured
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            y, _ = fwd()
            held[recompute] = torch.cuda.memory_allocated() - before
            y.backward(torch.ones_like(y))
            end.record()
            torch.cuda.synchronize()
            peak[recompute] = torch.cuda.max_memory_allocated() - before
            ms[recompute] = start.elapsed_time(end)
            del y
            model.zero_grad(set_to_none=True)
            x.grad = None
    mib = 2.0**-20
    print(f"\n{setup}: saved {saved[False] * mib:.0f} -> {saved[True] * mib:.0f} MiB, held after forward "
          f"{held[False] * mib:.0f} -> {held[True] * mib:.0f} MiB, one-MLP peak {peak[False] * mib:.0f} -> "
          f"{peak[True] * mib:.0f} MiB, fwd+bwd {ms[False]:.2f} -> {ms[True]:.2f} ms")
    want = _autocast_saving(GPU_T, GPU_H, GPU_I, lora_down) if autocast else GPU_T * GPU_I * 2
    assert saved[False] - saved[True] == want
    assert held[False] - held[True] >= GPU_T * GPU_I * 2


@pytest.mark.gpu
def test_llama_step_peak_memory_gpu():
    """A 4-layer slice of the e2e benchmark model (hidden 2048, intermediate 8192, 4 x 2048 tokens, bf16
    autocast over fp32 weights): one training step's peak drops by at least 3 layers' h (the last layer's
    backward recomputes its own). Peaks are printed (-s)."""
    import transformers

    layers, tokens, inter = 4, 4 * 2048, 8192
    cfg = transformers.LlamaConfig(hidden_size=2048, intermediate_size=inter, num_hidden_layers=layers,
                                   num_attention_heads=32, num_key_value_heads=8, vocab_size=32000,
                                   max_position_embeddings=4096)
    ids = torch.randint(0, cfg.vocab_size, (4, 2048), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    peak = {}
    for recompute in (False, True):
        torch.manual_seed(0)
        with torch.device("cuda"):
            model = transformers.LlamaForCausalLM(cfg).train()
        report = apply_fast_kernels(model, mlp_recompute=recompute)
        assert report.count("mlp_recompute") == (layers if recompute else 0), str(report)
        for _ in range(2):  # warm-up (autotune), then measured
            model.zero_grad(set_to_none=True)
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            torch.cuda.synchronize()
            peak[recompute] = torch.cuda.max_memory_allocated() - before
            del loss
        del model
    h = tokens * inter * 2
    print(f"\nstep peak above weights: unfused {peak[False] / 2**30:.2f} GiB, lean {peak[True] / 2**30:.2f} GiB "
          f"(h = {h / 2**20:.0f} MiB per layer)")
    assert peak[False] - peak[True] >= (layers - 1) * h


def test_reentrant_checkpoint_passes_compute_the_same(monkeypatch):
    """Reentrant checkpointing runs a training module's forward without autograd, then recomputes it with
    autograd: both passes must take one path even where the routing table's grad and no-grad rules differ (here
    the activation routes to stock without grad, to the kernel with it), so the loss and the gradients come from
    the same computation. In eval mode without autograd the class forward may run (nothing to recompute)."""
    from torch.utils.checkpoint import checkpoint

    from hf_fastkern.kernels import routing

    real = routing.use_kernel
    monkeypatch.setattr(routing, "use_kernel",
                        lambda op, device, **case: case["grad"] if op == "glu" else real(op, device, **case))
    mlp = _patched(_mlp(False, bias=False), "silu", True)
    x = _x().requires_grad_()

    def grads(y):
        mlp.zero_grad(set_to_none=True)
        x.grad = None
        y.sum().backward()  # reentrant checkpointing takes no torch.autograd.grad
        return [x.grad.clone()] + [p.grad.clone() for p in mlp.parameters()]
    y_plain = mlp(x)
    g_plain = grads(y_plain)
    y_ckpt = checkpoint(mlp, x, use_reentrant=True)
    g_ckpt = grads(y_ckpt)
    assert torch.equal(y_plain, y_ckpt)
    assert all(torch.equal(a, b) for a, b in zip(g_plain, g_ckpt))

    class WithForward(type(mlp)):  # the test MLP has no class forward of its own; a transformers MLP has
        def forward(self, h):
            return self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h))
    stock_mlp = _mlp(False, bias=False)
    stock_mlp.__class__ = WithForward
    expected = WithForward.forward(stock_mlp, x)
    _patched(stock_mlp, "silu", True).eval()
    count = _Count(monkeypatch)
    with torch.no_grad():  # eval + no autograd + routed to stock: the class forward, no lean node
        assert torch.equal(stock_mlp(x), expected.detach()) and count.n == 0

