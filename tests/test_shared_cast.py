"""One autocast cast shared by the linears that read one tensor (hf_fastkern/shared_cast.py, issue 7).

The claim is bit-exactness with autocast's own per-linear casts (outputs and every gradient, ``torch.equal``),
with fewer saved copies: three linears save one bf16 copy instead of three. Model level: a patched Llama
under bf16 autocast over fp32 weights gives the same loss and gradients with and without the sharing, and each
decoder layer saves two bf16 ``[tokens, hidden]`` tensors instead of five. Anything the argument does not cover
(autocast off, fp64, bf16 input, hooked or non-plain linears) gets ``x`` itself.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from hf_fastkern import apply_fast_kernels
from hf_fastkern.layers import rope_attention
from hf_fastkern.layers import shared_cast as sc
from hf_fastkern.patches import factories
from tests.test_patch_archs import ARCHS, batch, build

AC_DTYPES = [torch.bfloat16, torch.float16]


def _linears(device="cpu"):
    torch.manual_seed(0)  # q/k/v-like: one wide, two narrow, one with a bias; odd sizes
    return [nn.Linear(67, n, bias=b).to(device) for n, b in ((48, False), (17, True), (17, False))]


def _run(lins, x0, share, ac_dtype, device="cpu"):
    """Outputs, x's gradient, weight gradients and the saved low-precision copies of x's size."""
    for m in lins:
        m.zero_grad(set_to_none=True)
    x = x0.clone().requires_grad_()
    saved = set()

    def pack(t):
        if t.dtype == ac_dtype and t.numel() == x0.numel():
            saved.add(t.untyped_storage().data_ptr())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast(device, dtype=ac_dtype):
        y = x * 1.5  # the norm output: not a leaf
        ins = sc.share_cast(y, lins) if share else (y,) * len(lins)
        outs = [m(i) for m, i in zip(lins, ins)]
        loss = sum((o.float() ** 2).sum() * (k + 1) for k, o in enumerate(outs))
    loss.backward()
    return [o.detach() for o in outs], x.grad, [m.weight.grad for m in lins], len(saved)


@pytest.mark.parametrize("ac_dtype", AC_DTYPES, ids=["bf16", "fp16"])
def test_shared_cast_is_autocast_bit_for_bit(ac_dtype):
    lins = _linears()
    x0 = torch.randn(3, 7, 67)
    want_out, want_dx, want_dw, want_saved = _run(lins, x0, False, ac_dtype)
    out, dx, dw, n_saved = _run(lins, x0, True, ac_dtype)
    assert all(torch.equal(a, b) for a, b in zip(out, want_out))
    assert torch.equal(dx, want_dx)
    assert all(torch.equal(a, b) for a, b in zip(dw, want_dw))
    assert (want_saved, n_saved) == (3, 1)


def test_shared_cast_unused_output_gets_no_gradient():
    lins = _linears()
    x = (torch.randn(5, 67) * 1.0).requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a, b, c = sc.share_cast(x * 2, lins)
        loss = lins[1](b).float().sum()  # a and c unused: their gradients arrive as None
    loss.backward()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = torch.autograd.grad(lins[1](x * 2).float().sum(), x)[0]
    assert torch.equal(x.grad, want)


class _Wrapped(nn.Module):
    def __init__(self, lin):
        super().__init__()
        self.base = lin

    def forward(self, x):
        return self.base(x)


@pytest.mark.parametrize("case", ["autocast_off", "fp64", "already_bf16", "hooked", "instance_forward", "not_plain",
                                  "one"])
def test_shared_cast_leaves_what_it_does_not_cover(case):
    lins = _linears()
    x = torch.randn(4, 67, dtype=torch.float64 if case == "fp64" else torch.float32)
    if case == "already_bf16":
        x = x.bfloat16()
    if case == "hooked":
        lins[0].register_forward_pre_hook(lambda m, a: None)
    if case == "instance_forward":  # what accelerate's add_hook_to_module does
        lins[1].forward = lins[1].forward
    if case == "not_plain":
        lins[2] = _Wrapped(lins[2])
    if case == "one":
        lins = lins[:1]
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=case != "autocast_off"):
        got = sc.share_cast(x, lins)
    assert len(got) == len(lins) and all(t is x for t in got)


def test_shared_cast_without_grad_casts_once():
    lins = _linears()
    x = torch.randn(4, 67)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a, b, c = sc.share_cast(x, lins)
    assert a is b is c and a.dtype == torch.bfloat16 and torch.equal(a, x.bfloat16())


def _unshared(monkeypatch):
    def plain(x, consumers):
        return (x,) * len(consumers)

    monkeypatch.setattr(factories, "share_cast", plain)
    monkeypatch.setattr(rope_attention, "share_cast", plain)


def _train_step(model, ids, labels, device, hidden):
    """Loss, gradients, and the low-precision [tokens, hidden] tensors autograd saved, per decoder layer."""
    model.zero_grad(set_to_none=True)
    saved = set()
    tokens = ids.numel()

    def pack(t):
        if t.dtype == torch.bfloat16 and t.numel() == tokens * hidden:
            saved.add(t.untyped_storage().data_ptr())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast(device, dtype=torch.bfloat16):
        loss = model(input_ids=ids, labels=labels).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads, len(saved) / model.config.num_hidden_layers


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_patched_llama_shares_casts_bit_for_bit(device, monkeypatch):
    """fp32 weights, bf16 autocast (the 1.5B end-to-end setting): the same loss and gradients, bit for bit,
    with two saved bf16 copies of the norm outputs per layer instead of five."""
    arch = next(a for a in ARCHS if a.name == "llama")
    model = build(arch).to(device)
    report = apply_fast_kernels(model)
    assert report.patched.get("rope") == model.config.num_hidden_layers, str(report)
    ids, labels = batch(device)
    hidden = model.config.hidden_size
    loss, grads, per_layer = _train_step(model, ids, labels, device, hidden)
    with monkeypatch.context() as m:
        _unshared(m)
        want_loss, want_grads, want_per_layer = _train_step(model, ids, labels, device, hidden)
    assert torch.equal(loss, want_loss)
    assert grads.keys() == want_grads.keys()
    assert all(torch.equal(grads[n], want_grads[n]) for n in grads), \
        [n for n in grads if not torch.equal(grads[n], want_grads[n])]
    # hidden 64 == the attention width (4 heads x 16): o_proj's bf16 input is of this size too, in both runs
    assert want_per_layer - per_layer == 3, (want_per_layer, per_layer)
