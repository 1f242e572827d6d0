"""``apply_fast_kernels`` / ``revert_fast_kernels`` / ``report``: recipes bound to one model instance through its ledger.

What a call does to the instance it is given (and nothing else: classes, module globals and other models are
never touched), each change one ledger entry (:mod:`hf_fastkern.patches.ledger`):

1. modules: every module whose class the recipe names (norms, MLPs, Llama-family attention for the fused RoPE),
   every ``nn.LayerNorm`` and RMSNorm-like module (probed first), and every PEFT ``lora.Linear`` that can take the
   fused path gets a replacement forward bound to that instance (:mod:`hf_fastkern.patches.factories`).
2. attention: the model gets its *own copy* of its config (``from_config`` hands one config object to every model
   built from it; switching the attention on a shared config would switch the other models too), then
   ``set_attn_implementation("fastkern")`` on that copy, and the decoder's training-cache guard
   (:mod:`hf_fastkern.patches.training_cache`). Revert switches the copy back; the copy stays the model's own, so
   what was set on it meanwhile (Trainer's ``use_cache=False``) never reaches another model.
3. the causal-LM loss: the fused linear cross-entropy wrapper (:mod:`hf_fastkern.patches.loss`).
4. activation offload hooks, when asked.
5. the checkpoint planner, when asked (``checkpoint="auto"`` or one mode for every layer): per-layer keep /
   recompute / offload enforced at every training forward (:mod:`hf_fastkern.memory.checkpoint_plan`).
6. LoRA added later: a forward pre-hook on the model compares PEFT's adapter registry (``peft_config`` on the
   model, set by ``get_peft_model``, ``add_adapter`` and TRL's ``peft_config``) with what it last saw, and only
   when it changed scans the modules for new ``lora.Linear`` layers and binds them. Order with PEFT does not
   matter; the check is one dictionary lookup per forward.
"""
from __future__ import annotations

import copy
import functools
import inspect
import types
from typing import Any

import torch
import torch.nn as nn
from transformers import PretrainedConfig
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from hf_fastkern.kernels import routing
from hf_fastkern.kernels.dispatch import force_reference, interpret_mode
from hf_fastkern.layers.common import PATCH_FLAG, Unsupported, down_parts, is_lora_linear, is_qlora_linear
from hf_fastkern.layers.fused_qlora import OP as QLORA_OP
from hf_fastkern.layers.fused_qlora import QUIET as QLORA_QUIET
from hf_fastkern.layers.fused_qlora import qlora_parts
from hf_fastkern.memory.checkpoint_plan import (
    GIB,
    MODES,
    MemoryModel,
    analytic_memory_model,
    checkpoint_planner,
    disable_checkpoint_planner,
    enable_checkpoint_planner,
)
from hf_fastkern.memory.offload import (
    activation_offloader,
    checkpointable_stacks,
    disable_activation_offload,
    enable_activation_offload,
)
from hf_fastkern.patches import recipes  # noqa: F401  (fills RECIPES)
from hf_fastkern.patches.attention import attention_status
from hf_fastkern.patches.factories import (
    chunked_mlp_factory,
    generic_rms_factory,
    layer_norm_factory,
    looks_like_rms_norm,
    lora_linear_factory,
)
from hf_fastkern.patches.ledger import (
    Change,
    Ledger,
    PatchReport,
    drop_ledger,
    group_reasons,
    ledger_of,
    new_ledger,
    unwrap,
)
from hf_fastkern.patches.loss import (
    disable_fused_loss,
    enable_fused_loss,
    fused_loss_forced,
    fused_loss_status,
)
from hf_fastkern.patches.recipe import RECIPES, ForwardFactory, Recipe
from hf_fastkern.patches.training_cache import guard_training_cache

_OPTIONS = ("attention", "norm", "mlp", "cross_entropy", "offload_activations", "mlp_chunk_tokens", "mlp_recompute",
            "lora", "rope", "checkpoint", "memory_budget_gib", "memory_model")


# ----------------------------------------------------------------------------------------------------------
# status functions read by the report (module-level, so deep copies of a ledger share them)


