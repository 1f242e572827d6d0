"""LoRA fine-tuning of a Llama-3.1-8B-shaped model on one GPU: sdpa vs sdpa+Liger vs fastkern (issue 12).

Scenario (the issue's): Llama-3.1-8B shape (hidden 4096, 32 layers, 32 heads / 8 KV heads, intermediate 14336,
vocab 128256, untied head), random-init bf16 weights, PEFT LoRA r=16, alpha 32, dropout 0 on q, k, v, o, gate,
up and down projections (PEFT keeps the adapters in fp32; the step runs under bf16 autocast), non-reentrant
gradient checkpointing, fused AdamW on the adapters, labels = input_ids.
Method: one subprocess per variant builds the model once and measures every shape in turn (default 4 x 2048 and
1 x 8192): ``--warmup`` steps, then ``--steps`` timed steps between two ``cuda.synchronize()`` (wall clock: a
step is seconds long, so ``do_bench``'s event timing adds nothing); peak memory is ``max_memory_allocated`` over
the timed steps of that shape. Correctness gate: the first step's loss (same weights, same tokens) within 1% of
sdpa's.
  sdpa              attn_implementation="sdpa", nothing else (HF + PEFT)
  sdpa+liger        liger_kernel.transformers.apply_liger_kernel_to_llama() before the model is built
  fastkern          attn_implementation="fastkern" + apply_fast_kernels(peft_model)
  fastkern_offload  the same + offload_activations=True (the checkpointed layer inputs in pinned host memory)
  fastkern_auto     fastkern + checkpoint="auto" (hf_fastkern.memory.checkpoint_plan: per layer keep / cheap /
                    full / offload) under a budget: ``--budget-gib``, else the smallest peak of the sdpa rows of
                    this run (sdpa listed before it), else the card's free memory minus a margin. The rows carry
                    the plan chosen (``checkpoint_plan``) and the budget (``budget_GiB``).
In the long-context search both fastkern variants also run the MLP in token chunks (mlp_chunk_tokens=16384: no
[seq, 14336] tensor at once; at 147K tokens that is ~20 GiB of g, u and their gradients per layer otherwise).
``--longctx`` adds the longest trainable batch-1 sequence per variant (bench_longctx.py's search: one subprocess
per trial, grow then bisect). A trial near 256K tokens is a long step (tens of minutes for an 8B model: the
causal attention alone is ~7e17 FLOPs), so give it its own ``--longctx-budget``; rows say ``exact: false`` when
the budget ran out.

``--qlora``: the same variants over a 4-bit base (issue 23): every decoder-layer linear (the seven LoRA targets)
becomes bitsandbytes' ``Linear4bit`` with the settings of transformers'
``BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
bnb_4bit_compute_dtype=bfloat16)`` (NF4, double quant, bf16 compute; ``lm_head`` stays bf16 as from_pretrained
leaves it), quantized in memory from the random bf16 weights (no 16 GB checkpoint to write and load), and PEFT
wraps them in its ``lora.bnb.Linear4bit``. The baseline is then HF + PEFT + bitsandbytes (``sdpa``). No
``prepare_model_for_kbit_training`` (it would up-cast the norms and embeddings to fp32 in every variant alike).
Rows carry ``base: "nf4"``. The fused QLoRA linear runs on the GPU only where the routing table measured it
faster (op ``qlora_linear``, ``bench_routing.py --parts qlora``); the patch report in the rows says which ran.
``--qlora --longctx``: the long-context search over the 4-bit base (each trial subprocess gets ``--qlora``; rows
say ``"qlora": true``), for issue 23's 393,216-token QLoRA step (``--longctx-start 393216``: the first trial is
that length).

Without a GPU, ``run()`` does a tiny CPU smoke pass (2-layer LoRA model, patched vs unpatched loss agreement).

    python -m benchmarks.bench_lora --json benchmarks/results/h100/lora.json
    python -m benchmarks.bench_lora --qlora --json benchmarks/results/h100/qlora.json
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import io
import subprocess
import sys
import time
from collections.abc import Callable

import torch

from . import harness
from .bench_longctx import run_trial, search
from .harness import emit_result, prepare_variant, print_table, save, worker_result

VARIANTS = ("sdpa", "sdpa+liger", "fastkern")
ALL_VARIANTS = VARIANTS + ("fastkern_offload", "fastkern_prepeft", "fastkern_auto")
LLAMA_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                num_key_value_heads=8, vocab_size=128256, max_position_embeddings=131072, rope_theta=500000.0,
                tie_word_embeddings=False)
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=256, max_position_embeddings=256, tie_word_embeddings=False)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SHAPES = ((4, 2048), (1, 8192))
OFFLOAD_MLP_CHUNK = 16384
# the issue's numbers (H100 80GB, one process per variant): tokens/s at 4x2048, 1x8192, peak GiB, longest batch-1
ISSUE_ANCHORS = {"sdpa": dict(tok_4x2048=5993, tok_1x8192=5565, peak_GiB=29.4, max_seq=32768),
                 "sdpa+liger": dict(tok_4x2048=7034, tok_1x8192=6439, peak_GiB=20.1, max_seq=98304)}
TARGETS_VS_SDPA = dict(tok_per_s=1.5, mem=0.6)
GATE_LOSS_REL = 0.01
COLS = ["bench", "impl", "B", "S", "step_ms", "tok_per_s", "peak_GiB", "loss", "loss_rel_err", "gate", "vs_sdpa", "mem_vs_sdpa",
        "vs_best_peer", "max_seq", "exact", "error"]
METHOD = ("random-init Llama-3.1-8B shape, bf16 weights, PEFT LoRA r=16 alpha=32 dropout 0 on q,k,v,o,gate,up,down "
          "(fp32 adapters, bf16 autocast), non-reentrant gradient checkpointing, fused AdamW on the adapters; one "
          "subprocess per variant, all shapes in it; warm-up then timed steps (wall clock between "
          "cuda.synchronize); peak = max_memory_allocated over the timed steps of each shape")
QLORA_METHOD = ("; --qlora: decoder-layer linears as bitsandbytes Linear4bit (NF4, double quant, bf16 compute: "
                "transformers' BitsAndBytesConfig settings), quantized in memory, PEFT lora.bnb.Linear4bit adapters; "
                "the issue anchors above are bf16-base numbers")


def parse_variant(v: str) -> tuple[str, bool]:
    """'fastkern_offload' -> ('fastkern', True); 'fastkern_prepeft' (patched before get_peft_model) and
    'fastkern_auto' (checkpoint="auto") -> ('fastkern', False), read by :func:`build_model`."""
    v = v.removesuffix("_prepeft").removesuffix("_auto")
    if v.endswith("_offload"):
        return v[: -len("_offload")], True
    return v, False


def quantize_4bit(model, device: str) -> dict:
    """Every ``nn.Linear`` of the decoder layers -> bitsandbytes ``Linear4bit`` with the settings of transformers'
    ``BitsAndBytesConfig`` (NF4, double quant, bf16 compute), quantized on ``device`` one layer at a time (the
    bf16 weight is freed as its 4-bit copy is made); marks the model as PEFT and transformers mark a 4-bit load.
    Returns the config as a dict for the rows."""
    import bitsandbytes as bnb
    from transformers import BitsAndBytesConfig

    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype=torch.bfloat16)
    for layer in model.model.layers:
        for name, lin in list(layer.named_modules()):
            if type(lin) is not torch.nn.Linear:
                continue
            new = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None,
                                    compute_dtype=q.bnb_4bit_compute_dtype, quant_type=q.bnb_4bit_quant_type,
                                    compress_statistics=q.bnb_4bit_use_double_quant, device="meta")
            new.weight = bnb.nn.Params4bit(lin.weight.data, requires_grad=False, quant_type=q.bnb_4bit_quant_type,
                                           compress_statistics=q.bnb_4bit_use_double_quant, module=new).to(device)
            if lin.bias is not None:
                new.bias = torch.nn.Parameter(lin.bias.data, requires_grad=False)
            parent, _, attr = name.rpartition(".")
            setattr(layer.get_submodule(parent) if parent else layer, attr, new)
            del lin
    model.is_loaded_in_4bit = True  # what PEFT reads to wrap Linear4bit layers in lora.bnb.Linear4bit
    return dict(quant_type=q.bnb_4bit_quant_type, double_quant=q.bnb_4bit_use_double_quant,
                compute_dtype=str(q.bnb_4bit_compute_dtype).removeprefix("torch."))


def build_model(variant: str, cfg_kwargs: dict, device: str, longctx: bool = False,
                budget_gib: float | None = None, qlora: bool = False):
    """Random-init bf16 LlamaForCausalLM with LoRA adapters and checkpointing; returns (peft_model, notes).
    longctx: fastkern also chunks the MLP (at 8K tokens a 16K chunk is one whole-input replay, an extra MLP
    forward per layer for nothing, so the speed rows leave it off). budget_gib: ``fastkern_auto``'s memory
    budget (None: the card's free memory minus a margin). qlora: a 4-bit NF4 base (:func:`quantize_4bit`)."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    base, offload = parse_variant(variant)
    notes: dict = {}
    attn = prepare_variant(base)
    torch.manual_seed(0)
    cfg = LlamaConfig(**cfg_kwargs, attn_implementation=attn, use_cache=False)
    default = torch.get_default_dtype()
    # built in bf16 directly: an fp32 build of 8B parameters would need 32 GB first
    torch.set_default_dtype(torch.bfloat16 if device == "cuda" else torch.float32)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(default)
    if qlora:
        notes.update(base="nf4", bnb=quantize_4bit(model, device))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    chunk = OFFLOAD_MLP_CHUNK if longctx else None
    # "_prepeft": patched *before* get_peft_model, as TRL's SFTTrainer(peft_config=...) does it; the LoRA layers
    # are then fused at the first forward (hf_fastkern.patches.apply, the lora_watch hook)
    if variant.endswith("_prepeft"):
        from hf_fastkern import apply_fast_kernels
        apply_fast_kernels(model, offload_activations=offload, mlp_chunk_tokens=chunk)
    torch.manual_seed(1)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS))
    if base == "fastkern":
        from hf_fastkern import apply_fast_kernels
        # checkpoint="auto": the planner overrides the gradient_checkpointing_enable above, per layer
        auto = dict(checkpoint="auto", memory_budget_gib=budget_gib) if variant.endswith("_auto") else {}
        if auto:
            notes["budget_GiB"] = budget_gib
        report = apply_fast_kernels(model, offload_activations=offload, mlp_chunk_tokens=chunk, **auto) \
            if not variant.endswith("_prepeft") else None
        if chunk:
            notes["mlp_chunk_tokens"] = chunk
        if report is not None:
            notes["patch_report"] = str(report)[:500]
    model.train()
    return model, notes


