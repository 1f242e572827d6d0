"""Supervised fine-tuning with TRL's SFTTrainer and hf_fastkern: one callback, ``hf_fastkern.FastKernels()``.

CPU (default): a toy random-init Llama, an in-memory word-level tokenizer and ragged synthetic rows, no downloads:
    python examples/sft_trl.py --steps 10
    python examples/sft_trl.py --steps 10 --padding-free --peft
    python examples/sft_trl.py --steps 10 --compare --json sft_cmp.json   # patched vs the same run without
GPU, a real checkpoint (bf16 autocast, padding-free packed batches through the varlen attention kernel):
    python examples/sft_trl.py --model /path/to/llama --steps 100 --seq 2048 --batch 8 --padding-free

What the callback does: at ``on_train_begin`` (after SFTTrainer has wrapped the model with PEFT for
``--peft`` and turned gradient checkpointing on) it calls ``apply_fast_kernels`` on the model that trains and
prints the report (LoRA layers fused included). ``--padding-free`` sets ``SFTConfig(padding_free=True)``: each
batch is one packed row with ``position_ids`` and ``cu_seq_lens_*``, which our attention runs as varlen.
The loss is TRL's fused LM head (``FastKernels(lm_head="fastkern")`` would put ours there; docs/trl.md).
"""
from __future__ import annotations

import argparse
import tempfile
import time

import torch
from datasets import Dataset

# examples/ is on sys.path when a script in it runs, so the shared helpers import by name.
from finetune_trainer import LossRecorder, build_model, common_args, exit_if_distributed, run_or_compare
from peft import LoraConfig
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerFast
from trl import SFTConfig, SFTTrainer

from hf_fastkern import FastKernels

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
WARMUP_STEPS = 3  # excluded from the steady-state tokens/s (autotuning, allocator warm-up)


def toy_tokenizer(vocab: int) -> PreTrainedTokenizerFast:
    """Word-level tokenizer over 't0' ... 't<vocab-1>' (the id is the number), built in memory."""
    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t1"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="t0", unk_token="t1", eos_token="t2")


def ragged_rows(n: int, max_len: int, hi: int, seed: int) -> list[dict]:
    """Pre-tokenized rows of lengths in [max_len / 4, max_len], each repeating a short motif (learnable)."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        length = int(torch.randint(max(2, max_len // 4), max_len + 1, (1,), generator=g))
        motif = torch.randint(3, hi, (int(torch.randint(2, 6, (1,), generator=g)),), generator=g)
        rows.append({"input_ids": motif.repeat(length // len(motif) + 1)[:length].tolist()})
    return rows


class TokenClock(LossRecorder):
    """LossRecorder plus TRL's running count of real (non-padding) training tokens at every log."""

    def __init__(self) -> None:
        super().__init__()
        self.tokens: list[float] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        super().on_log(args, state, control, logs=logs, **kwargs)
        if logs and "num_tokens" in logs:
            self.tokens.append(float(logs["num_tokens"]))


def train_sft(args: argparse.Namespace) -> dict:
    cuda = torch.cuda.is_available()
    model = build_model(args)
    vocab = model.config.vocab_size
    tok = AutoTokenizer.from_pretrained(args.model) if args.model else toy_tokenizer(vocab)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    rows = ragged_rows(args.batch * args.steps, args.seq, args.token_range or vocab, args.seed)
    fk = None if args.no_patch else FastKernels()
    clock = TokenClock()
    cfg = SFTConfig(
        output_dir=tempfile.mkdtemp(prefix="fastkern_sft_"), max_steps=args.steps, per_device_train_batch_size=args.batch,
        learning_rate=args.lr, lr_scheduler_type="constant", warmup_steps=0, logging_steps=1, report_to=[],
        seed=args.seed, data_seed=args.seed, save_strategy="no", bf16=cuda, use_cpu=not cuda,
        gradient_checkpointing=args.gradient_checkpointing or args.peft, disable_tqdm=True,
        padding_free=args.padding_free, max_length=None if args.padding_free else args.seq,
        dataloader_num_workers=0)
    torch.manual_seed(args.seed + 1)  # the adapters' init: the same in the patched and the unpatched process
    peft_config = LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0, target_modules=TARGETS,
                             task_type="CAUSAL_LM") if args.peft else None
    trainer = SFTTrainer(model=model, args=cfg, train_dataset=Dataset.from_list(rows), processing_class=tok,
                         peft_config=peft_config, callbacks=[clock] + ([fk] if fk else []))
    label = "unpatched" if args.no_patch else "patched"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - t0
    if fk is not None and args.peft and fk.report.count("lora_linear") == 0:
        raise SystemExit(f"no LoRA layer was fused:\n{fk.report}")
    tokens = clock.tokens[-1] if clock.tokens else float("nan")
    steady = None
    if len(clock.step_ends) > WARMUP_STEPS + 1 and len(clock.tokens) == len(clock.step_ends):
        steady = ((clock.tokens[-1] - clock.tokens[WARMUP_STEPS])
                  / (clock.step_ends[-1] - clock.step_ends[WARMUP_STEPS]))
    print(f"[{label}] losses: " + " ".join(f"{x:.4f}" for x in clock.losses), flush=True)
    return {"label": label, "losses": clock.losses, "seconds": seconds, "real_tokens": tokens,
            "tokens_per_s": tokens / seconds, "tokens_per_s_steady": steady, "warmup_steps_excluded": WARMUP_STEPS,
            "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
            "padding_free": args.padding_free, "peft": args.peft,
            "lora_fused": fk.report.count("lora_linear") if fk is not None else 0}


def main() -> None:
    p = common_args(argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter))
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--padding-free", action="store_true", help="SFTConfig(padding_free=True): one packed row")
    p.add_argument("--peft", action="store_true", help="LoRA on every projection through SFTTrainer's peft_config")
    p.add_argument("--rank", type=int, default=8)
    args = p.parse_args()
    args.seq = args.seq or (32 if args.size == "toy" and not args.model else 1024)
    run_or_compare(args, train_sft, __file__)


if __name__ == "__main__":
    main()
    exit_if_distributed()
