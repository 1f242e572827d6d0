"""Training-speed metrics for Trainer runs and hand-written (Accelerate) loops.

``FastKernMetricsCallback`` adds to every Trainer log line:

    perf/tokens          non-padding input tokens in the logging interval
    perf/tokens_per_s    non-padding input tokens per second over the logging interval (all micro-batches)
    perf/step_ms         mean wall-clock time of one optimizer step over the interval
    perf/tflops          model FLOPs per second (formula below), per process
    perf/mfu             perf/tflops / the device's dense bf16 peak (omitted when the peak is unknown)
    perf/peak_mem_gib    torch.cuda.max_memory_allocated over the interval (omitted without CUDA)

and, with ``profile_steps=(start, stop)``, a ``torch.profiler`` kernel-time table for those steps (written to
``<output_dir>/fastkern_kernels.txt`` and logged as ``kernel_ms/<name>`` for the top kernels).

FLOPs per training step (the PaLM appendix-B count, causal attention):
    6 * N * tokens  +  6 * L * H * D * sum_over_sequences(S^2)
N = parameters that enter a matmul (every parameter except the input embedding table, which is a lookup);
L, H, D = layers, attention heads, head dim. The attention term is 12*L*H*D*S^2 per sequence halved by the causal
mask. Padding is counted in the attention term (it is computed), not in ``tokens``. Frozen weights (LoRA) are
still counted at 6 FLOPs per weight per token, so MFU is an upper bound there; pass ``flops_per_token`` to override.

How tokens are counted: the Trainer never hands inputs to callbacks, so ``on_train_begin`` registers a forward
pre-hook on the model that adds ``attention_mask.sum()`` (or ``input_ids.numel()``) while ``model.training``.
The sum stays on the device and is read once per log, so the hook adds no host synchronisation.

Where the metrics appear: Trainer builds its log dict, appends it to ``state.log_history`` and then calls
``on_log`` of each callback in order; the reporting integrations (TensorBoard, W&B, ...) come before callbacks
passed to ``Trainer(callbacks=...)``. ``callback.attach(trainer)`` therefore puts this callback first, so
every later callback, the progress printer and the reporters see the metrics. The callback also updates the
matching ``state.log_history`` entry.
"""
from __future__ import annotations

import math
import os
import time
from collections.abc import Mapping

import torch
from transformers import TrainerCallback

# Dense (no 2:4 sparsity) bf16 tensor-core peaks from the vendor datasheets, TFLOP/s. Matched on
# torch.cuda.get_device_name(); the first substring that matches wins, so the more specific names come first.
_DATASHEET_BF16_TFLOPS = (
    ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.4), ("H200", 989.4), ("H20", 148.0), ("GH200", 989.4),
    ("B200", 2250.0), ("A100", 312.0), ("A10G", 70.0), ("L40S", 362.0), ("L4", 121.0), ("4090", 165.2),
)


def datasheet_peak_tflops(device_name: str | None = None) -> float | None:
    """Dense bf16 peak of the current (or named) GPU from its datasheet; None when unknown or no GPU."""
    if device_name is None:
        if not torch.cuda.is_available():
            return None
        device_name = torch.cuda.get_device_name()
    for key, peak in _DATASHEET_BF16_TFLOPS:
        if key in device_name:
            return peak
    return None


def matmul_params(model: torch.nn.Module) -> int:
    """Parameters that take part in a matmul: all of them minus the input embedding table (a lookup).

    A tied lm_head shares the embedding's tensor; it is a matmul, so it is counted once in that case.
    """
    params = {id(p): p.numel() for p in model.parameters()}
    get_emb = getattr(model, "get_input_embeddings", None)
    emb = get_emb() if callable(get_emb) else None
    if emb is not None and getattr(emb, "weight", None) is not None:
        get_out = getattr(model, "get_output_embeddings", None)
        out = get_out() if callable(get_out) else None
        tied = out is not None and getattr(out, "weight", None) is emb.weight
        if not tied:
            params.pop(id(emb.weight), None)
    return sum(params.values())