def _lora_status(module: nn.Module) -> str:
    """Why a (Q)LoRA linear runs PEFT's forward, from its structure ("" when the fused node may run)."""
    if is_qlora_linear(module):
        why = qlora_parts(module)[1]
        return "" if why in ("", *QLORA_QUIET) else f"runs PEFT's forward: {why}"
    why = down_parts(module)[1]
    return "" if why in ("", "no active adapter") else f"runs PEFT's forward: {why}"


def _qlora_status(module: nn.Module) -> str:
    """The report's view of a bound QLoRA linear: its structure, then the routing (no measured case on this
    GPU: every call runs PEFT's forward)."""
    why = _lora_status(module)
    if why:
        return why
    why = routing.unrouted_reason(QLORA_OP, module.base_layer.weight.device)
    return f"runs PEFT's forward: routed to stock ({why})" if why else ""


def _mlp_status(down_attr: str, module: nn.Module) -> str:
    """The lean MLP's down projection as it is now (the forward decides again per call)."""
    why = down_parts(getattr(module, down_attr))[1]
    return f"mlp_recompute unfused, h stored: {why}" if why else ""


# ----------------------------------------------------------------------------------------------------------
# binding modules


def _required_positional(fn) -> list[str]:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return []
    return [p.name for p in params if p.default is inspect.Parameter.empty
            and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]


def _bind(ledger: Ledger, module: nn.Module, name: str, kind: str, factory: ForwardFactory, config: Any,
          left: list[tuple[str, str]], status=None) -> bool:
    """Bind ``factory``'s forward on ``module`` unless it is bound already; record the reason when refused."""
    if module in ledger.bound:
        return False
    label = f"{kind} {type(module).__name__} ({name})"
    own = module.__dict__.get("forward")
    if own is not None and not getattr(getattr(own, "__func__", own), PATCH_FLAG, False):
        # accelerate's device-map / offload hooks live there: replacing it would skip moving inputs and weights
        left.append((label, "has an instance-level forward (a hook library such as accelerate): left as it is"))
        return False
    try:
        fn = factory(module, config)
    except Unsupported as e:
        left.append((label, str(e)))
        return False
    # the replacement must take exactly the positional arguments the original requires
    want, got = _required_positional(module.forward), _required_positional(types.MethodType(fn, module))
    if len(want) != len(got):
        left.append((label, f"forward signature {want} differs from the replacement's {got}"))
        return False
    ledger.bind(module, kind, name, fn, status)
    return True


def _bind_lora(ledger: Ledger, module: nn.Module, name: str, config: Any, left: list[tuple[str, str]]) -> None:
    """A PEFT ``lora.Linear``: bound when its structure takes the fused path, else left with the reason (Conv1D
    ``fan_in_fan_out``, dropout > 0, DoRA, several active adapters...: PEFT's forward runs unchanged)."""
    if module in ledger.bound:
        return
    why = _lora_status(module)
    if why:
        left.append((f"lora_linear {type(module).__name__} ({name})", why.replace("runs PEFT's forward: ", "")))
        return
    _bind(ledger, module, name, "lora_linear", lora_linear_factory, config, left,
          _qlora_status if is_qlora_linear(module) else _lora_status)


def _gelu_status(fc_in: str, module: nn.Module) -> str:
    """A plain GELU MLP as it runs now: the routing table may keep its activation on ``F.gelu``."""
    weight = getattr(getattr(module, fc_in, None), "weight", None)
    if not isinstance(weight, torch.Tensor):
        return ""
    why = routing.unrouted_reason("gelu", weight.device)
    return f"its GELU runs F.gelu: routed to stock ({why})" if why else ""


def _rope_status(module: nn.Module) -> str:
    """A RoPE attention as it runs now: the routing table may keep the rotation on transformers' expression."""
    weight = next((p for p in module.parameters(recurse=True)), None)
    if weight is None:
        return ""
    head_dim = getattr(module, "head_dim", None)
    family = {"head_dim": head_dim} if isinstance(head_dim, int) else None
    why = routing.unrouted_reason("rope", weight.device, family)
    return f"its rotation runs apply_rotary_pos_emb: routed to stock ({why})" if why else ""


