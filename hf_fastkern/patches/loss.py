"""Fused linear cross-entropy for ``*ForCausalLM`` models: the training loss without the ``[tokens, vocab]`` logits.

Mechanism (per model INSTANCE; classes and module globals are never touched):
- ``model.forward`` gets an instance-level wrapper. Without labels, in eval mode, or when the caller passes
  ``return_logits=True``, it calls the original forward unchanged (evaluation and ``generate()`` are exactly
  the unpatched model).
- In training with labels it calls the original forward with ``labels=None`` while the output head
  (``get_output_embeddings()``, an ``nn.Linear``) is in *capture* mode: the head records its input (the last
  hidden state, already sliced by ``logits_to_keep`` by the model itself) and returns an empty
  ``[..., 0]`` placeholder instead of logits. Elementwise post-processing the model applies to its logits
  (Gemma's softcap) then costs nothing. The loss is computed from the captured hidden state with
  ``fused_linear_cross_entropy`` and ``lm_head.weight``/``bias``; the output is the model's own output class
  with ``loss`` set and ``logits=None`` (``past_key_values``/``cache``, ``hidden_states``, ``attentions``, MoE
  ``aux_loss`` pass through, so this does not depend on the transformers version: the model's forward is
  never copied).
- The loss follows ``transformers.loss.loss_utils.ForCausalLMLoss``: labels are padded with ``ignore_index``
  and shifted by one, or ``shift_labels`` is used as given; ``num_items_in_batch`` divides the summed loss
  (gradient accumulation gives the loss of one big batch); ``ignore_index`` kwarg honoured;
  ``config.final_logit_softcapping`` (Gemma 2/3) is the kernel's softcap; MoE models add
  ``router_aux_loss_coef * aux_loss`` as they do themselves.
- Routing (issue 21): per call, the routing table's op ``fused_loss`` (keyed on the fp32 logits the stock loss
  would make, ``tokens x vocab x 4`` bytes) may send a step to the model's own forward with its labels, where
  it measured faster (small, host-bound steps); that call's output then carries logits, as unpatched. A table
  without ``fused_loss`` rules (every table measured before the op existed) keeps the fused loss everywhere.
- Tied input/output embeddings: the head's weight *is* the embedding parameter, read once by the fused loss,
  so autograd accumulates both contributions into it once.

Refused (``enable_fused_loss`` returns ``(False, reason)``, the model keeps its standard loss):
- heads that are not a plain ``nn.Linear`` (PEFT LoRA on ``lm_head``, quantised layers): reading
  ``lm_head.weight`` directly would silently drop the adapter's gradient (TRL PR 5977);
- models whose logits are rescaled by config (``logit_scale`` Cohere, ``logits_scaling`` Granite ...), a
  non-causal-LM ``loss_type`` or a custom ``loss_function``;
- a head whose ``forward`` is already wrapped on the instance (accelerate device-map hooks).
Sharded heads (FSDP2, Liger #332): under ``fully_shard`` the model's forward normally sees the head's
*unsharded* plain parameter (FSDP2 all-gathers a module group before its forward), so nothing changes. When the
weight (or bias) is still a ``DTensor`` at loss time (``lm_head`` in an FSDP2 group of its own, already
resharded after its capture call; or a tensor-parallel head) it is gathered with ``full_tensor()`` for the
chunk loop. Its gradient goes back through DTensor's differentiable redistribute as a partial sum that is
reduce(-scattered) onto the shards and divided by the mesh size: the *average* of the per-rank gradients,
which is what FSDP2/DDP apply to every other parameter (and, for replicated tensor-parallel inputs, equals the
local gradient). Under FSDP2 mixed precision the gathered fp32 weight is cast to the hidden state's dtype, as
FSDP2's ``param_dtype`` would. A DTensor hidden state (tensor/sequence parallel) is gathered the same way.
If the head changes after enabling (LoRA added to ``lm_head``, ``resize_token_embeddings``), each call falls
back to the original forward with a one-time warning.
"""
from __future__ import annotations

import contextlib
import inspect
import types

import torch
import torch.nn as nn
import torch.nn.functional as F

from hf_fastkern.kernels import routing
from hf_fastkern.kernels.cross_entropy import fused_linear_cross_entropy
from hf_fastkern.kernels.dispatch import warn_once
from hf_fastkern.patches.ledger import unwrap

_STATE = "_hf_fastkern_fused_loss"
# The head finds the same state through its own __dict__. Both forwards look their state up through ``self``
# rather than a closure, so ``copy.deepcopy`` of a patched model gives a copy that runs (and captures into)
# its own modules, not the original's.
_HEAD_STATE = "_hf_fastkern_fused_loss_head"
# config attributes that rescale the logits after lm_head: not folded into the fused loss, so refused
_LOGIT_TRANSFORMS = ("logit_scale", "logits_scaling", "output_multiplier_scale", "lm_head_multiplier",
                     "logits_scale")


