"""Per-architecture patch recipes and the one mechanism that applies and reverts them.

A :class:`Recipe` is data: which norm and MLP classes of an architecture get which replacement forward, and
whether the attention and the LM head (fused loss) are patched. The per-architecture files (``llama.py``,
``gpt2.py`` ...) only declare recipes; this module binds them.

The mechanism (STYLE.md rule 8, HF kernels' ``layer.py`` pattern):
- replacement forwards are stateless functions ``forward(self, x)`` built by a factory from the module and
  the config, signature-checked against the original forward, and bound to *that instance* with
  ``types.MethodType``. Classes and module globals are never touched, so two models in one process can differ.
- the original instance state is kept on the module for :func:`revert_fast_kernels`.
- parameters are not replaced, so ``state_dict()`` and ``save_pretrained`` are unchanged (a checkpoint written
  by a patched model loads without the plugin).
- submodules are *called* (``self.gate_proj(x)``), never read as weights, so PEFT LoRA wrappers keep working.
- a RMSNorm forward is probed against the reference on a tiny fp32 input before it is swapped: if a new
  transformers version changes the norm's arithmetic, the module is left alone and the report says why.

Unknown architectures get the generic parts: the "fastkern" attention implementation, RMSNorm-like modules
(found by class name and checked by the probe) and ``nn.LayerNorm``; never an exception for a model that works.
"""
from __future__ import annotations

import functools
import inspect
import types
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from hf_fastkern import fused_mlp as _fused_mlp
from hf_fastkern.kernels import activations as _act
from hf_fastkern.kernels import layer_norm as _ln
from hf_fastkern.kernels import reference
from hf_fastkern.kernels import rms_norm as _rms
from hf_fastkern.shared_cast import share_cast

# Attribute names this plugin sets on a patched module / on the patched model (plain Python attributes, never
# parameters or buffers: they do not reach the state dict).
_MODULE_MARK = "_hf_fastkern_patch"
_MODEL_STATE = "_hf_fastkern_state"

Forward = Callable[..., torch.Tensor]
# factory(module, config) -> replacement forward ``fn(self, x)``; raises Unsupported(reason) to refuse.
ForwardFactory = Callable[[nn.Module, Any], Forward]


class Unsupported(Exception):
    """Raised by a factory that cannot patch this module; the message goes into the report."""


@dataclass(frozen=True)
class Recipe:
    """What to patch in one architecture.

    norms / mlps: class name -> replacement forward factory. Class *names* (not classes) keep recipes free of
    transformers imports and valid across versions; a class that a version lacks simply never matches.
    attention: switch the model to the "fastkern" attention implementation.
    lm_head: route the causal-LM loss through the fused linear cross-entropy.
    """

    name: str
    model_types: tuple[str, ...]
    norms: Mapping[str, ForwardFactory] = field(default_factory=dict)
    mlps: Mapping[str, ForwardFactory] = field(default_factory=dict)
    attention: bool = True
    lm_head: bool = True
    notes: str = ""
    rope_attention: Mapping[str, ForwardFactory] = field(default_factory=dict)
    """attention class name -> replacement forward with the fused RoPE kernel (patches/rope_attention.py)."""


RECIPES: dict[str, Recipe] = {}


