"""The patch ledger (patches/ledger.py, patches/apply.py): one instance patched, in any order with PEFT, truly reported.

- two models built from one config object: patching (and reverting) one never changes what the other computes;
- LoRA added *after* apply_fast_kernels (get_peft_model, TRL's peft_config) takes the fused path at the next
  forward, with the gradients of patching after PEFT;
- LoRA layers that cannot take the fused path are "left" with the reason, never "patched";
- recipe classes that match no module are reported;
- a deep copy of a patched model (TRL's reference model) has its own ledger.
"""
from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
import transformers

import hf_fastkern
from hf_fastkern import apply_fast_kernels, revert_fast_kernels
from hf_fastkern.layers import fused_lora
from hf_fastkern.patches.apply import is_patched
from hf_fastkern.patches.recipe import RECIPES, register_recipe
from tests.test_patch_archs import ARCHS, batch, build

LLAMA = next(a for a in ARCHS if a.name == "llama")
GPT2 = next(a for a in ARCHS if a.name == "gpt2")
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _two_models_one_config(dtype):
    config = transformers.LlamaConfig(**LLAMA.kwargs)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    a = transformers.LlamaForCausalLM(config).to(dtype).eval()
    torch.manual_seed(0)
    b = transformers.LlamaForCausalLM(config).to(dtype).eval()
    assert a.config is b.config  # what from_config / a shared config object gives
    return a, b


def test_two_models_one_config_patch_one():
    # bf16: the fastkern attention kernel itself runs (fp32 would fall back to SDPA and hide a switch)
    a, b = _two_models_one_config(torch.bfloat16)
    ids, _ = batch()
    b_before = _logits(b, ids)
    apply_fast_kernels(a)
    assert a.config._attn_implementation == "fastkern"
    assert b.config._attn_implementation == "sdpa" and not is_patched(b)
    assert all(m.config is b.config for m in b.modules() if "config" in m.__dict__)
    assert all(m.config is not b.config for m in a.modules() if "config" in m.__dict__)
    assert torch.equal(_logits(b, ids), b_before)
    a_patched = _logits(a, ids)
    assert a_patched.shape == b_before.shape
    # revert restores both: a computes b's logits again, b never moved
    assert revert_fast_kernels(a) > 0
    assert a.config._attn_implementation == "sdpa" and b.config._attn_implementation == "sdpa"
    assert torch.equal(_logits(a, ids), b_before)
    assert torch.equal(_logits(b, ids), b_before)


def test_two_models_one_config_revert_one_keeps_other_patched():
    a, b = _two_models_one_config(torch.float32)
    apply_fast_kernels(a)
    apply_fast_kernels(b)
    revert_fast_kernels(a)
    assert a.config._attn_implementation == "sdpa"
    assert b.config._attn_implementation == "fastkern" and is_patched(b)
    revert_fast_kernels(b)


def _lora_model(order: str, peft):
    model = build(LLAMA)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=LORA_TARGETS, lora_dropout=0.0,
                          init_lora_weights=False)  # random B: the adapters change the output and get gradients
    if order == "before":
        apply_fast_kernels(model)
        torch.manual_seed(3)
        model = peft.get_peft_model(model, cfg)
    else:
        torch.manual_seed(3)
        model = peft.get_peft_model(model, cfg)
        apply_fast_kernels(model)
    return model