def attention_dims(config) -> tuple[int, int, int]:
    """(layers, heads, head_dim) from a transformers config; zeros when the config does not say."""
    if config is None:
        return 0, 0, 0
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    layers = getattr(text, "num_hidden_layers", None) or getattr(text, "n_layer", 0) or 0
    heads = getattr(text, "num_attention_heads", None) or getattr(text, "n_head", 0) or 0
    hidden = getattr(text, "hidden_size", None) or getattr(text, "n_embd", 0) or 0
    head_dim = getattr(text, "head_dim", None) or (hidden // heads if heads else 0)
    return int(layers), int(heads), int(head_dim)


def training_flops(n_matmul_params: int, tokens: int, layers: int, heads: int, head_dim: int,
                   attn_sq_sum: int) -> float:
    """FLOPs of one forward+backward: ``6*N*tokens + 6*L*H*D*sum(S^2)`` (causal attention; see module doc)."""
    return 6.0 * n_matmul_params * tokens + 6.0 * layers * heads * head_dim * attn_sq_sum


class ThroughputMeter:
    """Tokens/s, TFLOP/s, MFU, step time and peak memory for a hand-written training loop.

    Usage (Accelerate or plain PyTorch)::

        meter = ThroughputMeter(model)
        for step, batch in enumerate(loader):
            meter.count(batch["input_ids"], batch.get("attention_mask"))   # every micro-batch
            ...forward, backward, optimizer.step()...
            meter.step_done()
            if step % 10 == 0:
                print(meter.metrics())           # or accelerator.log(meter.metrics(), step=step)

    input_ids: [batch, seq] (any integer dtype); attention_mask: [batch, seq] 0/1 or None.
    ``metrics()`` returns the averages since the previous call and starts a new interval. It reads the token
    count from the device once, so call it at logging time, not every step.
    """

    def __init__(self, model: torch.nn.Module | None = None, *, peak_tflops: float | None = None,
                 flops_per_token: float | None = None, n_matmul_params: int | None = None,
                 config=None, prefix: str = "perf/") -> None:
        self.prefix = prefix
        self.flops_per_token = flops_per_token
        self.n_params = n_matmul_params if n_matmul_params is not None else (
            matmul_params(model) if model is not None else 0)
        cfg = config if config is not None else getattr(model, "config", None)
        self.layers, self.heads, self.head_dim = attention_dims(cfg)
        self.peak_tflops = peak_tflops if peak_tflops is not None else datasheet_peak_tflops()
        self._reset()

    def _reset(self) -> None:
        self._tokens: torch.Tensor | int = 0
        self._attn_sq = 0
        self._steps = 0
        self._t0 = time.perf_counter()
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()

    def count(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None, *,
              shape: tuple[int, ...] | None = None, seq_lens: list[int] | None = None) -> None:
        """Add one micro-batch: ``input_ids`` [batch, seq] or its ``shape``; ``attention_mask`` [batch, seq] 0/1.

        Keeps the count on the device: no synchronisation here. ``seq_lens`` (packed sequences) replaces the
        padded square in the attention FLOPs.
        """
        if shape is None and input_ids is not None:
            shape = tuple(input_ids.shape)
        if attention_mask is not None:
            self._tokens = self._tokens + attention_mask.sum()
        elif shape is not None:
            self._tokens = self._tokens + math.prod(shape)
        if seq_lens is not None:
            self._attn_sq += sum(s * s for s in seq_lens)
        elif shape is not None:
            # padded shape: the kernels compute the padded square whatever the mask says
            batch, seq = (math.prod(shape[:-1]), shape[-1]) if len(shape) >= 2 else (1, shape[0])
            self._attn_sq += batch * seq * seq

    def step_done(self) -> None:
        self._steps += 1

    def metrics(self) -> dict[str, float]:
        """Averages over the interval since the last call; then starts a new interval."""
        if torch.cuda.is_available():
            # the interval ends when the queued GPU work has finished, not when Python got ahead of it
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - self._t0
        tokens = int(self._tokens.item()) if isinstance(self._tokens, torch.Tensor) else int(self._tokens)
        out: dict[str, float] = {}
        if elapsed > 0 and self._steps:
            p = self.prefix
            out[p + "tokens"] = tokens
            out[p + "tokens_per_s"] = tokens / elapsed
            out[p + "step_ms"] = elapsed * 1e3 / self._steps
            if self.flops_per_token is not None:
                flops = self.flops_per_token * tokens
            else:
                flops = training_flops(self.n_params, tokens, self.layers, self.heads, self.head_dim, self._attn_sq)
            if flops > 0:
                out[p + "tflops"] = flops / elapsed / 1e12
                if self.peak_tflops:
                    out[p + "mfu"] = out[p + "tflops"] / self.peak_tflops
            if torch.cuda.is_available():
                out[p + "peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
        self._reset()
        return out


class FastKernMetricsCallback(TrainerCallback):
    """Trainer callback logging tokens/s, TFLOP/s, MFU, step time and peak GPU memory (see module docstring).

    Args:
        peak_tflops: the device peak MFU is measured against; default: the datasheet dense bf16 peak.
        flops_per_token: override the FLOP formula (e.g. 4*N for LoRA, where frozen weights get no gradient).
        profile_steps: ``(start, stop)`` global steps to record with torch.profiler, or None.
        profile_top: how many kernels go into the logs as ``kernel_ms/<name>``.
        prefix: key prefix in the logs.
    Prefer ``FastKernMetricsCallback(...).attach(trainer)`` over ``Trainer(callbacks=[...])``: it runs before the
    reporting callbacks, so TensorBoard/W&B receive the metrics.
    """

    def __init__(self, *, peak_tflops: float | None = None, flops_per_token: float | None = None,
                 profile_steps: tuple[int, int] | None = None, profile_top: int = 10,
                 prefix: str = "perf/") -> None:
        self.peak_tflops = peak_tflops
        self.flops_per_token = flops_per_token
        self.profile_steps = profile_steps
        self.profile_top = profile_top
        self.prefix = prefix
        self.meter: ThroughputMeter | None = None
        self.kernel_table: list[dict] = []
        self._hook = None
        self._prof = None
        self._output_dir: str | None = None
        self._pending_kernels: dict[str, float] = {}

    def attach(self, trainer) -> FastKernMetricsCallback:
        """Register as the first callback of ``trainer`` so every other callback sees the metrics."""
        trainer.callback_handler.callbacks.insert(0, self)
        return self

    # -- token counting ---------------------------------------------------------------------------------
    def _pre_hook(self, module, args, kwargs):
        if not module.training or self.meter is None:
            return
        ids = kwargs.get("input_ids")
        if ids is None and args and isinstance(args[0], torch.Tensor):
            ids = args[0]
        shape = tuple(ids.shape) if ids is not None else None
        if shape is None and kwargs.get("inputs_embeds") is not None:
            shape = tuple(kwargs["inputs_embeds"].shape[:-1])
        mask = kwargs.get("attention_mask")
        # a 4-D or float mask is not a per-token 0/1 mask: count positions instead
        if mask is not None and (mask.dim() != 2 or mask.is_floating_point()):
            mask = None
        self.meter.count(None, mask, shape=shape)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is None:
            return
        self.meter = ThroughputMeter(model, peak_tflops=self.peak_tflops, flops_per_token=self.flops_per_token,
                                     prefix=self.prefix)
        if self._hook is not None:
            self._hook.remove()
        self._hook = model.register_forward_pre_hook(self._pre_hook, with_kwargs=True)
        self._output_dir = getattr(args, "output_dir", None)

    def on_train_end(self, args, state, control, **kwargs):
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        self._stop_profiler()

    # -- steps and the profiler ---------------------------------------------------------------------------
    def on_step_begin(self, args, state, control, **kwargs):
        if self.profile_steps and state.global_step == self.profile_steps[0] and self._prof is None:
            acts = [torch.profiler.ProfilerActivity.CPU]
            if torch.cuda.is_available():
                acts.append(torch.profiler.ProfilerActivity.CUDA)
            self._prof = torch.profiler.profile(activities=acts)
            self._prof.__enter__()

    def on_step_end(self, args, state, control, **kwargs):
        if self.meter is not None:
            self.meter.step_done()
        if self.profile_steps and self._prof is not None and state.global_step >= self.profile_steps[1]:
            self._stop_profiler()

    def _stop_profiler(self) -> None:
        if self._prof is None:
            return
        prof, self._prof = self._prof, None
        prof.__exit__(None, None, None)
        self.kernel_table = kernel_breakdown(prof, top=max(self.profile_top, 30))
        steps = (self.profile_steps[1] - self.profile_steps[0]) if self.profile_steps else 1
        for r in self.kernel_table:
            r["ms_per_step"] = r["ms_total"] / max(steps, 1)
        text = format_kernel_table(self.kernel_table)
        if self._output_dir:
            os.makedirs(self._output_dir, exist_ok=True)
            with open(os.path.join(self._output_dir, "fastkern_kernels.txt"), "w") as f:
                f.write(text + "\n")
        self._pending_kernels = {f"kernel_ms/{r['name'][:60]}": r["ms_per_step"]
                                 for r in self.kernel_table[: self.profile_top]}

    # -- logging -------------------------------------------------------------------------------------------
    def on_log(self, args, state, control, logs=None, **kwargs):
        # on_log also fires for evaluation logs and the end-of-training summary; only the periodic training
        # logs (which carry "loss") close a measuring interval
        if logs is None or self.meter is None or "loss" not in logs:
            return
        extra = self.meter.metrics()
        extra.update(self._pending_kernels)
        self._pending_kernels = {}
        logs.update(extra)
        # Trainer appended {**logs, "step": ...} to log_history before calling on_log: keep it in sync
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(extra)


def kernel_breakdown(prof, top: int = 30) -> list[dict]:
    """Rows {name, ms_total, calls, share} of a finished torch.profiler run, by device time (CPU time w/o GPU)."""
    rows = []
    for evt in prof.key_averages():
        dev = getattr(evt, "self_device_time_total", None)
        if dev is None:
            dev = getattr(evt, "self_cuda_time_total", 0)
        us = dev if torch.cuda.is_available() else evt.self_cpu_time_total
        if us and us > 0:
            rows.append({"name": evt.key, "ms_total": us / 1e3, "calls": evt.count})
    rows.sort(key=lambda r: -r["ms_total"])
    total = sum(r["ms_total"] for r in rows) or 1.0
    for r in rows:
        r["share"] = r["ms_total"] / total
    return rows[:top]


def format_kernel_table(rows: list[Mapping]) -> str:
    lines = [f"{'ms_total':>10} {'share':>6} {'calls':>6}  name"]
    for r in rows:
        lines.append(f"{r['ms_total']:10.3f} {r['share']:6.1%} {r['calls']:6d}  {r['name']}")
    return "\n".join(lines)
