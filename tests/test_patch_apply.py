"""The apply/revert mechanism itself: wrappers, bare models, unknown architectures, refusals, checkpoints."""
from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn as nn
import transformers

import hf_fastkern
from hf_fastkern import apply_fast_kernels, revert_fast_kernels
from hf_fastkern.patches.apply import is_patched
from hf_fastkern.patches.ledger import PatchReport
from hf_fastkern.patches.recipe import RECIPES
from tests.harness import ERROR_CASES, case_ids, case_params, check_error_case
from tests.test_patch_archs import ARCHS, batch, build
from tests.tolerances import assert_close

LLAMA = ARCHS[0]


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_recipes_cover_required_architectures():
    for mt in ("llama", "mistral", "gpt2", "gpt_neox", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3"):
        assert mt in RECIPES, mt


def test_bare_model_gets_norms_and_mlps_not_the_loss():
    model = build(LLAMA).model  # LlamaModel: no LM head
    report = apply_fast_kernels(model)
    assert report.patched["norm"] == 5 and report.patched["mlp"] == 2, str(report)
    assert ("cross_entropy", "LlamaModel has no LM head") in report.skipped
    revert_fast_kernels(model)
    assert not is_patched(model)


@pytest.mark.parametrize("flag", ["norm", "mlp", "attention", "cross_entropy"])
def test_flags_off_leave_that_part(flag):
    model = build(LLAMA)
    report = apply_fast_kernels(model, **{flag: False})
    assert report.count(flag) == 0 and all(w != flag for w, _ in report.skipped), str(report)
    revert_fast_kernels(model)


def test_unknown_architecture_gets_generic_parts():
    # Granite has no recipe: its RMSNorms are found by name and verified by the probe; MLPs stay.
    config = transformers.GraniteConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=256)
    model = transformers.GraniteForCausalLM(config).eval()
    ids, _ = batch()
    before = logits(model, ids)
    report = apply_fast_kernels(model)
    assert report.recipe is None and report.patched["norm"] == 5, str(report)
    assert report.count("mlp") == 0 and any(w == "mlp" and "no recipe" in why for w, why in report.skipped)
    assert "generic" in str(report)
    torch.testing.assert_close(logits(model, ids), before)
    revert_fast_kernels(model)
    assert torch.equal(logits(model, ids), before)


class _OddNorm(nn.Module):
    """Named like an RMSNorm but computes something else: the probe must refuse it."""

    def __init__(self, n):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n))
        self.eps = 1e-6

    def forward(self, x):
        return x * self.weight * 2.0


class _ToyRMSNorm(_OddNorm):
    def forward(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))


class _Toy(nn.Module):
    """Not a transformers model at all."""

    def __init__(self):
        super().__init__()
        self.a = _ToyRMSNorm(8)
        self.b = type("OddRMSNorm", (_OddNorm,), {})(8)
        self.c = nn.LayerNorm(8)
        self.d = nn.LayerNorm((2, 4))

    def forward(self, x):
        return self.d(self.c(self.b(self.a(x))).view(-1, 2, 4))


def test_arbitrary_module_never_raises_and_probe_refuses_odd_norms():
    toy = _Toy()
    x = torch.randn(3, 8)
    before = toy(x)
    report = apply_fast_kernels(toy)
    assert isinstance(report, PatchReport)
    assert report.patched["norm"] == 2, str(report)  # _ToyRMSNorm and the 1-D LayerNorm
    skipped = dict(report.skipped)
    assert "does not compute RMSNorm" in skipped["norm OddRMSNorm (b)"]
    assert "normalized_shape" in skipped["norm LayerNorm (d)"]
    assert "attention" in skipped and "cross_entropy" in skipped
    torch.testing.assert_close(toy(x), before)
    revert_fast_kernels(toy)
    assert torch.equal(toy(x), before)


def test_unsupported_activation_is_refused_and_reported():
    arch = copy.deepcopy(LLAMA)
    arch.kwargs = {**arch.kwargs, "hidden_act": "relu"}
    model = build(arch)
    report = apply_fast_kernels(model)
    assert report.count("mlp") == 0
    assert any("'relu' has no fused gated kernel" in why for _, why in report.skipped), str(report)
    assert report.patched["norm"] == 5
    revert_fast_kernels(model)


def test_instance_forward_set_by_someone_else_survives_revert():
    model = build(LLAMA)
    norm = model.model.norm
    # What accelerate or a hook library might have put there: a wrapper around the class forward. Replacing it
    # would skip what it does (accelerate's device-map hooks move inputs and weights), so it is left, with the
    # reason, and still there after revert.
    marker = lambda x: type(norm).forward(norm, x)
    norm.forward = marker
    report = apply_fast_kernels(model)
    assert norm.forward is marker and report.patched["norm"] == 4
    assert any("instance-level forward" in why for _, why in report.skipped), str(report)
    revert_fast_kernels(model)
    assert norm.forward is marker


def test_instance_forward_that_is_not_a_norm_is_left_alone():
    model = build(LLAMA)
    model.model.norm.forward = lambda x: x
    report = apply_fast_kernels(model)
    assert report.patched["norm"] == 4
    assert any("instance-level forward" in why for _, why in report.skipped), str(report)
    revert_fast_kernels(model)