def register_recipe(recipe: Recipe) -> Recipe:
    """Add ``recipe`` under each of its model types (a later registration replaces an earlier one)."""
    for mt in recipe.model_types:
        RECIPES[mt] = recipe
    return recipe


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

        def forward(self: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
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

        def forward(self: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
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
    (:func:`hf_fastkern.fused_mlp.glu_down`, decided per call); False is the plain ``down(act(g, u))``.
    """

    def factory(module: nn.Module, config: Any, recompute: bool = True) -> Forward:
        _require(module, gate, up, down)
        act = config_activation(config, act_keys)
        if act not in _GATED:
            raise Unsupported(f"activation {act!r} has no fused gated kernel (supported: {sorted(_GATED)})")
        kind, approximate = _GATED[act]

        def forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
            gm, um = getattr(self, gate), getattr(self, up)
            xg, xu = share_cast(x, (gm, um))  # one autocast cast of x, saved once (hf_fastkern.shared_cast)
            g, u = gm(xg), um(xu)
            return _fused_mlp.glu_down(g, u, getattr(self, down), kind, approximate, recompute)

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
            return _fused_mlp.glu_down(getattr(self, gate_up)(hidden_states), None, getattr(self, down), kind,
                                       approximate, recompute)

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


def _generic_rms_factory(module: nn.Module, config: Any) -> Forward:
    """Unknown RMSNorm-like class: try the Llama then the Gemma variant; the probe decides."""
    reasons = []
    for offset, cbw in ((0.0, True), (1.0, False)):
        try:
            return rms_norm_factory(offset, cbw)(module, config)
        except Unsupported as e:
            reasons.append(str(e))
    raise Unsupported("; ".join(dict.fromkeys(reasons)))


def _looks_like_rms_norm(module: nn.Module) -> bool:
    w = getattr(module, "weight", None)
    return ("rmsnorm" in type(module).__name__.lower() and isinstance(w, nn.Parameter) and w.dim() == 1
            and any(isinstance(getattr(module, a, None), float) for a in ("variance_epsilon", "eps")))


# ----------------------------------------------------------------------------------------------------------
# the report


@dataclass
class PatchReport:
    """What :func:`apply_fast_kernels` swapped on one model, and what it left and why."""

    model_type: str
    recipe: str | None
    patched: dict[str, int] = field(default_factory=dict)
    """kind ("norm", "mlp", "attention", "cross_entropy") -> number of modules patched by this call."""
    already: dict[str, int] = field(default_factory=dict)
    """kind -> number found already patched (a second call changes nothing)."""
    skipped: list[tuple[str, str]] = field(default_factory=list)
    """(what, reason) for everything left as it was."""

    def count(self, kind: str) -> int:
        return self.patched.get(kind, 0) + self.already.get(kind, 0)

    @property
    def changed(self) -> bool:
        return any(self.patched.values())

    def _add(self, table: dict[str, int], kind: str) -> None:
        table[kind] = table.get(kind, 0) + 1

    def __str__(self) -> str:
        lines = [f"hf_fastkern: {self.model_type} (recipe: {self.recipe or 'generic'})"]
        kinds = list(dict.fromkeys([*self.patched, *self.already]))
        for k in kinds:
            p, a = self.patched.get(k, 0), self.already.get(k, 0)
            lines.append(f"  patched {k:<14} {p:>4}" + (f"  (+{a} already patched)" if a else ""))
        for what, why in self.skipped:
            lines.append(f"  left    {what}: {why}")
        return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------
# the mechanism


def _unwrap(model: nn.Module) -> nn.Module:
    """The transformers model under a PeftModel / LoraModel wrapper (or the model itself)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module (a transformers model or a PeftModel), "
                        f"got {type(model).__name__}; load it first, e.g. AutoModelForCausalLM.from_pretrained(...)")
    seen = 0
    while seen < 4:
        seen += 1
        get_base = getattr(model, "get_base_model", None)
        if callable(get_base):
            inner = get_base()
            if inner is not model:
                model = inner
                continue
        break
    return model


def _required_positional(fn: Callable) -> list[str]:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return []
    return [p.name for p in params if p.default is inspect.Parameter.empty
            and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]


def _bind(module: nn.Module, kind: str, fn: Forward) -> None:
    """Bind ``fn`` as this instance's forward, keeping what was there for revert."""
    # An instance-level forward set by someone else (accelerate, a hook library) is kept and restored;
    # otherwise revert deletes our attribute so the class forward shows through again.
    own = module.__dict__.get("forward")
    object.__setattr__(module, _MODULE_MARK, (kind, own))
    setattr(fn, _fused_mlp.PATCH_FLAG, True)  # lets fused_mlp tell our instance forwards from a hook library's
    module.forward = types.MethodType(fn, module)


def _unbind(module: nn.Module) -> bool:
    mark = module.__dict__.get(_MODULE_MARK)
    if mark is None:
        return False
    _, own = mark
    if own is None:
        module.__dict__.pop("forward", None)
    else:
        module.forward = own
    del module.__dict__[_MODULE_MARK]
    return True


def _patch_module(module: nn.Module, name: str, kind: str, factory: ForwardFactory, config: Any,
                  report: PatchReport) -> None:
    if _MODULE_MARK in module.__dict__:
        report._add(report.already, kind)
        return
    try:
        fn = factory(module, config)
    except Unsupported as e:
        report.skipped.append((f"{kind} {type(module).__name__} ({name})", str(e)))
        return
    # Signature check: the replacement must take exactly the positional arguments the original requires.
    want = _required_positional(module.forward)
    got = _required_positional(types.MethodType(fn, module))
    if len(want) != len(got):
        report.skipped.append((f"{kind} {type(module).__name__} ({name})",
                               f"forward signature {want} differs from the replacement's {got}"))
        return
    _bind(module, kind, fn)
    report._add(report.patched, kind)


def _summarise_skips(report: PatchReport) -> None:
    """Collapse per-module skip lines that share a class and reason into one line with a count."""
    # Entries read "<kind> <Class> (<first module name>)"; the module name is dropped when several share a line.
    grouped: dict[tuple[str, str], list[str]] = {}
    for what, why in report.skipped:
        grouped.setdefault((what.split(" (", 1)[0], why), []).append(what)
    report.skipped = [(whats[0] if len(whats) == 1 else f"{key} x{len(whats)}", why)
                      for (key, why), whats in grouped.items()]


def _attention_target(model: nn.Module) -> tuple[bool, str]:
    try:
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    except Exception as e:  # pragma: no cover - transformers always has it from 4.48 on
        return False, f"transformers has no attention interface ({e})"
    if "fastkern" not in ALL_ATTENTION_FUNCTIONS:
        return False, "'fastkern' is not registered with transformers' AttentionInterface"
    if not hasattr(model, "set_attn_implementation") or not hasattr(model, "config"):
        return False, f"{type(model).__name__} is not a transformers PreTrainedModel"
    return True, ""


# ----------------------------------------------------------------------------------------------------------
# no implicit KV cache in a training forward (issue 11)

# decoder class -> position of use_cache in forward(*args) (self excluded); filled at bind time, read per call
_USE_CACHE_POS: dict[type, int] = {}


def _no_training_cache(self: nn.Module, args: tuple, kwargs: dict) -> bool:
    """True for a training forward with grad, fastkern attention, and no cache or ``use_cache`` given."""
    if not (self.training and torch.is_grad_enabled()):
        return False
    if getattr(getattr(self, "config", None), "_attn_implementation", None) != "fastkern":
        return False
    pos = _USE_CACHE_POS.get(type(self))
    if pos is None or len(args) > pos:
        return False  # use_cache (or an argument after it) passed positionally: the caller's choice
    return all(kwargs.get(k) is None for k in ("use_cache", "cache", "past_key_values"))


def _decoder_forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """The decoder's forward with ``use_cache=False`` in a training forward that asked for no cache.

    Why: with ``config.use_cache=True`` (the default) a transformers decoder builds a ``DynamicCache`` in every
    forward, training included, unless *its own* gradient checkpointing is on (``merge_with_config_defaults``).
    Activation checkpointing applied from outside (Accelerate's ``fsdp_activation_checkpointing``, torch's
    ``checkpoint_wrapper``) keeps that cache among the checkpointed layer's arguments, and the recompute in
    backward appends the layer's keys/values to it a second time: attention then sees 2x the keys of the
    original forward. The fastkern attention aligns a longer key axis bottom-right (decoding), so its recompute
    differs from the forward and torch.utils.checkpoint raises "Recomputed values ... have different metadata"
    (issue 11; SDPA's top-left ``is_causal`` happens to give the same output on the duplicated keys). Nothing
    reads a cache built in a forward that is followed by backward, so none is built. Eval, no-grad forwards
    (generation, rollouts) and explicit ``use_cache`` / cache arguments are passed through unchanged.
    """
    if _no_training_cache(self, args, kwargs):
        kwargs["use_cache"] = False
    # the forward that was there before (an instance-level one is kept in the mark), found through self so a
    # deepcopy of the model calls its own decoder
    own = self.__dict__[_MODULE_MARK][1]
    return own(*args, **kwargs) if own is not None else type(self).forward(self, *args, **kwargs)


def _guard_training_cache(base: nn.Module) -> bool:
    """Bind :func:`_decoder_forward` on the decoder that builds the cache (``base.base_model``); False when it
    takes no ``use_cache`` or is already bound. Undone by :func:`revert_fast_kernels` with the other forwards."""
    decoder = getattr(base, "base_model", None)
    decoder = decoder if isinstance(decoder, nn.Module) else base
    if _MODULE_MARK in decoder.__dict__:
        return False
    try:
        sig = inspect.signature(type(decoder).forward)
    except (TypeError, ValueError):
        return False
    if "use_cache" not in sig.parameters:
        return False
    _USE_CACHE_POS[type(decoder)] = list(sig.parameters).index("use_cache") - 1  # minus self
    # a fresh function object per model, to carry that model's signature
    fn = types.FunctionType(_decoder_forward.__code__, _decoder_forward.__globals__, "forward")
    # callers that inspect the decoder's forward (Trainer, PEFT) see the original signature
    fn.__signature__ = sig
    fn.__doc__ = _decoder_forward.__doc__
    _bind(decoder, "training_cache", fn)
    return True


def chunked_mlp_factory(factory: ForwardFactory, chunk_tokens: int) -> ForwardFactory:
    """``factory``'s MLP forward run over the tokens in chunks of ``chunk_tokens``, recomputed in backward.

    For long sequences: no ``[seq, intermediate]`` tensor for the whole sequence is ever held (see
    :func:`hf_fastkern.offload.chunked_recompute`). Gradients reach every parameter of the MLP that requires
    them (LoRA adapters included), through autograd.
    """

    def wrapped(module: nn.Module, config: Any) -> Forward:
        inner = factory(module, config)

        def forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
            from hf_fastkern.offload import chunked_recompute

            # read per call: PEFT may add adapters (and freeze the base) after patching
            params = [p for p in self.parameters() if p.requires_grad]
            return chunked_recompute(lambda t: inner(self, t), x, chunk_tokens, params)

        return forward

    return wrapped


def _lm_head_target(model: nn.Module) -> nn.Module | None:
    get = getattr(model, "get_output_embeddings", None)
    return model if callable(get) and get() is not None else None


def apply_fast_kernels(model: nn.Module, attention: bool = True, norm: bool = True, mlp: bool = True,
                       cross_entropy: bool = True, offload_activations: bool = False,
                       mlp_chunk_tokens: int | None = None, mlp_recompute: bool = True,
                       lora: bool = True, rope: bool = True) -> PatchReport:
    """Swap this model instance's norms, MLPs, attention and causal-LM loss for the fused kernels.

    model: a transformers ``*Model`` / ``*ForCausalLM``, or a PEFT model wrapping one (patched before or after
    ``get_peft_model``). Only this instance changes. Idempotent: a second call patches nothing new and reports
    what it found already patched. Returns a :class:`PatchReport`; never raises for a model that works.

    offload_activations: with gradient checkpointing on (e.g. Trainer's ``gradient_checkpointing=True``), keep
    the checkpointed layer inputs in pinned host memory between forward and backward
    (:func:`hf_fastkern.offload.enable_activation_offload`). No effect without checkpointing.
    mlp_chunk_tokens: run each patched MLP over at most this many tokens at a time and recompute it in
    backward, so a long sequence never holds ``[seq, intermediate]`` tensors (applies to MLPs patched by this
    call; revert first to change it).
    mlp_recompute: gated MLPs (SwiGLU/GeGLU) recompute the activation in backward instead of storing the
    ``[tokens, intermediate]`` tensor (:mod:`hf_fastkern.fused_mlp`). The report counts the MLPs whose down
    projection takes this lean path now ("mlp_recompute") and says why the others do not; the choice is made
    again per call (PEFT may wrap the projections after patching). False: today's unfused path.
    lora: PEFT ``lora.Linear`` layers found now (any architecture, recipe or not) run one fused autograd node
    (:mod:`hf_fastkern.fused_lora`: no input casts, the adapter summed in the GEMM epilogue); checked per call,
    PEFT's forward otherwise (dropout > 0, DoRA, several adapters ...). LoRA added by ``get_peft_model`` *after*
    this call is not bound: call ``apply_fast_kernels`` again on the PEFT model (it patches only what is new).
    rope: attention modules the recipe lists (Llama, Mistral, Qwen2, Qwen3) get a forward that applies the
    rotary embedding with one Triton kernel (:mod:`hf_fastkern.patches.rope_attention`: probed against the
    class forward before binding; the class forward runs whenever a cache is passed). Independent of
    ``attention`` (which attention implementation runs inside).
    """
    if mlp_chunk_tokens is not None and (not isinstance(mlp_chunk_tokens, int) or mlp_chunk_tokens <= 0):
        raise ValueError(f"mlp_chunk_tokens must be a positive int or None, got {mlp_chunk_tokens!r}")
    base = _unwrap(model)
    config = getattr(base, "config", None)
    model_type = getattr(config, "model_type", None) or type(base).__name__
    recipe = RECIPES.get(model_type)
    report = PatchReport(model_type=model_type, recipe=recipe.name if recipe else None)
    if base is not model:
        report.skipped.append(("wrapper", f"{type(model).__name__} unwrapped to {type(base).__name__}"))
    state = base.__dict__.get(_MODEL_STATE)
    if state is None:
        state = {}
        object.__setattr__(base, _MODEL_STATE, state)

    if norm or mlp or lora or rope:
        for name, module in base.named_modules():
            cls = type(module).__name__
            if rope and recipe is not None and cls in recipe.rope_attention:
                _patch_module(module, name, "rope", recipe.rope_attention[cls], config, report)
                continue
            if lora and _fused_mlp._is_lora_linear(module):
                from hf_fastkern.fused_lora import lora_linear_factory

                _patch_module(module, name, "lora_linear", lora_linear_factory, config, report)
                continue
            if norm:
                if recipe is not None and cls in recipe.norms:
                    _patch_module(module, name, "norm", recipe.norms[cls], config, report)
                    continue
                if type(module) is nn.LayerNorm:
                    _patch_module(module, name, "norm", layer_norm_factory(), config, report)
                    continue
                if _looks_like_rms_norm(module):
                    _patch_module(module, name, "norm", _generic_rms_factory, config, report)
                    continue
            if mlp and recipe is not None and cls in recipe.mlps:
                factory = recipe.mlps[cls]
                down_attr = getattr(factory, "recompute_down", None)
                if down_attr is not None:
                    factory = functools.partial(factory, recompute=mlp_recompute)
                if mlp_chunk_tokens:
                    factory = chunked_mlp_factory(factory, mlp_chunk_tokens)
                before = report.patched.get("mlp", 0)
                _patch_module(module, name, "mlp", factory, config, report)
                if mlp_recompute and down_attr is not None and report.patched.get("mlp", 0) > before:
                    # the down projection as it is now (the forward decides again per call)
                    _, why = _fused_mlp.down_parts(getattr(module, down_attr))
                    if why:
                        report.skipped.append((f"mlp_recompute {cls} ({name})", f"unfused, h stored: {why}"))
                    else:
                        report._add(report.patched, "mlp_recompute")
        if mlp and recipe is None:
            report.skipped.append(("mlp", f"no recipe for model_type {model_type!r}: MLPs left as they are "
                                          f"(known: {', '.join(sorted(RECIPES))})"))
        _summarise_skips(report)

    if attention and (recipe is None or recipe.attention):
        if "attention" in state:
            report._add(report.already, "attention")
        else:
            ok, why = _attention_target(base)
            if ok:
                previous = base.config._attn_implementation
                try:
                    base.set_attn_implementation("fastkern")
                except Exception as e:  # transformers refuses for this model: report, keep the old one
                    ok, why = False, f"set_attn_implementation('fastkern') failed: {e}"
            if ok:
                state["attention"] = previous
                _guard_training_cache(base)
                report._add(report.patched, "attention")
            else:
                report.skipped.append(("attention", why))
    elif attention:
        report.skipped.append(("attention", f"recipe {recipe.name} keeps its attention: {recipe.notes}"))

    if cross_entropy and (recipe is None or recipe.lm_head):
        if "cross_entropy" in state:
            report._add(report.already, "cross_entropy")
        elif _lm_head_target(base) is None:
            report.skipped.append(("cross_entropy", f"{type(base).__name__} has no LM head"))
        else:
            from hf_fastkern.patches.loss import enable_fused_loss

            try:
                ok, why = enable_fused_loss(base)
            except Exception as e:  # the loss patch must never break a model that works
                ok, why = False, f"enable_fused_loss raised {type(e).__name__}: {e}"
            if ok:
                state["cross_entropy"] = True
                report._add(report.patched, "cross_entropy")
            else:
                report.skipped.append(("cross_entropy", why))
    elif cross_entropy:
        report.skipped.append(("cross_entropy", f"recipe {recipe.name} keeps its loss: {recipe.notes}"))

    if offload_activations:
        from hf_fastkern.offload import activation_offloader, enable_activation_offload

        if activation_offloader(base) is not None:
            report._add(report.already, "offload")
        elif enable_activation_offload(base) is not None:
            state["offload"] = True
            report._add(report.patched, "offload")
        else:
            report.skipped.append(("offload", f"{type(base).__name__} has no list of checkpointable layers"))
    return report


def revert_fast_kernels(model: nn.Module) -> int:
    """Undo :func:`apply_fast_kernels` on this instance: original forwards, attention implementation and loss.

    Returns the number of things restored (0 when the model was not patched).
    """
    base = _unwrap(model)
    restored = sum(_unbind(m) for m in base.modules())
    state = base.__dict__.pop(_MODEL_STATE, None) or {}
    if state.get("offload"):
        from hf_fastkern.offload import disable_activation_offload

        restored += disable_activation_offload(base)
    if "attention" in state:
        base.set_attn_implementation(state["attention"])
        restored += 1
    if state.get("cross_entropy"):
        from hf_fastkern.patches.loss import disable_fused_loss

        disable_fused_loss(base)
        restored += 1
    return restored


def is_patched(model: nn.Module) -> bool:
    """True when any part of this model instance is patched by hf_fastkern."""
    base = _unwrap(model)
    return bool(base.__dict__.get(_MODEL_STATE)) or any(_MODULE_MARK in m.__dict__ for m in base.modules())


def _load_recipes() -> None:
    # The recipe files import this module for Recipe and the factories; importing them here (at the end, once
    # everything above exists) fills RECIPES when anyone imports the registry.
    from hf_fastkern.patches import gemma, gpt2, gpt_neox, llama, mistral, phi3, qwen2, qwen3  # noqa: F401


_load_recipes()
