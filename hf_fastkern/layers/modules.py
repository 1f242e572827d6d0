"""``nn.Module`` drop-ins built on ``hf_fastkern.kernels``, for code that builds its own model from modules.

``apply_fast_kernels`` does not use them: it binds replacement forwards on a model's own modules (parameters,
hooks and PEFT wrappers untouched; see docs/architecture.md). These classes are for users who compose their own
models, and for module-replacement routes such as HF ``kernels``' layer mapping.

State-dict keys equal HF's (``weight``, ``bias``), and ``from_module`` shares the SAME Parameter objects with
the module it replaces, so optimizers, PEFT wrappers and tied weights keep pointing at one tensor.
"""
from __future__ import annotations

import torch
from torch import nn

from hf_fastkern.kernels.activations import geglu, gelu, swiglu
from hf_fastkern.kernels.layer_norm import layer_norm
from hf_fastkern.kernels.rms_norm import rms_norm

# HF activation classes (by name: modules.py does not import transformers) -> GELU form.
_GELU_TANH_CLASSES = {"NewGELUActivation", "GELUTanh", "PytorchGELUTanh", "GELUPytorchTanh", "FastGELUActivation"}
_GELU_ERF_CLASSES = {"GELUActivation"}


def _eps_of(m: nn.Module, default: float) -> float:
    for name in ("variance_epsilon", "eps", "epsilon"):
        v = getattr(m, name, None)
        if isinstance(v, (int, float)):
            return float(v)
    return default


class FastRMSNorm(nn.Module):
    """RMSNorm over the last dimension (``kernels.rms_norm``): Llama order by default, Gemma with
    ``offset=1.0, cast_before_weight=False``. x: [..., hidden] -> [..., hidden] (dtype as ``rms_norm``)."""

    def __init__(self, hidden_size: int, eps: float = 1e-6, offset: float = 0.0, cast_before_weight: bool = True,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        # The effective scale ``offset + weight`` starts at 1 (Gemma stores weight - 1, so zeros).
        self.weight = nn.Parameter(torch.full((hidden_size,), 1.0 - offset, device=device, dtype=dtype))
        self.hidden_size = hidden_size
        self.eps = eps
        self.offset = offset
        self.cast_before_weight = cast_before_weight

    @classmethod
    def from_module(cls, m: nn.Module, offset: float = 0.0, cast_before_weight: bool = True) -> FastRMSNorm:
        """Wrap an HF RMSNorm (e.g. ``LlamaRMSNorm``): same ``weight`` Parameter, eps from
        ``variance_epsilon``/``eps``. Pass ``offset=1.0, cast_before_weight=False`` for Gemma's."""
        weight = getattr(m, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.dim() != 1:
            raise ValueError(f"from_module needs a module with a 1-D weight, got {type(m).__name__}")
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.weight = weight
        new.hidden_size = weight.shape[0]
        new.eps = _eps_of(m, 1e-6)
        new.offset = offset
        new.cast_before_weight = cast_before_weight
        return new

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return rms_norm(hidden_states, self.weight, self.eps, offset=self.offset,
                        cast_before_weight=self.cast_before_weight)

    def extra_repr(self) -> str:
        return (f"{self.hidden_size}, eps={self.eps}, offset={self.offset}, "
                f"cast_before_weight={self.cast_before_weight}")


class FastLayerNorm(nn.Module):
    """LayerNorm over the last dimension (``kernels.layer_norm``), statistics in fp32, result in x.dtype.
    x: [..., hidden] -> [..., hidden]."""

    def __init__(self, hidden_size: int, eps: float = 1e-5, bias: bool = True,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size, device=device, dtype=dtype))
        if bias:
            self.bias = nn.Parameter(torch.zeros(hidden_size, device=device, dtype=dtype))
        else:
            self.register_parameter("bias", None)
        self.hidden_size = hidden_size
        self.eps = eps

    @classmethod
    def from_module(cls, m: nn.Module) -> FastLayerNorm:
        """Wrap an ``nn.LayerNorm`` (or an HF LayerNorm with ``weight``/``bias``/``eps``) over one dimension,
        sharing its Parameters (``weight``/``bias`` may be None)."""
        shape = getattr(m, "normalized_shape", None)
        if shape is not None and len(tuple(shape)) != 1:
            raise ValueError(f"FastLayerNorm normalises the last dimension only, got normalized_shape={shape}")
        weight, bias = getattr(m, "weight", None), getattr(m, "bias", None)
        hidden = shape[0] if shape is not None else (weight.shape[0] if weight is not None else None)
        if hidden is None:
            raise ValueError(f"cannot tell the hidden size of {type(m).__name__}")
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        for name, p in (("weight", weight), ("bias", bias)):
            if isinstance(p, nn.Parameter) or p is None:
                new.register_parameter(name, p)
            else:
                new.register_buffer(name, p)
        new.hidden_size = hidden
        new.eps = _eps_of(m, 1e-5)
        return new

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return layer_norm(hidden_states, self.weight, self.bias, self.eps)

    def extra_repr(self) -> str:
        return f"{self.hidden_size}, eps={self.eps}, bias={self.bias is not None}"


class FastSwiGLU(nn.Module):
    """``silu(gate) * up``: called as ``module(gate, up)`` with gate, up [..., intermediate]."""

    def forward(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        return swiglu(gate, up)


class FastGeGLU(nn.Module):
    """``gelu(gate) * up`` (erf, or tanh with ``approximate='tanh'``): ``module(gate, up)``."""

    def __init__(self, approximate: str = "none") -> None:
        super().__init__()
        if approximate not in ("none", "tanh"):
            raise ValueError(f"approximate must be 'none' or 'tanh', got {approximate!r}")
        self.approximate = approximate

    def forward(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        return geglu(gate, up, self.approximate)

    def extra_repr(self) -> str:
        return f"approximate={self.approximate!r}"


class FastGELU(nn.Module):
    """GELU of x (erf, or GPT-2's ``gelu_new`` tanh form with ``approximate='tanh'``): ``module(x)``."""

    def __init__(self, approximate: str = "none") -> None:
        super().__init__()
        if approximate not in ("none", "tanh"):
            raise ValueError(f"approximate must be 'none' or 'tanh', got {approximate!r}")
        self.approximate = approximate

    @classmethod
    def from_module(cls, m: nn.Module) -> FastGELU:
        """From ``nn.GELU`` or an HF GELU activation (``NewGELUActivation``/``GELUTanh`` -> tanh,
        ``GELUActivation`` -> erf). Other activations raise ``ValueError``."""
        name = type(m).__name__
        if isinstance(m, nn.GELU):
            return cls(m.approximate)
        if name in _GELU_TANH_CLASSES:
            return cls("tanh")
        if name in _GELU_ERF_CLASSES:
            return cls("none")
        raise ValueError(f"{name} is not a GELU activation FastGELU can replace")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return gelu(x, self.approximate)

    def extra_repr(self) -> str:
        return f"approximate={self.approximate!r}"
