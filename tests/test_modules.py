"""modules.py drop-ins equal HF's modules on the same input, and from_module shares the Parameters."""
import pytest
import torch
from torch import nn

from hf_fastkern.layers.modules import FastGeGLU, FastGELU, FastLayerNorm, FastRMSNorm, FastSwiGLU
from tests.tolerances import assert_close


def _grads_equal_fp32(fast: nn.Module, ref: nn.Module, x: torch.Tensor, *more: torch.Tensor) -> None:
    """Same input to both modules; compare output and input/parameter grads against the fp64 copy."""
    xs = [t.clone().requires_grad_() for t in (x, *more)]
    xr = [t.clone().requires_grad_() for t in (x, *more)]
    y, yr = fast(*xs), ref(*xr)
    assert y.dtype == yr.dtype and y.shape == yr.shape
    g = torch.randn_like(yr)
    y.backward(g)
    yr.backward(g)
    assert_close(y, yr.double(), None, torch.float32, "output", type(fast).__name__)
    for a, b in zip(xs, xr):
        assert_close(a.grad, b.grad.double(), None, torch.float32, "grad", type(fast).__name__)


def test_fast_rms_norm_equals_llama(device):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    hf = LlamaRMSNorm(96, eps=1e-5).to(device)
    with torch.no_grad():
        hf.weight.normal_(1.0, 0.3)
    fast = FastRMSNorm.from_module(hf)
    assert fast.weight is hf.weight and fast.eps == 1e-5
    assert list(fast.state_dict()) == list(hf.state_dict()) == ["weight"]
    x = torch.randn(2, 5, 96, device=device)
    _grads_equal_fp32(fast, hf, x)
    # weight grad reaches the shared Parameter
    hf.weight.grad = None
    fast(x).sum().backward()
    assert hf.weight.grad is not None


def test_fast_rms_norm_bf16_input_fp32_weight_like_hf(device):
    """HF with an fp32 weight and a bf16 hidden state returns fp32; so does FastRMSNorm."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    hf = LlamaRMSNorm(64).to(device)
    fast = FastRMSNorm.from_module(hf)
    x = torch.randn(3, 64, device=device).bfloat16()
    y, yr = fast(x), hf(x)
    assert y.dtype == yr.dtype == torch.float32
    torch.testing.assert_close(y, yr, rtol=0, atol=1e-6)


def test_fast_rms_norm_gemma_order(device):
    from transformers.models.gemma.modeling_gemma import GemmaRMSNorm

    hf = GemmaRMSNorm(80, eps=1e-6).to(device)
    with torch.no_grad():
        hf.weight.normal_(0.0, 0.3)
    fast = FastRMSNorm.from_module(hf, offset=1.0, cast_before_weight=False)
    assert fast.weight is hf.weight
    _grads_equal_fp32(fast, hf, torch.randn(4, 80, device=device))


def test_fast_rms_norm_init():
    assert torch.equal(FastRMSNorm(8).weight, torch.ones(8))
    assert torch.equal(FastRMSNorm(8, offset=1.0, cast_before_weight=False).weight, torch.zeros(8))


@pytest.mark.parametrize("bias", [True, False])
def test_fast_layer_norm_equals_nn(bias, device):
    ln = nn.LayerNorm(72, eps=1e-5, bias=bias).to(device)
    with torch.no_grad():
        ln.weight.normal_(1.0, 0.3)
        if bias:
            ln.bias.normal_(0.0, 0.3)
    fast = FastLayerNorm.from_module(ln)
    assert fast.weight is ln.weight and fast.bias is ln.bias
    assert list(fast.state_dict()) == list(ln.state_dict())
    _grads_equal_fp32(fast, ln, torch.randn(3, 4, 72, device=device) + 1.0)
    assert list(FastLayerNorm(72, bias=bias).state_dict()) == list(ln.state_dict())


def test_fast_layer_norm_rejects_multi_dim():
    with pytest.raises(ValueError, match="last dimension only"):
        FastLayerNorm.from_module(nn.LayerNorm((4, 8)))


@pytest.mark.parametrize("name,approximate", [("gelu_new", "tanh"), ("gelu", "none"), ("gelu_pytorch_tanh", "tanh")])
def test_fast_gelu_equals_hf_activation(name, approximate, device):
    from transformers.activations import ACT2FN

    act = ACT2FN[name]
    fast = FastGELU.from_module(act)
    assert fast.approximate == approximate
    _grads_equal_fp32(fast, act, 3 * torch.randn(5, 33, device=device))


def test_fast_gelu_from_nn_and_rejects_others():
    assert FastGELU.from_module(nn.GELU(approximate="tanh")).approximate == "tanh"
    with pytest.raises(ValueError, match="not a GELU"):
        FastGELU.from_module(nn.SiLU())


def test_fast_swiglu_equals_llama_mlp_activation(device):
    from transformers.activations import ACT2FN

    g, u = torch.randn(4, 50, device=device), torch.randn(4, 50, device=device)

    class Ref(nn.Module):
        def forward(self, g, u):
            return ACT2FN["silu"](g) * u

    _grads_equal_fp32(FastSwiGLU(), Ref(), g, u)


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_fast_geglu_equals_torch(approximate, device):
    class Ref(nn.Module):
        def forward(self, g, u):
            return nn.functional.gelu(g, approximate=approximate) * u

    _grads_equal_fp32(FastGeGLU(approximate), Ref(), torch.randn(4, 50, device=device),
                      torch.randn(4, 50, device=device))
    with pytest.raises(ValueError):
        FastGeGLU("exact")
