"""One ledger per patched model instance: every change hf_fastkern makes is an entry that knows how to undo itself.

Why one ledger: a patched model is changed in several ways (instance-level forwards on norms, MLPs, attention
modules and LoRA linears; the decoder's training-cache guard; the fused-loss wrapper on the model and its head;
activation-offload hooks; the model's own copy of its config with the attention implementation switched; the
hook that fuses LoRA layers added later). Each is one :class:`Entry` appended here, in order, with its own
``undo``; :func:`hf_fastkern.revert_fast_kernels` walks the list backwards and knows none of the mechanisms.
The report (:class:`PatchReport`) is *derived* from the entries and the reasons recorded beside them, so it can
never claim more than what was bound.

The ledger lives in the patched model's ``__dict__`` (a plain attribute: not a parameter or buffer, never in the
state dict). Entries hold the modules they changed as plain references, never closures, so ``copy.deepcopy`` of
a patched model (TRL's reference model) gives a copy whose ledger points at the copy's own modules: reverting
the copy leaves the original patched, and the other way round.
"""
from __future__ import annotations

import types
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch.nn as nn

from hf_fastkern.layers.common import PATCH_FLAG

LEDGER_ATTR = "_hf_fastkern_ledger"


class Entry:
    """One change to the model. ``kind`` names it in the report; ``shown`` False for plumbing the user did not
    ask for by name (the config copy, the LoRA hook), which the report leaves out of its counts."""

    kind: str = ""
    shown: bool = True

    def undo(self) -> None:
        raise NotImplementedError

    def alive(self, modules: set[int]) -> bool:
        """Whether the changed module is still part of the model (PEFT's ``merge_and_unload`` drops LoRA layers)."""
        return True

    def fallback(self) -> str:
        """Why this binding runs its fallback now ("" while its fast path applies)."""
        return ""

    def describe(self) -> str:
        """What this change decided, for changes that decide something (the checkpoint plan); "" otherwise."""
        return ""


class ForwardBinding(Entry):
    """A replacement forward bound to one module instance (``types.MethodType``), the previous one kept.

    ``status`` (a module-level function, so deep copies share it) returns why the binding currently runs its
    fallback, or "".
    """

    def __init__(self, module: nn.Module, kind: str, target: str, fn: Callable,
                 status: Callable[[nn.Module], str] | None = None, shown: bool = True) -> None:
        self.module, self.kind, self.target, self.status, self.shown = module, kind, target, status, shown
        # An instance-level forward set by someone else (accelerate, a hook library) is kept and restored;
        # otherwise undo deletes ours so the class forward shows through again.
        self.previous = module.__dict__.get("forward")
        setattr(fn, PATCH_FLAG, True)  # lets layers.common tell our instance forwards from a hook library's
        self.bound = types.MethodType(fn, module)
        module.forward = self.bound

    def undo(self) -> None:
        if self.module.__dict__.get("forward") is not self.bound:
            return  # someone bound another forward over ours since: theirs stays
        if self.previous is None:
            del self.module.__dict__["forward"]
        else:
            self.module.forward = self.previous

    def alive(self, modules: set[int]) -> bool:
        return id(self.module) in modules

    def fallback(self) -> str:
        return self.status(self.module) if self.status is not None else ""

    @property
    def label(self) -> str:
        return f"{self.kind} {type(self.module).__name__} ({self.target})"


class Change(Entry):
    """Any other change: ``undo`` is ``undo_fn(*args)``, a module-level function and the objects it needs;
    ``status(*args)`` (optional, module-level too) says why the change does not act now ("" when it does);
    ``detail(*args)`` (optional) what it chose (listed under "chose" in the report)."""

    def __init__(self, kind: str, undo_fn: Callable[..., Any], *args: Any, shown: bool = True,
                 status: Callable[..., str] | None = None, detail: Callable[..., str] | None = None) -> None:
        self.kind, self.undo_fn, self.args, self.shown, self.status = kind, undo_fn, args, shown, status
        self.detail = detail

    def undo(self) -> None:
        self.undo_fn(*self.args)

    def fallback(self) -> str:
        return self.status(*self.args) if self.status is not None else ""

    def describe(self) -> str:
        return self.detail(*self.args) if self.detail is not None else ""


@dataclass
class PatchReport:
    """What :func:`apply_fast_kernels` bound on one model, what was there already, what runs a fallback, and what
    was left with the reason. Derived from the model's ledger."""

    model_type: str
    recipe: str | None
    patched: dict[str, int] = field(default_factory=dict)
    """kind ("norm", "mlp", "rope", "lora_linear", "attention", "cross_entropy", ...) -> number bound by this call
    (or, for :func:`hf_fastkern.report`, bound in all)."""
    already: dict[str, int] = field(default_factory=dict)
    """kind -> number found bound by an earlier call (a second call changes nothing)."""
    skipped: list[tuple[str, str]] = field(default_factory=list)
    """(what, reason) for everything left as it was."""
    fallbacks: list[tuple[str, str]] = field(default_factory=list)
    """(what, reason) for bindings that run their fallback now (counted under patched too)."""
    wrapper: str = ""
    """How the model was reached ("PeftModelForCausalLM -> LlamaForCausalLM"), "" when it was passed itself."""
    runs_on: str = ""
    """Where the kernels run for this model's parameters (one line)."""
    chosen: list[tuple[str, str]] = field(default_factory=list)
    """(what, decision) for changes that decide at run time (the checkpoint plan: each layer's mode)."""

    def count(self, kind: str) -> int:
        return self.patched.get(kind, 0) + self.already.get(kind, 0)

    @property
    def changed(self) -> bool:
        return any(self.patched.values())

    def __str__(self) -> str:
        head = f"hf_fastkern: {self.model_type} (recipe: {self.recipe or 'generic'})"
        lines = [head + (f" via {self.wrapper}" if self.wrapper else "")]
        if self.runs_on:
            lines.append(f"  runs on {self.runs_on}")
        for k in dict.fromkeys([*self.patched, *self.already]):
            p, a = self.patched.get(k, 0), self.already.get(k, 0)
            lines.append(f"  patched {k:<14} {p:>4}" + (f"  (+{a} already patched)" if a else ""))
        for what, why in self.fallbacks:
            lines.append(f"  fallback {what}: {why}")
        for what, how in self.chosen:
            lines.append(f"  chose   {what}: {how}")
        for what, why in self.skipped:
            lines.append(f"  left    {what}: {why}")
        return "\n".join(lines)


