"""Fine-tune a causal LM with transformers' Trainer, patched by hf_fastkern.

CPU (default): a toy random-init Llama and a synthetic dataset, a few seconds, no downloads:
    python examples/finetune_trainer.py --steps 10
GPU, a real checkpoint:
    python examples/finetune_trainer.py --model /path/to/llama --steps 200 --seq 2048 --batch 4
GPU, convergence check of a random-init 1B-class Llama, patched vs unpatched (same seed and data, run one
after the other in two subprocesses), both loss curves written to JSON:
    python examples/finetune_trainer.py --size 1b --steps 200 --compare --json out/convergence.json

The data is synthetic but learnable (each row repeats a short random motif), so the loss falls from ln(vocab).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

import torch
import transformers
from transformers import (
    DataCollatorWithFlattening,
    LlamaConfig,
    LlamaForCausalLM,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    default_data_collator,
)

# Random-init model shapes. "1b" is Llama-3.2-1B's shape (tied embeddings, ~1.24B parameters).
SIZES = {
    "toy": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=256),
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True, rope_theta=500000.0),
    # Llama-3.1-8B's shape (issue 12's LoRA scenario); built in bf16 (--dtype bf16): fp32 would need 32 GB
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False, rope_theta=500000.0),
}


WARMUP_STEPS = 10  # excluded from the steady-state tokens/s (autotuning, compilation, allocator warm-up)


def build_model(args: argparse.Namespace) -> torch.nn.Module:
    """A pretrained checkpoint (``--model``) or a random-init Llama of ``--size``, on the target device."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.model:
        return transformers.AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).to(device)
    torch.manual_seed(args.seed)
    config = LlamaConfig(**SIZES[args.size], max_position_embeddings=max(args.seq, 64), pad_token_id=0,
                         bos_token_id=1, eos_token_id=2)
    # Initialise directly on the device: a 1B model initialised on the CPU takes longer than its training run.
    dtype = torch.bfloat16 if getattr(args, "dtype", "fp32") == "bf16" else torch.float32
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            return LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default)