def _grads(model, ids, labels):
    model.train()
    model.zero_grad()
    loss = model(input_ids=ids, labels=labels).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_patch_before_get_peft_model_fuses_lora_at_next_forward(monkeypatch):
    peft = pytest.importorskip("peft")
    ids, labels = batch()
    before = _lora_model("before", peft)
    n_lora = 7 * LLAMA.kwargs["num_hidden_layers"]
    assert hf_fastkern.report(before).count("lora_linear") == 0  # nothing seen yet: no forward ran
    fused, slow = [], []
    orig = fused_lora.LoRALinearFunction.apply
    monkeypatch.setattr(fused_lora.LoRALinearFunction, "apply", lambda *a: fused.append(1) or orig(*a))
    peft_forward = peft.tuners.lora.layer.Linear.forward

    def counted(self, x, *args, **kwargs):  # PEFT's signature: the ledger checks it before binding
        slow.append(1)
        return peft_forward(self, x, *args, **kwargs)

    monkeypatch.setattr(peft.tuners.lora.layer.Linear, "forward", counted)
    loss_b, grads_b = _grads(before, ids, labels)
    rep = hf_fastkern.report(before)
    assert rep.count("lora_linear") == n_lora and _fp32_attention_only(rep.fallbacks), str(rep)
    # no LoRA linear ran PEFT's forward: six per layer ran the fused LoRA node, down_proj the lean MLP's node
    assert not slow and len(fused) == n_lora - LLAMA.kwargs["num_hidden_layers"]
    after = _lora_model("after", peft)
    assert hf_fastkern.report(after).count("lora_linear") == n_lora
    loss_a, grads_a = _grads(after, ids, labels)
    assert torch.equal(loss_b, loss_a)
    assert grads_b.keys() == grads_a.keys() and any("lora_A" in n for n in grads_b)
    for n in grads_b:
        assert torch.equal(grads_b[n], grads_a[n]), n
    revert_fast_kernels(before)
    assert not is_patched(before) and not before.get_base_model()._forward_pre_hooks


def test_second_adapter_added_later_is_scanned():
    peft = pytest.importorskip("peft")
    ids, _ = batch()
    model = _lora_model("after", peft)
    model.add_adapter("second", peft.LoraConfig(r=2, target_modules=["o_proj"], lora_dropout=0.1))
    _logits(model, ids)
    rep = hf_fastkern.report(model)
    # the new adapter's dropout makes o_proj unfusable only while both are active; "default" is active now
    assert rep.count("lora_linear") == 7 * LLAMA.kwargs["num_hidden_layers"], str(rep)


def test_gpt2_conv1d_lora_is_left_with_reason():
    peft = pytest.importorskip("peft")
    model = build(GPT2)
    model = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["c_attn", "c_fc"], lora_dropout=0.0,
                                                       fan_in_fan_out=True))
    rep = apply_fast_kernels(model)
    assert rep.count("lora_linear") == 0, str(rep)
    assert any(w.startswith("lora_linear Linear") and "fan_in_fan_out" in why for w, why in rep.skipped), str(rep)
    revert_fast_kernels(model)


def test_lora_dropout_is_left_with_reason():
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(build(LLAMA), peft.LoraConfig(r=4, target_modules=["q_proj"], lora_dropout=0.1))
    rep = apply_fast_kernels(model)
    assert rep.count("lora_linear") == 0
    assert any("lora_dropout > 0" in why for _, why in rep.skipped), str(rep)
    revert_fast_kernels(model)


def test_binding_that_falls_back_later_is_reported():
    peft = pytest.importorskip("peft")
    model = _lora_model("after", peft)
    model.base_model.model.model.layers[0].self_attn.q_proj.merge()  # merged: PEFT's forward from now on
    rep = hf_fastkern.report(model)
    assert any("merged" in why for _, why in rep.fallbacks), str(rep)


def test_recipe_class_that_matches_nothing_is_reported():
    original = RECIPES["llama"]
    # a recipe written against a class name the installed transformers does not have (a rename in a release)
    register_recipe(dataclasses.replace(original, mlps={"LlamaMLPRenamed": original.mlps["LlamaMLP"]}))
    try:
        rep = apply_fast_kernels(build(LLAMA))
    finally:
        register_recipe(original)
    assert rep.count("mlp") == 0
    assert ("mlp LlamaMLPRenamed", "recipe llama: no module of class LlamaMLPRenamed") in rep.skipped, str(rep)


def test_nothing_fine_is_left():
    peft = pytest.importorskip("peft")
    model = _lora_model("after", peft)
    rep = hf_fastkern.report(model)
    assert rep.skipped == [] and _fp32_attention_only(rep.fallbacks), str(rep)


def _fp32_attention_only(fallbacks) -> bool:
    """The fp32 test models' one true fallback: their attention calls run SDPA (no autocast here)."""
    return fallbacks == [("attention", "float32 q/k/v projections: calls outside bf16/fp16 autocast run SDPA "
                                       "(under autocast q/k/v are cast and the kernel runs)")]


