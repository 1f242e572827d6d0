"""dispatch for the norm/activation entries: kernel path under the interpreter/CUDA, fallback warns once with
its reason, HF_FASTKERN_FORCE_REFERENCE forces the reference."""
import inspect
import os
import pathlib
import re
import warnings

import pytest
import torch

from hf_fastkern.kernels import dispatch, reference
from hf_fastkern.kernels.activations import geglu, gelu, swiglu
from hf_fastkern.kernels.attention import flash_attention
from hf_fastkern.kernels.cross_entropy import fused_linear_cross_entropy
from hf_fastkern.kernels.layer_norm import layer_norm
from hf_fastkern.kernels.rms_norm import rms_norm

CALLS = {
    "rms_norm": lambda x: rms_norm(x, torch.ones(x.shape[-1], dtype=x.dtype, device=x.device)),
    "layer_norm": lambda x: layer_norm(x, None, None),
    "swiglu": lambda x: swiglu(x, x),
    "geglu": lambda x: geglu(x, x, "tanh"),
    "gelu": lambda x: gelu(x),
}


@pytest.fixture(autouse=True)
def _fresh_warnings():
    dispatch.reset_warnings()
    yield
    dispatch.reset_warnings()


def _fallbacks(record) -> list[str]:
    return [str(w.message) for w in record if issubclass(w.category, dispatch.FastKernFallbackWarning)]


@pytest.mark.parametrize("op", list(CALLS))
def test_kernel_path_does_not_warn(op, device):
    """Where kernels can run (CUDA, or CPU with TRITON_INTERPRET=1 as in CI), they run: no fallback."""
    if device == "cpu" and not dispatch.interpret_mode():
        pytest.skip("CPU without TRITON_INTERPRET=1 always falls back")
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        CALLS[op](torch.randn(3, 16, device=device))
    assert _fallbacks(rec) == []


@pytest.mark.parametrize("op", list(CALLS))
def test_force_reference_warns_once_and_matches(op, device, monkeypatch):
    monkeypatch.setenv("HF_FASTKERN_FORCE_REFERENCE", "1")
    x = torch.randn(3, 16, device=device)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        y1 = CALLS[op](x)
        y2 = CALLS[op](x)
    msgs = _fallbacks(rec)
    assert len(msgs) == 1 and op in msgs[0] and "HF_FASTKERN_FORCE_REFERENCE=1" in msgs[0]
    assert torch.equal(y1, y2)


def test_float64_falls_back_naming_the_dtype(device):
    x = torch.randn(4, 32, device=device, dtype=torch.float64)
    w = torch.ones(32, device=device, dtype=torch.float64)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        y = rms_norm(x, w)
        rms_norm(x, w)
    msgs = _fallbacks(rec)
    assert len(msgs) == 1 and "torch.float64" in msgs[0]
    torch.testing.assert_close(y, reference.rms_norm(x, w), rtol=0, atol=0)


