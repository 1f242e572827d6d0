"""Supervised fine-tuning through TRL's SFTTrainer: padded vs packed, HF vs Liger vs fastkern (issue 24).

Data: a seeded synthetic instruction set (``synthetic_sft``). Sequence lengths are lognormal with median 500
tokens (mu = ln 500) and sigma 0.8, clipped to [32, 4096]: the shape of public instruction-tuning mixes
(most conversations a few hundred tokens, a tail of long ones); sigma 0.8 puts the 90th percentile near 1,400
and about 1% of rows at the 4,096 cap. The first 30% of each row (at least 8 tokens) is the prompt, labelled
-100 (completion-only loss, as SFTTrainer does for prompt/completion data); token ids are uniform over
[3, vocab). Every variant reads the same rows in the same order (SFTTrainer's seeded sampler, ``--batch`` rows
per optimizer step), so every step has the same token budget; only how the batch is laid out differs.

Variants (one subprocess each, all through ``SFTTrainer`` as users run it, bf16 autocast, AdamW fused):
  sdpa_padded            attn_implementation="sdpa", rows padded to the longest in the batch
  sdpa_liger_padded      the same + ``SFTConfig(use_liger_kernel=True)`` (TRL keeps its own fused LM head and
                         applies Liger's norm/SwiGLU/RoPE kernels); skipped when liger_kernel is not importable
  sdpa_packed            sdpa + ``padding_free=True``: one packed row with position_ids; transformers turns the
                         packed position_ids into a block-diagonal mask for SDPA
  fastkern_padded        attn_implementation="fastkern" + ``callbacks=[FastKernels()]``, padded rows
  fastkern_padding_free  the same + ``padding_free=True`` (our varlen attention kernel)
Models: ``--model 1.5b`` random-init Llama-3-style 1.5B (hidden 2048, 16 layers, 32/8 heads, intermediate
8192, vocab 128256), full fine-tune, fp32 master weights; ``--model 8b-lora``: the Llama-3.1-8B shape in bf16,
LoRA r16 alpha 32 on every projection through ``peft_config``, gradient checkpointing. ``--layers N`` cuts the
layer count so a run fits the device's 10-minute limit (the per-token cost scales with it; say so when quoting).
Measured: ``--warmup`` steps, then ``--steps`` timed steps (wall clock between ``cuda.synchronize`` at step
ends). real_tok_per_s = non-padding tokens of the timed steps / their time (TRL's ``num_tokens``): it includes
what a shape seen for the first time costs (cuDNN plans, allocator growth, Triton autotuning of a new bucket),
which a long run pays once; median_tok_per_s = the median over timed steps of that step's real tokens / its time
(the steady state, needs ``--warmup`` >= 1; ``step_ms_each`` lists every step's time); peak_GiB =
``max_memory_allocated`` over the run. Gate: the first step's loss within 1% of sdpa_padded's (same weights,
same rows). Without CUDA: a tiny model, short rows (median 24, cap 64), fp32, the same five variants: a
harness smoke run, not a measurement.

    python -m benchmarks.bench_sft --model 1.5b --json $OUT/sft_1p5b.json
    python -m benchmarks.bench_sft --model 8b-lora --layers 8 --json $OUT/sft_8b_lora.json
    hf-fastkern bench sft
"""
from __future__ import annotations

import argparse
import math
import statistics
import subprocess
import sys
import tempfile
import time

import torch
from transformers import TrainerCallback

from .harness import emit_result, environment, print_table, save, summarize_profile, worker_result

VARIANTS = ("sdpa_padded", "sdpa_liger_padded", "sdpa_packed", "fastkern_padded", "fastkern_padding_free")
MODELS = {
    "1.5b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                 num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0, tie_word_embeddings=False),
    "8b-lora": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                    num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0, tie_word_embeddings=False),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=256, tie_word_embeddings=False),
}
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# lognormal lengths (see the module docstring)
LENGTHS = dict(median=500, sigma=0.8, lo=32, hi=4096)
CPU_LENGTHS = dict(median=24, sigma=0.8, lo=8, hi=64)
PROMPT_FRACTION = 0.3
DEFAULT_BATCH = {"1.5b": 4, "8b-lora": 8}
GATE_LOSS_REL = 0.01
COLS = ["model", "impl", "layers", "batch", "steps", "step_ms", "real_tok_per_s", "median_tok_per_s", "pad_frac",
        "peak_GiB", "loss0", "loss_rel_err", "gate", "vs_sdpa_padded", "median_vs_sdpa_padded", "vs_sdpa_liger_padded",
        "vs_sdpa_packed", "mem_vs_sdpa_padded", "error"]


