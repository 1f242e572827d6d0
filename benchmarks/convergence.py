"""Convergence parity: a small random-init Llama and GPT-2 trained patched vs unpatched, same seed and data.

What it shows: training through hf_fastkern (``apply_fast_kernels`` + ``attn_implementation="fastkern"``)
follows the same loss curve as stock transformers. Both runs start from the same weights (one state dict,
loaded twice), see the same batches in the same order, use the same optimizer and schedule; only the
kernels differ. Criteria (issue 8):

- final loss (mean of the last logged window) within 1% relative;
- every logged point within 2% relative. A logged point is the mean training loss over the ``--log-every``
  steps since the previous log, exactly what ``Trainer`` logs; per-step losses are saved too.
- an evaluation loss on fixed held-out batches after training, reported (and held to the 1% rule).

The task is fixed and learnable: sequences from a sparse random Markov chain (every token has 4 possible
successors), so the loss falls from ln(vocab) towards ln(4) and a kernel bug shows as a gap between curves.

GPU (the issue's run): ``PYTHONPATH=. python benchmarks/convergence.py --json $OUT/convergence.json
--plot $OUT/convergence.png`` -- 300 steps each of pure bf16 (weights and AdamW state in bf16) and bf16
autocast over fp32 master weights, fused AdamW.
CPU smoke (CI): ``python benchmarks/convergence.py --device cpu --steps 30 --tiny`` runs the reference path
(fp32) in well under a minute; tests/test_convergence.py calls :func:`run_pair` and :func:`compare` directly.

``--mode`` (Llama only) trains adapters instead of the whole model (issue 23's loss curves, held to 1 % at every
logged point): ``lora`` (PEFT r16 on the seven projections, bf16 base, PEFT's fp32 adapters, bf16 autocast),
``lora-auto`` (the same with gradient checkpointing on both sides and ``checkpoint="auto"`` patched),
``qlora`` (the decoder linears as bitsandbytes NF4 ``Linear4bit``, as ``bench_lora --qlora`` builds them;
CUDA only). Both runs create their adapters from the same seed, so they start identical.
"""
from __future__ import annotations

import argparse
import copy
import math
import sys
import time

import torch

from .bench_lora import TARGETS as LORA_TARGETS
from .bench_lora import _plan, quantize_4bit
from .harness import save

FINAL_RTOL = 0.01  # final loss within 1%
CURVE_RTOL = 0.02  # every logged point within 2%
N_SUCCESSORS = 4
ADAPTER_ARCH = "llama"  # the adapter modes' model (PEFT targets its seven projections)
ADAPTER_CPU_PRECISION = "bf16-base"  # the CPU's adapter runs: bf16 base, fp32 adapters, no autocast
ADAPTER_RTOL = 0.01  # issue 23: LoRA / QLoRA curves within 1 % of HF + PEFT at every logged step

# Model sizes: "gpu" is the small model (a few seconds per 100 steps on an H100), "tiny" is CI's.
SIZES = {
    "gpu": dict(hidden=512, layers=4, heads=8, kv_heads=4, inter=1408, vocab=8192, seq=256, batch=16),
    "tiny": dict(hidden=64, layers=2, heads=4, kv_heads=2, inter=128, vocab=128, seq=32, batch=4),
}