def _step(model, opt, ids, device: str) -> torch.Tensor:
    with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.detach()


def _optimizer(model, device: str) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=1e-4, fused=device == "cuda")


def _sync(dev: str) -> None:
    if dev == "cuda":
        torch.cuda.synchronize()


def _tokens(batch: int, seq: int, vocab: int, dev: str) -> torch.Tensor:
    """[batch, seq] token ids from a generator of their own: the same tokens in every variant's process."""
    gen = torch.Generator(device=dev).manual_seed(seq)
    return torch.randint(0, vocab, (batch, seq), device=dev, generator=gen)


def _plan(model) -> str:
    """The checkpoint plan the auto variant runs now (after a training step)."""
    from hf_fastkern import report as patch_report

    return dict(patch_report(model).chosen).get("checkpoint", "")


def worker(variant: str, shapes, steps: int, warmup: int, cfg_kwargs: dict, dev: str = "cuda",
           profile: bool = False, budget_gib: float | None = None, qlora: bool = False) -> list[dict]:
    """One variant in this process (CUDA; ``dev="cpu"`` only exercises the code): every shape, one row each;
    ``profile``: add a torch.profiler kernel-class breakdown of 2 steps per shape, after every shape's timed steps:
    steps timed after a profiler session ran slower (the offload variant's 1 x 8192 step took 950.9 ms after the
    4 x 2048 profile against 838.9 ms without it, H100 2026-11-26), so no timing follows one."""
    model, notes = build_model(variant, cfg_kwargs, dev, budget_gib=budget_gib, qlora=qlora)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    opt = _optimizer(model, dev)
    rows = []
    for batch, seq in shapes:
        row = dict(bench="lora", impl=variant, B=batch, S=seq, trainable_params=trainable, **notes)
        try:
            ids = _tokens(batch, seq, cfg_kwargs["vocab_size"], dev)
            # the first step on identical weights and tokens feeds the correctness gate; the optimizer state is
            # the variants' own from here on, which the timing does not care about
            row["loss0"] = float(_step(model, opt, ids, dev))
            if variant.startswith("fastkern"):
                # what runs after the first step (the _prepeft variant binds its LoRA layers in that forward)
                from hf_fastkern import report as patch_report
                row["patch_report"] = str(patch_report(model))[:600]
                if variant.endswith("_auto"):
                    row["checkpoint_plan"] = _plan(model)
            for _ in range(warmup - 1):
                _step(model, opt, ids, dev)
            _sync(dev)
            if dev == "cuda":
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            for _ in range(steps):
                loss = _step(model, opt, ids, dev)
            _sync(dev)
            dt = (time.perf_counter() - t0) / steps
            row.update(step_ms=dt * 1e3, tok_per_s=batch * seq / dt, loss=float(loss),
                       peak_GiB=torch.cuda.max_memory_allocated() / 2**30 if dev == "cuda" else None)
        except torch.OutOfMemoryError:
            row["error"] = "CUDA out of memory"
            opt.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()
        rows.append(row)
    if profile and dev == "cuda":
        for row in rows:
            if row.get("step_ms"):
                ids = _tokens(row["B"], row["S"], cfg_kwargs["vocab_size"], dev)
                row["profile"] = harness.profile_steps(lambda ids=ids: _step(model, opt, ids, dev))
    return rows