def synthetic_sft(n: int, vocab: int, median: int, sigma: float, lo: int, hi: int, seed: int = 0) -> list[dict]:
    """``n`` pre-tokenized rows {input_ids, labels}: lognormal lengths clipped to [lo, hi], prompt labelled -100."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.exp(math.log(median) + sigma * torch.randn(n, generator=g)).round().clamp(lo, hi).long()
    rows = []
    for n_tok in lengths.tolist():
        ids = torch.randint(3, vocab, (n_tok,), generator=g).tolist()
        prompt = max(8, int(PROMPT_FRACTION * n_tok)) if n_tok > 16 else n_tok // 2
        rows.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return rows


def _tokenizer(vocab: int):
    """A word-level tokenizer built in memory (the rows are pre-tokenized; SFTTrainer needs pad/eos ids)."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t1"))
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="t0", unk_token="t1", eos_token="t2")


class StepClock(TrainerCallback):
    """Wall time at every step end (after a device sync), TRL's running token count and the loss at every log;
    ``profile_step`` (1-based): that step runs under torch.profiler (``self.profile``: GPU ms by kernel class, the
    top kernels and the top host ops)."""

    def __init__(self, profile_step: int | None = None):
        self.ends, self.tokens, self.losses = [], [], []
        self.profile_step, self.profile, self._prof = profile_step, None, None

    def on_step_begin(self, args, state, control, **kwargs):
        if self.profile_step is not None and state.global_step + 1 == self.profile_step:
            acts = [torch.profiler.ProfilerActivity.CPU]
            if torch.cuda.is_available():
                acts.append(torch.profiler.ProfilerActivity.CUDA)
            self._prof = torch.profiler.profile(activities=acts)
            self._prof.__enter__()

    def on_step_end(self, args, state, control, **kwargs):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.ends.append(time.perf_counter())
        if self._prof is not None:
            self._prof.__exit__(None, None, None)
            self.profile = summarize_profile(self._prof, top=20, host=True)
            self._prof = None


    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "num_tokens" in logs:
            self.tokens.append(float(logs["num_tokens"]))
        if logs and "loss" in logs:
            self.losses.append(float(logs["loss"]))


def pad_fraction(trainer, n_batches: int) -> float:
    """Share of the computed positions that are padding over the first ``n_batches`` batches (the trainer's
    own seeded dataloader, so the same batches it trains on)."""
    real = total = 0
    for i, b in enumerate(trainer.get_train_dataloader()):
        if i == n_batches:
            break
        mask = b.get("attention_mask")
        real += int(mask.sum()) if mask is not None else b["input_ids"].numel()
        total += b["input_ids"].numel()
    return 1 - real / max(1, total)