def motif_dataset(n: int, seq: int, vocab: int, seed: int = 0, ragged: bool = False,
                  token_range: int | None = None) -> list[dict]:
    """Rows that repeat a random 2-16 token motif: learnable (copying), no download, same for every run.

    ``token_range``: motif tokens are drawn from ``[3, token_range)`` (default: the whole vocabulary). A 1B
    model needs more than 200 steps to learn copying over 128K random tokens, and without a falling loss a
    patched-vs-unpatched comparison only compares noise; a 1K-token range gives a clear descending curve
    (unigram statistics first, then copying)."""
    g = torch.Generator().manual_seed(seed)
    hi = min(vocab, token_range) if token_range else vocab
    rows = []
    for _ in range(n):
        length = int(torch.randint(seq // 2, seq + 1, (1,), generator=g)) if ragged else seq
        motif = torch.randint(3, hi, (int(torch.randint(2, 17, (1,), generator=g)),), generator=g)
        ids = motif.repeat(length // len(motif) + 1)[:length].tolist()
        rows.append({"input_ids": ids, "labels": list(ids)})
    return rows


def environment() -> dict:
    import accelerate
    import peft
    import triton

    return {
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "python": platform.python_version(), "torch": torch.__version__, "triton": triton.__version__,
        "transformers": transformers.__version__, "accelerate": accelerate.__version__, "peft": peft.__version__,
        "command": " ".join([sys.executable, *sys.argv]),
    }


class LossRecorder(TrainerCallback):
    """Keeps the loss the Trainer logs at every optimizer step, and the wall time of every step end."""

    def __init__(self) -> None:
        self.losses: list[float] = []
        self.step_ends: list[float] = []

    def on_step_end(self, args, state, control, **kwargs):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.step_ends.append(time.perf_counter())

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.losses.append(float(logs["loss"]))


class StepProfiler(TrainerCallback):
    """torch.profiler over optimizer steps [start, stop): prints the host (self CPU) and GPU time per step and
    the top ops by each, to see where a host-bound step goes."""

    def __init__(self, start: int, stop: int, top: int = 25) -> None:
        self.start, self.stop, self.top = start, stop, top
        self.prof = None

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == self.start and self.prof is None:
            acts = [torch.profiler.ProfilerActivity.CPU]
            if torch.cuda.is_available():
                acts.append(torch.profiler.ProfilerActivity.CUDA)
            self.prof = torch.profiler.profile(activities=acts)
            self.prof.__enter__()
            self.t0 = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if self.prof is None or state.global_step < self.stop:
            return
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        wall_ms = (time.perf_counter() - self.t0) / (self.stop - self.start) * 1e3
        prof, self.prof = self.prof, None
        prof.__exit__(None, None, None)
        n = self.stop - self.start
        ev = prof.key_averages()
        cpu_ms = sum(e.self_cpu_time_total for e in ev) / n / 1e3
        gpu_ms = sum(e.self_device_time_total for e in ev) / n / 1e3
        print(f"[profile] steps {self.start}-{self.stop}: wall {wall_ms:.1f} ms/step (profiled), self CPU {cpu_ms:.1f} ms/step, GPU {gpu_ms:.1f} ms/step")
        print(ev.table(sort_by="self_cpu_time_total", row_limit=self.top, max_name_column_width=60))
        print(ev.table(sort_by="self_device_time_total", row_limit=self.top, max_name_column_width=60), flush=True)


def patch(model: torch.nn.Module, enabled: bool) -> str:
    if not enabled:
        return "unpatched"
    from hf_fastkern import apply_fast_kernels

    report = apply_fast_kernels(model)
    print(report, flush=True)
    return "patched"


def train(args: argparse.Namespace) -> dict:
    cuda = torch.cuda.is_available()
    model = build_model(args)
    label = patch(model, not args.no_patch)
    data = motif_dataset(args.batch * args.accum * args.steps, args.seq, model.config.vocab_size, args.seed,
                         ragged=args.packing, token_range=args.token_range)
    bf16 = cuda and not args.no_bf16
    targs = TrainingArguments(
        output_dir=tempfile.mkdtemp(prefix="fastkern_trainer_"), max_steps=args.steps,
        per_device_train_batch_size=args.batch, gradient_accumulation_steps=args.accum, learning_rate=args.lr,
        lr_scheduler_type="constant_with_warmup", weight_decay=0.0,
        warmup_steps=args.warmup_steps if args.warmup_steps is not None else min(10, args.steps // 10),
        logging_steps=1, report_to=[], seed=args.seed, data_seed=args.seed, save_strategy="no",
        bf16=bf16, gradient_checkpointing=args.gradient_checkpointing, use_cpu=not cuda,
        optim="adamw_torch_fused" if cuda else "adamw_torch", dataloader_num_workers=0, disable_tqdm=True,
        remove_unused_columns=False)
    recorder = LossRecorder()
    collator = DataCollatorWithFlattening() if args.packing else default_data_collator
    callbacks = [recorder]
    if args.profile_steps:
        callbacks.append(StepProfiler(*(int(x) for x in args.profile_steps.split(","))))
    trainer = Trainer(model=model, args=targs, train_dataset=data, data_collator=collator, callbacks=callbacks)
    return timed_train(trainer, recorder, args, label)


def timed_train(trainer: Trainer, recorder: LossRecorder, args: argparse.Namespace, label: str) -> dict:
    """``trainer.train()`` with wall time, steady-state tokens/s and peak GPU memory: one run's result."""
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
    accum = getattr(args, "accum", 1)
    tokens = args.steps * args.batch * accum * args.seq
    print(f"[{label}] losses: " + " ".join(f"{x:.4f}" for x in recorder.losses), flush=True)
    # Steady state: the steps after the first WARMUP_STEPS (which include Triton autotuning and compilation).
    ends = recorder.step_ends
    steady = None
    if len(ends) > WARMUP_STEPS + 1:
        n = len(ends) - 1 - WARMUP_STEPS
        steady = n * args.batch * accum * args.seq / (ends[-1] - ends[WARMUP_STEPS])
    return {"label": label, "losses": recorder.losses, "seconds": seconds, "tokens_per_s": tokens / seconds,
            "tokens_per_s_steady": steady, "warmup_steps_excluded": WARMUP_STEPS, "peak_memory_gib": peak}


def compare(args: argparse.Namespace, script: str = __file__) -> dict:
    """Run ``script`` patched and unpatched in two fresh processes (same seed, same data), compare the curves."""
    runs = {}
    for label, extra in (("unpatched", ["--no-patch"]), ("patched", [])):
        with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
            path = f.name
        argv = [a for a in sys.argv[1:] if a not in ("--compare", "--no-patch")]
        if "--json" in argv:
            i = argv.index("--json")
            del argv[i:i + 2]
        subprocess.run([sys.executable, os.path.abspath(script), *argv, *extra, "--json", path], check=True)
        with open(path) as f:
            runs[label] = json.load(f)["run"]
        os.unlink(path)
    a = torch.tensor(runs["patched"]["losses"], dtype=torch.float64)
    b = torch.tensor(runs["unpatched"]["losses"], dtype=torch.float64)
    n = min(len(a), len(b))
    rel = ((a[:n] - b[:n]).abs() / b[:n].abs())
    # Per-step losses carry batch-to-batch noise in both runs alike; the 10-step moving average is the curve.
    k = min(10, n)
    sa, sb = a[:n].unfold(0, k, 1).mean(-1), b[:n].unfold(0, k, 1).mean(-1)
    rel_smooth = ((sa - sb).abs() / sb.abs())
    return {
        "unpatched": runs["unpatched"], "patched": runs["patched"],
        "max_rel_diff": rel.max().item(), "mean_rel_diff": rel.mean().item(),
        "max_rel_diff_smoothed10": rel_smooth.max().item(),
        "final_loss": {"patched": a[-1].item(), "unpatched": b[-1].item()},
        "within_1pct": bool(rel_smooth.max().item() <= 0.01),
        "speedup_whole_run": runs["patched"]["tokens_per_s"] / runs["unpatched"]["tokens_per_s"],
        "speedup": (runs["patched"]["tokens_per_s_steady"] / runs["unpatched"]["tokens_per_s_steady"]
                    if runs["patched"].get("tokens_per_s_steady") and runs["unpatched"].get("tokens_per_s_steady")
                    else runs["patched"]["tokens_per_s"] / runs["unpatched"]["tokens_per_s"]),
    }


def common_args(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The arguments finetune_trainer.py and finetune_lora.py share (model, data, comparison, output)."""
    p.add_argument("--model", help="path or hub id of a pretrained causal LM (default: random-init Llama)")
    p.add_argument("--size", choices=sorted(SIZES), default="toy", help="random-init model size")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32",
                   help="weights of the random-init model (bf16 for --size 8b: fp32 needs 32 GB)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--seq", type=int, default=None, help="sequence length (toy: 32, otherwise 1024)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--token-range", type=int, default=None,
                   help="motif tokens from [3, N) (default: the whole vocabulary for toy, 1024 otherwise)")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--no-patch", action="store_true", help="train the unpatched model (the baseline)")
    p.add_argument("--compare", action="store_true", help="run unpatched and patched, compare the loss curves")
    p.add_argument("--json", help="write results (losses, timing, environment) to this file")
    return p


def main() -> None:
    p = common_args(argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter))
    p.add_argument("--batch", type=int, default=None, help="per-device batch (toy: 4, otherwise 4)")
    p.add_argument("--accum", type=int, default=1, help="gradient accumulation steps")
    p.add_argument("--lr", type=float, default=None, help="learning rate (toy: 1e-3, otherwise 3e-4)")
    p.add_argument("--warmup-steps", type=int, default=None, help="linear lr warm-up (default: steps // 10, <= 10)")
    p.add_argument("--profile-steps", default=None, metavar="START,STOP",
                   help="torch.profiler over these optimizer steps: host and GPU time per step, top ops")
    p.add_argument("--packing", action="store_true", help="ragged rows packed by DataCollatorWithFlattening")
    p.add_argument("--no-bf16", action="store_true", help="fp32 training on the GPU")
    args = p.parse_args()
    toy = args.size == "toy" and not args.model
    args.seq = args.seq or (32 if toy else 1024)
    args.batch = args.batch or 4
    args.lr = args.lr or (1e-3 if toy else 3e-4)
    args.token_range = args.token_range or (None if toy else 1024)

    run_or_compare(args, train, __file__)


def exit_if_distributed(code: int = 0) -> None:
    """In a process of a multi-process launch (torchrun / accelerate launch), end it here, skipping the
    interpreter's shutdown; elsewhere return.

    Why: with gloo (multi-process on the CPU) a ProcessGroupGloo worker thread may still be releasing the last
    collective's work after the main thread has moved on (even past ``destroy_process_group``); releasing it
    decrefs Python tensors, which needs the GIL, and a thread that asks for the GIL while the interpreter shuts
    down is ended by ``pthread_exit`` inside a noexcept destructor: ``terminate called without an active
    exception``, SIGABRT, a failed launch after a finished run. Seen in about 1 of 50 runs on 2 busy cores (core
    dump: ``ProcessGroupGloo::runLoop`` -> ``~AsyncBarrierWork`` -> ``~AsyncAllgatherWork`` -> ``decref_pyobject``
    -> ``take_gil`` -> ``PyThread_exit_thread``, main thread in ``Py_FinalizeEx``; the same analysis in an
    unmerged upstream PR, pytorch/pytorch#179291). Only after a run that returned normally: a failure raises
    before this and exits non-zero. What is skipped: atexit handlers (logging.shutdown, coverage data, a
    tracker's final upload) and C-level stdio buffers; the examples write their JSON with ``with open`` and
    print with ``flush=True`` before this."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def run_or_compare(args: argparse.Namespace, train_fn, script: str) -> dict:
    """``--compare``: ``script`` patched vs unpatched in two processes; else one ``train_fn(args)`` run. Prints a
    summary line and writes ``--json`` (losses, timing, environment). Shared by finetune_lora.py."""
    if args.compare:
        result = compare(args, script)
        print(f"summary: {args.steps} steps, max rel diff {result['max_rel_diff']:.4f} per step, "
              f"{result['max_rel_diff_smoothed10']:.4f} smoothed (within 1%: {result['within_1pct']}), "
              f"final loss patched {result['final_loss']['patched']:.4f} / unpatched "
              f"{result['final_loss']['unpatched']:.4f}, speedup {result['speedup']:.2f}x (steady state, after "
              f"{WARMUP_STEPS} steps; whole run {result['speedup_whole_run']:.2f}x)")
    else:
        run = train_fn(args)
        result = {"run": run}
        print(f"summary: [{run['label']}] {args.steps} steps, loss {run['losses'][0]:.4f} -> "
              f"{run['losses'][-1]:.4f}, {run['tokens_per_s']:.0f} tokens/s"
              + (f", peak {run['peak_memory_gib']:.2f} GiB" if run["peak_memory_gib"] else ""))
    if args.json:
        result["environment"] = environment()
        result["args"] = vars(args)
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
    exit_if_distributed()
