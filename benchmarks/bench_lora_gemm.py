"""The 8B LoRA step's GEMMs, one at a time: which order of the base and rank-r products, and which loss chunk.

Why (issue 12): the fused path's GEMM class took 559 ms per 4 x 2048 step against HF + PEFT's 503 (H200,
2026-11-26 call b). Two suspects, both timed here on the step's own shapes (8B, 8192 tokens, r = 16, bf16):

1. LoRA order, per projection (q, k, v, o, gate, up, down), forward ``y = x W^T + a (sB)^T`` and backward
   ``dx = dy W + da A`` (one layer's 7 of each):
   - ``rank_first``: the rank-r product written first, the big GEMM accumulating into it (``addmm_``, beta 1:
     cuBLAS's ``badd`` kernels); what ``fused_mlp.linear_adapter`` does;
   - ``base_first``: the big GEMM alone (beta 0), then the rank-r product added in place (``addmm_`` K = r);
   - ``separate``: PEFT's shape of it: two products and an add;
   - ``base_only``: the big GEMM alone, the floor.
   Per-step estimate: 32 layers x (2 forwards, checkpointing recomputes one, + 1 backward).
2. The fused linear cross-entropy's chunk (tokens per logits block; 512 by default for a 128K vocabulary):
   forward + backward of 8192 tokens against the frozen 128256 x 4096 head, time and extra memory.

    python -m benchmarks.bench_lora_gemm [--json FILE] [--tokens 8192]
"""
from __future__ import annotations

import argparse
import sys

import torch

from .harness import bench_ms, peak_mib, print_table, save

# (name, in, out) for Llama-3.1-8B
PROJ = [("q", 4096, 4096), ("k", 4096, 1024), ("v", 4096, 1024), ("o", 4096, 4096), ("gate", 4096, 14336),
        ("up", 4096, 14336), ("down", 14336, 4096)]
ORDERS = ("rank_first", "base_first", "separate", "base_only")
R = 16
LAYERS, PASSES_FWD = 32, 2


def _fwd(order, x, w, a, b):
    if order == "rank_first":
        y = torch.mm(a, b.t())
        return y.addmm_(x, w.t())
    if order == "base_first":
        y = torch.mm(x, w.t())
        return y.addmm_(a, b.t())
    if order == "separate":
        return torch.mm(x, w.t()) + torch.mm(a, b.t())
    return torch.mm(x, w.t())


def gemm_rows(tokens: int) -> list[dict]:
    rows = []
    dev, dt = "cuda", torch.bfloat16
    for name, k, n in PROJ:
        g = torch.Generator(device=dev).manual_seed(0)
        x = torch.randn(tokens, k, device=dev, dtype=dt, generator=g)
        dy = torch.randn(tokens, n, device=dev, dtype=dt, generator=g)
        w = torch.randn(n, k, device=dev, dtype=dt, generator=g) / k ** 0.5
        a = torch.randn(tokens, R, device=dev, dtype=dt, generator=g)
        b = torch.randn(n, R, device=dev, dtype=dt, generator=g) / R
        da = torch.randn(tokens, R, device=dev, dtype=dt, generator=g)
        la = torch.randn(R, k, device=dev, dtype=dt, generator=g) / k ** 0.5
        fwd_args, bwd_args = (x, w, a, b), (dy, w.t(), da, la.t())  # backward: dx = dy W + da A
        for order in ORDERS:
            fwd = bench_ms(lambda o=order, t=fwd_args: _fwd(o, *t))
            bwd = bench_ms(lambda o=order, t=bwd_args: _fwd(o, *t))
            rows.append(dict(bench="lora_gemm", proj=name, order=order, fwd_ms=fwd, bwd_ms=bwd,
                             fwd_tflops=2 * tokens * k * n / fwd / 1e9))
    for order in ORDERS:
        per = [r for r in rows if r["order"] == order]
        step = LAYERS * sum(PASSES_FWD * r["fwd_ms"] + r["bwd_ms"] for r in per)
        rows.append(dict(bench="lora_gemm", proj="step (32 layers)", order=order, step_ms=step))
    base = next(r["step_ms"] for r in rows if r.get("step_ms") and r["order"] == "rank_first")
    for r in rows:
        if r.get("step_ms"):
            r["vs_rank_first"] = r["step_ms"] / base
    return rows


def ce_rows(tokens: int, chunks=(512, 1024, 2048, 4096)) -> list[dict]:
    from hf_fastkern.kernels.cross_entropy import fused_linear_cross_entropy

    rows = []
    g = torch.Generator(device="cuda").manual_seed(0)
    h = torch.randn(tokens, 4096, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
    w = torch.randn(128256, 4096, device="cuda", dtype=torch.bfloat16, generator=g) / 64  # frozen, as in LoRA
    y = torch.randint(0, 128256, (tokens,), device="cuda", generator=g)
    for c in chunks:
        def step(c=c):
            fused_linear_cross_entropy(h, w, y, chunk_size=c).backward()

        ms = bench_ms(step, grad_to_none=[h])
        rows.append(dict(bench="flce_chunk", chunk=c, ms=ms, extra_MiB=peak_mib(step)))
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json")
    ap.add_argument("--tokens", type=int, default=8192)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA device: this script times cuBLAS GEMMs and needs a GPU")
        return 0
    rows = gemm_rows(args.tokens)
    print_table(rows, ["proj", "order", "fwd_ms", "bwd_ms", "fwd_tflops", "step_ms", "vs_rank_first"])
    ce = ce_rows(args.tokens)
    print_table(ce, ["chunk", "ms", "extra_MiB"])
    save(args.json, rows + ce, {"tokens": args.tokens, "rank": R})
    return 0


if __name__ == "__main__":
    sys.exit(main())
