"""apply_fast_kernels on every supported architecture: tiny random-init configs, no downloads.

For each architecture (one id per arch, so ``-k gpt2`` picks one):
- patched vs unpatched logits, loss and every parameter gradient, judged with the tolerance table against
  the unpatched model in fp64 (the oracle) and in the test dtype (PyTorch's same-dtype baseline);
- greedy ``generate()`` identical;
- revert restores bitwise-identical outputs;
- the report names what was swapped (counts per kind).
On the CPU the kernels run under the Triton interpreter (or the reference where dispatch falls back); the
``gpu`` cases repeat the parity at real widths in bf16.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import pytest
import torch
import transformers

from hf_fastkern import apply_fast_kernels, revert_fast_kernels
from hf_fastkern.patches.apply import is_patched
from tests.tolerances import assert_close

VOCAB, SEQ, BATCH = 256, 16, 2


@dataclass
class Arch:
    name: str
    cls: str
    config_cls: str
    kwargs: dict
    norms_per_layer: int  # swapped norm modules per decoder layer (+1 final norm)


def _llama_like(hidden=64, heads=4, kv=2, inter=128, layers=2, **kw):
    return dict(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=heads,
                num_key_value_heads=kv, vocab_size=VOCAB, max_position_embeddings=64, pad_token_id=0,
                bos_token_id=1, eos_token_id=2, **kw)


ARCHS = [
    Arch("llama", "LlamaForCausalLM", "LlamaConfig", _llama_like(), 2),
    Arch("mistral", "MistralForCausalLM", "MistralConfig", _llama_like(sliding_window=8), 2),
    Arch("qwen2", "Qwen2ForCausalLM", "Qwen2Config", _llama_like(), 2),
    Arch("qwen3", "Qwen3ForCausalLM", "Qwen3Config", _llama_like(head_dim=16), 4),
    Arch("gpt2", "GPT2LMHeadModel", "GPT2Config",
         dict(n_embd=64, n_layer=2, n_head=4, n_positions=64, vocab_size=VOCAB, resid_pdrop=0.0, embd_pdrop=0.0,
              attn_pdrop=0.0, bos_token_id=1, eos_token_id=2, pad_token_id=0), 2),
    Arch("gpt_neox", "GPTNeoXForCausalLM", "GPTNeoXConfig",
         dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=VOCAB,
              max_position_embeddings=64, rotary_pct=0.25, use_parallel_residual=True, hidden_dropout=0.0,
              attention_dropout=0.0, bos_token_id=1, eos_token_id=2, pad_token_id=0), 2),
    Arch("gemma2", "Gemma2ForCausalLM", "Gemma2Config",
         _llama_like(head_dim=16, sliding_window=8, attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
                     query_pre_attn_scalar=16), 4),
    Arch("gemma3", "Gemma3ForCausalLM", "Gemma3TextConfig",
         _llama_like(head_dim=16, sliding_window=8, query_pre_attn_scalar=16), 6),
    Arch("phi3", "Phi3ForCausalLM", "Phi3Config", _llama_like(), 2),
]


def build(arch: Arch, dtype=torch.float32, init_std: float = 0.1) -> torch.nn.Module:
    torch.manual_seed(0)
    config = getattr(transformers, arch.config_cls)(**arch.kwargs)
    model = getattr(transformers, arch.cls)(config)
    # At tiny widths the default 0.02 init leaves activations and gradients near zero (a weak test), so the
    # CPU cases use 0.1; norm weights get noise so that a wrong offset or a dropped weight shows.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, init_std)
            else:
                p.add_(0.1 * torch.randn_like(p))
    return model.to(dtype)


def batch(device="cpu", bsz: int = BATCH, seq: int = SEQ, vocab: int = VOCAB):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, vocab, (bsz, seq), generator=g).to(device)
    return ids, ids.clone()


def run(model, ids, labels):
    """(logits, loss, grads). Logits come from a label-free call: with labels, the fused loss keeps none."""
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=labels).loss
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return logits, loss.detach(), grads


def assert_parity(arch: Arch, dtype: torch.dtype, device: str = "cpu", bsz: int = BATCH, seq: int = SEQ,
                  init_std: float = 0.1) -> None:
    ref = build(arch, init_std=init_std)
    oracle = copy.deepcopy(ref).double().to(device)
    base = copy.deepcopy(ref).to(dtype).to(device)
    patched = copy.deepcopy(ref).to(dtype).to(device)
    report = apply_fast_kernels(patched)
    assert report.patched.get("norm", 0) > 0 and report.patched.get("mlp", 0) > 0, str(report)
    ids, labels = batch(device, bsz, seq, ref.config.vocab_size)
    lo, so, go = run(oracle, ids, labels)
    lb, sb, gb = run(base, ids, labels)
    lp, sp, gp = run(patched, ids, labels)
    assert_close(lp, lo, lb, dtype, "output", f"{arch.name} logits")
    assert_close(sp, so, sb, dtype, "output", f"{arch.name} loss")
    assert gp.keys() == go.keys(), f"{arch.name}: gradient set differs"
    for n in go:
        assert_close(gp[n], go[n], gb[n], dtype, "grad", f"{arch.name} grad {n}")


# Gemma 2 (softcap, causal, no padding) is the regression case for the eager fallback that once dropped the
# causal mask when no explicit mask was needed by SDPA.
ARCH_PARAMS = [pytest.param(a, id=a.name) for a in ARCHS]


@pytest.mark.parametrize("arch", ARCH_PARAMS)
def test_parity_fp32(arch):
    assert_parity(arch, torch.float32)


def test_parity_bf16_llama():
    # head_dim 64, one KV head: the shape the attention kernel supports, so bf16 reaches every kernel.
    arch = Arch("llama", "LlamaForCausalLM", "LlamaConfig", _llama_like(hidden=128, heads=2, kv=1, inter=256), 2)
    assert_parity(arch, torch.bfloat16)


@pytest.mark.parametrize("arch", ARCH_PARAMS)
def test_report_generate_revert(arch):
    model = build(arch).eval()
    ids, _ = batch()
    with torch.no_grad():
        before = model(ids).logits
    gen_before = model.generate(ids[:, :6], max_new_tokens=6, do_sample=False, pad_token_id=0)
    impl_before = model.config._attn_implementation

    report = apply_fast_kernels(model)
    layers = model.config.num_hidden_layers
    assert report.recipe is not None
    assert report.patched["norm"] == arch.norms_per_layer * layers + 1, str(report)
    assert report.patched["mlp"] == layers, str(report)
    assert "norm" in str(report) and "mlp" in str(report)
    # every kind asked for is either patched or explained
    for kind in ("attention", "cross_entropy"):
        assert report.count(kind) == 1 or any(w == kind for w, _ in report.skipped), str(report)
    assert is_patched(model)

    gen_after = model.generate(ids[:, :6], max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(gen_before, gen_after), f"{arch.name}: greedy generate differs after patching"

    # idempotent: a second call changes nothing and says so
    again = apply_fast_kernels(model)
    assert not again.changed and again.already["norm"] == report.patched["norm"], str(again)

    assert revert_fast_kernels(model) > 0
    assert not is_patched(model)
    assert model.config._attn_implementation == impl_before
    with torch.no_grad():
        after = model(ids).logits
    assert torch.equal(before, after), f"{arch.name}: revert did not restore the exact outputs"
    assert all("forward" not in m.__dict__ for m in model.modules())


def test_patch_is_per_instance():
    arch = ARCHS[0]
    a, b = build(arch), build(arch)
    apply_fast_kernels(a)
    assert is_patched(a) and not is_patched(b)
    assert not any("forward" in m.__dict__ for m in b.modules())
    revert_fast_kernels(a)


# ----------------------------------------------------------------------------------------------------------
# GPU: the same parity at real widths in bf16

GPU_ARCHS = [
    Arch("llama", "LlamaForCausalLM", "LlamaConfig",
         _llama_like(hidden=2048, heads=32, kv=8, inter=8192, layers=2) | {"vocab_size": 32000}, 2),
    Arch("mistral", "MistralForCausalLM", "MistralConfig",
         _llama_like(hidden=2048, heads=32, kv=8, inter=8192, layers=2, sliding_window=256) | {"vocab_size": 32000}, 2),
    Arch("qwen2", "Qwen2ForCausalLM", "Qwen2Config",
         _llama_like(hidden=2048, heads=16, kv=2, inter=5632, layers=2) | {"vocab_size": 32000}, 2),
    Arch("qwen3", "Qwen3ForCausalLM", "Qwen3Config",
         _llama_like(hidden=2048, heads=16, kv=8, inter=6144, layers=2, head_dim=128) | {"vocab_size": 32000}, 4),
    Arch("gpt2", "GPT2LMHeadModel", "GPT2Config",
         dict(n_embd=1600, n_layer=2, n_head=25, n_positions=1024, vocab_size=32000, resid_pdrop=0.0, embd_pdrop=0.0,
              attn_pdrop=0.0), 2),
    Arch("gpt_neox", "GPTNeoXForCausalLM", "GPTNeoXConfig",
         dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=2, num_attention_heads=16, vocab_size=32000,
              rotary_pct=0.25, hidden_dropout=0.0, attention_dropout=0.0), 2),
    Arch("gemma2", "Gemma2ForCausalLM", "Gemma2Config",
         _llama_like(hidden=2304, heads=8, kv=4, inter=9216, layers=2, head_dim=256, sliding_window=256,
                     query_pre_attn_scalar=256) | {"vocab_size": 32000}, 4),
    Arch("phi3", "Phi3ForCausalLM", "Phi3Config",
         _llama_like(hidden=3072, heads=32, kv=32, inter=8192, layers=2) | {"vocab_size": 32064}, 2),
]


@pytest.mark.gpu
@pytest.mark.parametrize("arch", GPU_ARCHS, ids=lambda a: a.name)
def test_parity_bf16_gpu(arch):
    # Default-size init (0.02) at real widths; the fp64 oracle runs on the GPU too.
    assert_parity(arch, torch.bfloat16, device="cuda", bsz=2, seq=512, init_std=0.02)
