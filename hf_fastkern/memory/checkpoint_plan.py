"""Memory-budgeted checkpointing: per decoder layer, what to keep and what to recompute so the step fits (issue 23).

Gradient checkpointing as transformers does it (``gradient_checkpointing_enable``, Trainer's
``gradient_checkpointing=True``) is all or nothing: every layer recomputes its forward in backward, a third of a
LoRA step's GEMM work, even when most of the card sits idle. Here each layer gets one of four modes:

    keep     nothing recomputed: the layer stores every activation its backward reads
    cheap    no layer checkpoint; only the cheap parts are recomputed (the lean paths: the gated MLP's
             activation, :mod:`hf_fastkern.layers.fused_mlp`, recomputed from ``g, u`` in backward)
    full     the layer is checkpointed (``torch.utils.checkpoint``): it keeps only its input
    offload  full, and the input goes to pinned host memory (:class:`hf_fastkern.memory.offload.ActivationOffloader`)

Three parts:

1. The memory model (:class:`MemoryModel`): per layer, the bytes per token it keeps in each mode
   (:class:`LayerCost`), the bytes per token kept outside the layers (embeddings, final norm, loss), and the
   fixed bytes (weights, gradients, optimizer state). It comes from the config analytically
   (:func:`analytic_memory_model`), or from one measured forward (:func:`measure_memory_model`: autograd's saved
   tensors counted per layer at two token counts, the slope per token, the intercept fixed), or is given (tests
   inject a fake one).
2. The planner (:func:`plan_checkpointing`), a pure function of the memory model, the budget and the tokens per
   step. Greedy, cheapest time first: all layers ``keep`` when that fits; else layers move to ``cheap`` one by
   one, then to ``full`` (from the first layer up), then to ``offload``, stopping as soon as the estimated peak
   (:func:`estimate_peak`) fits. Checkpointing the *first* layers is what lowers the peak: when backward
   recomputes layer ``i``, the layers above it have already freed theirs, so the recompute's transient sits on
   top of layers ``0..i-1`` only.
3. The applier (:class:`CheckpointPlanner`, :func:`enable_checkpoint_planner`): a forward pre-hook on the module
   that owns the layer list sets, for the duration of that forward only, each layer's ``gradient_checkpointing``
   and ``_gradient_checkpointing_func`` (the attributes transformers' ``GradientCheckpointingLayer`` reads) and
   the lean MLP's store flag as the plan says; an always-called forward hook restores what was there. So
   Trainer's ``gradient_checkpointing_enable`` (called at train start, possibly after the patch) sets the
   model's own flags, and the plan still wins at every forward; after revert the model's own flags show again.
   The plan is made at the first training forward and made again whenever a step brings more tokens than the
   plan was made for. Only training forwards with grad enabled are touched. On CUDA the first steps' real
   peaks (``max_memory_allocated``) are compared with the estimate: an estimate found low is corrected, and a
   plan whose step went over the budget is made again. The process's peak statistics are reset before such a
   step only when their running maximum is already above the budget (else a step over the budget could not be
   seen); at most :data:`PEAK_CHECKS` times.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from hf_fastkern.layers.fused_mlp import STORE_ACTIVATION
from hf_fastkern.memory.offload import ActivationOffloader

MODES = ("keep", "cheap", "full", "offload")
_LETTER = {"keep": "k", "cheap": "c", "full": "f", "offload": "o"}
GIB = float(1 << 30)
# default budget on CUDA: free memory plus what this process holds, minus this share of the card (at least 1 GiB):
# room for the allocator's fragmentation, cuBLAS/cuDNN workspaces and what the estimate does not see
DEFAULT_MARGIN_FRACTION = 0.08
_ATTR = "_hf_fastkern_checkpoint_planner"
_MISSING = object()


# ----------------------------------------------------------------------------------------------------------
# the memory model and the planner (pure)


@dataclass(frozen=True)
class LayerCost:
    """Bytes per token one layer keeps on the device between its forward and its backward, per mode."""

    keep: float
    cheap: float
    full: float
    offload: float = 0.0
    workspace: float = 0.0
    """what the layer's backward holds for a moment beyond what it keeps (its gradient temporaries)."""

    def of(self, mode: str) -> float:
        return getattr(self, mode)


