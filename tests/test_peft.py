"""PEFT LoRA on a patched model: adapters train, the base stays frozen, losses match the unpatched run.

The kernels are applied before and after ``get_peft_model``; the replacement MLP forwards call the (LoRA-
wrapped) projections, so adapter gradients flow through the fused activation.
"""
from __future__ import annotations

import copy

import pytest
import torch

from hf_fastkern import apply_fast_kernels, revert_fast_kernels
from hf_fastkern.memory.offload import activation_offloader
from tests.test_patch_archs import ARCHS, batch, build
from tests.test_trainer import train
from tests.tolerances import assert_close

peft = pytest.importorskip("peft")

LLAMA = ARCHS[0]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def lora(model, seed: int = 1):
    torch.manual_seed(seed)  # the same adapter init for every copy
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, lora_dropout=0.0, init_lora_weights="gaussian")
    return peft.get_peft_model(model, cfg)


def _nonzero_b(model):
    # PEFT starts lora_B at zero; give it values so the first step already exercises the adapter path.
    with torch.no_grad():
        for i, (n, p) in enumerate(model.named_parameters()):
            if "lora_B" in n:
                p.copy_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(i)))


def test_only_adapters_get_gradients():
    model = lora(build(LLAMA))
    report = apply_fast_kernels(model)
    assert report.patched["mlp"] == 2 and report.patched["norm"] == 5, str(report)
    _nonzero_b(model)
    ids, labels = batch()
    model(input_ids=ids, labels=labels).loss.backward()
    for n, p in model.named_parameters():
        if "lora_" in n:
            assert p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0, n
        else:
            assert p.grad is None, f"frozen parameter {n} received a gradient"
    revert_fast_kernels(model)


@pytest.mark.parametrize("order,gc", [("after_get_peft_model", False), ("before_get_peft_model", True)],
                         ids=["after_get_peft_model-no_gc", "before_get_peft_model-grad_ckpt"])
def test_lora_training_matches_unpatched(tmp_path, order, gc):
    ref = build(LLAMA)
    peft_ref = lora(copy.deepcopy(ref))
    _nonzero_b(peft_ref)
    frozen = {n: p.detach().clone() for n, p in peft_ref.named_parameters() if "lora_" not in n}

    if order == "after_get_peft_model":
        patched_model = copy.deepcopy(peft_ref)
        report = apply_fast_kernels(patched_model)
    else:
        inner = copy.deepcopy(ref)
        report = apply_fast_kernels(inner)
        patched_model = lora(inner)
        _nonzero_b(patched_model)
    assert report.patched["mlp"] == 2, str(report)
    for (n, a), (_, b) in zip(patched_model.state_dict().items(), peft_ref.state_dict().items()):
        assert torch.equal(a, b), f"{n}: the patched LoRA model does not start from the same weights"

    oracle = train(copy.deepcopy(peft_ref).double(), tmp_path / "oracle", gc=gc, lr=1e-2)
    base = train(copy.deepcopy(peft_ref), tmp_path / "base", gc=gc, lr=1e-2)
    patched = train(patched_model, tmp_path / "patched", gc=gc, lr=1e-2)
    assert_close(patched, oracle, base, torch.float32, "output", f"LoRA losses ({order}, gc={gc})")
    assert len(set(patched.tolist())) > 1, "the LoRA loss never changed: nothing trained"

    for n, p in patched_model.named_parameters():
        if "lora_" not in n:
            assert torch.equal(p.detach(), frozen[n]), f"frozen parameter {n} changed"