def trial_worker(variant: str, seq: int, tiny: bool, qlora: bool = False) -> dict:
    """One LoRA training step (forward, backward, AdamW) at batch 1, length ``seq``, in this process
    (``qlora``: over the 4-bit base)."""
    gpu_cap = harness.cap_gpu_memory()  # an 80 GB card emulated on a larger one
    cfg = dict(TINY if tiny else LLAMA_8B, max_position_embeddings=max(seq, 8192))
    model, _ = build_model(variant, cfg, "cuda", longctx=True, qlora=qlora)
    # the step's peak, not the build's (a 4-bit base is quantized from a transient bf16 build, ~16 GB for 8B)
    torch.cuda.reset_peak_memory_stats()
    opt = _optimizer(model, "cuda")
    ids = torch.randint(0, cfg["vocab_size"], (1, seq), device="cuda")
    try:
        t0 = time.perf_counter()
        _step(model, opt, ids, "cuda")
        torch.cuda.synchronize()
        return dict(ok=True, peak_GiB=torch.cuda.max_memory_allocated() / 2**30, step_s=time.perf_counter() - t0,
                    gpu_cap_GiB=gpu_cap)
    except torch.OutOfMemoryError:
        return dict(ok=False, oom=True)
    except RuntimeError as e:
        # a failed cuBLAS/cuDNN workspace allocation is the memory limit too; anything else is a bug to report
        if "out of memory" in str(e) or "ALLOC_FAILED" in str(e):
            return dict(ok=False, oom=True, note=str(e)[:120])
        raise


