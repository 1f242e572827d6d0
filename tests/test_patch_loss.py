"""patches/loss.py: tiny random-init causal LMs, fused loss vs the unpatched model (loss and every grad).

Oracle: the unpatched model in fp64; baseline: the unpatched model in the test dtype; tolerances from
tests/tolerances.py. The kernels run in the Triton interpreter on the CPU.
"""
import copy

import pytest
import torch

from hf_fastkern.patches.loss import disable_fused_loss, enable_fused_loss, fused_loss_enabled
from tests.tolerances import assert_close

transformers = pytest.importorskip("transformers")

VOCAB = 203


def _llama():
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
                                   max_position_embeddings=64, tie_word_embeddings=False)
    return transformers.LlamaForCausalLM(cfg)


def _gpt2():
    cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=VOCAB, n_positions=64,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return transformers.GPT2LMHeadModel(cfg)


def _gemma2():
    cfg = transformers.Gemma2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                    vocab_size=VOCAB, max_position_embeddings=64, final_logit_softcapping=2.0)
    return transformers.Gemma2ForCausalLM(cfg)


def _neox():
    # the output head is `embed_out`, found through get_output_embeddings()
    cfg = transformers.GPTNeoXConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, vocab_size=VOCAB, max_position_embeddings=64,
                                     hidden_dropout=0.0, attention_dropout=0.0)
    return transformers.GPTNeoXForCausalLM(cfg)


BUILDERS = {"llama": _llama, "gpt2_tied": _gpt2, "gemma2_softcap": _gemma2, "gpt_neox": _neox}


def _batch(b=2, s=11, device="cpu"):
    ids = torch.randint(0, VOCAB, (b, s), device=device)
    labels = ids.clone()
    labels[0, :3] = -100
    labels[1, -2:] = -100
    return ids, labels


def _run(model, ids, labels, **kw):
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, labels=labels, **kw)
    out.loss.backward()
    return out, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def _compare(patched, plain, ids, labels, **kw):
    """Patched (fp32) vs plain fp32 (baseline) vs plain fp64 (oracle): loss and all parameter grads."""
    oracle_model = copy.deepcopy(plain).double()
    out, grads = _run(patched, ids, labels, **kw)
    base, base_g = _run(plain, ids, labels, **kw)
    orac, orac_g = _run(oracle_model, ids, labels, **kw)
    assert out.logits is None
    assert_close(out.loss.detach(), orac.loss.detach(), base.loss.detach(), torch.float32, "output", "loss")
    assert set(grads) == set(base_g), f"grads reached {set(grads) ^ set(base_g)} differently"
    for n in grads:
        assert_close(grads[n], orac_g[n], base_g[n], torch.float32, "grad", n)
    return out


def _pair(name):
    plain = BUILDERS[name]().train()
    patched = copy.deepcopy(plain)
    ok, why = enable_fused_loss(patched)
    assert ok, why
    return patched, plain


@pytest.mark.parametrize("name", list(BUILDERS))
def test_fused_loss_matches_unpatched(name):
    patched, plain = _pair(name)
    ids, labels = _batch()
    _compare(patched, plain, ids, labels)


def test_gradient_checkpointing():
    patched, plain = _pair("llama")
    for m in (patched, plain):
        m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ids, labels = _batch()
    _compare(patched, plain, ids, labels)


def test_tied_embeddings_grad_once():
    patched, plain = _pair("gpt2_tied")
    assert patched.lm_head.weight is patched.transformer.wte.weight
    ids, labels = _batch()
    _compare(patched, plain, ids, labels)
    # the shared parameter's grad is one tensor holding both the embedding and the head contributions
    assert "lm_head.weight" not in dict(patched.named_parameters())


def test_num_items_in_batch_and_accumulation():
    patched, plain = _pair("llama")
    ids, labels = _batch(b=4)
    n_items = torch.tensor(int((labels[:, 1:] != -100).sum()))
    # one micro-batch with num_items_in_batch matches the unpatched model given the same kwarg
    _compare(patched, plain, ids[:2], labels[:2], num_items_in_batch=n_items)
    # two micro-batches with num_items_in_batch sum to the full batch's mean loss and gradients
    patched.zero_grad(set_to_none=True)
    total = sum(patched(input_ids=ids[sl], labels=labels[sl], num_items_in_batch=n_items).loss
                for sl in (slice(0, 2), slice(2, 4)))
    total.backward()
    acc = {n: p.grad.clone() for n, p in patched.named_parameters()}
    full, full_g = _run(plain, ids, labels)
    oracle, oracle_g = _run(copy.deepcopy(plain).double(), ids, labels)
    assert_close(total.detach(), oracle.loss.detach(), full.loss.detach(), torch.float32, "output", "loss")
    for n in acc:
        assert_close(acc[n], oracle_g[n], full_g[n], torch.float32, "grad", n)


