"""PEFT LoRA on the patched fast paths (issue 12): adapters on every projection, gradient checkpointing,
activation offload and the chunked MLP.

The patched MLP forwards call the (LoRA-wrapped) projections, so the adapters run inside the fused path; the
frozen base weights get no gradient (autograd runs no weight-gradient matmul for them) and only ``lora_*``
parameters do. Each case is one training step of a tiny Llama, patched vs the unpatched PEFT model, judged
with the tolerance table against the unpatched PEFT model in fp64:
- lora_dropout 0 and 0.1 (the same seed before each step: checkpoint recompute and the chunked replay restore
  the RNG, so every run draws the same masks),
- with and without offload, with and without ``mlp_chunk_tokens``.
The model-level cases force the PyTorch reference (HF_FASTKERN_FORCE_REFERENCE=1): what is tested is the
plumbing (adapters, offload, chunking), and the interpreter would make the grid slow; one case runs the
Triton kernels under the interpreter.
"""
from __future__ import annotations

import copy

import pytest
import torch

from hf_fastkern import apply_fast_kernels
from hf_fastkern.memory.offload import activation_offloader
from hf_fastkern.memory.recompute import chunked_recompute
from tests.test_patch_archs import ARCHS, batch, build
from tests.tolerances import assert_close

peft = pytest.importorskip("peft")

LLAMA = ARCHS[0]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CHUNK = 5  # odd, does not divide BATCH * SEQ = 32 tokens: the last chunk is short


def lora(model, dropout: float):
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
    peft_ref = _gc(lora(build(LLAMA), dropout))
    patched = _gc(lora(build(LLAMA), dropout))  # build() and lora() seed: the same weights
    report = apply_fast_kernels(patched, offload_activations=offload, mlp_chunk_tokens=chunk)
    assert report.patched.get("mlp") == 2 and report.patched.get("offload", 0) == int(offload), str(report)
    if offload:
        activation_offloader(patched.get_base_model()).min_bytes = 0
    check_step(patched, peft_ref, f"dropout={dropout} offload={offload} chunk={chunk}")
    if offload:
        assert activation_offloader(patched.get_base_model()).stats.packed >= 2


def test_lora_patched_kernels_interpreter():
    """The same with the Triton kernels (interpreter on CPU): dropout 0, offload and chunked MLP on."""
    peft_ref = _gc(lora(build(LLAMA), 0.0))
    patched = _gc(lora(build(LLAMA), 0.0))
    apply_fast_kernels(patched, offload_activations=True, mlp_chunk_tokens=CHUNK)
    check_step(patched, peft_ref, "kernels")


def test_lora_patch_before_get_peft_model(monkeypatch):
    """Patched first, LoRA added after: the chunked MLP reads the adapters' parameters per call."""
    monkeypatch.setenv("HF_FASTKERN_FORCE_REFERENCE", "1")
    peft_ref = _gc(lora(build(LLAMA), 0.0))
    inner = build(LLAMA)
    apply_fast_kernels(inner, offload_activations=True, mlp_chunk_tokens=CHUNK)
    patched = _gc(lora(inner, 0.0))
    check_step(patched, peft_ref, "patched before get_peft_model")


# ----------------------------------------------------------------------------------------------------------
# the chunked MLP


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
    model = _gc(lora(build(LLAMA), 0.0))
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


def _lora_mlp(dropout: float):
    from transformers.models.llama.modeling_llama import LlamaMLP

    torch.manual_seed(0)
    mlp = LlamaMLP(build(LLAMA).config)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["gate_proj", "up_proj", "down_proj"],
                          lora_dropout=dropout, init_lora_weights="gaussian")
    wrapped = peft.get_peft_model(torch.nn.Sequential(mlp), cfg).train()
    with torch.no_grad():
        for i, (n, p) in enumerate(wrapped.named_parameters()):
            if "lora_B" in n:
                p.copy_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(i)))
    return wrapped


def _chunk_loop(fn, x, chunk):
    flat = x.reshape(-1, x.shape[-1])
    return torch.cat([fn(flat[s:s + chunk]) for s in range(0, flat.shape[0], chunk)]).reshape(*x.shape[:-1], -1)


@pytest.mark.parametrize("dropout", [0.0, 0.1], ids=["dropout0", "dropout0.1"])
def test_chunked_recompute_lora_dropout(dropout):
    """chunked_recompute vs the same chunk loop under plain autograd: same masks, same gradients, and the
    global RNG ends where the plain loop leaves it (the replay runs in a forked RNG)."""
    x0 = torch.randn(3, 11, 64)

    def run(mlp, x, chunked):
        x = x.clone().requires_grad_()
        params = [p for p in mlp.parameters() if p.requires_grad]
        torch.manual_seed(3)
        y = chunked_recompute(mlp, x, 4, params) if chunked else _chunk_loop(mlp, x, 4)
        after_forward = torch.get_rng_state()
        (y.square().sum()).backward()
        assert torch.equal(torch.get_rng_state(), after_forward), "backward moved the global RNG"
        return [y.detach(), x.grad] + [p.grad for p in params]

    mlp = _lora_mlp(dropout)
    oracle = run(copy.deepcopy(mlp).double(), x0.double(), False)
    base = run(copy.deepcopy(mlp), x0, False)
    got = run(mlp, x0, True)
    for i, (g, o, b) in enumerate(zip(got, oracle, base)):
        assert_close(g, o, b, torch.float32, "output" if i == 0 else "grad", f"dropout={dropout} tensor {i}")