def worker(variant: str, model_name: str, layers: int | None, batch: int, steps: int, warmup: int,
           profile: bool = False) -> dict:
    """One variant in this process: build, train ``warmup + steps`` steps, return its row."""
    from datasets import Dataset
    from transformers import LlamaConfig, LlamaForCausalLM
    from trl import SFTConfig, SFTTrainer

    cuda = torch.cuda.is_available()
    dev = "cuda" if cuda else "cpu"
    cfg_kwargs = dict(MODELS["tiny" if not cuda else model_name])
    if layers and cuda:
        cfg_kwargs["num_hidden_layers"] = layers
    row = dict(bench="sft", model=model_name if cuda else "tiny(cpu)", impl=variant, batch=batch, steps=steps,
               layers=cfg_kwargs["num_hidden_layers"])
    liger = variant == "sdpa_liger_padded"
    if liger:
        try:
            import liger_kernel  # noqa: F401
        except ImportError as e:
            return {**row, "error": f"liger_kernel not importable: {e}"}
    fastkern = variant.startswith("fastkern")
    callbacks = []
    if fastkern:
        from hf_fastkern import FastKernels

        callbacks.append(FastKernels(verbose=False))
    lora = model_name == "8b-lora"
    torch.manual_seed(0)
    config = LlamaConfig(**cfg_kwargs, max_position_embeddings=8192,
                         attn_implementation="fastkern" if fastkern else "sdpa", use_cache=False)
    default = torch.get_default_dtype()
    # 8B: bf16 weights (an fp32 build would need 32 GB first); 1.5B full FT: fp32 master weights + bf16 autocast
    torch.set_default_dtype(torch.bfloat16 if lora and cuda else torch.float32)
    try:
        with torch.device(dev):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    peft_config = None
    if lora:
        from peft import LoraConfig

        peft_config = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=LORA_TARGETS,
                                 task_type="CAUSAL_LM")
    lengths = LENGTHS if cuda else CPU_LENGTHS
    rows = synthetic_sft(batch * (steps + warmup + int(profile)), cfg_kwargs["vocab_size"], **lengths)
    padding_free = variant.endswith(("packed", "padding_free"))
    clock = StepClock(profile_step=warmup + steps + 1 if profile else None)
    args = SFTConfig(
        output_dir=tempfile.mkdtemp(prefix="bench_sft_"), max_steps=steps + warmup + int(profile),
        per_device_train_batch_size=batch,
        learning_rate=1e-5, lr_scheduler_type="constant", warmup_steps=0, logging_steps=1, report_to=[], seed=0,
        data_seed=0, save_strategy="no", bf16=cuda, use_cpu=not cuda, optim="adamw_torch_fused" if cuda else
        "adamw_torch", gradient_checkpointing=lora, gradient_checkpointing_kwargs={"use_reentrant": False},
        padding_free=padding_free, max_length=None, use_liger_kernel=liger, disable_tqdm=True,
        dataloader_num_workers=0)
    torch.manual_seed(1)  # the adapters' init, the same in every variant
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows),
                         processing_class=_tokenizer(cfg_kwargs["vocab_size"]), peft_config=peft_config,
                         callbacks=[clock, *callbacks])
    pad_frac = pad_fraction(trainer, steps + warmup)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    try:
        trainer.train()
    except torch.OutOfMemoryError as e:
        return {**row, "error": f"OOM: {str(e)[:200]}"}
    # the profiled step (one after the timed ones) is not timed
    clock.ends, clock.tokens = clock.ends[:warmup + steps], clock.tokens[:warmup + steps]
    n = len(clock.ends)
    timed_tokens = clock.tokens[-1] - clock.tokens[warmup - 1] if warmup else clock.tokens[-1]
    seconds = clock.ends[-1] - clock.ends[warmup - 1] if warmup else clock.ends[-1] - clock.ends[0]
    real_per_step = [b - a for a, b in zip([0.0, *clock.tokens[:-1]], clock.tokens)][warmup:]
    row.update(step_ms=seconds / max(1, n - warmup) * 1e3, real_tok_per_s=timed_tokens / seconds,
               real_tokens_per_step=sum(real_per_step) / max(1, len(real_per_step)),
               step_ms_each=[round((b - a) * 1e3, 1) for a, b in zip(clock.ends, clock.ends[1:])],
               median_tok_per_s=statistics.median(
                   t / (b - a) for t, a, b in zip(real_per_step, clock.ends[warmup - 1:], clock.ends[warmup:]))
               if warmup else None,
               pad_frac=pad_frac,
               peak_GiB=torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
               loss0=clock.losses[0] if clock.losses else None)
    if clock.profile is not None:
        row["profile"] = clock.profile
    if fastkern:
        row["patch_report"] = str(callbacks[0].report)[:600]
    return row