def build_model(arch: str, size: dict, attn: str = "sdpa") -> torch.nn.Module:
    """Random-init causal LM (no download). Dropout off so both runs see the same computation."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    if arch == "llama":
        cfg = LlamaConfig(hidden_size=size["hidden"], num_hidden_layers=size["layers"],
                          num_attention_heads=size["heads"], num_key_value_heads=size["kv_heads"],
                          intermediate_size=size["inter"], vocab_size=size["vocab"],
                          max_position_embeddings=size["seq"], tie_word_embeddings=False,
                          attention_dropout=0.0)
        return LlamaForCausalLM._from_config(cfg, attn_implementation=attn)
    if arch == "gpt2":
        cfg = GPT2Config(n_embd=size["hidden"], n_layer=size["layers"], n_head=size["heads"],
                         n_inner=size["inter"], vocab_size=size["vocab"], n_positions=size["seq"],
                         resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, activation_function="gelu_new",
                         bos_token_id=0, eos_token_id=0)
        return GPT2LMHeadModel._from_config(cfg, attn_implementation=attn)
    raise ValueError(f"arch must be 'llama' or 'gpt2', got {arch!r}")


def make_data(size: dict, n_batches: int, seed: int = 1234, chain_seed: int = 7) -> torch.Tensor:
    """[n_batches, batch, seq] int64 token ids sampled (``seed``) from one fixed sparse Markov chain
    (``chain_seed``). CPU generators: the same tokens on any device."""
    vocab, batch, seq = size["vocab"], size["batch"], size["seq"]
    # the chain: 4 successors per token, the same for training and evaluation data
    succ = torch.randint(0, vocab, (vocab, N_SUCCESSORS), generator=torch.Generator().manual_seed(chain_seed))
    g = torch.Generator().manual_seed(seed)
    out = torch.empty(n_batches * batch, seq, dtype=torch.long)
    out[:, 0] = torch.randint(0, vocab, (n_batches * batch,), generator=g)
    choice = torch.randint(0, N_SUCCESSORS, (n_batches * batch, seq), generator=g)
    for t in range(1, seq):
        out[:, t] = succ[out[:, t - 1], choice[:, t]]
    return out.view(n_batches, batch, seq)


def patch(model: torch.nn.Module, **options) -> dict:
    """apply_fast_kernels(model, **options) + attention "fastkern"; returns what happened (the report as text)."""
    import hf_fastkern

    info: dict = {}
    report = hf_fastkern.apply_fast_kernels(model, **options)
    info["report"] = str(report)
    impl = getattr(model.config, "_attn_implementation", None)
    if impl != "fastkern":
        # apply_fast_kernels(attention=True) should already have switched it; do it through the public API if not.
        model.set_attn_implementation("fastkern")
    info["attn_implementation"] = model.config._attn_implementation
    return info


MODES = ("full", "lora", "lora-auto", "qlora")


def _adapters(model: torch.nn.Module, mode: str, device: str) -> tuple[torch.nn.Module, dict]:
    """The LoRA modes: a bf16 (or NF4) base with PEFT adapters (gradient checkpointing on in ``lora-auto``; the
    patched side then gets ``checkpoint="auto"`` from :func:`patch`). Returns (model, notes)."""
    from peft import LoraConfig, get_peft_model

    notes: dict = {"mode": mode}
    model.to(torch.bfloat16)
    if mode == "qlora":
        notes["quant"] = quantize_4bit(model, device)
    if mode == "lora-auto":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    torch.manual_seed(1)  # the adapters' initialisation, the same on both sides
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=LORA_TARGETS))
    return model, notes


def train(arch: str, size: dict, state: dict, data: torch.Tensor, eval_data: torch.Tensor, *, patched: bool,
          steps: int, device: str, precision: str, lr: float, log_every: int, mode: str = "full",
          budget_gib: float | None = None) -> dict:
    """One training run from ``state``; returns per-step losses, logged (window-mean) losses and eval loss."""
    torch.manual_seed(0)
    model = build_model(arch, size)
    model.load_state_dict(state)
    model.to(device)
    info: dict = {}
    if mode != "full":
        model, info = _adapters(model, mode, device)
    elif precision == "bf16":
        # Pure bf16 weights (no master copy): the harshest setting for kernel rounding differences.
        model.to(torch.bfloat16)
    if patched:
        auto = {"checkpoint": "auto", "memory_budget_gib": budget_gib} if mode == "lora-auto" else {}
        info = {**patch(model, **auto), **info}
    else:
        info["attn_implementation"] = model.config._attn_implementation
    model.train()
    opt_kw = {"fused": True} if device.startswith("cuda") else {}
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.01, **opt_kw)
    warmup = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    autocast = (torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16) if precision == "autocast-bf16"
                else torch.autocast(device_type=device.split(":")[0], enabled=False))
    losses: list[float] = []
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for step in range(steps):
        ids = data[step % data.shape[0]].to(device)
        with autocast:
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        # One host sync per step is fine here: this measures loss, not speed.
        losses.append(float(loss.detach().float()))
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    if device.startswith("cuda"):
        info["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    if patched and mode == "lora-auto":
        info["plan"] = _plan(model)
    model.eval()
    with torch.no_grad(), autocast:
        ev = [float(model(input_ids=b.to(device), labels=b.to(device)).loss.float()) for b in eval_data]
    logged = [sum(losses[i:i + log_every]) / len(losses[i:i + log_every]) for i in range(0, steps, log_every)]
    return {"patched": patched, "losses": losses, "logged": logged,
            "logged_steps": [min(i + log_every, steps) for i in range(0, steps, log_every)],
            "eval_loss": sum(ev) / len(ev), "seconds": seconds, **info}


def run_pair(arch: str, *, steps: int, device: str, tiny: bool, precision: str = "autocast-bf16",
             lr: float = 1e-3, log_every: int = 10, seed: int = 0, mode: str = "full") -> dict:
    """Unpatched and patched runs of one architecture from identical weights and data (``mode``: full
    fine-tune or one of the adapter modes, whose curves are held to 1 % at every logged point)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    if mode != "full" and arch != ADAPTER_ARCH:
        raise ValueError(f"mode {mode!r} trains Llama adapters; arch {arch!r} has no such run")
    if mode == "qlora" and not device.startswith("cuda"):
        raise ValueError("mode 'qlora' needs a CUDA device (bitsandbytes' 4-bit kernels)")
    size = SIZES["tiny" if tiny else "gpu"]
    torch.manual_seed(seed)
    state = copy.deepcopy(build_model(arch, size).state_dict())
    data = make_data(size, n_batches=steps)
    eval_data = make_data(size, n_batches=4, seed=4321)
    runs: dict = {}
    for patched in (False, True):
        # lora-auto: the planner's budget is HF + PEFT's own peak (issue 23's setting), so the plan mixes
        # recompute modes; on the CPU (no peak to read) a tiny budget makes it recompute the most it can
        budget = None
        if patched and mode == "lora-auto":
            budget = runs["unpatched"].get("peak_gib") or 1e-3
        runs["patched" if patched else "unpatched"] = train(
            arch, size, state, data, eval_data, patched=patched, steps=steps, device=device,
            precision=precision, lr=lr, log_every=log_every, mode=mode, budget_gib=budget)
    rtol = {} if mode == "full" else {"curve_rtol": ADAPTER_RTOL}
    return {"arch": arch, "mode": mode, "size": size, "steps": steps, "precision": precision, "lr": lr,
            "log_every": log_every, **runs, "verdict": compare(runs["unpatched"], runs["patched"], **rtol)}


