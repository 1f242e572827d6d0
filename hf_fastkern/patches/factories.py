"""Replacement-forward factories the recipes are written with, and the probes that vet a module first.

A factory is ``factory(module, config) -> forward(self, ...)``: it reads what it needs from the module and the
config once, at patch time, checks that the module is what it expects (raising
:class:`~hf_fastkern.layers.common.Unsupported` with the reason otherwise), and returns a stateless forward that
the ledger binds to that one instance. Forwards *call* submodules (``self.gate_proj(x)``), never read their
weights, so PEFT LoRA wrappers added before or after patching keep working.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from hf_fastkern.kernels import activations as _act
from hf_fastkern.kernels import layer_norm as _ln
from hf_fastkern.kernels import reference
from hf_fastkern.kernels import rms_norm as _rms
from hf_fastkern.layers import rope_attention as _rope_attention
from hf_fastkern.layers.common import Unsupported, is_lora_linear, is_qlora_linear
from hf_fastkern.layers.fused_lora import lora_linear_forward
from hf_fastkern.layers.fused_mlp import glu_down, recompute_for, recompute_min_tokens
from hf_fastkern.layers.fused_qlora import qlora_linear_forward
from hf_fastkern.layers.shared_cast import share_cast
from hf_fastkern.memory.recompute import chunked_recompute
from hf_fastkern.patches.recipe import Forward, ForwardFactory

# ----------------------------------------------------------------------------------------------------------
# activation lookup: config string -> (kernel, GELU approximation)

# Exact functions only: "gelu_new" and "gelu_pytorch_tanh" are both 0.5x(1 + tanh(sqrt(2/pi)(x + 0.044715x^3))).
_GATED = {
    "silu": ("swiglu", None), "swish": ("swiglu", None),
    "gelu": ("geglu", "none"),
    "gelu_new": ("geglu", "tanh"), "gelu_pytorch_tanh": ("geglu", "tanh"),
}
_PLAIN = {"gelu": "none", "gelu_new": "tanh", "gelu_pytorch_tanh": "tanh"}


def config_activation(config: Any, keys: tuple[str, ...]) -> str:
    """The activation name the model was built with: the first of ``keys`` set on ``config``."""
    for k in keys:
        act = getattr(config, k, None)
        if isinstance(act, str):
            return act
    raise Unsupported(f"no activation found in config attributes {keys}")


# ----------------------------------------------------------------------------------------------------------
# replacement forward factories shared by the recipes


def _norm_eps(module: nn.Module) -> float:
    for attr in ("variance_epsilon", "eps", "epsilon"):
        eps = getattr(module, attr, None)
        if isinstance(eps, float | int):
            return float(eps)
    raise Unsupported(f"{type(module).__name__} has no eps attribute (variance_epsilon / eps)")


def rms_norm_factory(offset: float = 0.0, cast_before_weight: bool = True) -> ForwardFactory:
    """RMSNorm with a ``weight`` [hidden] parameter. Llama order by default; Gemma: offset=1.0, cast after."""

    def factory(module: nn.Module, config: Any) -> Forward:
        eps = _norm_eps(module)
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.dim() != 1:
            raise Unsupported(f"{type(module).__name__} has no 1-D weight")
        _probe_rms_norm(module, eps, offset, cast_before_weight)
        stock = type(module).forward

        def forward(self: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
            # in eval mode, where the routing table sends the norm to stock: the class forward (in training the
            # entry point decides, so a reentrant checkpoint's two passes take one path)
            if not self.training and not _rms.rms_norm_routed(hidden_states, self.weight):
                return stock(self, hidden_states)
            # eps is read at bind time: it is a constructor constant in every HF norm.
            return _rms.rms_norm(hidden_states, self.weight, eps, offset=offset,
                                 cast_before_weight=cast_before_weight)

        return forward

    return factory


def layer_norm_factory() -> ForwardFactory:
    """``nn.LayerNorm`` over the last dimension (weight and bias may be None)."""

    def factory(module: nn.Module, config: Any) -> Forward:
        shape = getattr(module, "normalized_shape", None)
        if shape is None or len(shape) != 1:
            raise Unsupported(f"normalized_shape {shape} is not a single last dimension")
        eps = float(module.eps)
        stock = type(module).forward

        def forward(self: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
            if not self.training and not _ln.layer_norm_routed(hidden_states, self.weight, self.bias):
                return stock(self, hidden_states)  # eval mode, routed to stock: the class forward (as rms_norm)
            return _ln.layer_norm(hidden_states, self.weight, self.bias, eps)

        return forward

    return factory


def _require(module: nn.Module, *names: str) -> None:
    missing = [n for n in names if not isinstance(getattr(module, n, None), nn.Module)]
    if missing:
        raise Unsupported(f"{type(module).__name__} lacks submodule(s) {', '.join(missing)}")


def gated_mlp_factory(gate: str = "gate_proj", up: str = "up_proj", down: str = "down_proj",
                      act_keys: tuple[str, ...] = ("hidden_act",)) -> ForwardFactory:
    """``down(act(gate(x)) * up(x))`` -> ``down(swiglu|geglu(gate(x), up(x)))``.

    The factory takes ``recompute`` (``apply_fast_kernels(mlp_recompute=...)``, default True): the activation
    is recomputed in backward instead of stored, when ``down`` is a plain or LoRA linear
    (:func:`hf_fastkern.layers.fused_mlp.glu_down`, decided per call); False is the plain ``down(act(g, u))``.
    """

    def factory(module: nn.Module, config: Any, recompute: bool = True) -> Forward:
        _require(module, gate, up, down)
        act = config_activation(config, act_keys)
        if act not in _GATED:
            raise Unsupported(f"activation {act!r} has no fused gated kernel (supported: {sorted(_GATED)})")
        kind, approximate = _GATED[act]
        stock = type(module).forward
        inter = getattr(getattr(module, gate), "out_features", None) or getattr(config, "intermediate_size", None)
        if stock is nn.Module.forward:  # a class without its own forward: no stock path to exit to
            inter = None

        def forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
            # Inference only (eval mode, no autograd: generate()): the lean node saves nothing there, and where the
            # routing table sends the activation to stock the class forward is what unpatched runs. Not in training
            # mode: reentrant checkpointing runs the first forward without autograd and recomputes with it, and
            # both passes must compute the same thing.
            if (not self.training and not torch.is_grad_enabled() and isinstance(inter, int)
                    and not _act.glu_routed(x, None, inter)):
                return stock(self, x)
            gm, um = getattr(self, gate), getattr(self, up)
            xg, xu = share_cast(x, (gm, um))  # one autocast cast of x, saved once (hf_fastkern.layers.shared_cast)
            g, u = gm(xg), um(xu)
            return glu_down(g, u, getattr(self, down), kind, approximate, recompute_for(self, recompute),
                            inference=not self.training, min_tokens=recompute_min_tokens(self))

        return forward

    # read by apply_fast_kernels: this factory takes ``recompute``, and which submodule is the down projection
    factory.recompute_down = down  # type: ignore[attr-defined]
    return factory


def fused_gated_mlp_factory(gate_up: str = "gate_up_proj", down: str = "down_proj",
                            act_keys: tuple[str, ...] = ("hidden_act",)) -> ForwardFactory:
    """Phi-3 style: one projection gives ``[gate | up]``; the halves are views fed to the fused kernel.

    ``recompute`` as in :func:`gated_mlp_factory`: the lean path saves the one ``gate_up`` output.
    """

    def factory(module: nn.Module, config: Any, recompute: bool = True) -> Forward:
        _require(module, gate_up, down)
        act = config_activation(config, act_keys)
        if act not in _GATED:
            raise Unsupported(f"activation {act!r} has no fused gated kernel (supported: {sorted(_GATED)})")
        kind, approximate = _GATED[act]

        def forward(self: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
            # up=None: glu_down takes the [gate | up] halves of this one tensor as views
            return glu_down(getattr(self, gate_up)(hidden_states), None, getattr(self, down), kind,
                            approximate, recompute_for(self, recompute), inference=not self.training,
                            min_tokens=recompute_min_tokens(self))

        return forward

    factory.recompute_down = down  # type: ignore[attr-defined]
    return factory


def plain_mlp_factory(fc_in: str, fc_out: str, act_keys: tuple[str, ...],
                      dropout: str | None = None) -> ForwardFactory:
    """``[dropout](fc_out(gelu(fc_in(x))))`` (GPT-2 with Conv1D projections, GPT-NeoX)."""

    def factory(module: nn.Module, config: Any) -> Forward:
        _require(module, fc_in, fc_out, *([dropout] if dropout else []))
        act = config_activation(config, act_keys)
        if act not in _PLAIN:
            raise Unsupported(f"activation {act!r} has no GELU kernel (supported: {sorted(_PLAIN)})")
        approximate = _PLAIN[act]

        def forward(self: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
            h = getattr(self, fc_out)(_act.gelu(getattr(self, fc_in)(hidden_states), approximate))
            return getattr(self, dropout)(h) if dropout else h

        return forward

    factory.gelu_input = fc_in  # type: ignore[attr-defined]  # read by apply_fast_kernels' report
    return factory


# ----------------------------------------------------------------------------------------------------------
# probes: check that a norm computes what its replacement computes, before swapping it


def _probe_rms_norm(module: nn.Module, eps: float, offset: float, cast_before_weight: bool) -> None:
    """Raise Unsupported unless the module's current forward equals the reference RMSNorm variant in fp32."""
    weight = module.weight
    if weight.device.type == "meta":
        return  # nothing to compare on the meta device; the recipe is trusted
    x = torch.randn(3, weight.shape[0], generator=torch.Generator().manual_seed(0)).to(weight.device)
    with torch.no_grad():
        try:
            got = module.forward(x)
        except Exception as e:  # a norm that cannot run on a probe is left alone
            raise Unsupported(f"probe forward failed ({type(e).__name__})") from e
        want = reference.rms_norm(x, weight.detach().float(), eps, offset, cast_before_weight)
    if not isinstance(got, torch.Tensor) or got.shape != want.shape or \
            not torch.allclose(got.float(), want.float(), rtol=1e-4, atol=1e-5):
        raise Unsupported(f"{type(module).__name__}.forward does not compute RMSNorm(offset={offset}, "
                          f"cast_before_weight={cast_before_weight}) (changed transformers version?)")


