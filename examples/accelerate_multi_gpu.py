"""Multi-GPU training of a random-init Llama with Accelerate (DDP or FSDP2), patched by hf_fastkern.

The same script runs on any number of processes; the *global* batch is fixed (``--global-batch`` rows per
optimizer step), so 1 GPU (with gradient accumulation) and N GPUs see the same data and should give the same
loss curve. Step ``s`` uses rows generated from ``seed`` and ``s`` only; process ``r`` of ``W`` takes its slice.

    # 2 GPUs, DDP / FSDP2 (full shard, bf16 mixed precision, activation checkpointing):
    accelerate launch --config_file examples/accelerate_configs/ddp.yaml   examples/accelerate_multi_gpu.py --size 1.5b
    accelerate launch --config_file examples/accelerate_configs/fsdp2.yaml examples/accelerate_multi_gpu.py --size 1.5b
    # 1 GPU, the same global batch (accumulation 2):
    python examples/accelerate_multi_gpu.py --size 1.5b
    # CPU, 2 processes, gloo (what tests/test_ddp.py runs):
    python -m torch.distributed.run --standalone --nproc_per_node 2 examples/accelerate_multi_gpu.py --tiny

``--impl`` picks ``sdpa`` (unpatched), ``sdpa+liger`` (Liger Kernel's Llama patch, when installed) or
``fastkern`` (``attn_implementation="fastkern"`` + ``apply_fast_kernels``). ``--json`` (written by process 0):
per-step global losses, tokens/s per process, peak memory per GPU, the environment and the command.
NCCL's NVLink multicast (NVLS) and torch's symmetric-memory multicast are switched off below, before any
process group exists: this script never needs them, and some lent machines do not support them.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

# read by NCCL / torch when the first communicator is created, which is after this line in every process
os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")

import torch  # noqa: E402

SIZES = {
    # the end-to-end benchmark's model (benchmarks/bench_e2e.py): ~1.5B parameters, untied head
    "1.5b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                 num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False),
    # head_dim 64, so the Triton attention runs on the GPU (tiny's head_dim 16 takes the SDPA fallback)
    "small": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=1024, tie_word_embeddings=False),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=256, tie_word_embeddings=False),
}
IMPLS = ("sdpa", "sdpa+liger", "fastkern")


def motif_batch(step: int, rows: int, seq: int, vocab: int, seed: int) -> torch.Tensor:
    """The global batch of optimizer step ``step``: [rows, seq] int64, each row a repeated 2-16 token motif.

    Learnable (copying) so the loss falls from ln(vocab); depends on (seed, step) only, never on the number
    of processes, so every launch configuration trains on the same tokens.
    """
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    lengths = torch.randint(2, 17, (rows, 1), generator=g)
    motifs = torch.randint(3, vocab, (rows, 16), generator=g)
    pos = torch.arange(seq).unsqueeze(0) % lengths
    return torch.gather(motifs, 1, pos)


def build_model(args: argparse.Namespace, device: torch.device) -> tuple[torch.nn.Module, str]:
    """Random-init LlamaForCausalLM for ``args.impl`` (same weights on every process); returns (model, report)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    attn = "sdpa"
    report = "unpatched"
    if args.impl == "sdpa+liger":
        from liger_kernel.transformers import apply_liger_kernel_to_llama
        # class-level patch (Liger's way); harmless: each launch is its own set of processes
        apply_liger_kernel_to_llama()
        report = "liger: apply_liger_kernel_to_llama()"
    elif args.impl == "fastkern":
        import hf_fastkern  # noqa: F401  (registers "fastkern")
        attn = "fastkern"
    torch.manual_seed(args.seed)
    cfg = LlamaConfig(**SIZES[args.size], max_position_embeddings=max(args.seq, 64), pad_token_id=0,
                      bos_token_id=1, eos_token_id=2, attn_implementation=attn)
    # initialise on the target device: a 1.5B model initialised on the CPU takes longer than the run
    with torch.device(device):
        model = LlamaForCausalLM(cfg)
    if args.dtype == "float64":
        model = model.double()
    if args.impl == "fastkern":
        from hf_fastkern import apply_fast_kernels
        # before accelerator.prepare: the patch binds per instance, FSDP2/DDP wrap the patched modules
        report = str(apply_fast_kernels(model))
    return model, report