@pytest.mark.gpu
def test_qlora_4bit_gpu(tmp_path):
    """QLoRA: 4-bit frozen base (bitsandbytes), bf16 compute, LoRA adapters; patched vs unpatched."""
    bnb = pytest.importorskip("bitsandbytes")  # noqa: F841
    import transformers

    ref = build(LLAMA)
    ref.save_pretrained(tmp_path / "ckpt")
    q = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.bfloat16,
                                        bnb_4bit_quant_type="nf4")

    def load():
        m = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "ckpt", quantization_config=q)
        m = peft.prepare_model_for_kbit_training(m, use_gradient_checkpointing=False)
        return lora(m)

    base = train(load(), tmp_path / "base", bf16=True, lr=1e-2)
    patched_model = load()
    report = apply_fast_kernels(patched_model)
    assert report.patched["mlp"] == 2, str(report)
    patched = train(patched_model, tmp_path / "patched", bf16=True, lr=1e-2)
    # No fp64 oracle exists for a 4-bit base: hold the patched curve to the unpatched one within bf16's
    # rounding of the loss value (the tolerance table's floor), times the output factor.
    from tests.tolerances import FACTOR, FLOORS

    lim = FACTOR["output"] * FLOORS[torch.bfloat16].rtol * base.abs().max().item()
    assert (patched - base).abs().max().item() <= lim, (patched.tolist(), base.tolist())


# --- LoRA on the fast paths: dropout, offload, chunked MLP ---


CHUNK = 5  # odd, does not divide BATCH * SEQ = 32 tokens: the last chunk is short


def lora_with_dropout(model, dropout: float):
    torch.manual_seed(1)  # the same adapter init for every copy
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, lora_dropout=dropout,
                          init_lora_weights="gaussian")
    model = peft.get_peft_model(model, cfg)
    # PEFT starts lora_B at zero; give it values so the step exercises the adapter path in both directions
    with torch.no_grad():
        for i, (n, p) in enumerate(model.named_parameters()):
            if "lora_B" in n:
                p.copy_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(i)))
    return model


def _gc(model):
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model.train()


def step(model, seed: int = 7):
    ids, labels = batch(next(model.parameters()).device)
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # dropout masks
    loss = model(input_ids=ids, labels=labels).loss
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


def check_step(patched, peft_fp32, tag: str) -> None:
    oracle = step(copy.deepcopy(peft_fp32).double())
    base = step(peft_fp32)
    got = step(patched)
    assert_close(got[0], oracle[0], base[0], torch.float32, "output", f"{tag}: loss")
    assert got[1].keys() == base[1].keys()
    assert got[1] and all("lora_" in n for n in got[1]), f"{tag}: non-adapter gradients {sorted(got[1])[:4]}"
    n_adapters = sum("lora_" in n for n, _ in patched.named_parameters())
    assert len(got[1]) == n_adapters, f"{tag}: {n_adapters - len(got[1])} adapter(s) got no gradient"
    for n in got[1]:
        assert_close(got[1][n], oracle[1][n], base[1][n], torch.float32, "grad", f"{tag}: {n}")


# (dropout, offload, chunk). Dropout with the chunked MLP draws its masks per chunk, so it cannot match the
# unpatched model's masks: test_chunked_recompute_lora_dropout checks that case against a chunk loop.
CASES = [(d, o, None) for d in (0.0, 0.1) for o in (False, True)] + [(0.0, False, CHUNK), (0.0, True, CHUNK)]


@pytest.mark.parametrize("dropout,offload,chunk", CASES,
                         ids=[f"dropout{d}-{'offload' if o else 'no_offload'}-{'chunked' if c else 'whole'}"
                              for d, o, c in CASES])
def test_lora_patched_matches_peft(monkeypatch, dropout, offload, chunk):
    monkeypatch.setenv("HF_FASTKERN_FORCE_REFERENCE", "1")
    peft_ref = _gc(lora_with_dropout(build(LLAMA), dropout))
    patched = _gc(lora_with_dropout(build(LLAMA), dropout))  # build() and lora_with_dropout() seed: the same weights
    report = apply_fast_kernels(patched, offload_activations=offload, mlp_chunk_tokens=chunk)
    assert report.patched.get("mlp") == 2 and report.patched.get("offload", 0) == int(offload), str(report)
    if offload:
        activation_offloader(patched.get_base_model()).min_bytes = 0
    check_step(patched, peft_ref, f"dropout={dropout} offload={offload} chunk={chunk}")
    if offload:
        assert activation_offloader(patched.get_base_model()).stats.packed >= 2


def test_lora_patched_kernels_interpreter():
    """The same with the Triton kernels (interpreter on CPU): dropout 0, offload and chunked MLP on."""
    peft_ref = _gc(lora_with_dropout(build(LLAMA), 0.0))
    patched = _gc(lora_with_dropout(build(LLAMA), 0.0))
    apply_fast_kernels(patched, offload_activations=True, mlp_chunk_tokens=CHUNK)
    check_step(patched, peft_ref, "kernels")


