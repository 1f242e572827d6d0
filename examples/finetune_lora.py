"""PEFT LoRA fine-tuning of a patched model with transformers' Trainer.

CPU (default): toy random-init Llama, synthetic data, a few seconds:
    python examples/finetune_lora.py --steps 10
GPU, a real checkpoint (add --qlora for a 4-bit base through bitsandbytes, when installed):
    python examples/finetune_lora.py --model /path/to/llama --steps 100 --seq 2048 --batch 4
GPU, issue 12's scenario as a loss curve: random-init Llama-3.1-8B shape in bf16, LoRA r=16 on every
projection, gradient checkpointing, patched vs HF + PEFT in two processes, curves compared step by step:
    python examples/finetune_lora.py --size 8b --dtype bf16 --rank 16 --steps 100 --seq 2048 --batch 4 \\
        --lr 1e-4 --gradient-checkpointing --compare --json lora_curve.json

hf_fastkern is applied after ``get_peft_model`` here (before works too): the patched MLP forwards call the
LoRA-wrapped projections, so only the adapters train. The script checks that the base weights did not move.
"""
from __future__ import annotations

import argparse
import tempfile

import torch

# examples/ is on sys.path when a script in it runs, so the shared helpers import by name.
from finetune_trainer import (
    LossRecorder,
    build_model,
    common_args,
    exit_if_distributed,
    motif_dataset,
    patch,
    run_or_compare,
    timed_train,
)
from peft import LoraConfig, get_peft_model
from transformers import Trainer, TrainingArguments, default_data_collator

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def train_lora(args: argparse.Namespace) -> dict:
    """One LoRA run (patched unless --no-patch); returns losses, timing and peak memory."""
    cuda = torch.cuda.is_available()
    if args.qlora:
        import transformers
        from peft import prepare_model_for_kbit_training

        q = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                            bnb_4bit_compute_dtype=torch.bfloat16)
        model = transformers.AutoModelForCausalLM.from_pretrained(args.model, quantization_config=q)
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=args.gradient_checkpointing)
    else:
        model = build_model(args)
    torch.manual_seed(args.seed + 1)  # the adapters' init: the same in the patched and the unpatched process
    model = get_peft_model(model, LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0,
                                             target_modules=TARGETS))
    label = patch(model, not args.no_patch)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    print(f"trainable parameters: {trainable} of {total} ({100 * trainable / total:.2f}%)")
    # a copy of every frozen weight would double an 8B model's memory: keep a checksum per tensor instead
    frozen = {n: p.detach().float().sum().item() for n, p in model.named_parameters() if not p.requires_grad} \
        if not args.model else {}

    targs = TrainingArguments(
        output_dir=tempfile.mkdtemp(prefix="fastkern_lora_"), max_steps=args.steps,
        per_device_train_batch_size=args.batch, learning_rate=args.lr, lr_scheduler_type="constant",
        logging_steps=1, report_to=[], seed=args.seed, data_seed=args.seed, save_strategy="no",
        bf16=cuda, use_cpu=not cuda, optim="adamw_torch_fused" if cuda else "adamw_torch",
        gradient_checkpointing=args.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False} if args.gradient_checkpointing else None,
        disable_tqdm=True, remove_unused_columns=False, dataloader_num_workers=0)
    recorder = LossRecorder()
    data = motif_dataset(args.batch * args.steps, args.seq, model.config.vocab_size, args.seed,
                         token_range=args.token_range)
    trainer = Trainer(model=model, args=targs, train_dataset=data, data_collator=default_data_collator,
                      callbacks=[recorder])
    run = timed_train(trainer, recorder, args, label)
    moved = [n for n, p in model.named_parameters()
             if n in frozen and p.detach().float().sum().item() != frozen[n]]
    if moved:
        raise SystemExit(f"frozen base parameters changed: {moved[:5]}")
    run.update(trainable_params=trainable, base_frozen=not moved)
    print(f"[{label}] LoRA r={args.rank}, base frozen: {not moved}")
    return run


def main() -> None:
    p = common_args(argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter))
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--qlora", action="store_true", help="4-bit NF4 base via bitsandbytes (GPU, --model)")
    args = p.parse_args()
    toy = args.size == "toy" and not args.model
    args.seq = args.seq or (32 if toy else 1024)
    args.token_range = args.token_range or (None if toy else 1024)
    if args.qlora and not (torch.cuda.is_available() and args.model):
        p.error("--qlora needs a GPU and --model")
    run_or_compare(args, train_lora, __file__)


if __name__ == "__main__":
    main()
    exit_if_distributed()
