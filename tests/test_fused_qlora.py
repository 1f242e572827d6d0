"""QLoRALinearFunction: PEFT ``lora.bnb.Linear4bit`` (a LoRA adapter over a bitsandbytes NF4 base) in one node.

- output, ``dx`` and every adapter gradient vs PEFT's own 4-bit forward (PyTorch's same-dtype baseline) and an
  fp64 oracle on the same dequantized weight, judged by ``tests/tolerances.py`` (not bitwise: the node sums
  the adapter in the GEMM's accumulator where PEFT rounds it separately); bf16 with PEFT's fp32 adapters
  without and under autocast, fp32; with and without a base bias; dropout 0 and 0.25 (seeded: the same mask);
- the node keeps no dequantized ``[out, in]`` weight for backward;
- what runs PEFT's forward instead (disabled adapters, two active adapters, routing to stock) is exactly
  PEFT's result, and the report says so;
- a tiny Llama loaded in 4-bit through transformers' ``BitsAndBytesConfig`` (NF4, double quant), patched before
  ``get_peft_model``: every projection bound, a short training loss curve vs unpatched and an fp64 oracle;
- without bitsandbytes (blocked in a subprocess) the package imports and fuses a plain LoRA model.

Everything but the last test skips without bitsandbytes (CI does not install it).
"""
from __future__ import annotations

import copy
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from hf_fastkern import apply_fast_kernels, report, revert_fast_kernels
from hf_fastkern.kernels import routing
from hf_fastkern.layers import fused_qlora
from tests.harness import time_fwd_bwd_gpu
from tests.test_fused_mlp import _compare, _Count
from tests.tolerances import assert_close

peft = pytest.importorskip("peft")

IN, OUT, R = 64, 96, 4
TOKENS = (3, 5)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _bnb():
    return pytest.importorskip("bitsandbytes")


class _Proj(nn.Module):
    def __init__(self, bias: bool, compute: torch.dtype, d_in: int = IN, d_out: int = OUT, std: float = 0.3,
                 device: str = "cpu") -> None:
        super().__init__()
        bnb = _bnb()
        self.p0 = bnb.nn.Linear4bit(d_in, d_out, bias=bias, compute_dtype=compute, quant_type="nf4",
                                    compress_statistics=True)
        w = torch.randn(d_out, d_in, generator=torch.Generator().manual_seed(0)) * std
        self.p0.weight = bnb.nn.Params4bit(w, requires_grad=False, quant_type="nf4", compress_statistics=True)
        if bias:
            self.p0.bias = nn.Parameter(std * torch.randn(d_out, generator=torch.Generator().manual_seed(1)),
                                        requires_grad=False)
        self.p0 = self.p0.to(device)  # quantizes (NF4, double quant)
        self.is_loaded_in_4bit = True  # what PEFT reads to wrap Linear4bit layers in lora.bnb.Linear4bit

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.p0(x)


# mode: (compute dtype, input dtype, autocast, tolerance dtype); adapters stay fp32 (PEFT's default)
MODES = {
    "bf16_fp32_adapters": (torch.bfloat16, torch.bfloat16, False, torch.bfloat16),
    "autocast_bf16": (torch.bfloat16, torch.bfloat16, True, torch.bfloat16),
    "fp32": (torch.float32, torch.float32, False, torch.float32),
    # fp32 activations into a bf16-compute 4-bit layer (norms up-cast by prepare_model_for_kbit_training)
    "fp32_input_bf16_compute": (torch.bfloat16, torch.float32, False, torch.bfloat16),
    # the same under bf16 autocast (prepare_model_for_kbit_training + AMP): the sum stays in x's dtype, as PEFT's
    "fp32_input_autocast_bf16": (torch.bfloat16, torch.float32, True, torch.bfloat16),
}