def test_report_says_fp32_attention_runs_sdpa():
    """The report lists the switched attention as a fallback exactly while its calls would run SDPA."""
    model = build(LLAMA)
    rep = apply_fast_kernels(model)
    assert rep.count("attention") == 1 and _fp32_attention_only(rep.fallbacks), str(rep)
    model.to(torch.bfloat16)
    assert not any(what == "attention" for what, _ in hf_fastkern.report(model).fallbacks)
    model.get_input_embeddings().float()  # what decides is the q/k/v projections' dtype, not the first parameter
    assert not any(what == "attention" for what, _ in hf_fastkern.report(model).fallbacks)


def test_deepcopy_has_its_own_ledger():
    ids, _ = batch()
    model = build(LLAMA).eval()
    ref = _logits(model, ids)
    apply_fast_kernels(model)
    twin = copy.deepcopy(model)
    revert_fast_kernels(twin)
    assert not is_patched(twin) and is_patched(model)
    assert twin.config._attn_implementation != "fastkern" and model.config._attn_implementation == "fastkern"
    assert torch.equal(_logits(twin, ids), ref)
    revert_fast_kernels(model)
    assert torch.equal(_logits(model, ids), ref)


def _tiny_tokenizer():
    """A word-level tokenizer over the 256 ids of the tiny models, built in memory (no download)."""
    tokenizers = pytest.importorskip("tokenizers")
    vocab = {f"t{i}": i for i in range(256)}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="t3"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="t0", bos_token="t1",
                                                eos_token="t2", unk_token="t3")


def test_sft_trainer_peft_config_takes_fused_path(tmp_path):
    """TRL wraps the model with PEFT after it is handed over: a model patched before still fuses its LoRA."""
    trl = pytest.importorskip("trl")
    peft = pytest.importorskip("peft")
    datasets = pytest.importorskip("datasets")
    model = build(LLAMA)
    apply_fast_kernels(model)
    g = torch.Generator().manual_seed(0)
    rows = [{"input_ids": torch.randint(3, 256, (12,), generator=g).tolist()} for _ in range(8)]
    args = trl.SFTConfig(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2, report_to=[],
                         logging_steps=1, use_cpu=True, save_strategy="no", bf16=False)
    trainer = trl.SFTTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(rows),
                             processing_class=_tiny_tokenizer(),
                             peft_config=peft.LoraConfig(r=4, target_modules=LORA_TARGETS, lora_dropout=0.0))
    trainer.train()
    rep = hf_fastkern.report(trainer.model)
    assert rep.count("lora_linear") == 7 * LLAMA.kwargs["num_hidden_layers"], str(rep)
    # TRL's own fused LM head answers the trainer's calls: the report says so instead of claiming our loss runs
    assert any(what == "cross_entropy" and "TRL's fused LM head" in why for what, why in rep.fallbacks), str(rep)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(x)) for x in losses)


def test_revert_restores_each_sub_config_attention():
    """A composite model whose parts use different attention implementations gets each one back."""
    text = transformers.LlamaConfig(**{**LLAMA.kwargs, "num_hidden_layers": 1})
    vision = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                           num_attention_heads=2, image_size=16, patch_size=8)
    model = transformers.LlavaForConditionalGeneration(
        transformers.LlavaConfig(text_config=text, vision_config=vision, image_token_index=255))
    model.set_attn_implementation({"text_config": "sdpa", "vision_config": "eager"})
    apply_fast_kernels(model)
    assert model.config.text_config._attn_implementation == "fastkern"
    revert_fast_kernels(model)
    assert model.config.text_config._attn_implementation == "sdpa"
    assert model.config.vision_config._attn_implementation == "eager"


def test_revert_under_another_wrapper_leaves_a_working_model():
    """A hook library (accelerate) or TRL wrapped the model's forward after patching: revert must not break the
    chain that still calls ours; the model then computes the unpatched result."""
    accelerate_hooks = pytest.importorskip("accelerate.hooks")
    ids, labels = batch()
    model = build(LLAMA).train()
    want = model(input_ids=ids, labels=labels)
    apply_fast_kernels(model)
    accelerate_hooks.add_hook_to_module(model, accelerate_hooks.ModelHook())
    accelerate_hooks.add_hook_to_module(model.model, accelerate_hooks.ModelHook())
    revert_fast_kernels(model)
    got = model(input_ids=ids, labels=labels)
    assert got.logits is not None  # the standard loss path, not the fused one
    torch.testing.assert_close(got.loss, want.loss)