def add_sft_ratios(rows: list[dict]) -> None:
    by = {r["impl"]: r for r in rows if not r.get("error")}
    for r in rows:
        if r.get("error"):
            continue
        for peer in ("sdpa_padded", "sdpa_liger_padded", "sdpa_packed"):
            if peer in by and r["impl"] != peer:
                r[f"vs_{peer}"] = r["real_tok_per_s"] / by[peer]["real_tok_per_s"]
                if r.get("median_tok_per_s") and by[peer].get("median_tok_per_s"):
                    r[f"median_vs_{peer}"] = r["median_tok_per_s"] / by[peer]["median_tok_per_s"]
        base = by.get("sdpa_padded")
        if base and r.get("peak_GiB") and base.get("peak_GiB"):
            r["mem_vs_sdpa_padded"] = r["peak_GiB"] / base["peak_GiB"]
        if base and base.get("loss0") and r.get("loss0") is not None:
            r["loss_rel_err"] = abs(r["loss0"] - base["loss0"]) / abs(base["loss0"])
            r["gate"] = r["loss_rel_err"] <= GATE_LOSS_REL


def _spawn(variant: str, args: argparse.Namespace) -> dict:
    args.batch = args.batch or DEFAULT_BATCH[args.model]
    cmd = [sys.executable, "-m", __spec__.name, "--worker", variant, "--model", args.model, "--batch",
           str(args.batch), "--steps", str(args.steps), "--warmup", str(args.warmup)]
    if args.layers:
        cmd += ["--layers", str(args.layers)]
    if args.profile:
        cmd.append("--profile")
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return dict(bench="sft", model=args.model, impl=variant, error=f"timed out after {args.timeout}s")
    res = worker_result(r.stdout)
    if res is not None:
        return res
    tail = (r.stderr or r.stdout).strip().splitlines()[-3:]
    return dict(bench="sft", model=args.model, impl=variant, error=" | ".join(tail)[-400:] or f"rc={r.returncode}")


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", help="write rows + environment + command here")
    ap.add_argument("--model", choices=["1.5b", "8b-lora"], default="1.5b")
    ap.add_argument("--layers", type=int, default=None, help="decoder layers (default: the model's own)")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--batch", type=int, default=None,
                    help="rows per optimizer step, the same for every variant (default: 4 for 1.5b, which trains "
                         "without checkpointing and must fit 4 padded rows of up to 4096; 8 for 8b-lora)")
    ap.add_argument("--steps", type=int, default=6, help="timed steps")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=300, help="seconds per variant subprocess")
    ap.add_argument("--profile", action="store_true",
                    help="one more step after the timed ones, under torch.profiler: the row gains a 'profile' "
                         "summary (GPU ms by kernel class, top kernels, top host ops)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    return ap


def run(quick: bool = False, model: str = "1.5b", layers: int | None = None) -> list[dict]:
    """Rows for every variant (one subprocess each). ``quick``: 1 warm-up + 3 timed steps; 8 layers."""
    argv = ["--model", model]
    if quick:
        argv += ["--steps", "3", "--warmup", "1", "--layers", str(layers or 8)]
    elif layers:
        argv += ["--layers", str(layers)]
    if not torch.cuda.is_available():
        argv += ["--steps", "2", "--warmup", "1", "--batch", "4"]
    args = _parser().parse_args(argv)
    rows = [_spawn(v, args) for v in VARIANTS]
    add_sft_ratios(rows)
    return rows


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.worker:
        emit_result(worker(args.worker, args.model, args.layers, args.batch, args.steps, args.warmup,
                           args.profile))
        return 0
    if not torch.cuda.is_available():
        print("no CUDA device: a tiny CPU smoke run of the harness; numbers need a GPU")
    extra = {"method": __doc__.split("Variants")[0].strip(), "lengths": LENGTHS, "prompt_fraction": PROMPT_FRACTION}
    if not torch.cuda.is_available():
        extra["note"] = "no GPU: tiny CPU smoke run"
    rows = []
    for v in filter(None, args.variants.split(",")):
        if v not in VARIANTS:
            raise SystemExit(f"unknown variant {v!r}: choose from {', '.join(VARIANTS)}")
        rows.append(_spawn(v, args))
        print_table(rows[-1:], COLS)
        add_sft_ratios(rows)
        save(args.json, rows, extra)  # after each variant: a time limit keeps the rows measured so far
    print()
    print_table(rows, COLS)
    print("environment:", environment())
    return 0


if __name__ == "__main__":
    sys.exit(main())
