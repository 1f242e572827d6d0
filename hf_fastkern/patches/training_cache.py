"""No implicit KV cache in a training forward (issue 11): the decoder's forward with ``use_cache=False`` there.

Why: with ``config.use_cache=True`` (the default) a transformers decoder builds a ``DynamicCache`` in every
forward, training included, unless *its own* gradient checkpointing is on (``merge_with_config_defaults``).
Activation checkpointing applied from outside (Accelerate's ``fsdp_activation_checkpointing``, torch's
``checkpoint_wrapper``) keeps that cache among the checkpointed layer's arguments, and the recompute in backward
appends the layer's keys/values to it a second time: attention then sees 2x the keys of the original forward.
The fastkern attention aligns a longer key axis bottom-right (decoding), so its recompute differs from the
forward and torch.utils.checkpoint raises "Recomputed values ... have different metadata" (SDPA's top-left
``is_causal`` happens to give the same output on the duplicated keys). Nothing reads a cache built in a forward
that is followed by backward, so none is built. Eval, no-grad forwards (generation, rollouts) and explicit
``use_cache`` / cache arguments are passed through unchanged.
"""
from __future__ import annotations

import ast
import inspect
import textwrap
import types
from contextvars import ContextVar
from typing import Any

import torch
import torch.nn as nn

from hf_fastkern.patches.ledger import Change, Ledger

# decoder attribute: (position of use_cache in forward(*args) without self, the forward that was there before,
# active, does the forward hand position_ids to every mask builder it calls (:func:`_masks_see_position_ids`))
_GUARD_ATTR = "_hf_fastkern_cache_guard"

# True while a guarded decoder forward runs without any cache (forced here, or use_cache=False passed with no cache
# object) and without an attention mask, in a decoder whose mask builders get position_ids. transformers' mask
# builder then looks for packed sequences in position_ids itself (``masking_utils._preprocess_mask_arguments``:
# no cache and no 2-D mask), so the attention function need not look again: its own look costs three host reads
# per forward (issue 21: B1 training steps are host-bound). Not set while torch.compile traces (dynamo cannot
# trace ContextVar.set; the attention does not look there anyway). A checkpointed layer's recompute runs after the
# forward, with the flag unset: it looks again (same answer as transformers', so the same path).
_NO_CACHE_FORWARD: ContextVar[bool] = ContextVar("hf_fastkern_no_cache_forward", default=False)


def _call_name(func: ast.expr) -> str:
    return func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""


def _masks_see_position_ids(cls: type) -> bool:
    """Does ``cls.forward`` pass ``position_ids`` to every self-attention mask builder it calls (a call whose
    name holds "mask" and that takes ``inputs_embeds``, by keyword or through a ``**dict`` literal built in the
    forward; cross-attention builders, which take ``encoder_hidden_states``, do not matter here)? Llama,
    Mistral, Qwen, Gemma, GPT-2 and GPT-NeoX do; BioGPT and others build their masks without, so transformers
    cannot look for packing there. Read from the source once, when the guard is installed; False when unsure."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls.forward)))
    except (OSError, TypeError, SyntaxError, IndentationError):
        return False
    dicts: dict[str, set] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Dict):
            keys = {k.value for k in node.value.keys if isinstance(k, ast.Constant)}
            for t in node.targets:
                if isinstance(t, ast.Name):
                    dicts[t.id] = keys
    builders = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and "mask" in _call_name(node.func):
            names = {k.arg for k in node.keywords if k.arg}
            for k in node.keywords:
                if k.arg is None and isinstance(k.value, ast.Name):
                    names |= dicts.get(k.value.id, set())
            if "inputs_embeds" in names and "encoder_hidden_states" not in names:
                builders.append(names)
    return bool(builders) and all("position_ids" in names for names in builders)


def packing_checked_upstream() -> bool:
    """Is a guarded decoder forward without a cache running (transformers has looked for packed sequences)?"""
    return _NO_CACHE_FORWARD.get()


def _no_training_cache(self: nn.Module, pos: int, args: tuple, kwargs: dict) -> bool:
    """True for a training forward with grad, fastkern attention, and no cache or ``use_cache`` given."""
    if not (self.training and torch.is_grad_enabled()):
        return False
    if getattr(getattr(self, "config", None), "_attn_implementation", None) != "fastkern":
        return False
    if len(args) > pos:
        return False  # use_cache (or an argument after it) passed positionally: the caller's choice
    return kwargs.get("use_cache") is None and _no_cache_object(kwargs)


def _no_cache_object(kwargs: dict) -> bool:
    """No cache passed by keyword (the name differs between transformers releases)."""
    return all(kwargs.get(k) is None for k in ("cache", "past_key_values"))


def _call_own(self: nn.Module, own, args: tuple, kwargs: dict) -> Any:
    """The forward the guard sits over: an earlier instance-level one, else the class's."""
    return own(*args, **kwargs) if own is not None else type(self).forward(self, *args, **kwargs)


