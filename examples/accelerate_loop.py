"""A plain training loop with Accelerate (``accelerator.prepare``) on a patched model.

CPU (default): toy random-init Llama, synthetic data:
    python examples/accelerate_loop.py --steps 10
GPU (bf16 mixed precision), a real checkpoint:
    python examples/accelerate_loop.py --model /path/to/llama --steps 100 --seq 2048 --batch 4
Multi-GPU: ``accelerate launch examples/accelerate_loop.py ...``.
"""
from __future__ import annotations

import argparse
import time

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from finetune_trainer import SIZES, build_model, exit_if_distributed, motif_dataset, patch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="path or hub id of a pretrained causal LM (default: random-init Llama)")
    p.add_argument("--size", choices=sorted(SIZES), default="toy")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--seq", type=int, default=None)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--accum", type=int, default=2)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--no-patch", action="store_true")
    args = p.parse_args()
    args.seq = args.seq or (32 if args.size == "toy" and not args.model else 1024)
    cuda = torch.cuda.is_available()

    set_seed(args.seed)
    accelerator = Accelerator(mixed_precision="bf16" if cuda else "no", gradient_accumulation_steps=args.accum,
                              cpu=not cuda)
    model = build_model(args)
    label = patch(model, not args.no_patch)
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    rows = motif_dataset(args.batch * args.accum * args.steps, args.seq, model.config.vocab_size, args.seed)
    data = [{k: torch.tensor(v) for k, v in r.items()} for r in rows]
    loader = torch.utils.data.DataLoader(data, batch_size=args.batch, shuffle=True,
                                         generator=torch.Generator().manual_seed(args.seed))
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0, fused=cuda)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    model.train()
    losses, step_loss = [], 0.0
    t0 = time.perf_counter()
    for batch in loader:
        with accelerator.accumulate(model):
            loss = model(**batch).loss
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
        step_loss += loss.detach().float().item() / args.accum
        if accelerator.sync_gradients:
            losses.append(step_loss)
            accelerator.print(f"step {len(losses):4d} loss {step_loss:.4f}")
            step_loss = 0.0
    seconds = time.perf_counter() - t0
    tokens = args.steps * args.accum * args.batch * args.seq
    accelerator.print(f"summary: [{label}] {len(losses)} steps, loss {losses[0]:.4f} -> {losses[-1]:.4f}, "
                      f"{tokens / seconds:.0f} tokens/s")


if __name__ == "__main__":
    main()
    exit_if_distributed()