def group_reasons(items: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Collapse per-module lines that share a class and reason into one line with a count.

    Entries read "<kind> <Class> (<module name>)"; the module name is dropped when several share a line.
    """
    grouped: dict[tuple[str, str], list[str]] = {}
    for what, why in items:
        grouped.setdefault((what.split(" (", 1)[0], why), []).append(what)
    return [(whats[0] if len(whats) == 1 else f"{key} x{len(whats)}", why) for (key, why), whats in grouped.items()]


class Ledger:
    """The entries of one patched model, in the order they were made, and the reasons things were left."""

    def __init__(self, model_type: str, recipe: str | None) -> None:
        self.model_type, self.recipe = model_type, recipe
        self.entries: list[Entry] = []
        self.bound: dict[nn.Module, ForwardBinding] = {}  # module -> its binding (a module is bound once)
        self.kinds: dict[str, Entry] = {}  # kind -> entry, for the one-per-model changes
        self.left: list[tuple[str, str]] = []
        self.options: dict[str, Any] = {}
        self.wrapper = ""

    # -- recording --------------------------------------------------------------------------------------------
    def bind(self, module: nn.Module, kind: str, target: str, fn: Callable,
             status: Callable[[nn.Module], str] | None = None) -> ForwardBinding:
        entry = ForwardBinding(module, kind, target, fn, status)
        self.entries.append(entry)
        self.bound[module] = entry
        return entry

    def record(self, entry: Change) -> Change:
        self.entries.append(entry)
        self.kinds[entry.kind] = entry
        return entry

    def has(self, kind: str) -> bool:
        return kind in self.kinds

    # -- undo ---------------------------------------------------------------------------------------------------
    def revert(self) -> int:
        """Undo every entry, last first. Returns the number of entries the report counts (plumbing excluded)."""
        n = sum(e.shown for e in self.entries)
        for entry in reversed(self.entries):
            entry.undo()
        self.entries.clear()
        self.bound.clear()
        self.kinds.clear()
        return n

    # -- the report ---------------------------------------------------------------------------------------------
    def report(self, model: nn.Module, since: int = 0, runs_on: str = "") -> PatchReport:
        """The report of the entries from index ``since`` on (earlier ones count as already patched), with the
        fallbacks of every live binding and the reasons recorded by the last apply or LoRA scan."""
        rep = PatchReport(self.model_type, self.recipe, wrapper=self.wrapper, runs_on=runs_on)
        live = {id(m) for m in model.modules()}
        fallbacks = []
        for i, entry in enumerate(self.entries):
            if not entry.shown or not entry.alive(live):
                continue
            table = rep.patched if i >= since else rep.already
            table[entry.kind] = table.get(entry.kind, 0) + 1
            how = entry.describe()
            if how:
                rep.chosen.append((entry.kind, how))
            why = entry.fallback()
            if why:
                fallbacks.append((entry.label if isinstance(entry, ForwardBinding) else entry.kind, why))
            elif entry.kind == "mlp" and getattr(entry, "status", None) is not None:
                # a gated MLP whose down projection takes the lean (recompute) path now
                table["mlp_recompute"] = table.get("mlp_recompute", 0) + 1
        rep.fallbacks = group_reasons(fallbacks)
        rep.skipped = list(self.left)
        return rep


def ledger_of(model: nn.Module) -> Ledger | None:
    """The ledger kept on ``model`` (None when it was never patched)."""
    return model.__dict__.get(LEDGER_ATTR)


def new_ledger(model: nn.Module, model_type: str, recipe: str | None) -> Ledger:
    ledger = Ledger(model_type, recipe)
    object.__setattr__(model, LEDGER_ATTR, ledger)
    return ledger


def drop_ledger(model: nn.Module) -> Ledger | None:
    return model.__dict__.pop(LEDGER_ATTR, None)


def unwrap(model: nn.Module) -> nn.Module:
    """The transformers model under PeftModel / LoraModel wrappers (or the model itself): the instance whose
    modules are patched and which keeps the ledger (transformers #34016: never patch a wrapper silently)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module (a transformers model or a PeftModel), "
                        f"got {type(model).__name__}; load it first, e.g. AutoModelForCausalLM.from_pretrained(...)")
    for _ in range(4):
        get_base = getattr(model, "get_base_model", None)
        inner = get_base() if callable(get_base) else model
        if inner is model:
            break
        model = inner
    return model