def _wrapped(bias: bool = False, dropout: float = 0.0, compute: torch.dtype = torch.bfloat16, r: int = R,
             **kw) -> nn.Module:
    m = _Proj(bias, compute, **kw)
    torch.manual_seed(2)
    w = peft.get_peft_model(m, peft.LoraConfig(r=r, lora_alpha=2 * r + 1, target_modules=["p0"],
                                               lora_dropout=dropout, init_lora_weights="gaussian"))
    assert fused_qlora.is_qlora_linear(w.base_model.model.p0), type(w.base_model.model.p0)
    with torch.no_grad():  # lora_B starts at zero: give it values so both directions are exercised
        for i, (name, p) in enumerate(w.named_parameters()):
            if "lora_B" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(10 + i)))
    return w.to(kw.get("device", "cpu")).train()


def _run(w: nn.Module, x: torch.Tensor, autocast: bool) -> list[torch.Tensor]:
    """[y, dx, lora_A grad, lora_B grad] for the loss <y, fixed random>; dropout masks from seed 5."""
    w.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_()
    torch.manual_seed(5)
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=autocast):
        y = w(x)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(3)).to(y.device, y.dtype)
    y.backward(dy)
    return [y.detach(), x.grad] + [p.grad for _, p in w.named_parameters() if p.requires_grad]


def _oracle(w: nn.Module, x: torch.Tensor, lora_dtype: torch.dtype, p: float) -> list[torch.Tensor]:
    """The same function in fp64 on the same dequantized weight; the dropout mask PEFT draws (seed 5, a tensor of
    the adapter operand's dtype and x's shape, drawn first: the 4-bit base product draws nothing)."""
    layer = w.base_model.model.p0
    base = layer.base_layer
    wq = fused_qlora.dequantize(base.weight, base.weight.quant_state, torch.float64)
    la, lb = (t.detach().double().requires_grad_() for t in (layer.lora_A["default"].weight,
                                                             layer.lora_B["default"].weight))
    torch.manual_seed(5)
    mask = F.dropout(torch.ones(x.shape, dtype=lora_dtype, device=x.device), p, training=True).double() if p else 1.0
    x64 = x.detach().double().requires_grad_()
    y = F.linear(x64, wq, None if base.bias is None else base.bias.double())
    y = y + layer.scaling["default"] * F.linear(F.linear(x64 * mask, la), lb)
    y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(3)).to(y.device).double())
    return [y.detach(), x64.grad, la.grad, lb.grad]


@pytest.mark.parametrize("dropout", [0.0, 0.25], ids=["nodrop", "dropout"])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("mode", list(MODES))
def test_qlora_linear_matches_peft(mode, bias, dropout, monkeypatch):
    compute, x_dt, autocast, tol = MODES[mode]
    w = _wrapped(bias, dropout, compute)
    peft_m = copy.deepcopy(w)
    rep = apply_fast_kernels(w, attention=False, cross_entropy=False)
    assert rep.count("lora_linear") == 1, str(rep)
    count = _Count(monkeypatch, fused_qlora.QLoRALinearFunction)
    x = torch.randn(*TOKENS, IN, generator=torch.Generator().manual_seed(4)).to(x_dt)
    got = _run(w, x, autocast)
    assert count.n == 1
    base = _run(peft_m, x, autocast)
    assert count.n == 1
    oracle = _oracle(w, x, torch.float32, dropout)
    _compare(got, oracle, base, tol, f"{mode} bias={bias} dropout={dropout}")