def _mlp_factory(recipe: Recipe, cls: str, opts: dict) -> tuple[ForwardFactory, Any]:
    factory = recipe.mlps[cls]
    gelu_input = getattr(factory, "gelu_input", None)
    down_attr = getattr(factory, "recompute_down", None)
    if down_attr is not None:
        factory = functools.partial(factory, recompute=opts["mlp_recompute"])
    if opts["mlp_chunk_tokens"]:
        factory = chunked_mlp_factory(factory, opts["mlp_chunk_tokens"])
    status = functools.partial(_mlp_status, down_attr) if down_attr and opts["mlp_recompute"] else None
    if gelu_input is not None:
        status = functools.partial(_gelu_status, gelu_input)
    return factory, status


def _patch_modules(base: nn.Module, ledger: Ledger, recipe: Recipe | None, opts: dict,
                   left: list[tuple[str, str]]) -> None:
    config = getattr(base, "config", None)
    seen: set[str] = set()
    for name, module in base.named_modules():
        cls = type(module).__name__
        seen.add(cls)
        if opts["rope"] and recipe is not None and cls in recipe.rope_attention:
            _bind(ledger, module, name, "rope", recipe.rope_attention[cls], config, left, _rope_status)
        elif opts["lora"] and (is_lora_linear(module) or is_qlora_linear(module)):
            _bind_lora(ledger, module, name, config, left)
        elif opts["norm"] and recipe is not None and cls in recipe.norms:
            _bind(ledger, module, name, "norm", recipe.norms[cls], config, left)
        elif opts["norm"] and type(module) is nn.LayerNorm:
            _bind(ledger, module, name, "norm", layer_norm_factory(), config, left)
        elif opts["norm"] and looks_like_rms_norm(module):
            _bind(ledger, module, name, "norm", generic_rms_factory, config, left)
        elif opts["mlp"] and recipe is not None and cls in recipe.mlps:
            factory, status = _mlp_factory(recipe, cls, opts)
            _bind(ledger, module, name, "mlp", factory, config, left, status)
    if recipe is None:
        if opts["mlp"]:
            left.append(("mlp", f"no recipe for model_type {ledger.model_type!r}: MLPs left as they are "
                                f"(known: {', '.join(sorted(RECIPES))})"))
        return
    # a recipe class that matches nothing (renamed in a new transformers release) shows in the report
    for flag, table in (("norm", recipe.norms), ("mlp", recipe.mlps), ("rope", recipe.rope_attention)):
        for cls in table if opts[flag] else ():
            if cls not in seen:
                left.append((f"{flag} {cls}", f"recipe {recipe.name}: no module of class {cls}"))


def _scan_lora(base: nn.Module, ledger: Ledger) -> None:
    """Bind ``lora.Linear`` layers added since the last scan; the reasons for the ones left replace the old ones."""
    config = getattr(base, "config", None)
    left = [item for item in ledger.left if not item[0].startswith("lora_linear ")]
    for name, module in base.named_modules():
        if is_lora_linear(module) or is_qlora_linear(module):
            _bind_lora(ledger, module, name, config, left)
    ledger.left = group_reasons(left)


# ----------------------------------------------------------------------------------------------------------
# LoRA added after patching


_PEFT_SEEN = "_hf_fastkern_peft_seen"


def _peft_key(base: nn.Module) -> Any:
    """What changes when PEFT adds or removes an adapter: its registry on the model (``peft_config``, a dict set
    by ``get_peft_model`` / ``inject_adapter_in_model`` / transformers' ``add_adapter``): the adapters' names and
    config objects (an add and a delete between two forwards keep the count but change the names)."""
    cfg = base.__dict__.get("peft_config")
    if not isinstance(cfg, dict):
        return None if cfg is None else id(cfg)
    return tuple((name, id(c)) for name, c in cfg.items())


def _lora_pre_hook(module: nn.Module, args: tuple) -> None:
    """Forward pre-hook: when PEFT's registry changed since the last look, bind the new LoRA layers."""
    key = _peft_key(module)
    if key == module.__dict__.get(_PEFT_SEEN):
        return
    module.__dict__[_PEFT_SEEN] = key
    ledger = ledger_of(module)
    if ledger is not None and ledger.options.get("lora", True):  # a later apply(lora=False) turns it off
        _scan_lora(module, ledger)


