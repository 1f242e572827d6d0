"""One switch for ``transformers.Trainer`` and TRL: ``callbacks=[hf_fastkern.FastKernels(**options)]``.

Why a callback: the model a trainer trains is not the model the user hands over. ``SFTTrainer`` and
``DPOTrainer`` wrap it with PEFT (``peft_config``) and install TRL's fused LM head *inside* their ``__init__``,
and ``Trainer`` turns on gradient checkpointing and wraps it for DDP/FSDP when training starts. A callback's
``on_train_begin`` runs after every one of those steps, and ``CallbackHandler.call_event`` hands it
``model=trainer.model`` (read in transformers 5.25; the metrics callback relies on the same keyword on 5.17):
the unwrapped model (a ``PeftModel`` with PEFT) that DDP/FSDP and the optimizer share, so patching that
instance patches what trains, and the report printed is the report of what trains (LoRA layers included;
a model patched by hand before ``SFTTrainer`` gets them bound at its first forward, silently).

What ``on_train_begin`` does: ``apply_fast_kernels(model, **options)`` (idempotent: a second ``train()`` or a
model patched by hand before patches only what is new, e.g. LoRA layers PEFT added since), then prints the
report once, on the main process. ``DPOTrainer``'s reference model is not in the callback's arguments and is
left alone; ``FastKernels(patch_ref_model=True).attach(trainer)`` patches ``trainer.ref_model`` too (with
PEFT and no separate reference model, the reference pass is the policy with its adapters disabled, so it runs
patched either way).

TRL's fused LM head: ``SFTTrainer`` / ``DPOTrainer`` call ``model(..., fused_lm_head=True)``, which runs the
backbone and TRL's chunked log-prob kernel and returns per-token log-probs, entropy and top-1 (TRL's loss and
its ``entropy`` / ``mean_token_accuracy`` metrics need all three). Our fused-loss wrapper steps aside for such
calls (:mod:`hf_fastkern.patches.loss`), so exactly one fused head runs, TRL's, in either patching order.
``FastKernels(lm_head="fastkern")`` serves them with our fused linear cross-entropy instead
(:mod:`hf_fastkern.integrations.trl_head`); the default stays ``"trl"`` until ``benchmarks/bench_trl_head.py``
is measured on the GPU (``docs/trl.md``).
"""
from __future__ import annotations

import inspect
import weakref
from typing import Any

import torch.nn as nn
from transformers import TrainerCallback

from hf_fastkern.integrations.trl_head import use_fastkern_head
from hf_fastkern.kernels.cross_entropy import resolve_label_checks
from hf_fastkern.patches.apply import apply_fast_kernels
from hf_fastkern.patches.ledger import PatchReport

# the keyword options FastKernels forwards (everything apply_fast_kernels takes after the model)
_APPLY_OPTIONS = tuple(list(inspect.signature(apply_fast_kernels).parameters)[1:])
# who serves TRL's fused_lm_head=True calls (hf_fastkern.integrations.trl_head): "trl", measured faster on the H100
# (bench_trl_head, 2026-12-07: 49.4 ms fwd+bwd with SFT's outputs vs 65.7 ms for our per-token path; docs/trl.md)
LM_HEADS = ("trl", "fastkern")
DEFAULT_LM_HEAD = "trl"


class FastKernels(TrainerCallback):
    """Patch the model a (TRL) trainer trains at ``on_train_begin``, with ``apply_fast_kernels``' options.

    ``FastKernels(**options)``: ``options`` are :func:`hf_fastkern.apply_fast_kernels` keywords (``attention``,
    ``norm``, ``mlp``, ``cross_entropy``, ``lora``, ``rope``, ``offload_activations``, ...); an unknown one
    raises ``TypeError`` here, not at training time.
    patch_ref_model: also patch a TRL trainer's separate ``ref_model`` (``DPOTrainer``); needs ``attach``,
    because callbacks are not handed the trainer.
    lm_head: which fused LM head serves TRL's ``fused_lm_head=True`` calls: ``"trl"`` (TRL's chunked
    log-prob kernel; it also gives the entropy / token-accuracy metrics) or ``"fastkern"`` (our fused linear
    cross-entropy; those metrics become NaN). Exactly one runs either way; see docs/trl.md.
    verbose: print the patch report once, on the main process, when training starts.
    After training starts, ``report`` (and ``ref_report``) hold the :class:`PatchReport`.
    """

    def __init__(self, *, patch_ref_model: bool = False, lm_head: str = DEFAULT_LM_HEAD, verbose: bool = True,
                 **options: Any):
        if lm_head not in LM_HEADS:
            raise ValueError(f"lm_head must be one of {LM_HEADS}, got {lm_head!r}")
        unknown = sorted(set(options) - set(_APPLY_OPTIONS))
        if unknown:
            raise TypeError(f"FastKernels got unknown option(s) {', '.join(unknown)}; apply_fast_kernels "
                            f"takes {', '.join(_APPLY_OPTIONS)}")
        self.options = options
        self.patch_ref_model = patch_ref_model
        self.lm_head = lm_head
        self.lm_head_note = ""
        self.verbose = verbose
        self.report: PatchReport | None = None
        self.ref_report: PatchReport | None = None
        self._trainer = None

    def attach(self, trainer) -> FastKernels:
        """Add this callback to ``trainer`` and keep a weak reference to it (for ``patch_ref_model``)."""
        if self not in trainer.callback_handler.callbacks:
            trainer.add_callback(self)
        self._trainer = weakref.ref(trainer)
        return self

    def _ref_model(self) -> nn.Module | None:
        trainer = self._trainer() if self._trainer is not None else None
        if trainer is None:
            raise ValueError("FastKernels(patch_ref_model=True) must be attached to the trainer: "
                             "FastKernels(patch_ref_model=True).attach(trainer), since callbacks are not handed "
                             "the trainer or its ref_model")
        return getattr(trainer, "ref_model", None)

    def on_train_end(self, args, state, control, **kwargs):
        # HF_FASTKERN_LABEL_CHECK=async: the last steps' label checks, read now (a bad batch raises here)
        resolve_label_checks()

    def on_train_begin(self, args, state, control, model: nn.Module | None = None, **kwargs):
        if model is None:
            raise ValueError("FastKernels.on_train_begin was not handed the model (a Trainer always passes it)")
        first = self.report is None
        self.report = apply_fast_kernels(model, **self.options)
        if self.lm_head == "fastkern":
            ok, why = use_fastkern_head(model)
            self.lm_head_note = ("fused_lm_head calls: hf_fastkern fused linear cross-entropy" if ok else
                                 f"fused_lm_head calls: TRL's head kept ({why})")
        if self.patch_ref_model:
            ref = self._ref_model()
            if ref is not None and ref is not model:
                self.ref_report = apply_fast_kernels(ref, **self.options)
                if self.lm_head == "fastkern":
                    use_fastkern_head(ref)
        if first and self.verbose and state.is_world_process_zero:
            print(f"hf_fastkern.FastKernels: patched the trained model ({type(model).__name__})\n{self.report}")
            if self.lm_head_note:
                print(f"  {self.lm_head_note}")
            if self.ref_report is not None:
                print(f"hf_fastkern.FastKernels: reference model\n{self.ref_report}")
        return control
