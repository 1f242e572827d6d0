"""Chunked recompute (hf_fastkern/memory/recompute.py): the MLP replayed chunk by chunk in backward, with LoRA
adapters and dropout, against the same chunk loop under plain autograd (fp64 oracle, tolerance table)."""
from __future__ import annotations

import copy

import pytest
import torch

from hf_fastkern import apply_fast_kernels
from hf_fastkern.memory.recompute import chunked_recompute
from tests.test_patch_archs import ARCHS, build
from tests.tolerances import assert_close

peft = pytest.importorskip("peft")

LLAMA = ARCHS[0]


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