@dataclass(frozen=True)
class MemoryModel:
    """What a training step holds: ``fixed_bytes + tokens * (per_token_bytes + sum of the layers' costs)``."""

    layers: tuple[LayerCost, ...]
    fixed_bytes: float
    """weights, gradients, optimizer state: independent of the tokens per step."""
    per_token_bytes: float = 0.0
    """kept outside the layers per token (embedding output, final norm, loss)."""
    source: str = "given"
    """"analytic", "measured" or "given" (shown in the report)."""


@dataclass(frozen=True)
class CheckpointPlan:
    """One mode per layer, for steps of up to ``tokens`` tokens."""

    modes: tuple[str, ...]
    tokens: int
    budget_bytes: float
    peak_bytes: float
    """the estimated peak of the step under this plan."""
    fits: bool
    source: str = "given"

    def counts(self) -> dict[str, int]:
        return {m: self.modes.count(m) for m in MODES if m in self.modes}

    def describe(self) -> str:
        counts = ", ".join(f"{m} x{n}" for m, n in self.counts().items())
        layers = "".join(_LETTER[m] for m in self.modes)
        fit = "" if self.fits else " (does NOT fit: the least memory the planner found)"
        return (f"{counts} for {self.tokens} tokens/step [{layers}]; estimated peak "
                f"{_size(self.peak_bytes)} of {_size(self.budget_bytes)} budget ({self.source} per-token costs){fit}")


def _size(n: float) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB / 10 else f"{n / (1 << 20):.2f} MiB"


def estimate_peak(memory: MemoryModel, modes: Sequence[str], tokens: int) -> float:
    """The step's estimated peak in bytes under ``modes``.

    The larger of (a) the end of the forward, every layer holding what its mode keeps, and (b) for each layer
    ``i``, its backward: the layers below still hold theirs (the ones above are freed), the layer holds what it
    kept plus its gradient temporaries (``workspace``); a checkpointed layer has its input on the device again and
    its recompute holds the layer's activations at the ``cheap`` level (the lean paths run inside the recompute).
    """
    if len(modes) != len(memory.layers):
        raise ValueError(f"modes has {len(modes)} entries for {len(memory.layers)} layers")
    peak = below = 0.0
    held = [c.of(m) for c, m in zip(memory.layers, modes)]
    for c, m, h in zip(memory.layers, modes, held):
        during = c.full + c.cheap if m in ("full", "offload") else h
        peak = max(peak, below + during + c.workspace)
        below += h
    peak = max(peak, below)
    return memory.fixed_bytes + tokens * (memory.per_token_bytes + peak)


def plan_checkpointing(memory: MemoryModel, budget_bytes: float, tokens: int) -> CheckpointPlan:
    """Per-layer modes for a step of ``tokens`` tokens under ``budget_bytes`` (see the module docstring).

    Order of preference: no recompute; the cheap parts of as few layers as possible; whole layers (from the first
    up); their inputs offloaded (from the first up). A move that does not lower the estimated peak is skipped (a
    ``cheap`` that keeps as much as ``keep``, when the model has no lean MLP; checkpointing the top layer). When the
    last plan reached still does not fit, it comes back with ``fits=False``.
    """
    if isinstance(budget_bytes, bool) or not isinstance(budget_bytes, (int, float)) or \
            not math.isfinite(budget_bytes) or budget_bytes <= 0:
        raise ValueError(f"budget_bytes must be a positive finite number, got {budget_bytes!r}")
    if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens <= 0:
        raise ValueError(f"tokens must be a positive int, got {tokens!r}")
    if not memory.layers:
        raise ValueError("the memory model has no layers")
    modes = ["keep"] * len(memory.layers)
    peak = estimate_peak(memory, modes, tokens)
    for target in ("cheap", "full", "offload"):
        for i in range(len(modes)):
            if peak <= budget_bytes:
                break
            if MODES.index(target) <= MODES.index(modes[i]):
                continue
            trial = [*modes[:i], target, *modes[i + 1:]]
            trial_peak = estimate_peak(memory, trial, tokens)
            # only moves that lower the peak: checkpointing the top layer does not (its recompute's transient sits
            # on all the layers below), nor does a cheap mode that keeps what keep keeps
            if trial_peak < peak:
                modes, peak = trial, trial_peak
    return CheckpointPlan(tuple(modes), tokens, float(budget_bytes), peak, peak <= budget_bytes, memory.source)