@pytest.mark.gpu
@pytest.mark.parametrize("autocast", [True, False], ids=["autocast", "no_autocast"])
def test_qlora_linear_gpu_real_size(autocast, monkeypatch):
    """Llama-3-8B up projection (4096 -> 14336, NF4 double quant, bf16 compute) over 8192 tokens, r 16, fp32
    adapters: fused (routing pinned to the kernel) vs PEFT vs the fp64 oracle; fwd+bwd times and peak memory
    printed (-s), not asserted (bench_routing's qlora part measures them for the table)."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    monkeypatch.setenv(routing.MODE_ENV, routing.KERNEL)
    t, d_in, d_out = 8192, 4096, 14336
    w = _wrapped(d_in=d_in, d_out=d_out, r=16, std=0.02, device="cuda")
    base_m = copy.deepcopy(w)
    apply_fast_kernels(w, attention=False, cross_entropy=False)
    count = _Count(monkeypatch, fused_qlora.QLoRALinearFunction)
    x = torch.randn(t, d_in, device="cuda").bfloat16()
    got = _run(w, x, autocast)
    assert count.n == 1
    base = _run(base_m, x, autocast)
    oracle = _oracle(w, x, torch.bfloat16 if autocast else torch.float32, 0.0)
    _compare(got, oracle, base, torch.bfloat16, f"gpu 8b up_proj QLoRA autocast={autocast}")
    xb = x.requires_grad_()
    dy = torch.randn(t, d_out, device="cuda", dtype=torch.bfloat16)
    ms, peak = time_fwd_bwd_gpu({"peft": base_m, "fused": w}, xb, dy, autocast)
    print(f"\n8B up_proj QLoRA fwd+bwd (autocast={autocast}): PEFT {ms['peft']:.2f} ms {peak['peft']:.2f} GiB, "
          f"fused {ms['fused']:.2f} ms {peak['fused']:.2f} GiB")


def test_qlora_linear_keeps_no_dequantized_weight():
    w = _wrapped()
    apply_fast_kernels(w, attention=False, cross_entropy=False)
    shapes = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        shapes.append((tuple(t.shape), t.dtype))
        return t

    x = torch.randn(*TOKENS, IN, dtype=torch.bfloat16, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = w(x)
    y.float().sum().backward()
    assert shapes, "nothing saved: the node did not run"
    dense = [s for s in shapes if s[0] in ((OUT, IN), (IN, OUT)) and s[1].is_floating_point]
    assert not dense, f"a dequantized weight was saved for backward: {dense}"


def _two_adapters(w: nn.Module) -> None:
    w.add_adapter("other", peft.LoraConfig(r=R, lora_alpha=2 * R + 1, target_modules=["p0"],
                                           init_lora_weights="gaussian"))
    w.base_model.set_adapter(["default", "other"])


@pytest.mark.parametrize("case", ["disabled", "two_adapters", "routed_stock"])
def test_qlora_linear_runs_peft(case, monkeypatch):
    w = _wrapped()
    if case == "two_adapters":
        _two_adapters(w)
    peft_m = copy.deepcopy(w)
    apply_fast_kernels(w, attention=False, cross_entropy=False)
    if case == "routed_stock":
        monkeypatch.setenv(routing.MODE_ENV, routing.STOCK)
    count = _Count(monkeypatch, fused_qlora.QLoRALinearFunction)
    x = torch.randn(*TOKENS, IN, dtype=torch.bfloat16)
    ctx = w.disable_adapter() if case == "disabled" else torch.enable_grad()
    ctx_ref = peft_m.disable_adapter() if case == "disabled" else torch.enable_grad()
    with ctx:
        got = _run(w, x, False)
    with ctx_ref:
        want = _run(peft_m, x, False)
    assert count.n == 0, f"{case}: the fused node ran"
    for g, b in zip(got, want):
        assert (g is None and b is None) or torch.equal(g, b), f"{case}: differs from PEFT's forward"
    text = str(report(w))
    if case == "routed_stock":
        assert "fallback lora_linear" in text and "routed to stock" in text, text
    if case == "two_adapters":
        assert "2 active adapters" in text, text


def _tiny_llama_4bit(path) -> nn.Module:
    """A tiny random Llama saved and loaded back through transformers' BitsAndBytesConfig (NF4, double quant)."""
    from transformers import BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

    _bnb()
    if not os.path.exists(os.path.join(path, "config.json")):
        cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, vocab_size=256, max_position_embeddings=64)
        torch.manual_seed(0)
        dense = LlamaForCausalLM(cfg)
        with torch.no_grad():
            for p in dense.parameters():
                if p.dim() >= 2:
                    p.normal_(0.0, 0.1)
        dense.save_pretrained(path)
    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype=torch.bfloat16)
    return LlamaForCausalLM.from_pretrained(path, quantization_config=q, dtype=torch.bfloat16, device_map="cpu")


