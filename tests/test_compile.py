"""``torch.compile`` of a patched model traces through the kernels and gives the eager results.

The kernels are ``torch.library`` custom ops, so Dynamo sees one opaque node per kernel instead of tracing
Triton. The CPU runs use the ``aot_eager`` backend (forward and backward graphs, no C++ toolchain needed);
the GPU case uses inductor.
"""
from __future__ import annotations

import copy

import pytest
import torch

from hf_fastkern import apply_fast_kernels
from tests.test_patch_archs import ARCHS, batch, build
from tests.tolerances import assert_close

LLAMA = ARCHS[0]


def loss_and_grads(model, ids, labels):
    """(logits, loss, grads); logits from a label-free call (with labels the fused loss keeps none)."""
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=labels).loss
    loss.backward()
    # A compiled module names its parameters "_orig_mod.<name>"; compare by the model's own names.
    return logits, loss.detach(), {n.removeprefix("_orig_mod."): p.grad.detach().clone()
                                   for n, p in model.named_parameters()}


def graph_breaks(model, ids) -> int:
    torch._dynamo.reset()
    return torch._dynamo.explain(model)(input_ids=ids).graph_break_count


@pytest.mark.parametrize("path", ["kernels", "reference"])
def test_compile_patched_model(path, monkeypatch):
    if path == "reference":
        # The pure-PyTorch path behind the same patched forwards.
        monkeypatch.setenv("HF_FASTKERN_FORCE_REFERENCE", "1")
    ref = build(LLAMA)
    ids, labels = batch()
    oracle = copy.deepcopy(ref).double()
    lo, so, go = loss_and_grads(oracle, ids, labels)
    eager = copy.deepcopy(ref)
    lb, sb, gb = loss_and_grads(eager, ids, labels)

    patched = copy.deepcopy(ref)
    apply_fast_kernels(patched)
    # One eager call first: dispatch.warn_once's first ``warnings.warn`` is a graph break of its own (Dynamo
    # cannot trace it), which is dispatch's business, not the patched forwards'. After it, patching adds no
    # graph break beyond those transformers itself has.
    patched(input_ids=ids)
    assert graph_breaks(patched, ids) <= graph_breaks(eager, ids)
    torch._dynamo.reset()
    compiled = torch.compile(patched, backend="aot_eager")
    lc, sc, gc = loss_and_grads(compiled, ids, labels)
    assert_close(lc, lo, lb, torch.float32, "output", f"compiled logits ({path})")
    assert_close(sc, so, sb, torch.float32, "output", f"compiled loss ({path})")
    for n in go:
        assert_close(gc[n], go[n], gb[n], torch.float32, "grad", f"compiled grad {n} ({path})")
    torch._dynamo.reset()


@pytest.mark.gpu
def test_compile_inductor_bf16_gpu():
    ref = build(LLAMA).cuda()
    ids, labels = (t.cuda() for t in batch())
    oracle = copy.deepcopy(ref).double()
    lo, so, go = loss_and_grads(oracle, ids, labels)
    eager = copy.deepcopy(ref).bfloat16()
    lb, sb, gb = loss_and_grads(eager, ids, labels)
    patched = copy.deepcopy(ref).bfloat16()
    apply_fast_kernels(patched)
    compiled = torch.compile(patched)
    lc, sc, gc = loss_and_grads(compiled, ids, labels)
    assert_close(lc, lo, lb, torch.bfloat16, "output", "compiled logits")
    assert_close(sc, so, sb, torch.bfloat16, "output", "compiled loss")
    for n in go:
        assert_close(gc[n], go[n], gb[n], torch.bfloat16, "grad", f"compiled grad {n}")