# ----------------------------------------------------------------------------------------------------------
# where the costs come from


def _first_int(config: Any, names: Sequence[str]) -> int | None:
    for name in names:
        v = getattr(config, name, None)
        if isinstance(v, int) and not isinstance(v, bool):
            return v
    return None


def static_bytes(model: nn.Module) -> float:
    """Weights (each storage once), their gradients and an Adam-like optimizer's two states per trainable
    parameter, in the parameter's dtype."""
    seen: set[int] = set()
    weights = trainable = 0
    for p in model.parameters():
        key = p.untyped_storage().data_ptr() if p.device.type != "meta" else id(p)
        if key in seen:
            continue
        seen.add(key)
        b = p.numel() * p.element_size()
        weights += b
        if p.requires_grad:
            trainable += b
    return float(weights + 3 * trainable)


def analytic_layer_cost(config: Any, act_bytes: int, lean_mlp: bool) -> LayerCost:
    """A Llama-style decoder layer's saved bytes per token, from its config (an estimate; measurement replaces it).

    keep: the layer input and both norm outputs (saved by the projections that read them) and the second norm's
    input (3H + H), q and k after RoPE and v (Q + 2 KV), the attention output and its copy into ``o_proj`` (2 Q), the
    MLP's ``g``, ``u`` and ``h`` (3 I), in the activation dtype; two fp32 norm statistics and the attention's fp32
    log-sum-exp per head. cheap: without ``h`` when the MLP is lean. full: the layer input. offload: nothing.
    workspace: the larger of the MLP backward's ``dh, dg, du`` (3 I) and the attention backward's ``dO, dq, dk,
    dv`` (2 Q + 2 KV).
    """
    h = _first_int(config, ("hidden_size", "n_embd", "d_model"))
    if h is None:
        raise ValueError(f"{type(config).__name__} names no hidden size (hidden_size / n_embd / d_model)")
    heads = _first_int(config, ("num_attention_heads", "n_head")) or 1
    kv = _first_int(config, ("num_key_value_heads",)) or heads
    head_dim = _first_int(config, ("head_dim",)) or h // heads
    inter = _first_int(config, ("intermediate_size", "n_inner", "ffn_dim")) or 4 * h
    q, kvd = heads * head_dim, kv * head_dim
    keep = act_bytes * (4 * h + 3 * q + 2 * kvd + 3 * inter) + 4 * (2 + heads)
    cheap = keep - act_bytes * inter if lean_mlp else keep
    workspace = act_bytes * max(3 * inter, 2 * q + 2 * kvd)
    return LayerCost(keep=float(keep), cheap=float(cheap), full=float(act_bytes * h), offload=0.0,
                     workspace=float(workspace))