class _State:
    """Per-instance bookkeeping: the original forwards and the capture slot."""

    def __init__(self, model: nn.Module, head: nn.Linear, softcap: float | None):
        self.head = head
        self.softcap = softcap
        self.capturing = False
        self.hidden: torch.Tensor | None = None
        self.prev_forward = model.__dict__.get("forward")  # an instance-level forward set by someone else
        self.orig_forward = model.forward
        params = list(inspect.signature(self.orig_forward).parameters)
        self.labels_pos = params.index("labels") if "labels" in params else None
        self.wrapper = None
        self.head_wrapper = None
        self.reverted = False
        self.force_kernel = False  # the checkpoint planner's calibration: the loss as a long step runs it


def _is_dtensor(t: torch.Tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except Exception:  # torch built without distributed
        return False
    return isinstance(t, DTensor)


def _head_problem(head) -> str:
    """Why this output head cannot go through the fused loss ('' when it can)."""
    if head is None:
        return "the model has no output embeddings (get_output_embeddings() is None)"
    if not isinstance(head, nn.Linear) or type(head).forward is not nn.Linear.forward:
        return (f"lm_head is {type(head).__module__}.{type(head).__name__}, not a plain nn.Linear (PEFT LoRA "
                "or a quantised layer): the fused loss would drop its adapter's gradient, standard loss kept")
    return ""


class _AverageGrad(torch.autograd.Function):
    """Identity forward; the backward divides the gradient by ``n`` (a sum over ``n`` ranks becomes a mean)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, n: int) -> torch.Tensor:
        ctx.n = n
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        return g / ctx.n, None


def _gathered(t: torch.Tensor | None) -> torch.Tensor | None:
    """A sharded DTensor parameter as one plain full tensor whose gradient averages the ranks' gradients.

    ``t``: a DTensor of any placements on any mesh (or a plain tensor / None, returned as is). Each rank's
    gradient of the full tensor is a partial contribution (it saw only its own tokens): ``Partial`` grad
    placements make the backward of ``full_tensor`` sum-reduce them onto the shards (reduce-scatter for Shard,
    all-reduce for Replicate), and ``_AverageGrad`` divides by the number of ranks first. ``Partial('avg')``
    would do both at once but gloo has no AVG reduction.
    """
    if t is None or not _is_dtensor(t):
        return t
    from torch.distributed.tensor import Partial
    full = t.full_tensor(grad_placements=[Partial()] * t.device_mesh.ndim)
    return _AverageGrad.apply(full, t.device_mesh.size()) if full.requires_grad else full


def _softcap(config) -> float | None:
    cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    cap = getattr(cfg, "final_logit_softcapping", None)
    return float(cap) if cap else None


def _support_problem(model: nn.Module) -> str:
    config = getattr(model, "config", None)
    if config is None:
        return "not a transformers model (no config)"
    if "labels" not in inspect.signature(model.forward).parameters:
        return f"{type(model).__name__}.forward takes no labels"
    custom = model.__dict__.get("_loss_function")
    if custom is not None:
        return "a custom loss_function is set on the model"
    loss_type = getattr(model, "loss_type", None)
    try:
        from transformers.loss.loss_utils import LOSS_MAPPING
    except Exception:
        LOSS_MAPPING = {}
    # transformers uses ForCausalLMLoss for unknown/None loss types (GPT2LMHeadModel)
    if loss_type is not None and loss_type in LOSS_MAPPING and loss_type != "ForCausalLM":
        return f"loss_type is {loss_type!r}, not a causal-LM loss"
    cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    for attr in _LOGIT_TRANSFORMS:
        if getattr(cfg, attr, None) not in (None, 1, 1.0):
            return f"config.{attr} rescales the logits after lm_head; the fused loss does not fold it in"
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    why = _head_problem(head)
    if why:
        return why
    if "forward" in head.__dict__:
        return "lm_head.forward is already wrapped on the instance (accelerate hook?)"
    return ""


def _make_head_forward():
    def forward(self, input: torch.Tensor) -> torch.Tensor:
        state = self.__dict__[_HEAD_STATE]
        if state.capturing:
            state.hidden = input
            # no logits: an empty vocab axis, so any elementwise post-processing by the model is free
            return input.new_empty(*input.shape[:-1], 0)
        return F.linear(input, self.weight, self.bias)
    return forward


def _make_forward():
    def forward(self, *args, **kwargs):
        state = self.__dict__[_STATE]
        if state.reverted:  # reverted while another wrapper (TRL, accelerate) sat over this one: pass through
            return state.orig_forward(*args, **kwargs)
        return_logits = kwargs.pop("return_logits", False)
        if state.labels_pos is not None and len(args) > state.labels_pos:
            labels = args[state.labels_pos]
            args = args[:state.labels_pos] + (None,) + args[state.labels_pos + 1:]
        else:
            labels = kwargs.pop("labels", None)
        # like the model itself: no labels, no loss (shift_labels alone does not ask for one). TRL's fused LM
        # head (trl.trainer.utils.add_fused_lm_head, installed under this wrapper when the model is patched
        # after the trainer was built) computes its own per-token log-probs: let it, so one fused head runs.
        if labels is None or not self.training or return_logits or kwargs.get("fused_lm_head"):
            return _call_with_positional(state, args, labels, kwargs)
        head = self.get_output_embeddings()
        why = "lm_head was replaced after enable_fused_loss" if head is not state.head else _head_problem(head)
        if not why and not state.force_kernel and not _routed_to_kernel(head, labels):
            # the routing table measured the model's own loss faster at this size (a small, host-bound step)
            return _call_with_positional(state, args, labels, kwargs)
        if why:
            warn_once(f"fused_loss:{why}", f"hf_fastkern: fused loss falls back to the standard loss: {why}.")
            return _call_with_positional(state, args, labels, kwargs)
        state.capturing, state.hidden = True, None
        try:
            out = state.orig_forward(*args, **kwargs)
        finally:
            state.capturing = False
        hidden, state.hidden = state.hidden, None
        if hidden is None:
            raise RuntimeError(f"hf_fastkern: {type(self).__name__}.forward did not call its output head; "
                               "disable the fused loss for this model (disable_fused_loss)")
        loss = _causal_lm_loss(state, hidden, labels, kwargs)
        aux = out.get("aux_loss") if isinstance(out, dict) else None
        coef = getattr(self.config, "router_aux_loss_coef", None)
        if aux is not None and coef is not None:
            loss = loss + coef * aux.to(loss.device)
        if isinstance(out, tuple):
            # return_dict=False: the model returned (logits, ...) without a loss; HF's tuple skips None fields
            return (loss,) + tuple(out[1:])
        fields = {k: v for k, v in out.items() if k not in ("logits", "loss")}
        return type(out)(loss=loss, **fields)
    return forward


@contextlib.contextmanager
def fused_loss_forced(model: nn.Module):
    """Within: this model's training loss takes the fused path whatever the routing table says (the checkpoint
    planner's calibration forwards are small, but what they measure is the per-token memory of a long step, where
    the fused loss runs: a stock loss there would count its ``[tokens, vocab]`` logits)."""
    state = unwrap(model).__dict__.get(_STATE)
    if state is None:
        yield
        return
    before, state.force_kernel = state.force_kernel, True
    try:
        yield
    finally:
        state.force_kernel = before


def _routed_to_kernel(head: nn.Module, labels) -> bool:
    """The routing table's choice for this call (op ``fused_loss``: the fp32 logits the stock loss would make)."""
    weight = head.weight
    if not isinstance(labels, torch.Tensor):
        return True
    mib = routing.logits_mib(labels.numel(), weight.shape[0])
    return routing.use_kernel("fused_loss", weight.device, logits_mib=mib, grad=torch.is_grad_enabled())