def generic_rms_factory(module: nn.Module, config: Any) -> Forward:
    """Unknown RMSNorm-like class: try the Llama then the Gemma variant; the probe decides."""
    reasons = []
    for offset, cbw in ((0.0, True), (1.0, False)):
        try:
            return rms_norm_factory(offset, cbw)(module, config)
        except Unsupported as e:
            reasons.append(str(e))
    raise Unsupported("; ".join(dict.fromkeys(reasons)))


def looks_like_rms_norm(module: nn.Module) -> bool:
    w = getattr(module, "weight", None)
    return ("rmsnorm" in type(module).__name__.lower() and isinstance(w, nn.Parameter) and w.dim() == 1
            and any(isinstance(getattr(module, a, None), float) for a in ("variance_epsilon", "eps")))


def chunked_mlp_factory(factory: ForwardFactory, chunk_tokens: int) -> ForwardFactory:
    """``factory``'s MLP forward run over the tokens in chunks of ``chunk_tokens``, recomputed in backward.

    For long sequences: no ``[seq, intermediate]`` tensor for the whole sequence is ever held (see
    :func:`hf_fastkern.memory.recompute.chunked_recompute`). Gradients reach every parameter of the MLP that requires
    them (LoRA adapters included), through autograd.
    """

    def wrapped(module: nn.Module, config: Any) -> Forward:
        inner = factory(module, config)

        def forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
            # read per call: PEFT may add adapters (and freeze the base) after patching
            params = [p for p in self.parameters() if p.requires_grad]
            return chunked_recompute(lambda t: inner(self, t), x, chunk_tokens, params)

        return forward

    return wrapped