def analytic_memory_model(model: nn.Module, config: Any, lean: Sequence[bool], act_bytes: int,
                          fused_loss: bool) -> MemoryModel:
    """:func:`analytic_layer_cost` for each layer, :func:`static_bytes` fixed, and outside the layers the
    embedding output and final norm (2 H) plus the loss: ``[tokens, vocab]`` logits in the activation dtype and
    fp32 twice (upcast, gradient) unless the fused loss keeps none (then one fp32 ``[tokens, hidden]``)."""
    layers = tuple(analytic_layer_cost(config, act_bytes, lf) for lf in lean)
    h = _first_int(config, ("hidden_size", "n_embd", "d_model")) or 0
    vocab = _first_int(config, ("vocab_size",)) or 0
    loss = 4 * h if fused_loss else vocab * (act_bytes + 8)
    return MemoryModel(layers, static_bytes(model), float(2 * act_bytes * h + loss), "analytic")


class _SaveCounter:
    """``saved_tensors_hooks`` pair that adds up the bytes autograd keeps, per layer (last slot: outside any)."""

    def __init__(self, n_layers: int, exclude: set[int]) -> None:
        self.bytes = [0] * (n_layers + 1)
        self.current = n_layers
        self.exclude = exclude
        self.seen: set[int] = set()

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key and key not in self.exclude and key not in self.seen:
            self.seen.add(key)
            self.bytes[self.current] += storage.nbytes()
        return t

    @staticmethod
    def unpack(t: torch.Tensor) -> torch.Tensor:
        return t


def measure_memory_model(planner: CheckpointPlanner, model: nn.Module, run: Callable[[int], Any],
                         tokens: tuple[int, int], workspace: Sequence[float] | None = None) -> MemoryModel:
    """Per-token costs measured on ``model``: ``run(n)`` (one training forward over ``n`` tokens) at the two
    token counts, with every layer ``keep`` and then ``cheap``; autograd's saved tensors counted per layer
    (each storage once, parameters and buffers excluded). The slope between the two counts is the cost per token,
    the intercepts (autocast's weight copies, LoRA weight gradients a fused loss computes early) join the fixed
    bytes. ``full`` is the layer input's bytes per token as seen at the call, ``offload`` zero; ``workspace``
    (backward's temporaries, which a forward cannot see) is taken as given, per layer (default zero).

    This counts what the step holds between forward and backward on any device (CPU included); transient
    workspaces are what the budget's margin is for.
    """
    t1, t2 = tokens
    if not 0 < t1 < t2:
        raise ValueError(f"tokens must be two increasing positive counts, got {tokens}")
    exclude = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
    layers = planner.layers
    n = len(layers)
    inputs = [0.0] * n
    counter: list[_SaveCounter] = []

    def enter(i: int, module: nn.Module, args: tuple, kwargs: dict) -> None:
        x = args[0] if args and isinstance(args[0], torch.Tensor) else kwargs.get("hidden_states")
        if isinstance(x, torch.Tensor):
            inputs[i] = float(x.element_size() * x.shape[-1])
        counter[-1].current = i

    def leave(module: nn.Module, args: tuple, output: Any) -> None:
        counter[-1].current = n

    handles = []
    for i, layer in enumerate(layers):
        handles.append(layer.register_forward_pre_hook(functools.partial(enter, i), with_kwargs=True))
        handles.append(layer.register_forward_hook(leave, always_call=True))
    measured: dict[str, list[list[int]]] = {}
    try:
        for mode in ("keep", "cheap"):
            planner.forced = mode
            for t in (t1, t2):
                counter.append(_SaveCounter(n, exclude))
                with torch.autograd.graph.saved_tensors_hooks(counter[-1].pack, counter[-1].unpack):
                    out = run(t)
                del out  # the graph (and what it saved) goes
                measured.setdefault(mode, []).append(counter[-1].bytes)
    finally:
        planner.forced = None
        for handle in handles:
            handle.remove()
    dt = float(t2 - t1)

    def slope(mode: str, i: int) -> float:
        a, b = measured[mode]
        return max(0.0, (b[i] - a[i]) / dt)

    costs = []
    for i in range(n):
        keep = slope("keep", i)
        costs.append(LayerCost(keep=keep, cheap=min(keep, slope("cheap", i)), full=inputs[i], offload=0.0,
                               workspace=workspace[i] if workspace is not None else 0.0))
    a, b = measured["keep"]
    intercept = sum(max(0.0, a[i] - slope("keep", i) * t1) for i in range(n + 1))
    return MemoryModel(tuple(costs), static_bytes(model) + intercept, slope("keep", n), "measured")


