"""dispatch for the norm/activation entries: kernel path under the interpreter/CUDA, fallback warns once with
its reason, HF_FASTKERN_FORCE_REFERENCE forces the reference."""
import warnings

import pytest
import torch

from hf_fastkern.kernels import dispatch, reference
from hf_fastkern.kernels.activations import geglu, gelu, swiglu
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