def environment(accelerator) -> dict:
    import accelerate
    import transformers

    env = {"python": platform.python_version(), "torch": torch.__version__,
           "transformers": transformers.__version__, "accelerate": accelerate.__version__,
           "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
           "num_processes": accelerator.num_processes, "distributed_type": str(accelerator.distributed_type),
           "command": " ".join([sys.executable, *sys.argv]),
           "NCCL_NVLS_ENABLE": os.environ.get("NCCL_NVLS_ENABLE"),
           "TORCH_SYMM_MEM_DISABLE_MULTICAST": os.environ.get("TORCH_SYMM_MEM_DISABLE_MULTICAST")}
    for mod in ("triton", "liger_kernel"):
        try:
            env[mod] = getattr(__import__(mod), "__version__", "installed")
        except Exception:
            env[mod] = None
    return env


def train(args: argparse.Namespace) -> dict | None:
    """Run ``args.steps`` optimizer steps; returns the result dict on process 0 (None elsewhere)."""
    from accelerate import Accelerator

    cuda = torch.cuda.is_available() and not args.cpu
    accelerator = Accelerator(mixed_precision="bf16" if cuda else "no", cpu=not cuda)
    world, rank = accelerator.num_processes, accelerator.process_index
    per_step = world * args.micro_batch
    if args.global_batch % per_step:
        raise SystemExit(f"--global-batch {args.global_batch} is not a multiple of processes x --micro-batch "
                         f"= {world} x {args.micro_batch}")
    accum = args.global_batch // per_step
    fsdp = accelerator.distributed_type.name == "FSDP"
    model, report = build_model(args, accelerator.device)
    if args.grad_ckpt and not fsdp:
        # FSDP2 checkpoints through its own config (fsdp_activation_checkpointing); DDP/1 GPU through the model
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    # fused AdamW on plain CUDA parameters; FSDP2's DTensor parameters take the default (foreach) kernel
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0, fused=cuda and not fsdp)
    model, optimizer = accelerator.prepare(model, optimizer)
    vocab = SIZES[args.size]["vocab_size"]
    local_tokens = accum * args.micro_batch * args.seq

    losses: list[torch.Tensor] = []
    t_start = None
    for step in range(args.steps):
        if step == args.warmup:
            # timing and peak memory over the steps after warm-up (autotuning, NCCL setup, allocator growth)
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            t_start = time.perf_counter()
        batch = motif_batch(step, args.global_batch, args.seq, vocab, args.seed)
        step_loss = torch.zeros((), device=accelerator.device, dtype=torch.float64)
        for a in range(accum):
            # micro-batch a of process rank: any fixed split gives the same global mean loss and gradient
            lo = (a * world + rank) * args.micro_batch
            ids = batch[lo:lo + args.micro_batch].to(accelerator.device)
            # the last micro-batch synchronises gradients across processes; the others accumulate locally
            ctx = accelerator.no_sync(model) if a < accum - 1 else _null()
            with ctx:
                loss = model(input_ids=ids, labels=ids).loss
                accelerator.backward(loss / accum)
            step_loss += loss.detach().double() / accum
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        # every process has the same number of label tokens, so the mean of the process means is the global mean
        losses.append(accelerator.reduce(step_loss, reduction="mean"))
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t_start if t_start is not None else float("nan")
    timed = args.steps - args.warmup
    tok_s = torch.tensor([local_tokens * timed / seconds if timed > 0 else float("nan")],
                         device=accelerator.device, dtype=torch.float64)
    peak = torch.tensor([torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")],
                        device=accelerator.device, dtype=torch.float64)
    tok_all = accelerator.gather(tok_s).tolist()
    peak_all = accelerator.gather(peak).tolist()
    curve = [float(x) for x in torch.stack(losses).cpu()]
    result = None
    if accelerator.is_main_process:
        result = dict(impl=args.impl, size=args.size, mode=_mode(accelerator, fsdp), num_processes=world,
                      global_batch=args.global_batch, micro_batch=args.micro_batch, accum=accum, seq=args.seq,
                      steps=args.steps, warmup=args.warmup, grad_ckpt=bool(args.grad_ckpt or _fsdp_ckpt()),
                      dtype=args.dtype, losses=curve, tok_per_s_per_gpu=sum(tok_all) / len(tok_all),
                      tok_per_s_per_process=tok_all, tok_per_s_total=sum(tok_all),
                      peak_GiB_per_gpu=peak_all if cuda else None, patch_report=report[:600],
                      env=environment(accelerator))
        print(f"[{args.impl} {result['mode']} x{world}] loss {curve[0]:.4f} -> {curve[-1]:.4f}, "
              f"{result['tok_per_s_per_gpu']:.0f} tokens/s per process"
              + (f", peak {max(peak_all):.2f} GiB" if cuda else ""), flush=True)
        if args.json:
            os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
            with open(args.json, "w") as f:
                json.dump(result, f, indent=1)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return result


def _fsdp_ckpt() -> bool:
    return os.environ.get("FSDP_ACTIVATION_CHECKPOINTING", "false").lower() == "true"


def _mode(accelerator, fsdp: bool) -> str:
    if fsdp:
        version = getattr(accelerator.state.fsdp_plugin, "fsdp_version", 1)
        return f"fsdp{version}"
    return "ddp" if accelerator.num_processes > 1 else "single"


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--impl", choices=IMPLS, default="fastkern")
    p.add_argument("--size", choices=sorted(SIZES), default="1.5b")
    p.add_argument("--tiny", action="store_true", help="CPU smoke mode: tiny model, seq 32, fp32, 4 steps")
    p.add_argument("--cpu", action="store_true", help="run on the CPU even when CUDA is present")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (default 50; --tiny: 4)")
    p.add_argument("--warmup", type=int, default=None, help="untimed first steps (default 5; --tiny: 1)")
    p.add_argument("--global-batch", type=int, default=8, help="rows per optimizer step over all processes")
    p.add_argument("--micro-batch", type=int, default=4, help="rows per process per forward")
    p.add_argument("--seq", type=int, default=None, help="tokens per row (default 2048; --tiny: 32)")
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32",
                   help="parameter dtype (float64: a CPU oracle run)")
    p.add_argument("--grad-ckpt", action="store_true", help="activation checkpointing (DDP / 1 process)")
    p.add_argument("--json", help="write the result here (process 0)")
    args = p.parse_args(argv)
    if args.tiny:
        args.size, args.cpu = "tiny", True
        args.micro_batch = min(args.micro_batch, 2)
        args.global_batch = args.global_batch if "--global-batch" in (argv or sys.argv) else 4
    args.steps = args.steps if args.steps is not None else (4 if args.tiny else 50)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.tiny else 5)
    args.warmup = min(args.warmup, max(args.steps - 1, 0))
    args.seq = args.seq or (32 if args.tiny else 2048)
    return args


def _record(fn):
    """torchelastic's ``record``: a failing process writes its traceback to the error file that
    ``accelerate launch`` / ``torch.distributed.run`` print in their failure summary (without it the summary
    says only "traceback : To enable traceback see ..."). Plain ``python`` runs are unaffected."""
    try:
        from torch.distributed.elastic.multiprocessing.errors import record
    except ImportError:  # torch built without distributed
        return fn
    return record(fn)


@_record
def main(argv: list[str] | None = None) -> None:
    try:
        train(parse_args(argv))
    except BaseException as e:
        if not isinstance(e, SystemExit | KeyboardInterrupt):
            # one line naming the rank and the exception, flushed before the launcher tears the group down
            # (the full traceback follows from Python and from record above)
            rank = os.environ.get("RANK", "0")
            print(f"[rank {rank}] FAILED: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
                  file=sys.stderr, flush=True)
        raise


if __name__ == "__main__":
    main()
    from finetune_trainer import exit_if_distributed  # examples/: why gloo processes end this way
    exit_if_distributed()