def test_cpu_without_interpreter_falls_back(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x = torch.randn(4, 32)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        y = swiglu(x, x)
        swiglu(x, x)
    msgs = _fallbacks(rec)
    assert len(msgs) == 1 and "device 'cpu'" in msgs[0]
    torch.testing.assert_close(y, reference.swiglu(x, x), rtol=0, atol=0)


def test_too_wide_rows_fall_back(device, monkeypatch):
    from hf_fastkern.kernels import rms_norm as rms_mod

    monkeypatch.setattr(rms_mod, "MAX_FUSED_HIDDEN", 16)
    x = torch.randn(2, 32, device=device)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        y = rms_norm(x, None)
    msgs = _fallbacks(rec)
    if dispatch.device_check((x,))[0]:
        assert len(msgs) == 1 and "hidden size 32" in msgs[0]
    torch.testing.assert_close(y, reference.rms_norm(x, None), rtol=0, atol=0)


@pytest.mark.parametrize("cap,dtype,ok", [((6, 1), torch.float16, False), ((7, 5), torch.bfloat16, False),
                                          ((7, 5), torch.float16, True), ((8, 0), torch.bfloat16, True),
                                          ((9, 0), torch.bfloat16, True)])
def test_capability_check(monkeypatch, cap, dtype, ok):
    """Old GPUs fall back with a reason instead of failing to compile (pre-Volta; bf16 before Ampere)."""
    monkeypatch.setattr(dispatch, "_capability", lambda device: cap)
    monkeypatch.setattr(torch.version, "hip", None)
    got, reason = dispatch.capability_check(torch.device("cuda", 0), {dtype})
    assert got is ok
    assert (reason == "") is ok
    if not ok:
        assert f"{cap[0]}.{cap[1]}" in reason


# --- determinism: no kernel uses atomics unless it documents a deterministic path ---
#
# Two runs of every backward give bit-identical gradients (test_bitwise_identical_gradients in each op's test
# file, the case table in tests/harness.py).
# What the kernels promise (read from their sources; re-checked below so a new atomic cannot slip in silently):
# - no kernel under hf_fastkern/kernels/ uses atomics. Norm weight/bias gradients are per-program fp32 partial
#   sums reduced in a fixed order; attention's dK/dV program loops over the query heads of its GQA group and dQ
#   has its own kernel; fused linear cross-entropy accumulates d_weight chunk by chunk with ordinary matmuls.
# - so every op is deterministic run to run on the same GPU, shapes and launch config, and no
#   ``deterministic=True`` switch is needed. (Autotuning may pick another config in a fresh process; the
#   numbers then differ within the tolerance table, as any reordering of a float sum does.)
# If a kernel ever needs atomics, list it in ``ATOMIC_KERNELS`` with its ``deterministic=`` option and document
# it in docs/support_matrix.md; ``test_no_undocumented_atomics`` fails until then.


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


def test_deterministic_switch_where_documented():
    """Every entry listed in ATOMIC_KERNELS really has its deterministic= keyword."""
    entries = {"rms_norm.py": rms_norm, "layer_norm.py": layer_norm, "activations.py": swiglu,
               "attention.py": flash_attention, "cross_entropy.py": fused_linear_cross_entropy}
    for fname, kw in ATOMIC_KERNELS.items():
        assert kw in inspect.signature(entries[fname]).parameters, f"{fname}: no {kw}= keyword"


# ----------------------------------------------------------------------------------------------------------
# validation and the kernel/reference decision run once per call signature (issue 21: host time per call)


def _count_calls(monkeypatch, module, name: str) -> list:
    calls = []
    real = getattr(module, name)
    monkeypatch.setattr(module, name, lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


@pytest.mark.parametrize("op", ["rms_norm", "layer_norm", "swiglu"])
def test_validation_runs_once_per_shape(op, monkeypatch):
    from hf_fastkern.kernels import activations
    from hf_fastkern.kernels import layer_norm as ln_mod
    from hf_fastkern.kernels import rms_norm as rms_mod

    mod, name = {"rms_norm": (rms_mod, "_validate"), "layer_norm": (ln_mod, "_validate"),
                 "swiglu": (activations, "_check_pair")}[op]
    validated = _count_calls(monkeypatch, mod, name)
    decided = _count_calls(monkeypatch, mod, "use_kernel")
    a, b = torch.randn(4, 32), torch.randn(3, 32)
    for _ in range(3):
        CALLS[op](a)
    assert len(validated) == 1 and len(decided) == 1
    CALLS[op](b)  # a new shape: validated again
    assert len(validated) == 2
    CALLS[op](a.t().contiguous().t())  # same shape, other strides: validated again
    assert len(validated) == 3
    CALLS[op](a.requires_grad_())  # autograd state is part of the signature (routing keeps grad apart)
    assert len(validated) == 4
    monkeypatch.setenv("HF_FASTKERN_FORCE_REFERENCE", "1")  # so is the environment
    CALLS[op](a)
    assert len(validated) == 5


def test_bad_input_raises_every_call():
    x = torch.randn(4, 32)
    for _ in range(2):
        with pytest.raises(ValueError, match="weight must have shape"):
            rms_norm(x, torch.ones(31))


def test_attention_validates_once_per_shape(monkeypatch):
    from hf_fastkern.patches import attention as fk

    validated = _count_calls(monkeypatch, fk, "_validate")
    mod = torch.nn.Module()
    mod.is_causal = True
    q = torch.randn(1, 2, 8, 16, dtype=torch.bfloat16)
    k = torch.randn(1, 1, 8, 16, dtype=torch.bfloat16)
    for _ in range(3):  # the layers of one forward share a signature
        fk.fastkern_attention_forward(mod, q, k, k, None)
    assert len(validated) == 1
    fk.fastkern_attention_forward(mod, q[:, :, :4], k[:, :, :4], k[:, :, :4], None)
    assert len(validated) == 2
    with pytest.raises(ValueError, match="value must have shape"):
        fk.fastkern_attention_forward(mod, q, k, k[:, :, :4], None)


def test_env_get_follows_os_environ(monkeypatch):
    """The hot-path env reader (os.environ's backing mapping) sees what os.environ / monkeypatch set and unset,
    and call_key changes with every switch it covers."""
    from hf_fastkern.kernels import dispatch

    name = "HF_FASTKERN_TEST_ENV_GET"
    monkeypatch.delenv(name, raising=False)
    assert dispatch.env_get(name) is None and dispatch.env_get(name, "d") == "d"
    monkeypatch.setenv(name, "ü1")
    assert dispatch.env_get(name) == os.environ.get(name) == "ü1"
    monkeypatch.delenv(name)
    assert dispatch.env_get(name, "d") == "d"
    x = torch.zeros(2)
    for key in dispatch._ENV_KEYS:
        before = dispatch.call_key(x)
        monkeypatch.setenv(key, "switched")
        assert dispatch.call_key(x) != before, key
        monkeypatch.undo()
