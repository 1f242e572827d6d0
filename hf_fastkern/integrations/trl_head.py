"""Which fused LM head serves TRL's ``model(..., fused_lm_head=True)`` calls: TRL's (default) or ours.

TRL >= 1.16 (``trl.trainer.utils.add_fused_lm_head``, installed by ``SFTTrainer`` / ``DPOTrainer`` on every
model) wraps ``model.forward``: with ``fused_lm_head=True`` it runs the backbone (``model.base_model``) and its
chunked log-prob kernel on ``lm_head.weight`` and returns per-token ``log_probs`` (the loss is their negated
mean) plus ``entropy`` / ``is_top1`` (/ ``mean_logits`` for DPO) for its metrics. Our fused-loss wrapper
(:mod:`hf_fastkern.patches.loss`) steps aside for those calls, so by default TRL's head is the one that runs.

``use_fastkern_head(model)`` installs one more instance-level forward over whatever is there that answers
``fused_lm_head=True`` with our ``fused_linear_cross_entropy(reduction='none')`` on the valid rows (TRL's
"compact" mode), the same loss, ``log_probs`` and ``label_mask`` as TRL's, and therefore the same gradients.
Our kernel computes no entropy, top-1 or mean logit: those fields are NaN-filled tensors, so TRL logs
``entropy`` / ``mean_token_accuracy`` as NaN instead of a made-up number. Any other call goes to the forward
it wraps. ``remove_fastkern_head(model)`` puts that forward back.

Refused (returns the reason; TRL's head keeps running): an output head that is not a plain ``nn.Linear``
(PEFT ``modules_to_save`` / LoRA on ``lm_head``: reading its weight would drop the adapter's gradient),
logits rescaled by the config (``logit_scale`` & co.), and a model without an instance-level forward (TRL has
not wrapped it, so nothing would call it with ``fused_lm_head``).
"""
from __future__ import annotations

import functools
import types
from dataclasses import dataclass

import torch
import torch.nn as nn
from transformers.utils import ModelOutput

from hf_fastkern.kernels.cross_entropy import fused_linear_cross_entropy

_STATE = "_hf_fastkern_trl_head"
# config attributes TRL folds into its logits and our kernel does not (trl.trainer.utils.add_fused_lm_head)
_LOGIT_TRANSFORMS = ("logit_scale", "output_multiplier", "lm_head_multiplier", "logits_scaling")


@dataclass
class FusedHeadOutput(ModelOutput):
    """The fields of TRL's ``FusedCausalLMOutput`` (read by attribute); shapes ``[batch, seq - 1]``."""

    loss: torch.Tensor | None = None
    log_probs: torch.Tensor | None = None
    entropy: torch.Tensor | None = None
    log_sum_sq_probs: torch.Tensor | None = None
    mean_logits: torch.Tensor | None = None
    is_top1: torch.Tensor | None = None
    label_mask: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None


def _base(model: nn.Module) -> nn.Module:
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) and type(model).__name__.startswith("Peft") else model


def _problem(model: nn.Module) -> str:
    cfg = model.config.get_text_config()
    for attr in _LOGIT_TRANSFORMS:
        if getattr(cfg, attr, None) not in (None, 1, 1.0):
            return f"config.{attr} rescales the logits; TRL's head folds it in, ours does not"
    head = model.get_output_embeddings()
    if type(head) is not nn.Linear:
        return (f"lm_head is {type(head).__name__}, not a plain nn.Linear (PEFT on lm_head?): reading its "
                "weight would drop the adapter's gradient")
    if "forward" not in model.__dict__:
        return "TRL's fused LM head is not installed on this model (no SFTTrainer/DPOTrainer wrapped it)"
    return ""


def _make_forward(prev_forward):
    @functools.wraps(prev_forward)
    def forward(self, *args, fused_lm_head: bool = False, labels=None, shift_labels=None,
                num_items_in_batch=None, **kwargs):
        if not fused_lm_head:
            for name, value in (("labels", labels), ("shift_labels", shift_labels),
                                ("num_items_in_batch", num_items_in_batch)):
                if value is not None:
                    kwargs[name] = value
            return prev_forward(*args, **kwargs)
        kwargs["use_cache"] = False
        hidden = self.base_model(*args, **kwargs).last_hidden_state
        if shift_labels is None:
            hidden, labels = hidden[:, :-1], labels[:, 1:]
        else:
            labels = shift_labels
        head = self.get_output_embeddings()
        labels = labels.to(head.weight.device)
        mask = labels != -100  # [batch, seq - 1]
        softcap = getattr(self.config.get_text_config(), "final_logit_softcapping", None)
        # [n_valid] fp32, the valid rows only (TRL's compact mode)
        nll = fused_linear_cross_entropy(hidden.to(head.weight.device)[mask], head.weight, labels[mask],
                                         head.bias, reduction="none", softcap=softcap)
        log_probs = nll.new_zeros(mask.shape).masked_scatter(mask, -nll)
        denom = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
        loss = nll.sum() / denom
        # not computed by our kernel: NaN, so a metric built on them says so
        nan = torch.full(mask.shape, float("nan"), device=mask.device)
        return FusedHeadOutput(loss=loss, log_probs=log_probs, entropy=nan, mean_logits=nan, is_top1=nan,
                               label_mask=mask)
    return forward


def use_fastkern_head(model: nn.Module) -> tuple[bool, str]:
    """Serve this model's ``fused_lm_head=True`` calls with our fused linear CE; ``(ok, reason)``.

    model: a transformers ``*ForCausalLM`` (or a PeftModel around one) that a TRL trainer has already wrapped
    with ``add_fused_lm_head``. Idempotent.
    """
    base = _base(model)
    if _STATE in base.__dict__:
        return True, ""
    why = _problem(base)
    if why:
        return False, why
    prev = base.__dict__["forward"]
    wrapper = types.MethodType(_make_forward(prev), base)
    base.__dict__[_STATE] = (prev, wrapper)
    base.forward = wrapper
    return True, ""


def remove_fastkern_head(model: nn.Module) -> None:
    """Undo :func:`use_fastkern_head` (no-op if it is not installed or was wrapped over since)."""
    base = _base(model)
    state = base.__dict__.get(_STATE)
    if state is None:
        return
    prev, wrapper = state
    if base.__dict__.get("forward") is wrapper:
        base.forward = prev
        del base.__dict__[_STATE]


def fastkern_head_active(model: nn.Module) -> bool:
    return _STATE in _base(model).__dict__