def _call_with_positional(state: _State, args: tuple, labels, kwargs: dict):
    """Call the original forward with the labels put back where the caller passed them."""
    if state.labels_pos is not None and len(args) > state.labels_pos:
        args = args[:state.labels_pos] + (labels,) + args[state.labels_pos + 1:]
        return state.orig_forward(*args, **kwargs)
    return state.orig_forward(*args, labels=labels, **kwargs)


def _causal_lm_loss(state: _State, hidden: torch.Tensor, labels, kwargs: dict) -> torch.Tensor:
    """ForCausalLMLoss semantics from the captured hidden state [batch, seq, H] (or [..., H])."""
    ignore_index = kwargs.get("ignore_index", -100)
    shift_labels = kwargs.get("shift_labels")
    if shift_labels is None:
        # tokens < n predict n: pad with ignore_index, then shift (HF's ForCausalLMLoss)
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    head = state.head
    weight, bias = head.weight, head.bias
    if _is_dtensor(hidden):
        # tensor/sequence parallel: every rank computes the loss of the whole (gathered) sequence, so the
        # gradient of the full hidden state is the same on every rank and its local slice is the default
        hidden = hidden.full_tensor()
    if _is_dtensor(weight) or _is_dtensor(bias):
        weight, bias = _gathered(weight), _gathered(bias)
        if not torch.is_autocast_enabled(hidden.device.type) and weight.dtype != hidden.dtype:
            # FSDP2 mixed precision: the sharded master weight is fp32, the compute dtype is the hidden's
            weight = weight.to(hidden.dtype)
            bias = bias.to(hidden.dtype) if bias is not None else None
    shift_labels = shift_labels.to(hidden.device)
    return fused_linear_cross_entropy(hidden.reshape(-1, hidden.shape[-1]), weight,
                                      shift_labels.reshape(-1), bias, ignore_index=ignore_index,
                                      num_items_in_batch=kwargs.get("num_items_in_batch"),
                                      softcap=state.softcap)