def _lora(model: nn.Module) -> nn.Module:
    torch.manual_seed(1)
    pm = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS,
                                                    init_lora_weights="gaussian"))
    with torch.no_grad():
        for i, (n, p) in enumerate(pm.named_parameters()):
            if "lora_B" in n:
                p.copy_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(i)))
    return pm


def _dense_oracle(path, qmodel: nn.Module) -> nn.Module:
    """The fp64 Llama with every 4-bit weight replaced by its dequantization and the same adapters."""
    from transformers import LlamaForCausalLM

    dense = LlamaForCausalLM.from_pretrained(path, dtype=torch.float64)
    qmods = dict(qmodel.named_modules())
    with torch.no_grad():
        for name, m in dense.named_modules():
            q = qmods.get(name)
            if q is not None and type(q).__name__ == "Linear4bit" and type(q).__module__.startswith("bitsandbytes"):
                m.weight.copy_(fused_qlora.dequantize(q.weight, q.weight.quant_state, torch.float64))
            elif q is not None and hasattr(m, "weight") and q.weight.shape == m.weight.shape:
                m.weight.copy_(q.weight.double())  # the bf16 embedding, norms and head as loaded
    pm = peft.get_peft_model(dense, peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS,
                                                    init_lora_weights="gaussian"))
    qp = dict(qmodel.named_parameters())
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.copy_(qp[n].double())
    return pm


def _train(model: nn.Module, steps: int = 4) -> torch.Tensor:
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(3, 256, (2, 12), generator=g)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    losses = []
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.detach().double())
    return torch.stack(losses)


def test_qlora_llama_patch_before_peft_trains_like_peft(tmp_path, monkeypatch):
    """Patched before get_peft_model (TRL's order): the 14 QLoRA projections are bound at the first forward,
    and 4 SGD steps give the unpatched loss curve within the tolerance table (fp64 oracle on the same weights)."""
    path = str(tmp_path / "llama")
    ref = _lora(_tiny_llama_4bit(path))
    patched_inner = _tiny_llama_4bit(path)
    apply_fast_kernels(patched_inner)
    patched = _lora(patched_inner)
    for (n, a), (_, b) in zip(patched.state_dict().items(), ref.state_dict().items()):
        assert torch.equal(a, b), f"{n}: the patched model does not start from the same weights"
    oracle_m = _dense_oracle(path, ref)
    count = _Count(monkeypatch, fused_qlora.QLoRALinearFunction)
    got = _train(patched)
    rep = report(patched)
    assert rep.count("lora_linear") == 14 and count.n == 14 * 4, str(rep)
    base = _train(ref)
    oracle = _train(oracle_m)
    assert_close(got, oracle, base, torch.bfloat16, "output", "QLoRA loss curve")
    assert len(set(got.tolist())) > 1, "the loss never changed: nothing trained"
    revert_fast_kernels(patched)
    assert "forward" not in patched.base_model.model.model.layers[0].self_attn.q_proj.__dict__


def test_package_works_without_bitsandbytes():
    """bitsandbytes blocked at import: hf_fastkern imports, and a plain PEFT LoRA model is fused as before."""
    code = textwrap.dedent("""
        import sys
        sys.modules["bitsandbytes"] = None  # any import of it raises ImportError
        import torch, peft
        from transformers import LlamaConfig, LlamaForCausalLM
        import hf_fastkern
        from hf_fastkern import apply_fast_kernels
        from hf_fastkern.layers import fused_qlora
        cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, vocab_size=256)
        m = peft.get_peft_model(LlamaForCausalLM(cfg), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
        rep = apply_fast_kernels(m)
        ids = torch.randint(0, 256, (1, 8))
        m(input_ids=ids, labels=ids).loss.backward()
        assert rep.count("lora_linear") == 4, str(rep)
        assert "bitsandbytes" not in {k for k, v in sys.modules.items() if v is not None}
        print("OK")
    """)
    env = dict(os.environ, TRITON_INTERPRET="1")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0 and r.stdout.strip().endswith("OK"), r.stderr[-2000:]