def test_shift_labels_and_ignore_index():
    patched, plain = _pair("llama")
    ids, labels = _batch()
    shift = labels.roll(-1, dims=1).masked_fill(labels.roll(-1, dims=1) == -100, 7)
    shift[:, -1] = 7
    _compare(patched, plain, ids, labels, shift_labels=shift, ignore_index=7)


def test_logits_to_keep():
    patched, plain = _pair("llama")
    ids, _ = _batch()
    labels = torch.randint(0, VOCAB, (2, 4))
    _compare(patched, plain, ids, labels, logits_to_keep=4)


def test_positional_labels_and_tuple_output():
    patched, plain = _pair("llama")
    ids, labels = _batch()
    # LlamaForCausalLM.forward(input_ids, attention_mask, position_ids, cache/past_key_values, inputs_embeds,
    # labels, ...): labels is the sixth positional argument in both 5.17 and 5.24
    out = patched(ids, None, None, None, None, labels, return_dict=False)
    ref = plain(ids, None, None, None, None, labels, return_dict=False)
    assert isinstance(out, tuple)
    assert_close(out[0].detach(), ref[0].detach().double(), None, torch.float32, "output", "loss")
    assert len(out) == len(ref) - 1  # no logits


def test_outputs_pass_through():
    patched, plain = _pair("llama")
    ids, labels = _batch()
    out = patched(input_ids=ids, labels=labels, output_hidden_states=True, use_cache=False)
    ref = plain(input_ids=ids, labels=labels, output_hidden_states=True, use_cache=False)
    assert type(out) is type(ref) and out.logits is None
    assert len(out.hidden_states) == len(ref.hidden_states)
    for a, b in zip(out.hidden_states, ref.hidden_states):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_return_logits_eval_and_generate_unchanged():
    patched, plain = _pair("llama")
    ids, labels = _batch()
    out = patched(input_ids=ids, labels=labels, return_logits=True)
    ref = plain(input_ids=ids, labels=labels)
    torch.testing.assert_close(out.logits, ref.logits, rtol=0, atol=0)
    torch.testing.assert_close(out.loss, ref.loss, rtol=0, atol=0)
    patched.eval()
    plain.eval()
    out = patched(input_ids=ids, labels=labels)
    ref = plain(input_ids=ids, labels=labels)
    torch.testing.assert_close(out.logits, ref.logits, rtol=0, atol=0)
    torch.testing.assert_close(out.loss, ref.loss, rtol=0, atol=0)
    gen = patched.generate(ids[:1, :4], max_new_tokens=5, do_sample=False)
    gen_ref = plain.generate(ids[:1, :4], max_new_tokens=5, do_sample=False)
    assert torch.equal(gen, gen_ref)


def test_disable_restores():
    patched, plain = _pair("llama")
    assert fused_loss_enabled(patched)
    assert enable_fused_loss(patched) == (True, "")  # idempotent
    disable_fused_loss(patched)
    assert not fused_loss_enabled(patched)
    assert "forward" not in patched.__dict__ and "forward" not in patched.lm_head.__dict__
    ids, labels = _batch()
    out = patched(input_ids=ids, labels=labels)
    ref = plain(input_ids=ids, labels=labels)
    torch.testing.assert_close(out.logits, ref.logits, rtol=0, atol=0)
    disable_fused_loss(patched)  # no-op


def test_deepcopy_of_patched_model_runs_its_own_modules():
    """Regression: the forwards once found their state through a closure, so a deepcopy of a patched model ran
    the ORIGINAL model's decoder and head (silently training the wrong weights)."""
    original, plain = _pair("llama")
    clone = copy.deepcopy(original)
    with torch.no_grad():
        clone.lm_head.weight.mul_(2.0)
        plain.lm_head.weight.mul_(2.0)
    ids, labels = _batch()
    fired = []
    hook = clone.model.register_forward_pre_hook(lambda *a: fired.append(1))
    out, grads = _run(clone, ids, labels)
    hook.remove()
    assert fired, "the copy's decoder never ran"
    assert original.lm_head.weight.grad is None, "the copy's backward reached the original's weights"
    base, base_g = _run(plain, ids, labels)
    assert_close(out.loss.detach(), base.loss.detach().double(), base.loss.detach(), torch.float32, "output", "loss")
    assert_close(grads["lm_head.weight"], base_g["lm_head.weight"].double(), base_g["lm_head.weight"],
                 torch.float32, "grad", "lm_head.weight")
    disable_fused_loss(clone)
    assert fused_loss_enabled(original) and not fused_loss_enabled(clone)