def test_lora_patch_before_get_peft_model(monkeypatch):
    """Patched first, LoRA added after: the chunked MLP reads the adapters' parameters per call."""
    monkeypatch.setenv("HF_FASTKERN_FORCE_REFERENCE", "1")
    peft_ref = _gc(lora_with_dropout(build(LLAMA), 0.0))
    inner = build(LLAMA)
    apply_fast_kernels(inner, offload_activations=True, mlp_chunk_tokens=CHUNK)
    patched = _gc(lora_with_dropout(inner, 0.0))
    check_step(patched, peft_ref, "patched before get_peft_model")


def test_chunked_mlp_matches_whole(monkeypatch):
    """Full fine-tuning (every parameter trains): chunked vs whole MLP, loss and all gradients."""
    monkeypatch.setenv("HF_FASTKERN_FORCE_REFERENCE", "1")
    ref = build(LLAMA).train()
    chunked = build(LLAMA).train()
    apply_fast_kernels(chunked, mlp_chunk_tokens=CHUNK)
    oracle, base, got = step(copy.deepcopy(ref).double()), step(ref), step(chunked)
    assert_close(got[0], oracle[0], base[0], torch.float32, "output", "chunked loss")
    assert got[1].keys() == base[1].keys()
    for n in got[1]:
        assert_close(got[1][n], oracle[1][n], base[1][n], torch.float32, "grad", f"chunked {n}")


def test_chunked_mlp_never_holds_whole_sequence(monkeypatch):
    """Every [tokens, intermediate] tensor, forward and backward replay, has at most CHUNK tokens."""
    monkeypatch.setenv("HF_FASTKERN_FORCE_REFERENCE", "1")
    model = _gc(lora_with_dropout(build(LLAMA), 0.0))
    apply_fast_kernels(model, mlp_chunk_tokens=CHUNK)
    rows = []
    for m in model.modules():
        if type(m).__name__ == "LlamaMLP":
            m.gate_proj.register_forward_hook(lambda mod, a, out: rows.append(out.reshape(-1, out.shape[-1]).shape[0]))
    step(model)
    n_tokens = batch()[0].numel()
    assert rows and max(rows) <= CHUNK, rows
    # 2 layers x (forward + checkpoint recompute + backward replay) x ceil(32 / 5) chunks
    assert len(rows) == 2 * 3 * -(-n_tokens // CHUNK), len(rows)


@pytest.mark.gpu
@pytest.mark.parametrize("offload,chunk", [(False, None), (True, None), (True, 1024)],
                         ids=["plain", "offload", "offload_chunked"])
def test_lora_patched_matches_peft_gpu(offload, chunk):
    """Llama width 1024, 2 layers, bf16 autocast over fp32 weights, 2 x 2048 tokens, on the Triton kernels."""
    import transformers

    cfg = transformers.LlamaConfig(hidden_size=1024, intermediate_size=3584, num_hidden_layers=2,
                                   num_attention_heads=8, num_key_value_heads=2, vocab_size=32000,
                                   max_position_embeddings=4096)

    def make():
        torch.manual_seed(0)
        with torch.device("cuda"):
            m = transformers.LlamaForCausalLM(cfg)
        return _gc(lora_with_dropout(m, 0.0))

    ids = torch.randint(0, cfg.vocab_size, (2, 2048), device="cuda", generator=torch.Generator("cuda").manual_seed(0))

    def run(model):
        model.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    oracle = run(copy.deepcopy(make()).double())  # fp64 weights; autocast bf16 does not apply to fp64 ops
    base = run(make())
    patched = make()
    apply_fast_kernels(patched, offload_activations=offload, mlp_chunk_tokens=chunk)
    got = run(patched)
    assert_close(got[0], oracle[0], base[0], torch.bfloat16, "output", "gpu LoRA loss")
    assert all("lora_" in n for n in got[1]) and got[1].keys() == base[1].keys()
    for n in got[1]:
        assert_close(got[1][n], oracle[1][n], base[1][n], torch.bfloat16, "grad", f"gpu {n}")