# ----------------------------------------------------------------------------------------------------------
# the applier

# training steps after the first plan whose real peak (CUDA: max_memory_allocated) is compared with the estimate
PEAK_CHECKS = 3


def _offloaded(offloader: ActivationOffloader, inner: Callable, fn: Callable, *args: Any, **kwargs: Any) -> Any:
    """An offload layer's checkpoint: what the checkpoint saves (the layer's inputs) goes to host memory. Inside
    the layer the checkpoint's own hooks are innermost, so nothing else moves."""
    with torch.autograd.graph.saved_tensors_hooks(offloader.pack, offloader.unpack):
        return inner(fn, *args, **kwargs)


_DEFAULT_CHECKPOINT = functools.partial(checkpoint, use_reentrant=False)


def _tokens_of(args: tuple, kwargs: dict) -> int | None:
    for x in (kwargs.get("input_ids"), kwargs.get("inputs_embeds"), *(a for a in args[:1])):
        if isinstance(x, torch.Tensor) and x.dim() >= 1:
            return int(x.shape[0] * x.shape[1]) if x.dim() >= 2 else int(x.shape[0])
    return None


def default_budget_bytes(device: torch.device) -> float:
    """On CUDA: the card's free memory plus what this process's allocator holds, minus
    :data:`DEFAULT_MARGIN_FRACTION` of the card (at least 1 GiB). Elsewhere there is no card to read: raises."""
    if device.type != "cuda":
        raise ValueError(f"checkpoint='auto' needs memory_budget_gib for a model on {device}: the default budget "
                         f"is the CUDA card's free memory minus a margin")
    free, total = torch.cuda.mem_get_info(device)
    held = torch.cuda.memory_reserved(device)
    return float(free + held - max(GIB, DEFAULT_MARGIN_FRACTION * total))