def _remove_pre_hook(module: nn.Module, hook_id: int) -> None:
    module._forward_pre_hooks.pop(hook_id, None)
    module.__dict__.pop(_PEFT_SEEN, None)


def _watch_lora(base: nn.Module, ledger: Ledger) -> None:
    if ledger.has("lora_watch"):
        return
    base.__dict__[_PEFT_SEEN] = _peft_key(base)
    handle = base.register_forward_pre_hook(_lora_pre_hook)
    # the hook's id, not its handle: a handle holds weak references that a deepcopy cannot follow
    ledger.record(Change("lora_watch", _remove_pre_hook, base, handle.id, shown=False))


# ----------------------------------------------------------------------------------------------------------
# attention, loss, offload


def _own_config(outer: nn.Module, base: nn.Module) -> None:
    """Give the model (and every module and wrapper that holds its config or a sub-config) its own deep copy."""
    memo: dict[int, Any] = {}
    copy.deepcopy(base.config, memo)
    for m in outer.modules():
        held = m.__dict__.get("config")
        mine = memo.get(id(held)) if held is not None else None
        if isinstance(mine, PretrainedConfig):
            m.__dict__["config"] = mine


def _attention_of(config: PretrainedConfig) -> str | dict:
    """The attention implementation per (sub-)config, in ``set_attn_implementation``'s dict form when a composite
    config's parts differ (a vision tower on eager beside a text model on sdpa), so revert restores each."""
    own = config._attn_implementation
    subs = {k: getattr(config, k) for k in getattr(config, "sub_configs", {}) or {}}
    parts = {k: _attention_of(c) for k, c in subs.items() if isinstance(c, PretrainedConfig)}
    if all(v == own for v in parts.values()):
        return own
    return {"": own, **parts}


def _reset_attention(base: nn.Module, previous: str | dict) -> None:
    base.set_attn_implementation(previous)


def _attention_problem(model: nn.Module) -> str:
    if "fastkern" not in ALL_ATTENTION_FUNCTIONS:
        return "'fastkern' is not registered with transformers' AttentionInterface"
    if not hasattr(model, "set_attn_implementation") or not hasattr(model, "config"):
        return f"{type(model).__name__} is not a transformers PreTrainedModel"
    return ""


def _switch_attention(outer: nn.Module, base: nn.Module, ledger: Ledger, left: list[tuple[str, str]]) -> None:
    why = _attention_problem(base)
    if not why:
        previous = _attention_of(base.config)
        if previous != "fastkern":
            _own_config(outer, base)
        try:
            base.set_attn_implementation("fastkern")
        except Exception as e:  # transformers refuses for this model: report, keep the old one
            why = f"set_attn_implementation('fastkern') failed: {e}"
    if why:
        left.append(("attention", why))
        return
    ledger.record(Change("attention", _reset_attention, base, previous, status=attention_status))
    guard_training_cache(base, ledger)


def _fuse_loss(base: nn.Module, ledger: Ledger, left: list[tuple[str, str]]) -> None:
    get = getattr(base, "get_output_embeddings", None)
    if not callable(get) or get() is None:
        left.append(("cross_entropy", f"{type(base).__name__} has no LM head"))
        return
    try:
        ok, why = enable_fused_loss(base)
    except Exception as e:  # the loss patch must never break a model that works
        ok, why = False, f"enable_fused_loss raised {type(e).__name__}: {e}"
    if ok:
        ledger.record(Change("cross_entropy", disable_fused_loss, base, status=fused_loss_status))
    else:
        left.append(("cross_entropy", why))


def _offload(base: nn.Module, ledger: Ledger, left: list[tuple[str, str]]) -> None:
    if activation_offloader(base) is not None:
        left.append(("offload", "activation offload was enabled on this model outside apply_fast_kernels"))
    elif enable_activation_offload(base) is not None:
        ledger.record(Change("offload", disable_activation_offload, base))
    else:
        left.append(("offload", f"{type(base).__name__} has no list of checkpointable layers"))


# ----------------------------------------------------------------------------------------------------------
# the checkpoint planner


def _lean_mlp(ledger: Ledger, module: nn.Module) -> bool:
    """A patched gated MLP whose down projection may take the lean (recompute) path: the planner's "keep" mode
    switches it to storing its activation."""
    entry = ledger.bound.get(module)
    return entry is not None and entry.kind == "mlp" and entry.status is not None