def test_peft_before_and_after_get_peft_model():
    peft = pytest.importorskip("peft")
    ids, _ = batch()
    for order in ("before", "after"):
        model = build(LLAMA).eval()
        ref = logits(model, ids)
        cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "gate_proj", "down_proj"],
                              lora_dropout=0.0)
        if order == "before":
            report = apply_fast_kernels(model)
            model = peft.get_peft_model(model, cfg)
        else:
            model = peft.get_peft_model(model, cfg)
            report = apply_fast_kernels(model)
            # reaching the base model through PEFT is shown, and is not something "left"
            assert report.wrapper.endswith("-> LlamaForCausalLM") and "via PeftModel" in str(report), str(report)
            assert not any(w == "wrapper" for w, _ in report.skipped), str(report)
        # not a silent no-op under the wrapper (transformers #34016)
        assert report.patched["norm"] == 5 and report.patched["mlp"] == 2, str(report)
        assert is_patched(model)
        torch.testing.assert_close(logits(model, ids), ref)  # LoRA B starts at zero
        revert_fast_kernels(model)
        assert not is_patched(model)
        assert torch.equal(logits(model, ids), ref)


def test_save_pretrained_is_a_standard_checkpoint(tmp_path):
    model = build(LLAMA).eval()
    ids, _ = batch()
    ref = logits(model, ids)
    keys = set(model.state_dict())
    apply_fast_kernels(model)
    assert set(model.state_dict()) == keys
    model.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert not any("fastkern" in json.dumps(v) for v in cfg.values()), cfg
    # A fresh, unpatched load (no plugin involved) gives the original model's exact outputs.
    fresh = transformers.LlamaForCausalLM.from_pretrained(tmp_path, attn_implementation="sdpa").eval()
    assert not is_patched(fresh)
    assert set(fresh.state_dict()) == keys
    assert torch.equal(logits(fresh, ids), ref)


# --- edge cases ---


@pytest.mark.parametrize("arch,dtype", [
    pytest.param("llama", torch.bfloat16, id="llama-bf16"),
    pytest.param("llama", torch.float16, id="llama-fp16"),
    pytest.param("gpt2", torch.float16, id="gpt2-fp16")])
def test_grad_scaler_training(arch, dtype, device):
    """autocast(dtype) + GradScaler: the scaler never sees inf/NaN gradients from our kernels (its scale never
    backs off), losses stay finite, and the first loss matches the unpatched model (fp64 oracle, unpatched
    same-dtype baseline, tolerance table)."""
    from benchmarks.convergence import build_model, make_data

    size = dict(hidden=32, layers=1, heads=2, kv_heads=1, inter=64, vocab=64, seq=12, batch=2)
    torch.manual_seed(0)
    state = build_model(arch, size).state_dict()
    data = make_data(size, 3).to(device)

    def fresh(attn="sdpa"):
        m = build_model(arch, size, attn=attn)
        m.load_state_dict(state)
        return m.to(device)

    with torch.no_grad():
        oracle = fresh("eager").double()(input_ids=data[0], labels=data[0]).loss
        with torch.autocast(device_type=device, dtype=dtype):
            baseline = fresh()(input_ids=data[0], labels=data[0]).loss.float()
    model = fresh()
    hf_fastkern.apply_fast_kernels(model)
    if model.config._attn_implementation != "fastkern":
        model.set_attn_implementation("fastkern")
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    scaler = torch.amp.GradScaler(device, init_scale=2.0**8, growth_interval=1000)
    losses = []
    for step in range(3):
        with torch.autocast(device_type=device, dtype=dtype):
            loss = model(input_ids=data[step], labels=data[step]).loss
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        for n, p in model.named_parameters():
            assert p.grad is None or torch.isfinite(p.grad).all(), f"step {step}: non-finite grad in {n}"
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.detach().float())
        assert scaler.get_scale() == 2.0**8, "GradScaler backed off: an inf/NaN gradient was produced"
    assert all(torch.isfinite(x) for x in losses)
    assert_close(losses[0], oracle, baseline, dtype, "output", f"{arch} {dtype} first loss")


# --- bad input ---


@pytest.mark.parametrize("case", case_params(case_ids(ERROR_CASES, "apply_fast_kernels/", "revert_fast_kernels/")))
def test_bad_input_raises_naming_argument(case, device):
    check_error_case(case, device)


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


# --- determinism ---


@pytest.mark.gpu
def test_patched_llama_training_step_bitwise_gpu():
    """One bf16 training step of a patched small Llama, twice from the same state: every gradient
    bit-identical (the embedding is left out: its stock CUDA backward is not ours)."""
    from benchmarks.convergence import SIZES, build_model, make_data

    size = SIZES["gpu"]
    torch.manual_seed(0)
    state = build_model("llama", size).state_dict()
    ids = make_data(size, 1)[0].cuda()
    grads = []
    for _ in range(2):
        m = build_model("llama", size)
        m.load_state_dict(state)
        m.to("cuda", torch.bfloat16)
        hf_fastkern.apply_fast_kernels(m)
        if m.config._attn_implementation != "fastkern":
            m.set_attn_implementation("fastkern")
        m(input_ids=ids, labels=ids).loss.backward()
        grads.append({k: p.grad.clone() for k, p in m.named_parameters() if "embed" not in k})
    for k in grads[0]:
        assert torch.equal(grads[0][k], grads[1][k]), f"gradient of {k} differs between two identical steps"