def rope_attention_factory(sliding_window: str | None = None) -> ForwardFactory:
    """Llama-family attention with the fused RoPE kernel (:mod:`hf_fastkern.layers.rope_attention`), looking the
    attention function up in transformers' ``ALL_ATTENTION_FUNCTIONS``. ``sliding_window``: ``"module"``
    (Qwen2, Qwen3), ``"config"`` (Mistral) or None (Llama)."""
    return _rope_attention.rope_attention_factory(ALL_ATTENTION_FUNCTIONS, sliding_window)


def lora_linear_factory(module: nn.Module, config: Any) -> Forward:
    """PEFT ``lora.Linear`` instances: :func:`hf_fastkern.layers.fused_lora.lora_linear_forward` (the fused node
    when the layer's structure allows it per call, PEFT's forward otherwise); PEFT ``lora.bnb.Linear4bit``
    (QLoRA): :func:`hf_fastkern.layers.fused_qlora.qlora_linear_forward` (likewise, and where the routing table
    measured it faster)."""
    qlora = is_qlora_linear(module)
    if not (qlora or is_lora_linear(module)):
        raise Unsupported(f"{type(module).__name__} is not PEFT's lora.Linear or lora.bnb.Linear4bit")
    if "forward" in module.__dict__:
        raise Unsupported("has an instance-level forward (a hook library such as accelerate)")
    return qlora_linear_forward if qlora else lora_linear_forward
