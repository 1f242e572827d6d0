"""Determinism (issue 8, part 5): two runs of every backward give bit-identical gradients.

What the kernels promise (read from their sources; re-checked below so a new atomic cannot slip in silently):
- no kernel under hf_fastkern/kernels/ uses atomics. Norm weight/bias gradients are per-program fp32 partial
  sums reduced in a fixed order; attention's dK/dV program loops over the query heads of its GQA group and dQ
  has its own kernel; fused linear cross-entropy accumulates d_weight chunk by chunk with ordinary matmuls.
- so every op is deterministic run to run on the same GPU, shapes and launch config, and no
  ``deterministic=True`` switch is needed. (Autotuning may pick another config in a fresh process; the
  numbers then differ within the tolerance table, as any reordering of a float sum does.)
If a kernel ever needs atomics, list it in ``ATOMIC_KERNELS`` with its ``deterministic=`` option and document
it in docs/support_matrix.md; ``test_no_undocumented_atomics`` fails until then.
"""
from __future__ import annotations

import inspect
import pathlib
import re

import pytest
import torch

from hf_fastkern.kernels.activations import geglu, gelu, swiglu
from hf_fastkern.kernels.attention import flash_attention, flash_attention_varlen
from hf_fastkern.kernels.cross_entropy import cross_entropy, fused_linear_cross_entropy
from hf_fastkern.kernels.layer_norm import layer_norm
from hf_fastkern.kernels.rms_norm import rms_norm

KERNEL_DIR = pathlib.Path(__file__).resolve().parents[1] / "hf_fastkern" / "kernels"
# file name -> the public entry point's keyword that switches to a deterministic path
ATOMIC_KERNELS: dict[str, str] = {}


def test_no_undocumented_atomics():
    found = {}
    for f in sorted(KERNEL_DIR.glob("*.py")):
        src = f.read_text()
        hits = re.findall(r"tl\.atomic_\w+", src)
        if hits:
            found[f.name] = sorted(set(hits))
    undocumented = {k: v for k, v in found.items() if k not in ATOMIC_KERNELS}
    assert not undocumented, (f"kernels using atomics without a documented deterministic path: {undocumented}; "
                              "add a deterministic= option, list it in ATOMIC_KERNELS and docs/support_matrix.md")


def _cases(device: str, big: bool):
    """(name, fn(*inputs) -> output, input builders). ``big`` sizes make many programs (GPU)."""
    bf = torch.bfloat16
    n, h, inter = (8192, 4096, 14336) if big else (37, 96, 80)
    b, s, hq, hk, d = (2, 2048, 16, 4, 128) if big else (1, 21, 2, 1, 16)
    vocab, hid = (32000, 2048) if big else (301, 48)
    lens = [0, 900, 1, 2047, 1100] if big else [0, 7, 1, 12]
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device=device)
    total, mx = sum(lens), max(lens)
    labels = torch.randint(0, vocab, (n,), device=device)
    labels[::5] = -100

    def rn(*shape):
        return lambda: torch.randn(*shape, device=device).to(bf)

    return [
        ("rms_norm", lambda x, w: rms_norm(x, w), [rn(n, h), rn(h)]),
        ("layer_norm", lambda x, w, bb: layer_norm(x, w, bb), [rn(n, h), rn(h), rn(h)]),
        ("swiglu", swiglu, [rn(n, inter), rn(n, inter)]),
        ("geglu", lambda a, c: geglu(a, c, approximate="tanh"), [rn(n, inter), rn(n, inter)]),
        ("gelu", gelu, [rn(n, inter)]),
        ("flash_attention_gqa_causal", lambda q, k, v: flash_attention(q, k, v, causal=True),
         [rn(b, s, hq, d), rn(b, s, hk, d), rn(b, s, hk, d)]),
        ("flash_attention_window_bidir", lambda q, k, v: flash_attention(q, k, v, causal=False, sliding_window=s // 3),
         [rn(b, s, hq, d), rn(b, s, hk, d), rn(b, s, hk, d)]),
        ("flash_attention_varlen", lambda q, k, v: flash_attention_varlen(q, k, v, cu, cu, mx, mx, causal=True),
         [rn(total, hq, d), rn(total, hk, d), rn(total, hk, d)]),
        ("cross_entropy", lambda z: cross_entropy(z, labels, label_smoothing=0.1), [rn(n, vocab)]),
        ("fused_linear_cross_entropy", lambda x, w: fused_linear_cross_entropy(x, w, labels, z_loss=1e-4),
         [rn(n, hid), rn(vocab, hid)]),
    ]


def _run(fn, inputs, grad_seed: int = 3):
    ins = [t.detach().clone().requires_grad_(True) for t in inputs]
    out = fn(*ins)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(grad_seed)).to(out.device, out.dtype)
    out.backward(g)
    return [out.detach()] + [t.grad for t in ins]


def _check_bitwise(name, fn, builders, runs: int):
    torch.manual_seed(0)
    inputs = [mk() for mk in builders]
    first = _run(fn, inputs)
    for r in range(1, runs):
        again = _run(fn, inputs)
        for i, (a, b) in enumerate(zip(first, again)):
            what = "output" if i == 0 else f"grad[{i - 1}]"
            # equal_nan: bitwise identity is the claim, NaN included (there should be none)
            same = torch.equal(a, b) or (torch.equal(a.isnan(), b.isnan())
                                         and torch.equal(a.nan_to_num(), b.nan_to_num()))
            assert same, f"{name}: {what} differs between run 0 and run {r}"


_CPU_IDS = [c[0] for c in _cases("cpu", big=False)]


@pytest.mark.parametrize("case", _CPU_IDS, ids=_CPU_IDS)
def test_bitwise_identical_gradients(case, device):
    (name, fn, builders), = [c for c in _cases(device, big=False) if c[0] == case]
    _check_bitwise(name, fn, builders, runs=2)


@pytest.mark.gpu
@pytest.mark.parametrize("case", _CPU_IDS, ids=_CPU_IDS)
def test_bitwise_identical_gradients_gpu_real_size(case):
    """Many programs in flight (where atomics would reorder sums): three runs, bit-identical."""
    (name, fn, builders), = [c for c in _cases("cuda", big=True) if c[0] == case]
    _check_bitwise(name, fn, builders, runs=3)
    torch.cuda.empty_cache()


@pytest.mark.gpu
def test_patched_llama_training_step_bitwise_gpu():
    """One bf16 training step of a patched small Llama, twice from the same state: every gradient
    bit-identical (the embedding is left out: its stock CUDA backward is not ours)."""
    import hf_fastkern
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


def test_deterministic_switch_where_documented():
    """Every entry listed in ATOMIC_KERNELS really has its deterministic= keyword."""
    entries = {"rms_norm.py": rms_norm, "layer_norm.py": layer_norm, "activations.py": swiglu,
               "attention.py": flash_attention, "cross_entropy.py": fused_linear_cross_entropy}
    for fname, kw in ATOMIC_KERNELS.items():
        assert kw in inspect.signature(entries[fname]).parameters, f"{fname}: no {kw}= keyword"