class CheckpointPlanner:
    """The per-model state of :func:`enable_checkpoint_planner`: the layers, the mode (``"auto"`` or one of
    :data:`MODES` for every layer), the budget, the memory model (given, measured or analytic) and the plan."""

    def __init__(self, stacks: list[tuple[nn.Module, nn.ModuleList]], lean: list[list[nn.Module]], mode: str,
                 budget_bytes: float | None, memory: MemoryModel | None,
                 analytic: Callable[[], MemoryModel], calibrate: Callable[[int], Any] | None,
                 calibrate_tokens: tuple[int, int], hidden_size: int | None) -> None:
        self.stacks = stacks
        self.layers: list[nn.Module] = [layer for _, layers in stacks for layer in layers]
        self.lean = lean
        self.mode, self.budget_bytes, self.given = mode, budget_bytes, memory
        self.analytic, self.calibrate, self.calibrate_tokens = analytic, calibrate, calibrate_tokens
        self.measured: MemoryModel | None = None
        self.calibration_error = ""
        self.plan: CheckpointPlan | None = None
        self.forced: str | None = None  # every layer in this mode (measurement)
        self.offloader = ActivationOffloader(hidden_size=hidden_size, min_bytes=0)
        self.warned_fit = False
        self.active: list[Any] = []  # per stack call: what to restore (None when nothing was set)
        self.plans_made = 0
        # measure off CUDA too (the CPU tests); by default a model off CUDA plans from the analytic costs
        self.calibrate_off_cuda = False
        # the step's real peak: a reader of the running maximum of allocated bytes (CUDA's max_memory_allocated;
        # tests inject one), what it read when the step under a plan began, the upward correction learned so far
        self.peak_reader: Callable[[], int] | None = None
        # resets that running maximum (CUDA's reset_peak_memory_stats; tests inject one): used only when the
        # maximum is already above a watched plan's budget, where a step over the budget could not show otherwise
        self.peak_reset: Callable[[], None] | None = None
        self.watch: tuple[CheckpointPlan, int] | None = None
        self.checks_left = PEAK_CHECKS
        self.correction = 0.0

    # -- deciding -----------------------------------------------------------------------------------------------
    def memory_model(self) -> MemoryModel:
        memory = self.given or self.measured or self.analytic()
        if self.correction:
            memory = dataclasses.replace(memory, fixed_bytes=memory.fixed_bytes + self.correction,
                                         source=f"{memory.source}, +{_size(self.correction)} from a measured step")
        return memory

    def check_peak(self) -> None:
        """Compare the last step's real peak with the plan's estimate: when the running maximum rose during the
        step, it is that step's peak (``start_watch`` reset it first if it was already above the budget). An
        estimate found low by more than it should be is corrected upward (fixed bytes), and the plan made again
        when the real peak went over the budget. Checks :data:`PEAK_CHECKS` steps (the optimizer's state
        appears after the first)."""
        if self.watch is None or self.peak_reader is None:
            return
        plan, before = self.watch
        self.watch = None
        now = self.peak_reader()
        if now <= before or now <= plan.peak_bytes:
            return
        self.correction += now - plan.peak_bytes
        if now > plan.budget_bytes and self.plan is plan:
            self.plan = None
            warnings.warn(f"hf_fastkern: a step under the checkpoint plan peaked at {_size(now)}, over the "
                          f"{_size(plan.budget_bytes)} budget (estimated {_size(plan.peak_bytes)}): planning again "
                          f"with the difference added", stacklevel=3)

    def start_watch(self, device: torch.device) -> None:
        if self.mode != "auto" or self.plan is None or self.checks_left <= 0 or self.forced is not None:
            return
        if self.peak_reader is None and device.type == "cuda":
            self.peak_reader = functools.partial(torch.cuda.max_memory_allocated, device)
            self.peak_reset = functools.partial(torch.cuda.reset_peak_memory_stats, device)
        if self.peak_reader is not None:
            self.checks_left -= 1
            before = self.peak_reader()
            if before > self.plan.budget_bytes and self.peak_reset is not None:
                # An earlier, larger step (another plan, an evaluation, a bigger batch) left the running maximum
                # above the budget: a step of this plan over the budget but under that maximum would not show.
                # Start a fresh maximum (at most PEAK_CHECKS times; docs/checkpointing.md). Below the budget no
                # reset is needed: a step over the budget raises the maximum.
                self.peak_reset()
                before = self.peak_reader()
            self.watch = (self.plan, before)

    def modes_for(self, tokens: int | None, device: torch.device) -> tuple[str, ...]:
        if self.forced is not None:
            return (self.forced,) * len(self.layers)
        if self.mode != "auto":
            return (self.mode,) * len(self.layers)
        if tokens is None:
            # a call that names no input_ids / inputs_embeds / positional input: the plan if there is one, else
            # what transformers' checkpointing does (no plan can be made without the tokens per step)
            return self.plan.modes if self.plan is not None else ("full",) * len(self.layers)
        if self.plan is None or tokens > self.plan.tokens:
            if self.budget_bytes is None:
                self.budget_bytes = default_budget_bytes(device)
            self.plan = plan_checkpointing(self.memory_model(), self.budget_bytes, tokens)
            self.plans_made += 1
            if not self.plan.fits and not self.warned_fit:
                self.warned_fit = True
                warnings.warn(f"hf_fastkern: checkpoint plan does not fit the budget: {self.plan.describe()}",
                              stacklevel=3)
        return self.plan.modes

    def describe(self) -> str:
        if self.mode != "auto":
            return f"every layer {self.mode} (checkpoint={self.mode!r}), {len(self.layers)} layers"
        budget = "the card's free memory minus a margin" if self.budget_bytes is None else \
            _size(self.budget_bytes)
        why = f"; calibration failed, analytic costs used: {self.calibration_error}" if self.calibration_error \
            else ""
        if self.plan is None:
            return f"auto: planned at the first training forward, budget {budget}{why}"
        return f"auto: {self.plan.describe()}{why}"

    # -- enforcing ----------------------------------------------------------------------------------------------
    def enforce(self, owner: nn.Module, modes: Sequence[str]) -> list[tuple]:
        """Set the plan on ``owner``'s layers; returns what to restore."""
        saved = []
        offload = False
        for (stack_owner, layers), start in zip(self.stacks, self._starts()):
            if stack_owner is not owner:
                continue
            for j, layer in enumerate(layers):
                mode = modes[start + j]
                d = layer.__dict__
                saved.append((d, d.get("gradient_checkpointing", _MISSING),
                              d.get("_gradient_checkpointing_func", _MISSING), self.lean[start + j]))
                ckpt = mode in ("full", "offload")
                d["gradient_checkpointing"] = ckpt
                if ckpt:
                    inner = getattr(layer, "_gradient_checkpointing_func", None) or _DEFAULT_CHECKPOINT
                    if mode == "offload":
                        offload = True
                        inner = functools.partial(_offloaded, self.offloader, inner)
                    d["_gradient_checkpointing_func"] = inner
                for m in self.lean[start + j]:
                    m.__dict__[STORE_ACTIVATION] = mode == "keep"
        if offload:
            self.offloader.begin()
        return [offload, saved]

    @staticmethod
    def restore(saved: list[tuple]) -> None:
        """Put back what :meth:`enforce` changed (the model's own flags, or their absence)."""
        for d, ckpt, fn, lean in saved:
            for key, value in (("gradient_checkpointing", ckpt), ("_gradient_checkpointing_func", fn)):
                if value is _MISSING:
                    d.pop(key, None)
                else:
                    d[key] = value
            for m in lean:
                m.__dict__.pop(STORE_ACTIVATION, None)

    def _starts(self) -> list[int]:
        starts, n = [], 0
        for _, layers in self.stacks:
            starts.append(n)
            n += len(layers)
        return starts

    def run_calibration(self, model: nn.Module) -> None:
        """Measure the per-token costs once (auto mode, a calibration forward given, none measured yet)."""
        if self.calibrate is None or self.measured is not None or self.calibration_error or self.given:
            return
        devices = [d.index or 0 for d in {p.device for p in model.parameters()} if d.type == "cuda"]
        if not devices and not self.calibrate_off_cuda:
            return
        try:
            # the measurement's forwards must not move the RNG the training step draws dropout masks from
            with torch.random.fork_rng(devices=devices):
                workspace = [c.workspace for c in self.analytic().layers]
                self.measured = measure_memory_model(self, model, self.calibrate, self.calibrate_tokens, workspace)
        except Exception as e:  # a model the measurement cannot drive still gets the analytic plan
            self.calibration_error = f"{type(e).__name__}: {e}"
            warnings.warn(f"hf_fastkern: checkpoint calibration failed, planning from analytic costs: "
                          f"{self.calibration_error}", stacklevel=3)
        self.plan = None