def enable_fused_loss(model: nn.Module) -> tuple[bool, str]:
    """Route the training loss of this model instance through the fused path.

    model: a transformers ``*ForCausalLM`` (or ``GPT2LMHeadModel``-style) instance, or a PeftModel around one.
    Returns ``(ok, reason)``: ``(True, "")`` when enabled (or already enabled), ``(False, why)`` when the model
    keeps its standard loss.
    """
    model = unwrap(model)
    if _STATE in model.__dict__:
        model.__dict__[_STATE].reverted = False  # a pass-through left by a revert under another wrapper: live again
        return True, ""
    why = _support_problem(model)
    if why:
        return False, why
    head = model.get_output_embeddings()
    state = _State(model, head, _softcap(model.config))
    fwd = _make_forward()
    # Trainer reads the forward's signature (dataset columns to keep, whether it accepts loss kwargs such as
    # num_items_in_batch): the wrapper must show the original one
    sig = inspect.signature(state.orig_forward)
    self_param = inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)
    fwd.__signature__ = sig.replace(parameters=[self_param, *sig.parameters.values()])
    fwd.__doc__ = getattr(state.orig_forward, "__doc__", None)
    state.wrapper = types.MethodType(fwd, model)
    state.head_wrapper = types.MethodType(_make_head_forward(), head)
    model.__dict__[_STATE] = state
    head.__dict__[_HEAD_STATE] = state
    model.forward = state.wrapper
    head.forward = state.head_wrapper
    return True, ""


def disable_fused_loss(model: nn.Module) -> None:
    """Undo enable_fused_loss on this instance (no-op if it was not enabled)."""
    model = unwrap(model)
    state = model.__dict__.get(_STATE)
    if state is None or state.reverted:
        return
    if model.__dict__.get("forward") is state.wrapper:
        del model.__dict__[_STATE]
        if state.prev_forward is not None:
            model.forward = state.prev_forward
        else:
            del model.forward
    else:
        # another wrapper (TRL's fused LM head, an accelerate hook) was installed over ours and calls it: ours
        # stays in the chain as a pass-through to the original forward instead of breaking that wrapper
        state.reverted = True
    state.capturing = False
    if state.head.__dict__.get("forward") is state.head_wrapper:
        del state.head.forward
        state.head.__dict__.pop(_HEAD_STATE, None)


def _is_trl_fused_forward(fwd) -> bool:
    # by its code object: functools.wraps gives TRL's wrapper the model forward's name and module
    code = getattr(getattr(fwd, "__func__", fwd), "__code__", None)
    return code is not None and code.co_name == "_fused_forward" and "trl" in code.co_filename


def fused_loss_status(model: nn.Module) -> str:
    """Why the fused loss does not compute this model's training loss now ("" when it does): TRL's fused LM head
    (``trl.trainer.utils.add_fused_lm_head``, installed by its trainers) answers every training call it makes with
    ``fused_lm_head=True``, and this wrapper steps aside for those, unless hf_fastkern's own head was put in its
    place (``FastKernels(lm_head="fastkern")``, which marks the model)."""
    state = model.__dict__.get(_STATE)
    if state is None or state.reverted:
        return "not enabled"
    if "_hf_fastkern_trl_head" in model.__dict__:
        return ""
    if _is_trl_fused_forward(model.__dict__.get("forward")) or _is_trl_fused_forward(state.prev_forward):
        return "TRL's fused LM head computes the training loss (its trainers call with fused_lm_head=True)"
    why = routing.unrouted_reason("fused_loss", state.head.weight.device)
    return f"the model's own loss runs: routed to stock ({why})" if why else ""


def fused_loss_enabled(model: nn.Module) -> bool:
    """True when enable_fused_loss is active on this instance."""
    state = unwrap(model).__dict__.get(_STATE)
    return state is not None and not state.reverted