def _trial(variant: str, seq: int, timeout: float, tiny: bool, qlora: bool = False) -> dict:
    # bench_longctx names variants with their checkpointing ('fastkern_gc_offload'); here it is always on
    return run_trial(__spec__.name, variant.replace("_gc", ""), seq, timeout, tiny, ("--qlora",) if qlora else ())


def longctx_rows(variants, budget_s: float, tiny: bool = False, start: int | None = None,
                 on_rows: Callable[[list[dict]], None] | None = None, qlora: bool = False) -> list[dict]:
    """Longest trainable batch-1 sequence per variant, with bench_longctx.search and this script's trial
    (``qlora``: over the 4-bit base; rows say ``"qlora": true``).

    ``on_rows(rows)`` is called after every trial with the finished rows and the one in progress, so a run that a
    time limit kills mid-search still leaves what it measured (the caller saves it)."""
    rows, t0 = [], time.time()

    def as_lora(row: dict, v: str) -> dict:
        row.update(bench="lora_longctx", impl=v, variant=v)
        if qlora:
            row["qlora"] = True
        # search() attaches the 1.5B e2e anchors by name; this scenario's anchors are the issue's
        row.pop("anchor", None)
        if ISSUE_ANCHORS.get(v) and not qlora:  # the anchors are bf16-base numbers
            row["anchor"] = ISSUE_ANCHORS[v]["max_seq"]
        return row

    for i, v in enumerate(variants):
        per = (budget_s - (time.time() - t0)) / (len(variants) - i)
        s = start or (ISSUE_ANCHORS.get(parse_variant(v)[0], {}).get("max_seq") or 98304)
        if parse_variant(v)[1] and not start:
            s = 262144  # the issue's target with offload
        base, offload = parse_variant(v)
        # bench_longctx's variant syntax: checkpointing is always on in this scenario
        name = f"{base}_gc" + ("_offload" if offload else "")
        saved = None if on_rows is None else (lambda partial, v=v: on_rows(rows + [as_lora(partial, v)]))
        trial = functools.partial(_trial, qlora=True) if qlora else _trial
        rows.append(as_lora(search(name, start=s, budget_s=per, trial_timeout=per, tiny=tiny, grow=1.25,
                                   trial=trial, on_trial=saved), v))
    return rows