def _training(module: nn.Module) -> bool:
    return module.training and torch.is_grad_enabled()


def _model_pre_hook(module: nn.Module, args: tuple) -> None:
    planner: CheckpointPlanner = module.__dict__[_ATTR]
    if planner.mode == "auto" and planner.forced is None and _training(module):
        planner.check_peak()
        planner.run_calibration(module)


def _stack_pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
    planner: CheckpointPlanner = module.__dict__[_ATTR]
    if not _training(module):
        planner.active.append(None)
        return
    p = next(module.parameters(), None)
    device = p.device if p is not None else torch.device("cpu")
    modes = planner.modes_for(_tokens_of(args, kwargs), device)
    planner.active.append(planner.enforce(module, modes))
    planner.start_watch(device)


def _stack_post_hook(module: nn.Module, args: tuple, output: Any) -> None:
    # always_call=True: runs when the forward raised too, so the model's own flags always come back
    planner: CheckpointPlanner = module.__dict__[_ATTR]
    state = planner.active.pop() if planner.active else None
    if state is not None:
        if state[0]:
            planner.offloader.finish()
        planner.restore(state[1])


def enable_checkpoint_planner(model: nn.Module, stacks: list[tuple[nn.Module, nn.ModuleList]],
                              lean: list[list[nn.Module]], mode: str, budget_bytes: float | None,
                              memory: MemoryModel | None, analytic: Callable[[], MemoryModel],
                              calibrate: Callable[[int], Any] | None = None,
                              calibrate_tokens: tuple[int, int] = (128, 256),
                              hidden_size: int | None = None) -> CheckpointPlanner:
    """Enforce per-layer checkpoint modes on ``model``'s layer stacks at every training forward.

    stacks: (owner, layers) as :func:`hf_fastkern.memory.offload.checkpointable_stacks` finds them.
    lean: per layer (in stack order), the patched MLP modules whose activation store the plan switches.
    mode: "auto" (planned from ``memory`` or the measured / ``analytic`` model against ``budget_bytes``, None:
    :func:`default_budget_bytes` at the first training forward) or one of :data:`MODES` for every layer.
    calibrate: ``calibrate(n)`` runs one training forward over ``n`` tokens (its output returned); given, the first
    training forward measures the costs first (:func:`measure_memory_model`).
    """
    if mode not in ("auto", *MODES):
        raise ValueError(f"checkpoint must be 'auto' or one of {MODES}, got {mode!r}")
    planner = model.__dict__.get(_ATTR)
    if planner is not None:
        # a later apply_fast_kernels may have bound other MLPs (mlp=..., mlp_recompute=...): the lean lists and
        # the cost models follow it, and the measured costs are taken again
        planner.mode, planner.budget_bytes, planner.given, planner.plan = mode, budget_bytes, memory, None
        planner.lean, planner.analytic, planner.calibrate = lean, analytic, calibrate
        planner.calibrate_tokens, planner.measured = calibrate_tokens, None
        return planner
    planner = CheckpointPlanner(stacks, lean, mode, budget_bytes, memory, analytic, calibrate, calibrate_tokens,
                                hidden_size)
    # the hooks find their state in the module's __dict__ and are module-level functions, so a deepcopy of the
    # model (TRL's reference model) carries hooks and a planner of its own
    model.register_forward_pre_hook(_model_pre_hook)
    for owner, _ in stacks:
        owner.__dict__[_ATTR] = planner
        owner.register_forward_pre_hook(_stack_pre_hook, with_kwargs=True)
        owner.register_forward_hook(_stack_post_hook, always_call=True)
    model.__dict__[_ATTR] = planner
    return planner


def checkpoint_planner(model: nn.Module) -> CheckpointPlanner | None:
    """The planner enabled on ``model`` (None when there is none)."""
    return model.__dict__.get(_ATTR)


def disable_checkpoint_planner(model: nn.Module) -> bool:
    """Remove the planner's hooks; the layers' own checkpointing flags were never changed outside a forward."""
    planner = model.__dict__.pop(_ATTR, None)
    if planner is None:
        return False
    ours = (_model_pre_hook, _stack_pre_hook, _stack_post_hook)
    for module in (model, *(owner for owner, _ in planner.stacks)):
        module.__dict__.pop(_ATTR, None)
        for hooks in (module._forward_pre_hooks, module._forward_hooks):
            for key in [k for k, fn in hooks.items() if fn in ours]:
                hooks.pop(key)
                module._forward_hooks_always_called.pop(key, None)
                module._forward_pre_hooks_with_kwargs.pop(key, None)
    return True
