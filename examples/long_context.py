"""Long-context fine-tuning at batch 1: how long a sequence trains, and how fast, patched vs not.

The fused attention never materialises [seq, seq] scores and the fused loss never keeps [seq, vocab] logits, so
the longest trainable sequence grows. With gradient checkpointing on, this trains a few steps at each length of
``--seq`` and reports tokens/s and peak memory, or OOM.

CPU (default): toy random-init Llama at 256 and 512 tokens:
    python examples/long_context.py --steps 2
GPU:
    python examples/long_context.py --size 1b --seq 4096,8192,16384,32768 --steps 3
    python examples/long_context.py --model /path/to/llama --seq 8192,16384 --no-patch
"""
from __future__ import annotations

import argparse
import time

import torch

# examples/ is on sys.path when a script in it runs, so the shared helpers import by name.
from finetune_trainer import SIZES, build_model, motif_dataset, patch


def train_at(model, seq: int, steps: int, lr: float, seed: int) -> dict:
    cuda = torch.cuda.is_available()
    device = next(model.parameters()).device
    rows = motif_dataset(steps, seq, model.config.vocab_size, seed)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, fused=cuda)
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    losses = []
    t0 = time.perf_counter()
    for row in rows:
        ids = torch.tensor([row["input_ids"]], device=device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.detach().float().item())
    seconds = time.perf_counter() - t0
    del optimizer
    return {"seq": seq, "losses": losses, "tokens_per_s": steps * seq / seconds,
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="path or hub id of a pretrained causal LM (default: random-init Llama)")
    p.add_argument("--size", choices=sorted(SIZES), default="toy")
    p.add_argument("--seq", default=None, help="comma-separated sequence lengths (toy: 256,512)")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-patch", action="store_true")
    p.add_argument("--no-gradient-checkpointing", action="store_true")
    args = p.parse_args()
    toy = args.size == "toy" and not args.model
    lengths = [int(s) for s in (args.seq or ("256,512" if toy else "4096,8192,16384")).split(",")]
    args.seq = max(lengths)  # build_model sizes max_position_embeddings from it
    model = build_model(args)
    label = patch(model, not args.no_patch)
    if not args.no_gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    longest = 0
    for seq in lengths:
        try:
            r = train_at(model, seq, args.steps, args.lr, args.seed)
        except torch.cuda.OutOfMemoryError:
            print(f"seq {seq:6d}: out of memory")
            break
        longest = seq
        peak = f", peak {r['peak_gib']:.2f} GiB" if r["peak_gib"] is not None else ""
        print(f"seq {seq:6d}: loss {r['losses'][0]:.4f} -> {r['losses'][-1]:.4f}, "
              f"{r['tokens_per_s']:.0f} tokens/s{peak}", flush=True)
    print(f"summary: [{label}] longest trained sequence at batch 1: {longest} tokens")


if __name__ == "__main__":
    main()