def _activation_bytes(base: nn.Module) -> int:
    p = next((q for q in base.parameters() if q.is_floating_point()), None)
    if p is None:
        return 4
    dev = p.device.type
    if torch.amp.is_autocast_available(dev) and torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev).itemsize
    return p.element_size()


def _analytic_model(base: nn.Module, lean: tuple[bool, ...]) -> MemoryModel:
    """The config-derived memory model, with the activation dtype and the loss path as they are at plan time."""
    ledger = ledger_of(base)
    fused = ledger is not None and ledger.has("cross_entropy")
    return analytic_memory_model(base, base.config, lean, _activation_bytes(base), fused)


def _calibration_forward(base: nn.Module, tokens: int) -> Any:
    """One training forward of ``tokens`` random ids (batch 1), with labels where the model takes them."""
    p = next(base.parameters())
    ids = torch.randint(0, base.config.vocab_size, (1, tokens), device=p.device)
    kw = {"labels": ids} if "labels" in inspect.signature(type(base).forward).parameters else {}
    with fused_loss_forced(base):  # a long step's loss, not what the routing table runs at this small size
        return base(input_ids=ids, **kw)


def _calibration_tokens(config: Any) -> tuple[int, int]:
    most = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None) or 256
    t2 = max(16, min(256, int(most)))
    return t2 // 2, t2


def _checkpoint_detail(base: nn.Module) -> str:
    planner = checkpoint_planner(base)
    return planner.describe() if planner is not None else ""


def _plan_checkpoints(base: nn.Module, ledger: Ledger, opts: dict, left: list[tuple[str, str]]) -> None:
    stacks = checkpointable_stacks(base)
    if not stacks or getattr(base, "config", None) is None:
        left.append(("checkpoint", f"{type(base).__name__} has no list of checkpointable layers"))
        return
    layers = [layer for _, stack in stacks for layer in stack]
    memory = opts["memory_model"]
    if memory is not None and len(memory.layers) != len(layers):
        raise ValueError(f"memory_model has {len(memory.layers)} layers, the model {len(layers)}")
    lean = [[m for m in layer.modules() if _lean_mlp(ledger, m)] for layer in layers]
    budget = None if opts["memory_budget_gib"] is None else float(opts["memory_budget_gib"]) * GIB
    hidden = getattr(base.config, "hidden_size", None)
    enable_checkpoint_planner(
        base, stacks, lean, opts["checkpoint"], budget, memory,
        analytic=functools.partial(_analytic_model, base, tuple(bool(x) for x in lean)),
        calibrate=functools.partial(_calibration_forward, base),
        calibrate_tokens=_calibration_tokens(base.config), hidden_size=hidden if isinstance(hidden, int) else None)
    if not ledger.has("checkpoint"):
        ledger.record(Change("checkpoint", disable_checkpoint_planner, base, detail=_checkpoint_detail))


def _check_checkpoint_options(checkpoint: str | None, memory_budget_gib: float | None,
                              memory_model: MemoryModel | None, offload_activations: bool, base: nn.Module) -> None:
    if checkpoint is not None and checkpoint not in ("auto", *MODES):
        raise ValueError(f"checkpoint must be None, 'auto' or one of {MODES}, got {checkpoint!r}")
    if memory_budget_gib is not None:
        if isinstance(memory_budget_gib, bool) or not isinstance(memory_budget_gib, (int, float)) \
                or not memory_budget_gib > 0 or memory_budget_gib == float("inf"):
            raise ValueError(f"memory_budget_gib must be a positive finite number of GiB, got {memory_budget_gib!r}")
        if checkpoint != "auto":
            raise ValueError(f"memory_budget_gib is the budget of checkpoint='auto'; got checkpoint={checkpoint!r}")
    if memory_model is not None and (checkpoint != "auto" or not isinstance(memory_model, MemoryModel)):
        raise ValueError("memory_model must be a hf_fastkern.memory.checkpoint_plan.MemoryModel, given with "
                         "checkpoint='auto'")
    if checkpoint is not None and offload_activations:
        raise ValueError("offload_activations offloads every checkpointed layer input; with checkpoint=... the plan "
                         "decides which layers offload (mode 'offload'): pass one of them")
    if checkpoint == "auto" and memory_budget_gib is None and not torch.cuda.is_available():
        raise ValueError("checkpoint='auto' without memory_budget_gib takes the CUDA card's free memory as the "
                         "budget, and CUDA is not available here: pass memory_budget_gib=<GiB>")
    ledger = ledger_of(base)
    if checkpoint is not None and ledger is not None and ledger.has("offload"):
        raise ValueError("activation offload (offload_activations=True) is on from an earlier apply_fast_kernels; "
                         "revert it before choosing checkpoint=...")
    if offload_activations and ledger is not None and ledger.has("checkpoint"):
        raise ValueError("the checkpoint planner is on from an earlier apply_fast_kernels (checkpoint=...); its "
                         "'offload' mode offloads per layer: revert before offload_activations=True")