def add_lora_ratios(rows: list[dict]) -> None:
    """Per shape: the correctness gate, vs_sdpa / mem_vs_sdpa, and vs_best_peer (tokens/s) on fastkern rows."""
    shapes = {(r.get("B"), r.get("S")) for r in rows if r.get("bench") == "lora"}
    for shape in shapes:
        group = {r["impl"]: r for r in rows if r.get("bench") == "lora" and (r.get("B"), r.get("S")) == shape
                 and r.get("tok_per_s")}
        base = group.get("sdpa")
        for r in group.values():
            if base and base.get("loss0") and r.get("loss0") is not None:
                r["loss0_rel_diff"] = abs(r["loss0"] - base["loss0"]) / abs(base["loss0"])
                r["gate"] = "ok" if r["loss0_rel_diff"] <= GATE_LOSS_REL else "FAIL: first-step loss differs from sdpa"
            if base:
                r["vs_sdpa"] = r["tok_per_s"] / base["tok_per_s"]
                r["mem_vs_sdpa"] = r["peak_GiB"] / base["peak_GiB"]
        peers = [r for k, r in group.items() if not k.startswith("fastkern")]
        for k, r in group.items():
            if k.startswith("fastkern") and peers:
                best = max(peers, key=lambda p: p["tok_per_s"])
                r["vs_best_peer"], r["best_peer"] = r["tok_per_s"] / best["tok_per_s"], best["impl"]
                if base:
                    r["meets_target"] = (r["vs_sdpa"] >= TARGETS_VS_SDPA["tok_per_s"]
                                         and r["mem_vs_sdpa"] <= TARGETS_VS_SDPA["mem"])


# the CPU smoke pass's budget for fastkern_auto (there is no card to read): enough to keep every layer
CPU_SMOKE_BUDGET_GIB = 1.0