def _decoder_forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """The decoder's forward with ``use_cache=False`` in a training forward that asked for no cache (see the
    module docstring of ``hf_fastkern.patches.training_cache``)."""
    # found through self, so a deepcopy of the model calls its own decoder
    pos, own, active, sees_pos = self.__dict__[_GUARD_ATTR]
    if active and _no_training_cache(self, pos, args, kwargs):
        kwargs["use_cache"] = False
    if torch.compiler.is_compiling():
        return _call_own(self, own, args, kwargs)
    # only input_ids may come positionally: an attention mask passed as the second argument is not seen here
    no_cache = (active and sees_pos and len(args) <= 1 and kwargs.get("use_cache") is False
                and kwargs.get("attention_mask") is None and _no_cache_object(kwargs))
    token = _NO_CACHE_FORWARD.set(no_cache)
    try:
        return _call_own(self, own, args, kwargs)
    finally:
        _NO_CACHE_FORWARD.reset(token)


def _forget(decoder: nn.Module) -> None:
    """Drop the guard's state, unless another wrapper (an accelerate hook) sat over the guard and still calls it:
    then the guard stays in that chain as a pass-through."""
    # runs after the guard binding's own undo (entries are undone last first)
    fwd = decoder.__dict__.get("forward")
    state = decoder.__dict__.get(_GUARD_ATTR)
    if state is None:
        return
    still_called = fwd is not None and state[1] is not fwd
    if still_called:
        decoder.__dict__[_GUARD_ATTR] = (state[0], state[1], False, state[3])
    else:
        decoder.__dict__.pop(_GUARD_ATTR, None)


def guard_training_cache(base: nn.Module, ledger: Ledger) -> bool:
    """Bind :func:`_decoder_forward` on the decoder that builds the cache (``base.base_model``). False when it
    takes no ``use_cache`` or is already bound by this plugin."""
    decoder = getattr(base, "base_model", None)
    decoder = decoder if isinstance(decoder, nn.Module) else base
    if decoder in ledger.bound or _GUARD_ATTR in decoder.__dict__:
        return False
    try:
        sig = inspect.signature(type(decoder).forward)
    except (TypeError, ValueError):
        return False
    if "use_cache" not in sig.parameters:
        return False
    decoder.__dict__[_GUARD_ATTR] = (list(sig.parameters).index("use_cache") - 1, decoder.__dict__.get("forward"),
                                     True, _masks_see_position_ids(type(decoder)))
    ledger.record(Change("training_cache_state", _forget, decoder, shown=False))
    # a fresh function object per model, to carry that model's signature: callers that inspect the decoder's
    # forward (Trainer, PEFT) see the original one
    fn = types.FunctionType(_decoder_forward.__code__, _decoder_forward.__globals__, "forward")
    fn.__signature__ = sig
    fn.__doc__ = _decoder_forward.__doc__
    ledger.bind(decoder, "training_cache", "", fn).shown = False
    return True