def compare(base: dict, fast: dict, final_rtol: float = FINAL_RTOL, curve_rtol: float = CURVE_RTOL) -> dict:
    """The issue's criteria on two runs' results: final (last logged window) within 1%, every logged point
    within 2%, eval loss within 1%. Returns the numbers and ``ok``."""
    rel = [abs(f - b) / abs(b) for b, f in zip(base["logged"], fast["logged"])]
    final = rel[-1] if rel else float("nan")
    ev = abs(fast["eval_loss"] - base["eval_loss"]) / abs(base["eval_loss"])
    finite = all(math.isfinite(x) for x in base["losses"] + fast["losses"])
    ok = finite and bool(rel) and final <= final_rtol and max(rel) <= curve_rtol and ev <= final_rtol
    return {"ok": ok, "finite": finite, "final_rel": final, "max_curve_rel": max(rel) if rel else float("nan"),
            "worst_step": base["logged_steps"][rel.index(max(rel))] if rel else None, "eval_rel": ev,
            "final_rtol": final_rtol, "curve_rtol": curve_rtol}


def plot(results: list[dict], path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return
    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4), squeeze=False)
    for ax, r in zip(axes[0], results):
        for key, style in (("unpatched", "-"), ("patched", "--")):
            ax.plot(r[key]["logged_steps"], r[key]["logged"], style, label=f"{key} (eval {r[key]['eval_loss']:.4f})")
        v = r["verdict"]
        ax.set_title(f"{r['arch']} {r.get('mode', 'full')} {r['precision']}: max gap {100 * v['max_curve_rel']:.2f}%, "
                     f"final {100 * v['final_rel']:.2f}% -> {'PASS' if v['ok'] else 'FAIL'}", fontsize=9)
        ax.set_xlabel("step")
        ax.set_ylabel(f"train loss (mean over {r['log_every']} steps)")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tiny", action="store_true", help="CI-size models (CPU smoke run)")
    p.add_argument("--arch", nargs="+", default=["llama", "gpt2"], choices=["llama", "gpt2"])
    p.add_argument("--precision", nargs="+", default=["bf16", "autocast-bf16"],
                   choices=["autocast-bf16", "bf16", "fp32"],
                   help="bf16: pure bf16 weights and optimizer state; autocast-bf16: fp32 master weights + bf16 "
                        "autocast; fp32 (CPU default). Default: both bf16 settings")
    p.add_argument("--mode", nargs="+", default=["full"], choices=list(MODES),
                   help="full fine-tune (default) or adapters: lora, lora-auto, qlora (Llama only; see above)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--json", default=None)
    p.add_argument("--plot", default=None)
    args = p.parse_args(argv)

    results = []
    precisions = args.precision if args.device.startswith("cuda") else ["fp32"]
    pairs = [(arch, precision, "full") for arch in args.arch for precision in precisions if "full" in args.mode]
    # adapter modes: bf16 base with PEFT's fp32 adapters, under bf16 autocast on a GPU (what LoRA users run);
    # Llama only: --arch must name it, and the other archs run their full fine-tune alone
    adapter_modes = [m for m in args.mode if m != "full"]
    if adapter_modes and ADAPTER_ARCH not in args.arch:
        p.error(f"--mode {' '.join(adapter_modes)} trains {ADAPTER_ARCH} adapters: add {ADAPTER_ARCH} to --arch")
    if adapter_modes and len(args.arch) > 1:
        print(f"adapter modes run for --arch {ADAPTER_ARCH} only (the other archs: the full fine-tune)")
    pairs += [(ADAPTER_ARCH, "autocast-bf16" if args.device.startswith("cuda") else ADAPTER_CPU_PRECISION, m)
              for m in adapter_modes]
    for arch, precision, mode in pairs:
        try:
            r = run_pair(arch, steps=args.steps, device=args.device, tiny=args.tiny, precision=precision,
                         lr=args.lr, log_every=args.log_every, mode=mode)
        except Exception as e:  # one failing pair must not hide the others' results
            print(f"{arch:6s} {mode} {precision:13s} ERROR {type(e).__name__}: {e}")
            results.append({"arch": arch, "mode": mode, "precision": precision,
                            "error": f"{type(e).__name__}: {e}", "verdict": {"ok": False}})
            continue
        results.append(r)
        v = r["verdict"]
        print(f"{arch:6s} {mode} {r['precision']:13s} steps={args.steps}  "
              f"unpatched final={r['unpatched']['logged'][-1]:.4f} "
              f"patched final={r['patched']['logged'][-1]:.4f}  final gap={100 * v['final_rel']:.3f}%  "
              f"max curve gap={100 * v['max_curve_rel']:.3f}% (step {v['worst_step']})  "
              f"eval gap={100 * v['eval_rel']:.3f}%  time {r['unpatched']['seconds']:.1f}s / "
              f"{r['patched']['seconds']:.1f}s  {'PASS' if v['ok'] else 'FAIL'}")
        print(f"  patched with: {r['patched'].get('attn_implementation')}; {r['patched'].get('report', '')}")
    ok = all(r["verdict"]["ok"] for r in results)
    if args.json:
        save(args.json, [], extra={"convergence": results, "pass": ok})
    if args.plot:
        plot([r for r in results if "error" not in r], args.plot)
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