def cpu_smoke(batch: int = 2, seq: int = 32, qlora: bool = False) -> list[dict]:
    """Tiny LoRA model on the CPU: one step unpatched vs fastkern (+offload, +auto checkpointing); loss agreement,
    not performance. ``qlora``: over a 4-bit base (bitsandbytes runs on the CPU)."""
    rows = []
    losses = {}
    for v in ("sdpa", "fastkern", "fastkern_offload", "fastkern_auto"):
        try:
            model, notes = build_model(v, TINY, "cpu", budget_gib=CPU_SMOKE_BUDGET_GIB if v.endswith("_auto") else None,
                                       qlora=qlora)
            ids = torch.randint(0, TINY["vocab_size"], (batch, seq), generator=torch.Generator().manual_seed(0))
            t0 = time.perf_counter()
            losses[v] = float(_step(model, _optimizer(model, "cpu"), ids, "cpu"))
            row = dict(bench="lora", impl=v, model="llama-tiny(cpu)", B=batch, S=seq,
                       step_ms=(time.perf_counter() - t0) * 1e3, loss=losses[v],
                       **{k: notes[k] for k in ("base", "bnb") if k in notes})
            if v != "sdpa" and "sdpa" in losses:
                row["loss_rel_err"] = abs(losses[v] - losses["sdpa"]) / abs(losses["sdpa"])
            if v.endswith("_auto"):
                row["checkpoint_plan"] = _plan(model)
            rows.append(row)
        except Exception as e:  # report, do not hide the other variants
            rows.append(dict(bench="lora", impl=v, B=batch, S=seq, error=f"{type(e).__name__}: {str(e)[:200]}"))
    return rows


def auto_budget(rows: list[dict], given: float | None) -> float | None:
    """fastkern_auto's budget: ``--budget-gib`` when given, else the smallest peak among this run's sdpa rows
    (HF + PEFT's own peak: the issue's "at most HF+PEFT's memory"), else None (the card's free memory)."""
    if given is not None:
        return given
    peaks = [r["peak_GiB"] for r in rows if r.get("impl") == "sdpa" and r.get("peak_GiB")]
    return min(peaks) if peaks else None


def _spawn(variant: str, args: argparse.Namespace, budget_gib: float | None = None) -> list[dict]:
    cmd = [sys.executable, "-m", __spec__.name, "--worker", "--variant", variant, "--shapes", args.shapes,
           "--steps", str(args.steps), "--warmup", str(args.warmup)] + (["--tiny"] if args.tiny else []) \
        + (["--profile"] if args.profile else []) + (["--budget-gib", str(budget_gib)] if budget_gib else []) \
        + (["--qlora"] if getattr(args, "qlora", False) else [])
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return [dict(bench="lora", impl=variant, error=f"timed out after {args.timeout}s")]
    res = worker_result(r.stdout)
    if res is not None:
        return res
    tail = (r.stderr or r.stdout).strip().splitlines()[-3:]
    return [dict(bench="lora", impl=variant, error=" | ".join(tail)[-400:] or f"rc={r.returncode}")]


def _shapes(text: str) -> list[tuple[int, int]]:
    return [tuple(int(v) for v in s.split("x")) for s in text.split(",")]  # type: ignore[misc]