def _runs_on(base: nn.Module) -> str:
    p = next(base.parameters(), None)
    device = p.device if p is not None else torch.device("cpu")
    if force_reference():
        return f"{device}: every op runs its PyTorch reference (HF_FASTKERN_FORCE_REFERENCE=1)"
    if device.type == "cuda":
        return f"{device}: Triton kernels where the routing table measured them faster (`hf-fastkern info`)"
    if interpret_mode():
        return f"{device}: Triton's CPU interpreter (TRITON_INTERPRET=1; slow, for tests)"
    return f"{device}: every op runs its PyTorch reference (no CUDA); SDPA for attention"


# ----------------------------------------------------------------------------------------------------------
# the public entry points


def apply_fast_kernels(model: nn.Module, attention: bool = True, norm: bool = True, mlp: bool = True,
                       cross_entropy: bool = True, offload_activations: bool = False,
                       mlp_chunk_tokens: int | None = None, mlp_recompute: bool = True,
                       lora: bool = True, rope: bool = True, checkpoint: str | None = None,
                       memory_budget_gib: float | None = None,
                       memory_model: MemoryModel | None = None) -> PatchReport:
    """Swap this model instance's norms, MLPs, attention, RoPE, LoRA linears and causal-LM loss for the fused kernels.

    model: a transformers ``*Model`` / ``*ForCausalLM``, or a PEFT model wrapping one, patched before or after
    ``get_peft_model`` (LoRA layers added later are fused at the next forward). Only this instance changes, also
    when other models share its config object. Idempotent: a second call binds only what is new and reports the
    rest as already patched. Returns a :class:`PatchReport` derived from the instance's ledger; never raises for a
    model that works.

    attention: ``set_attn_implementation("fastkern")`` on the model's own copy of its config.
    norm / mlp / rope: recipe classes (and generic norms) get the fused forwards; ``rope`` the fused rotary
    embedding in Llama-family attention (probed against the class forward; the class forward runs whenever a
    cache is passed).
    cross_entropy: the training loss through fused linear cross-entropy (no ``[tokens, vocab]`` logits: a patched
    model returns ``logits=None`` in training when labels are given).
    offload_activations: with gradient checkpointing on, keep the checkpointed layer inputs in pinned host memory
    (:mod:`hf_fastkern.memory.offload`). No effect without checkpointing.
    mlp_chunk_tokens: run each patched MLP over at most this many tokens at a time, recomputed in backward.
    mlp_recompute: gated MLPs recompute the activation in backward instead of storing ``[tokens, intermediate]``
    (on CUDA for calls of at least ``fused_mlp.RECOMPUTE_MIN_TOKENS`` tokens; smaller ones store it).
    lora: PEFT ``lora.Linear`` layers run one fused autograd node (:mod:`hf_fastkern.layers.fused_lora`); layers
    whose structure cannot (Conv1D ``fan_in_fan_out``, dropout > 0, DoRA, several active adapters) are reported
    under "left" and run PEFT's forward.
    checkpoint: None (default) leaves checkpointing to the model (``gradient_checkpointing_enable``, Trainer's
    ``gradient_checkpointing=True``). ``"auto"`` decides per decoder layer, at the first training forward and
    again when a step brings more tokens, what to keep and what to recompute so the step fits
    ``memory_budget_gib``: no recompute when everything fits, the cheap parts (the MLP activation) next, whole
    layers next, their inputs offloaded last (:mod:`hf_fastkern.memory.checkpoint_plan`, docs/checkpointing.md).
    ``"keep"``, ``"cheap"``, ``"full"`` or ``"offload"`` puts every layer in that mode. The plan is enforced at
    every training forward, whatever the model's own checkpointing flags say (Trainer's
    ``gradient_checkpointing=True`` included); the report lists it under "chose".
    memory_budget_gib: the step's peak-memory budget for ``"auto"``. None: on CUDA the card's free memory (plus
    what this process holds) minus a margin; without CUDA a ValueError (there is no card to read).
    memory_model: per-layer bytes per token per mode to plan with instead of the measured (CUDA: one calibration
    forward at the first training step) or config-derived ones.
    """
    if mlp_chunk_tokens is not None and (isinstance(mlp_chunk_tokens, bool) or not isinstance(mlp_chunk_tokens, int)
                                         or mlp_chunk_tokens <= 0):
        raise ValueError(f"mlp_chunk_tokens must be a positive int or None, got {mlp_chunk_tokens!r}")
    base = unwrap(model)
    _check_checkpoint_options(checkpoint, memory_budget_gib, memory_model, offload_activations, base)
    opts = dict(attention=attention, norm=norm, mlp=mlp, cross_entropy=cross_entropy,
                offload_activations=offload_activations, mlp_chunk_tokens=mlp_chunk_tokens,
                mlp_recompute=mlp_recompute, lora=lora, rope=rope, checkpoint=checkpoint,
                memory_budget_gib=memory_budget_gib, memory_model=memory_model)
    config = getattr(base, "config", None)
    model_type = getattr(config, "model_type", None) or type(base).__name__
    recipe = RECIPES.get(model_type)
    ledger = ledger_of(base) or new_ledger(base, model_type, recipe.name if recipe else None)
    ledger.options = opts
    ledger.wrapper = f"{type(model).__name__} -> {type(base).__name__}" if base is not model else ""
    start = len(ledger.entries)
    left: list[tuple[str, str]] = []

    if norm or mlp or lora or rope:
        _patch_modules(base, ledger, recipe, opts, left)
    if attention and (recipe is None or recipe.attention):
        if not ledger.has("attention"):
            _switch_attention(model, base, ledger, left)
    elif attention:
        left.append(("attention", f"recipe {recipe.name} keeps its attention: {recipe.notes}"))
    if cross_entropy and (recipe is None or recipe.lm_head):
        if not ledger.has("cross_entropy"):
            _fuse_loss(base, ledger, left)
    elif cross_entropy:
        left.append(("cross_entropy", f"recipe {recipe.name} keeps its loss: {recipe.notes}"))
    if offload_activations and not ledger.has("offload"):
        _offload(base, ledger, left)
    if lora:
        _watch_lora(base, ledger)
    if checkpoint is not None:
        _plan_checkpoints(base, ledger, opts, left)
    ledger.left = group_reasons(left)
    return ledger.report(base, since=start, runs_on=_runs_on(base))


def revert_fast_kernels(model: nn.Module) -> int:
    """Undo :func:`apply_fast_kernels` on this instance, walking its ledger backwards.

    Returns the number of reported changes undone (0 when the model was not patched).
    """
    base = unwrap(model)
    ledger = drop_ledger(base)
    return ledger.revert() if ledger is not None else 0


def report(model: nn.Module) -> PatchReport:
    """What runs now on this (patched) model: every live binding under "patched", the ones that run their
    fallback, and what the last apply (or LoRA scan) left with the reason."""
    base = unwrap(model)
    ledger = ledger_of(base)
    if ledger is None:
        config = getattr(base, "config", None)
        model_type = getattr(config, "model_type", None) or type(base).__name__
        rep = PatchReport(model_type, None, runs_on=_runs_on(base))
        rep.skipped.append(("model", "not patched (call hf_fastkern.apply_fast_kernels)"))
        return rep
    return ledger.report(base, since=0, runs_on=_runs_on(base))


def is_patched(model: nn.Module) -> bool:
    """True when any part of this model instance is patched by hf_fastkern."""
    ledger = ledger_of(unwrap(model))
    return ledger is not None and bool(ledger.entries)
