"""The "never slower" guard (issue 21): patched vs unpatched ``sdpa``, same model, same process, per case.

Every recipe architecture (llama, mistral, qwen2, qwen3, gemma, gpt2, gpt_neox, phi3) at tiny and real hidden
sizes, head_dim 64/128/256, small and large batches, a training step (forward + backward + AdamW) and
``generate()``, autocast on and off, LoRA (PEFT, r16, every projection, PEFT's default fp32 adapters) and full
fine-tune. One model per case: timed unpatched (``attn_implementation="sdpa"``), then
``apply_fast_kernels`` (per instance), timed, ``revert_fast_kernels``, timed again, patched again: rounds
alternate (A B A B ...) so drift in clocks or the allocator hits both sides; after every switch one untimed
unit of work (a warm-up) runs on that side; a round times ``--steps`` training steps or up to 3 ``generate()``
calls (median), and each side's time is the median of its rounds. ``ratio = unpatched_ms / patched_ms`` (> 1: patched is faster; the target is >= 0.98 everywhere).

Real hidden sizes stay affordable with ``--layers`` (default 4: the per-layer work is the model's, the
embedding and head are the full vocabulary's). Issue 21's four rows are cases ``issue21-*``.

    python -m benchmarks.bench_guard --out guard.json [--quick] [--layers 4] [--cases NAME,...]
    python -m benchmarks.bench_guard --cpu-smoke --out guard_smoke.json   (toy sizes, CPU, checks the script)

``--variant NAME:VAR=VALUE`` adds a patched side with those environment variables set to every round (an
in-process A/B of two patched paths: two runs of one case have differed by 0.2 in ratio on one machine);
``--sync-audit`` counts the synchronizing calls of one unit of work per side and the lines that made them.

``hf-fastkern bench guard [--quick]`` runs :func:`run` (registry entry ``guard``, not part of ``all``).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field, replace

import torch

from hf_fastkern import apply_fast_kernels, revert_fast_kernels

from .harness import environment

VOCAB = 32000


@dataclass(frozen=True)
class Case:
    name: str
    arch: str
    hidden: int
    head_dim: int
    kv_heads_div: int = 4  # kv heads = heads // this (1: MHA)
    batch: int = 1
    seq: int = 512
    mode: str = "train"  # "train" or "generate"
    autocast: bool = True  # train: bf16 autocast over fp32 weights; off: bf16 weights, no autocast
    lora: bool = False
    grad_ckpt: bool = False
    new_tokens: int = 64
    vocab: int = VOCAB
    intermediate: int | None = None  # default 4x hidden (8/3 rounded for gated MLPs)
    rotary_pct: float = 1.0  # gpt_neox
    extra: dict = field(default_factory=dict)


def _inter(c: Case) -> int:
    if c.intermediate:
        return c.intermediate
    return 4 * c.hidden if c.arch in ("gpt2", "gpt_neox") else (8 * c.hidden // 3 + 255) // 256 * 256


def build_config(c: Case, layers: int, device: str):
    """A transformers config for case ``c`` with ``layers`` decoder layers (random init, no download)."""
    import transformers as tf
    heads = max(c.hidden // c.head_dim, 1)
    kv = max(heads // c.kv_heads_div, 1)
    common = dict(vocab_size=c.vocab, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if c.arch == "gpt2":
        return tf.GPT2Config(n_embd=c.hidden, n_layer=layers, n_head=heads, n_positions=max(c.seq + c.new_tokens, 64),
                             n_inner=_inter(c), resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **common)
    if c.arch == "gpt_neox":
        return tf.GPTNeoXConfig(hidden_size=c.hidden, intermediate_size=_inter(c), num_hidden_layers=layers,
                                num_attention_heads=heads, rotary_pct=c.rotary_pct, hidden_dropout=0.0,
                                attention_dropout=0.0, max_position_embeddings=max(c.seq + c.new_tokens, 64),
                                **common)
    kw = dict(hidden_size=c.hidden, intermediate_size=_inter(c), num_hidden_layers=layers,
              num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=max(c.seq + c.new_tokens, 64),
              **common, **c.extra)
    cls = {"llama": tf.LlamaConfig, "mistral": tf.MistralConfig, "qwen2": tf.Qwen2Config, "qwen3": tf.Qwen3Config,
           "gemma": tf.GemmaConfig, "phi3": tf.Phi3Config}[c.arch]
    if c.arch in ("qwen3", "gemma"):
        kw["head_dim"] = c.head_dim
    if c.arch == "mistral":
        kw.setdefault("sliding_window", 4096)
    return cls(**kw)


def build_model(c: Case, layers: int, device: str):
    import transformers as tf
    cfg = build_config(c, layers, device)
    torch.manual_seed(0)
    with torch.device(device):
        model = tf.AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa")
    # fp32 master weights only for a full fine-tune under autocast (the Trainer's way); LoRA bases, bf16
    # training without autocast and generate() hold bf16 weights (the CPU smoke test keeps fp32)
    if device == "cuda" and (c.lora or not c.autocast or c.mode == "generate"):
        model = model.to(torch.bfloat16)
    if c.lora:
        import peft
        targets = [n for n in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
                               "query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h", "c_attn", "c_proj",
                               "c_fc", "qkv_proj", "gate_up_proj")
                   if any(m.endswith("." + n) for m, _ in model.named_modules())]
        model = peft.get_peft_model(model, peft.LoraConfig(r=16, lora_alpha=32, target_modules=targets,
                                                           lora_dropout=0.0))
    if c.grad_ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _timer(c: Case, model, device: str):
    """A function that runs one unit of work (a training step or one generate()) and returns its seconds."""
    g = torch.Generator(device="cpu").manual_seed(1)
    ids = torch.randint(3, c.vocab, (c.batch, c.seq), generator=g).to(device)
    if c.mode == "generate":
        model.eval()
        am = torch.ones_like(ids)

        def gen() -> float:
            _sync(device)
            t0 = time.perf_counter()
            with torch.no_grad():
                model.generate(input_ids=ids, attention_mask=am, max_new_tokens=c.new_tokens,
                               min_new_tokens=c.new_tokens, do_sample=False, pad_token_id=0)
            _sync(device)
            return time.perf_counter() - t0
        return gen
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, fused=device == "cuda")
    ac = c.autocast and device == "cuda"

    def step() -> float:
        _sync(device)
        t0 = time.perf_counter()
        with torch.autocast(device, dtype=torch.bfloat16, enabled=ac):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        _sync(device)
        return time.perf_counter() - t0
    return step


def _profile(run, device: str) -> dict[str, str]:
    """One unit of work under torch.profiler: the top ops by host time and by device time (the guard's misses
    are host-bound steps; this says whose calls the time goes to)."""
    acts = [torch.profiler.ProfilerActivity.CPU]
    if device == "cuda":
        acts.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=acts) as prof:
        run()
    ka = prof.key_averages()
    out = {"host": ka.table(sort_by="self_cpu_time_total", row_limit=25)}
    if device == "cuda":
        out["device"] = ka.table(sort_by="self_cuda_time_total", row_limit=25)
    return out


@dataclass(frozen=True)
class Variant:
    """A third (fourth, ...) side of every round: the patched model with some environment variables set, e.g.
    ``async_check:HF_FASTKERN_LABEL_CHECK=async``. An A/B of two patched paths in one process and one model,
    interleaved with the unpatched rounds, so machine drift hits every side alike (two separate runs of one
    case on one machine have differed by 0.2 in ratio)."""
    name: str
    env: tuple[tuple[str, str], ...]


def parse_variant(spec: str) -> Variant:
    """``NAME:VAR=VALUE[,VAR=VALUE...]`` -> Variant (ValueError naming what is wrong)."""
    name, sep, rest = spec.partition(":")
    if not sep or not name or name in ("sdpa", "fastkern") or not rest:
        raise ValueError(f"variant {spec!r}: expected NAME:VAR=VALUE[,VAR=VALUE...] with NAME not sdpa/fastkern")
    env = []
    for item in rest.split(","):
        var, eq, val = item.partition("=")
        if not eq or not var:
            raise ValueError(f"variant {spec!r}: {item!r} is not VAR=VALUE")
        if any(var == v for v, _ in env):
            raise ValueError(f"variant {spec!r}: {var} is set twice")
        env.append((var, val))
    return Variant(name, tuple(env))


def _set_env(pairs: tuple[tuple[str, str], ...], saved: dict[str, str | None]) -> None:
    """Restore what earlier sides set (``saved``), then set ``pairs`` (remembering the values they replace)."""
    for var, val in saved.items():
        if val is None:
            os.environ.pop(var, None)
        else:
            os.environ[var] = val
    saved.clear()
    for var, val in pairs:
        saved[var] = os.environ.get(var)
        os.environ[var] = val


def _sync_audit(run, device: str) -> dict[str, int]:
    """One unit of work under ``torch.cuda.set_sync_debug_mode("warn")``: how many synchronizing calls each
    source line made (a sync inside a step stalls the host until the GPU drains, and a host-bound step then
    loses its head start; the stock step has none outside ``generate()``'s own checks). Explicit waits
    (``torch.cuda.synchronize``, ``Event.synchronize``, the timer's own per-step sync) are not counted."""
    if device != "cuda":
        return {}
    counts: dict[str, int] = {}
    before = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            run()
        finally:
            torch.cuda.set_sync_debug_mode(before)
    for w in caught:
        if "synchroniz" in str(w.message):
            where = f"{os.path.relpath(w.filename) if w.filename.startswith(os.getcwd()) else w.filename}:{w.lineno}"
            counts[where] = counts.get(where, 0) + 1
    return counts


def measure_case(c: Case, layers: int, device: str, rounds: int, steps: int, profile: bool = False,
                 variants: tuple[Variant, ...] = (), sync_audit: bool = False) -> dict:
    """Alternate unpatched / patched (/ each variant) rounds on one model; the median per-step time of each side
    (``profile``: then one profiled unit of work per side; ``sync_audit``: the synchronizing calls of one unit
    of work per side)."""
    model = build_model(c, layers, device)
    run = _timer(c, model, device)
    sides = ["sdpa", "fastkern"] + [v.name for v in variants]
    side_env = {"sdpa": (), "fastkern": (), **{v.name: v.env for v in variants}}
    times: dict[str, list[float]] = {s: [] for s in sides}
    peaks: dict[str, float] = {}
    syncs: dict[str, dict[str, int]] = {}
    reports: dict[str, str] = {}
    saved: dict[str, str | None] = {}
    n_steps = min(steps, 3) if c.mode == "generate" else steps

    def switch(m: torch.nn.Module, side: str) -> None:
        """Unpatched, then this side's environment, then patched unless it is the unpatched side."""
        revert_fast_kernels(m)
        _set_env(side_env[side], saved)
        if side != "sdpa":
            reports[side] = str(apply_fast_kernels(m))
    try:
        for r in range(rounds):
            # the unpatched side first, then the patched sides in an order that rotates every round (a side
            # that always follows another would carry that order's bias into the A/B)
            patched = sides[1:]
            k = r % len(patched)
            for side in ["sdpa"] + patched[k:] + patched[:k]:
                switch(model, side)
                # warm-up after every switch, every side alike: the first round's compile/autotune and allocator
                # growth, and in later rounds the first call after (re)patching, which is not a steady-state step
                run()
                if r == 0 and c.mode == "train":
                    run()
                if sync_audit and r == 0:
                    syncs[side] = _sync_audit(run, device)
                if device == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                ts = [run() for _ in range(n_steps)]
                times[side].append(statistics.median(ts))
                if device == "cuda":
                    peaks[side] = max(peaks.get(side, 0.0), torch.cuda.max_memory_allocated() / 2**30)
        profiles = {}
        if profile:
            for side in sides:
                switch(model, side)
                run()  # the first call after a switch is not a steady-state one (as above)
                profiles[side] = _profile(run, device)
    finally:
        _set_env((), saved)
        revert_fast_kernels(model)
    del model, run
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    ms = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    tokens = c.batch * (c.new_tokens if c.mode == "generate" else c.seq)
    # each round's own ratio (its unpatched median / its patched median, measured seconds apart): their spread is
    # the noise a single ratio carries (2026-12-07, H200: two runs of one case, same table, gave 0.95 and 1.16)
    round_ratios = [a / b for a, b in zip(times["sdpa"], times["fastkern"])]
    row = {**asdict(c), "layers": layers, "sdpa_ms": ms["sdpa"], "fastkern_ms": ms["fastkern"],
           "ratio": ms["sdpa"] / ms["fastkern"], "round_ratios": [round(x, 3) for x in round_ratios],
           "sdpa_tok_s": tokens / ms["sdpa"] * 1e3, "fastkern_tok_s": tokens / ms["fastkern"] * 1e3,
           "rounds": rounds, "patch_report": reports.get("fastkern", "")[:600]}
    if variants:
        row["variants"] = {
            v.name: {"env": dict(v.env), "ms": ms[v.name], "ratio": ms["sdpa"] / ms[v.name],
                     "vs_fastkern": ms["fastkern"] / ms[v.name],
                     "round_ratios": [round(a / b, 3) for a, b in zip(times["sdpa"], times[v.name])],
                     "peak_GiB": peaks.get(v.name), "patch_report": reports.get(v.name, "")[:600]}
            for v in variants}
    if syncs:
        row["syncs"] = syncs
    if profiles:
        row["profile"] = profiles
    if peaks:
        row.update(sdpa_peak_GiB=peaks["sdpa"], fastkern_peak_GiB=peaks["fastkern"],
                   mem_ratio=peaks["fastkern"] / peaks["sdpa"] if peaks["sdpa"] else None)
    return row


# ----------------------------------------------------------------------------------------------------------
# the grid


LLAMA8B = dict(arch="llama", hidden=4096, head_dim=128, intermediate=14336, vocab=128256)
PYTHIA1B = dict(arch="gpt_neox", hidden=2048, head_dim=256, kv_heads_div=1, intermediate=8192, vocab=50304,
                rotary_pct=0.25)
ARCH_SHAPES = {
    # arch: (real-size kwargs, head_dim)
    "llama": dict(arch="llama", hidden=2048, head_dim=64, intermediate=8192),
    "mistral": dict(arch="mistral", hidden=4096, head_dim=128, intermediate=14336),
    "qwen2": dict(arch="qwen2", hidden=1536, head_dim=128, kv_heads_div=6, intermediate=8960),
    "qwen3": dict(arch="qwen3", hidden=2048, head_dim=128, kv_heads_div=2, intermediate=6144),
    "gemma": dict(arch="gemma", hidden=2048, head_dim=256, kv_heads_div=8, intermediate=16384, vocab=256000),
    "gpt2": dict(arch="gpt2", hidden=1600, head_dim=64, kv_heads_div=1),
    "gpt_neox": PYTHIA1B,
    "phi3": dict(arch="phi3", hidden=3072, head_dim=96, kv_heads_div=1, intermediate=8192, vocab=32064),
}


def issue21_cases() -> list[Case]:
    """The four rows of issue 21's table."""
    return [
        Case("issue21-pythia1b-full-bf16-B2x4096", **PYTHIA1B, batch=2, seq=4096, autocast=False),
        Case("issue21-generate-llama8b-B1x32768", **LLAMA8B, batch=1, seq=32768, mode="generate", new_tokens=64),
        Case("issue21-generate-llama8b-B4x4096", **LLAMA8B, batch=4, seq=4096, mode="generate", new_tokens=64),
        Case("issue21-small-llama2048-B1x128", arch="llama", hidden=2048, head_dim=64, intermediate=8192,
             batch=1, seq=128),
        Case("issue21-small-llama2048-B1x512", arch="llama", hidden=2048, head_dim=64, intermediate=8192,
             batch=1, seq=512),
        Case("issue21-small-llama2048-B2x1024", arch="llama", hidden=2048, head_dim=64, intermediate=8192,
             batch=2, seq=1024),
        Case("issue21-lora8b-noautocast-B4x2048", **LLAMA8B, batch=4, seq=2048, lora=True, autocast=False,
             grad_ckpt=True),
        Case("issue21-lora8b-autocast-B4x2048", **LLAMA8B, batch=4, seq=2048, lora=True, autocast=True,
             grad_ckpt=True),
    ]


def all_cases() -> list[Case]:
    cases = issue21_cases()
    for arch, shape in ARCH_SHAPES.items():
        tiny = dict(shape, hidden=256, head_dim=64, intermediate=None, vocab=VOCAB)
        if arch == "gemma":
            tiny["kv_heads_div"] = 1
        cases += [
            Case(f"{arch}-tiny-train-B1x128", **tiny, batch=1, seq=128),
            Case(f"{arch}-real-train-B1x512", **shape, batch=1, seq=512),
            Case(f"{arch}-real-train-B8x2048", **shape, batch=8, seq=2048),
            Case(f"{arch}-real-train-noautocast-B4x1024", **shape, batch=4, seq=1024, autocast=False),
            Case(f"{arch}-real-lora-B4x1024", **shape, batch=4, seq=1024, lora=True, autocast=False),
            Case(f"{arch}-real-generate-B1x512", **shape, batch=1, seq=512, mode="generate"),
            Case(f"{arch}-real-generate-B16x2048", **shape, batch=16, seq=2048, mode="generate"),
        ]
    return cases


def quick_cases() -> list[Case]:
    """~4 minutes on one H100 at --layers 2: issue 21's rows and one training + one generate() case per arch."""
    by = {c.name: c for c in all_cases()}
    names = [c.name for c in issue21_cases() if "B1x512" not in c.name and "autocast-B4" not in c.name]
    names += [f"{a}-real-train-B1x512" for a in ARCH_SHAPES]
    names += [f"{a}-real-generate-B1x512" for a in ("llama", "gpt_neox", "gemma")]
    return [by[n] for n in names]


def smoke_cases() -> list[Case]:
    """Toy sizes for the CPU: every arch, both modes, LoRA and autocast-off, so the script's paths all run."""
    out = []
    for arch in ARCH_SHAPES:
        toy = dict(arch=arch, hidden=64, head_dim=16, kv_heads_div=1 if arch in ("gpt2", "gpt_neox", "phi3") else 2,
                   intermediate=128, vocab=128, rotary_pct=0.25 if arch == "gpt_neox" else 1.0)
        out.append(Case(f"{arch}-toy-train", **toy, batch=1, seq=16, autocast=False))
    out.append(Case("llama-toy-lora", arch="llama", hidden=64, head_dim=16, kv_heads_div=2, intermediate=128,
                    vocab=128, batch=1, seq=16, lora=True, autocast=False))
    out.append(Case("llama-toy-generate", arch="llama", hidden=64, head_dim=16, kv_heads_div=2, intermediate=128,
                    vocab=128, batch=2, seq=8, mode="generate", new_tokens=4))
    return out


def run_cases(cases: list[Case], layers: int, device: str, rounds: int, steps: int, log=print,
              flush=None, profile: bool = False, variants: tuple[Variant, ...] = (),
              sync_audit: bool = False) -> list[dict]:
    """One row per case; ``flush(rows)`` after each (a time limit keeps the rows measured so far)."""
    rows = []
    for c in cases:
        t0 = time.time()
        try:
            row = measure_case(c, layers, device, rounds, steps, profile, variants, sync_audit)
        except torch.OutOfMemoryError as e:
            row = {**asdict(c), "layers": layers, "error": f"out of memory: {str(e)[:200]}"}
        except Exception as e:  # one broken case never hides the others; the row says what broke
            row = {**asdict(c), "layers": layers, "error": f"{type(e).__name__}: {str(e)[:300]}"}
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
        row["secs"] = round(time.time() - t0, 1)
        rows.append(row)
        if "error" in row:
            log(f"{c.name}: ERROR {row['error']}")
        else:
            log(f"{c.name}: sdpa {row['sdpa_ms']:.1f} ms, fastkern {row['fastkern_ms']:.1f} ms, "
                f"ratio {row['ratio']:.3f}, per round {row['round_ratios']} ({row['secs']} s)")
            for name, v in row.get("variants", {}).items():
                log(f"    {name}: {v['ms']:.1f} ms, ratio {v['ratio']:.3f} ({v['vs_fastkern']:.3f}x fastkern), "
                    f"per round {v['round_ratios']}")
            for side, where in row.get("syncs", {}).items():
                log(f"    syncs {side}: {sum(where.values())} {dict(sorted(where.items(), key=lambda x: -x[1])[:6])}")
        if flush is not None:
            flush(rows)
    return rows


def run(quick: bool = False) -> list[dict]:
    """``hf-fastkern bench guard``: the full case list (``quick``: issue 21's rows and one training step and one
    ``generate()`` per architecture) on a GPU; the toy cases when Triton runs in its CPU interpreter."""
    from hf_fastkern.kernels.dispatch import interpret_mode

    from .harness import cannot_run_here

    if torch.cuda.is_available():
        cases = quick_cases() if quick else all_cases()
        return run_cases(cases, 2 if quick else 4, "cuda", 2 if quick else 3, 3 if quick else 5)
    if interpret_mode():
        return run_cases([replace(c, autocast=False) for c in smoke_cases()], 1, "cpu", 1, 1)
    return cannot_run_here("guard", "needs a CUDA GPU, or TRITON_INTERPRET=1 for the toy cases")


def summary(rows: list[dict]) -> dict:
    ok = [r for r in rows if "ratio" in r]
    below = sorted((r["name"], round(r["ratio"], 3)) for r in ok if r["ratio"] < 0.98)
    return {"cases": len(rows), "measured": len(ok), "errors": len(rows) - len(ok),
            "min_ratio": min((r["ratio"] for r in ok), default=None),
            "geomean_ratio": statistics.geometric_mean([r["ratio"] for r in ok]) if ok else None,
            "below_0.98": below}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="JSON file to write")
    ap.add_argument("--quick", action="store_true", help="issue 21's rows + one train/generate per arch")
    ap.add_argument("--cpu-smoke", action="store_true", help="toy sizes on the CPU (checks the script)")
    ap.add_argument("--layers", type=int, default=None, help="decoder layers per model (default 4; quick 2)")
    ap.add_argument("--rounds", type=int, default=None, help="alternating rounds per side (default 3; quick 2)")
    ap.add_argument("--steps", type=int, default=None,
                    help="training steps per round, generate() calls up to 3 (default 5; quick 3)")
    ap.add_argument("--cases", help="comma-separated case names (see --list)")
    ap.add_argument("--list", action="store_true", help="print the case names and exit")
    ap.add_argument("--profile", action="store_true",
                    help="also one torch.profiler step per side and case: top ops by host and device time")
    ap.add_argument("--variant", action="append", default=[], metavar="NAME:VAR=VALUE[,VAR=VALUE]",
                    help="one more patched side per round with these environment variables set (repeatable), "
                         "e.g. async_check:HF_FASTKERN_LABEL_CHECK=async")
    ap.add_argument("--sync-audit", action="store_true",
                    help="count the synchronizing calls of one unit of work per side (CUDA sync debug mode)")
    args = ap.parse_args(argv)
    try:
        variants = tuple(parse_variant(v) for v in args.variant)
    except ValueError as e:
        ap.error(str(e))
    if len({v.name for v in variants}) != len(variants):
        ap.error("variant names must differ")
    if args.cpu_smoke and os.environ.get("TRITON_INTERPRET") != "1":
        # the kernel modules read TRITON_INTERPRET when imported: rerun this script with it set
        import subprocess
        return subprocess.call([sys.executable, "-m", __spec__.name] + (argv if argv is not None else
                                                                              sys.argv[1:]),
                               env=dict(os.environ, TRITON_INTERPRET="1"))
    if args.cpu_smoke:
        cases, device = smoke_cases(), "cpu"
        layers, rounds, steps = args.layers or 1, args.rounds or 1, args.steps or 1
    else:
        cases = quick_cases() if args.quick else all_cases()
        device = "cuda"
        layers = args.layers or (2 if args.quick else 4)
        rounds, steps = args.rounds or (2 if args.quick else 3), args.steps or (3 if args.quick else 5)
    if args.cases:
        pool = {c.name: c for c in all_cases() + smoke_cases()}
        missing = [n for n in args.cases.split(",") if n not in pool]
        if missing:
            ap.error(f"unknown case(s) {missing}; see --list")
        cases = [pool[n] for n in args.cases.split(",")]
    if args.list:
        for c in cases:
            print(c.name)
        return 0
    if device == "cuda" and not torch.cuda.is_available():
        ap.error("the guard benchmark needs a CUDA GPU (or --cpu-smoke)")
    if device == "cpu":
        # tiny CPU runs: no autocast (CPU bf16 matmuls are slow and not what the guard measures)
        cases = [replace(c, autocast=False) for c in cases]
    t0 = time.time()
    env = environment()
    command = "python -m benchmarks.bench_guard " + " ".join(argv if argv is not None else sys.argv[1:])
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)

    def write(rows: list[dict]) -> dict:
        doc = {"env": env, "command": command, "gpu": env.get("gpu") or "cpu",
               "secs": round(time.time() - t0, 1), "summary": summary(rows), "rows": rows}
        with open(args.out, "w") as f:
            json.dump(doc, f, indent=1, default=str)
        return doc
    doc = write(run_cases(cases, layers, device, rounds, steps, flush=write, profile=args.profile, variants=variants,
                          sync_audit=args.sync_audit))
    s = doc["summary"]
    print(f"wrote {args.out}: {s['measured']}/{s['cases']} cases, min ratio {s['min_ratio']}, "
          f"below 0.98: {s['below_0.98']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