def test_chunked_recompute_autograd_grad_returns_param_grads():
    """Parameter gradients flow through autograd (torch.autograd.grad sees them; nothing lands in .grad)."""
    x0 = torch.randn(2, 9, 64)

    def grads(mlp, x, chunked):
        params = [p for p in mlp.parameters() if p.requires_grad]
        x = x.clone().requires_grad_()
        y = chunked_recompute(mlp, x, 4, params) if chunked else mlp(x)
        out = torch.autograd.grad(y.sum(), [x, *params])
        assert all(p.grad is None for p in params)
        return out

    mlp = _lora_mlp(0.0)
    oracle, base = grads(copy.deepcopy(mlp).double(), x0.double(), False), grads(mlp, x0, False)
    for i, (g, o, b) in enumerate(zip(grads(mlp, x0, True), oracle, base)):
        assert_close(g, o, b, torch.float32, "grad", f"autograd.grad tensor {i}")


def test_chunked_recompute_no_grad_and_bad_chunk():
    mlp = _lora_mlp(0.0)
    x = torch.randn(2, 9, 64)
    with torch.no_grad():
        assert torch.equal(chunked_recompute(mlp, x, 4, list(mlp.parameters())), mlp(x))
    with pytest.raises(ValueError, match="chunk_tokens"):
        chunked_recompute(mlp, x, 0, [])
    with pytest.raises(ValueError, match="mlp_chunk_tokens"):
        apply_fast_kernels(build(LLAMA), mlp_chunk_tokens=-1)


# ----------------------------------------------------------------------------------------------------------
# benchmarks/bench_lora.py (the GPU scenario; here its CPU smoke pass and bookkeeping)


def test_bench_lora_cpu_smoke(monkeypatch):
    monkeypatch.setenv("HF_FASTKERN_FORCE_REFERENCE", "1")
    from benchmarks import bench_lora

    rows = {r["impl"]: r for r in bench_lora.cpu_smoke()}
    assert set(rows) == {"sdpa", "fastkern", "fastkern_offload"}
    assert not any("error" in r for r in rows.values()), rows
    for v in ("fastkern", "fastkern_offload"):
        assert_close(torch.tensor(rows[v]["loss"]), torch.tensor(rows["sdpa"]["loss"], dtype=torch.float64), None,
                     torch.float32, "output", f"bench_lora smoke {v}")


def test_bench_lora_ratios_and_gate():
    from benchmarks import bench_lora

    rows = [dict(bench="lora", impl=i, B=4, S=2048, tok_per_s=t, peak_GiB=m, loss0=l0)
            for i, t, m, l0 in [("sdpa", 6000, 30.0, 11.9), ("sdpa+liger", 7000, 20.0, 11.9),
                                ("fastkern", 9600, 15.0, 11.91), ("fastkern_offload", 8000, 12.0, 12.5)]]
    bench_lora.add_lora_ratios(rows)
    by = {r["impl"]: r for r in rows}
    assert by["fastkern"]["vs_sdpa"] == 1.6 and by["fastkern"]["mem_vs_sdpa"] == 0.5
    assert by["fastkern"]["vs_best_peer"] == 9600 / 7000 and by["fastkern"]["meets_target"]
    assert by["fastkern"]["gate"] == "ok" and by["fastkern_offload"]["gate"].startswith("FAIL")


def test_bench_lora_longctx_uses_the_longctx_search():
    from benchmarks import bench_lora

    tried = []

    def fake_trial(variant, seq, timeout, tiny):
        tried.append(seq)
        return dict(ok=seq <= 300_000)

    seen = []
    orig = bench_lora._trial
    bench_lora._trial = fake_trial
    try:
        (row,) = bench_lora.longctx_rows(["fastkern_offload"], budget_s=60, on_rows=lambda rows: seen.append(rows))
    finally:
        bench_lora._trial = orig
    assert tried[0] == 262144 and row["max_seq"] <= 300_000 < row["first_fail"] and row["exact"], row
    # one save per trial, each with this scenario's row (not the 1.5B e2e anchors), the longest so far
    assert len(seen) == len(tried) and all(len(rows) == 1 for rows in seen)
    assert seen[0][0]["bench"] == "lora_longctx" and seen[0][0]["in_progress"] and seen[0][0]["max_seq"] == 262144
    assert "anchor" not in seen[0][0]  # fastkern_offload has no issue anchor; the e2e one (245,760) is dropped


# ----------------------------------------------------------------------------------------------------------
# GPU


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
        return _gc(lora(m, 0.0))

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