def run(quick: bool = False, variants: tuple[str, ...] = VARIANTS, progress=None,
        budget_gib: float | None = None, qlora: bool = False) -> list[dict]:
    """Rows for every variant and shape (GPU: one subprocess per variant). ``quick``: 1 warm-up + 3 timed steps.
    ``budget_gib``: fastkern_auto's budget (None: :func:`auto_budget`'s default); with a budget the
    ``fastkern_auto`` variant is added when not listed (that is what the budget is for). ``qlora``: a 4-bit NF4
    base in every variant (``--qlora``)."""
    if budget_gib is not None and "fastkern_auto" not in variants:
        variants = (*variants, "fastkern_auto")
    if not torch.cuda.is_available():
        return cpu_smoke(qlora=qlora)
    args = _parser().parse_args(["--steps", "3" if quick else "5", "--warmup", "1" if quick else "2"]
                                + (["--qlora"] if qlora else []))
    rows = []
    for v in variants:
        rows += _spawn(v, args, auto_budget(rows, budget_gib) if v.endswith("_auto") else None)
        if progress is not None:
            progress(v)
    add_lora_ratios(rows)
    return rows


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", help="write rows + environment here")
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"any of {', '.join(ALL_VARIANTS)}")
    ap.add_argument("--shapes", default=",".join(f"{b}x{s}" for b, s in SHAPES), help="BxS,BxS,...")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--tiny", action="store_true", help="2-layer model (smoke test of the harness)")
    ap.add_argument("--profile", action="store_true", help="add a torch.profiler breakdown of 2 steps per shape")
    ap.add_argument("--timeout", type=float, default=600, help="seconds per variant subprocess")
    ap.add_argument("--budget-gib", type=float, default=None,
                    help="fastkern_auto's memory budget (default: the smallest sdpa peak of this run, listed first; "
                         "without sdpa rows the card's free memory minus a margin)")
    ap.add_argument("--qlora", action="store_true",
                    help="4-bit NF4 double-quant base (bitsandbytes, BitsAndBytesConfig settings) in every variant; "
                         "baseline HF + PEFT + bitsandbytes")
    ap.add_argument("--longctx", action="store_true", help="also search the longest batch-1 sequence per variant")
    ap.add_argument("--longctx-variants", default="sdpa,sdpa+liger,fastkern,fastkern_offload")
    ap.add_argument("--longctx-budget", type=float, default=1800, help="seconds for the whole search")
    ap.add_argument("--longctx-start", type=int, default=None, help="start length (default: anchors / target)")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--variant", help=argparse.SUPPRESS)
    ap.add_argument("--device", default="cuda", help=argparse.SUPPRESS)
    ap.add_argument("--trial", nargs=2, metavar=("VARIANT", "SEQ"), help=argparse.SUPPRESS)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    extra = {"method": METHOD + (QLORA_METHOD if args.qlora else ""), "issue_anchors": ISSUE_ANCHORS,
             "targets_vs_sdpa": TARGETS_VS_SDPA}
    cfg = TINY if args.tiny else LLAMA_8B
    if args.trial:
        emit_result(trial_worker(args.trial[0], int(args.trial[1]), args.tiny, args.qlora))
        return 0
    if args.worker:
        rows = worker(args.variant, _shapes(args.shapes), args.steps, args.warmup, cfg, args.device, args.profile,
                      args.budget_gib, args.qlora)
        emit_result(rows)
        return 0
    if not torch.cuda.is_available():
        print("no CUDA device: tiny CPU smoke pass only; GPU numbers need a GPU")
        rows = cpu_smoke(qlora=args.qlora)
    else:
        rows = []
        for v in filter(None, args.variants.split(",")):  # --variants "": the long-context search alone
            parse_variant(v)
            rows += _spawn(v, args, auto_budget(rows, args.budget_gib) if v.endswith("_auto") else None)
            print_table(rows[-len(_shapes(args.shapes)):], COLS)
        add_lora_ratios(rows)
        if args.longctx:
            done = list(rows)

            def saved(partial: list[dict]) -> None:  # after every trial: a killed search keeps its trials
                with contextlib.redirect_stdout(io.StringIO()):
                    save(args.json, done + partial, dict(extra, partial=True))

            rows += longctx_rows(args.longctx_variants.split(","), args.longctx_budget, args.tiny, args.longctx_start,
                                 on_rows=saved, qlora=args.qlora)
    print_table(rows, COLS)
    for r in rows:
        if r.get("checkpoint_plan"):
            print(r["impl"], f"{r.get('B')}x{r.get('S')}", "checkpoint plan:", r["checkpoint_plan"])
        if r.get("profile"):
            print(r["impl"], f"{r['B']}x{r['S']}", "GPU ms/step by class:", r["profile"]["by_class_ms"])
    save(args.json, rows, extra)
    return 0


if __name__ == "__main__":
    sys.exit(main())