def test_signature_kept_for_trainer():
    """Trainer keeps dataset columns and passes num_items_in_batch by reading forward's signature."""
    import inspect
    patched, plain = _pair("llama")
    assert inspect.signature(patched.forward) == inspect.signature(plain.forward)


def test_per_instance_only():
    patched, plain = _pair("llama")
    assert "forward" not in plain.__dict__
    assert type(patched).forward is type(plain).forward
    ids, labels = _batch()
    assert plain(input_ids=ids, labels=labels).logits is not None


def test_refuses_unsupported_heads():
    model = _llama()
    model.lm_head = torch.nn.Sequential(model.lm_head)  # not an nn.Linear
    ok, why = enable_fused_loss(model)
    assert not ok and "not a plain nn.Linear" in why
    assert not enable_fused_loss(torch.nn.Linear(3, 3))[0]


def test_peft_lora_on_lm_head_refused_and_elsewhere_supported():
    peft = pytest.importorskip("peft")
    lora_head = peft.get_peft_model(_llama(), peft.LoraConfig(r=4, target_modules=["lm_head", "q_proj"]))
    ok, why = enable_fused_loss(lora_head)
    assert not ok and "LoRA" in why
    plain = _llama().train()
    cfg = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    ref = peft.get_peft_model(copy.deepcopy(plain), cfg)
    pm = peft.get_peft_model(copy.deepcopy(plain), cfg)
    pm.load_state_dict(ref.state_dict())
    ok, why = enable_fused_loss(pm)
    assert ok, why
    ids, labels = _batch()
    out = pm(input_ids=ids, labels=labels)
    out.loss.backward()
    assert out.logits is None
    r = ref(input_ids=ids, labels=labels)
    r.loss.backward()
    assert_close(out.loss.detach(), r.loss.detach().double(), None, torch.float32, "output", "loss")
    for (n, p), (_, q) in zip(pm.named_parameters(), ref.named_parameters()):
        if q.requires_grad:
            assert p.grad is not None, n
            assert_close(p.grad, q.grad.double(), None, torch.float32, "grad", n)


def test_lora_added_to_head_after_enable_falls_back_with_warning():
    peft = pytest.importorskip("peft")
    from hf_fastkern.kernels.dispatch import FastKernFallbackWarning, reset_warnings
    model = _llama().train()
    assert enable_fused_loss(model)[0]
    pm = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["lm_head"], init_lora_weights=False))
    reset_warnings()
    ids, labels = _batch()
    with pytest.warns(FastKernFallbackWarning, match="lm_head"):
        out = pm(input_ids=ids, labels=labels)
    assert out.logits is not None  # standard loss: the adapter's gradient is kept
    out.loss.backward()
    lora_grads = [p.grad for n, p in pm.named_parameters() if "lora_" in n]
    assert lora_grads and all(g is not None and g.abs().sum() > 0 for g in lora_grads)


def test_torch_compile_patched_model_fullgraph():
    """The wrapper and the custom ops trace in one graph (Liger #174: compiled patched models broke)."""
    patched, plain = _pair("llama")
    compiled = torch.compile(patched, backend="aot_eager", fullgraph=True)
    ids, labels = _batch()
    out = compiled(input_ids=ids, labels=labels)
    out.loss.backward()
    ref = plain(input_ids=ids, labels=labels)
    ref.loss.backward()
    assert out.logits is None
    assert_close(out.loss.detach(), ref.loss.detach().double(), None, torch.float32, "output", "loss")
    for (n, p), (_, q) in zip(patched.named_parameters(), plain.named_parameters()):
        assert_close(p.grad, q.grad.double(), None, torch.float32, "grad", n)


@pytest.mark.gpu
@pytest.mark.parametrize("name", list(BUILDERS))
def test_fused_loss_matches_unpatched_gpu(name):
    patched, plain = _pair(name)
    patched.cuda()
    plain.cuda()
    ids, labels = _batch(b=4, s=33, device="cuda")
    _compare(patched, plain, ids, labels)


@pytest.mark.gpu
def test_fused_loss_autocast_bf16_gpu():
    """fp32 master weights under bf16 autocast (the usual Trainer bf16=True setup)."""
    patched, plain = _pair("llama")
    patched.cuda()
    plain.cuda()
    oracle_model = copy.deepcopy(plain).double()
    ids, labels = _batch(b=4, s=33, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out, grads = _run(patched, ids, labels)
        base, base_g = _run(plain, ids, labels)
    orac, orac_g = _run(oracle_model, ids, labels)
    assert out.logits is None
    assert_close(out.loss.detach(), orac.loss.detach(), base.loss.detach(), torch.bfloat16, "output", "loss")
    for n in grads:
        assert_close(grads[n], orac_g[n], base_g[n], torch.bfloat16, "grad", n)
