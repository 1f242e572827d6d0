"""What autotuning costs a user: the first call at a new autotune key against the same call once tuned.

A ragged SFT batch (TRL's padding-free rows, issue 24) meets a new sequence-length bucket of the attention
kernels every few steps early in training; a fresh process meets every bucket again. This measures that pause.

Ops (bf16, fwd+bwd, each at a series of shapes that fall in different autotune keys, in this order):
  attention_varlen  the Llama-3 8B heads (32 query / 8 kv heads, head_dim 128), one packed row of 4 sequences
                    whose longest is 512, 1024, 2048, 4096 tokens (the kernels' SEQ_BUCKET key)
  rms_norm          hidden 4096 at 2,048 / 8,192 / 40,960 rows (its row-class key)
  swiglu            intermediate 14,336 at 64 / 512 / 4,096 rows (its size-class key)
Per op and shape: ``first_ms`` (the call that tunes; the op's first shape also compiles every config),
``warm_ms`` (median of 10 later calls) and ``tune_ms = first_ms - warm_ms``; ``max_err``: the forward against
the fp32 reference (attention: SDPA on the first sequence), a gate (``error`` when above ``GATE_ABS``).
Two processes share one fresh ``TRITON_CACHE_DIR``: ``cold`` starts from the empty directory, ``cached`` starts
from what ``cold`` left there (compiled kernels and, where Triton supports ``cache_results``, the tunings): the
second run of a user's script. Kernels are forced (``HF_FASTKERN_ROUTING=kernel``): the routing table does not
choose here.

    python -m benchmarks.bench_tuning --json $OUT/tuning.json
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

from hf_fastkern.kernels import reference

from .harness import emit_result, environment, print_table, save, worker_result

COLS = ["run", "op", "shape", "first_ms", "warm_ms", "tune_ms", "max_err", "error"]


# Each op: (step, check). step runs forward + backward; check compares the forward once with the reference in
# fp32 (a gate, not a timing: the row says "error" when it fails; GATE_ABS is far above bf16 rounding of O(1)
# values and far below what a wrong kernel gives).
GATE_ABS = 0.1


def _attention(max_len: int):
    from hf_fastkern.kernels.attention import flash_attention_varlen

    lens = [max_len, max_len // 2, max_len // 4, max_len // 8]
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    t = sum(lens)
    q = torch.randn(t, 32, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(t, 8, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(t, 8, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    do = torch.randn_like(q)

    def run():
        return flash_attention_varlen(q, k, v, cu, cu, max_len, max_len, causal=True, require_kernel=True)

    def check():
        s0, s1 = int(cu[0]), int(cu[1])  # the first (longest) sequence against SDPA in fp32
        qs, ks, vs = (x[s0:s1].float().transpose(0, 1)[None] for x in (q, k, v))
        ref = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, enable_gqa=True)[0].transpose(0, 1)
        return (run()[s0:s1].float() - ref).abs().max().item()
    return (lambda: run().backward(do)), check


def _rms_norm(rows: int):
    from hf_fastkern.kernels.rms_norm import rms_norm

    x = torch.randn(rows, 4096, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = torch.ones(4096, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn_like(x)
    return (lambda: rms_norm(x, w).backward(dy)), \
        (lambda: (rms_norm(x, w).float() - reference.rms_norm(x.float(), w.float())).abs().max().item())


def _swiglu(rows: int):
    from hf_fastkern.kernels.activations import swiglu

    g = torch.randn(rows, 14336, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    u = torch.randn_like(g, requires_grad=True)
    dy = torch.randn_like(g)
    return (lambda: swiglu(g, u).backward(dy)), \
        (lambda: (swiglu(g, u).float() - reference.swiglu(g.float(), u.float())).abs().max().item())


OPS = {"attention_varlen": (_attention, (512, 1024, 2048, 4096)),
       "rms_norm": (_rms_norm, (2048, 8192, 40960)),
       "swiglu": (_swiglu, (64, 512, 4096))}


def _ms(fn) -> float:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) * 1e3


def worker(run: str) -> list[dict]:
    rows = []
    for op, (make, shapes) in OPS.items():
        for shape in shapes:
            row = dict(bench="tuning", run=run, op=op, shape=shape)
            try:
                fn, check = make(shape)
                first = _ms(fn)
                warm = statistics.median(_ms(fn) for _ in range(10))
                row.update(first_ms=first, warm_ms=warm, tune_ms=first - warm)
                with torch.no_grad():
                    row["max_err"] = check()
                if not row["max_err"] <= GATE_ABS:
                    row["error"] = f"forward max error {row['max_err']:.3g} > {GATE_ABS} against the fp32 reference"
            except Exception as e:  # noqa: BLE001 - a failed op is reported in its row
                row["error"] = f"{type(e).__name__}: {e}"[:300]
            rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", help="write rows + environment + command here")
    ap.add_argument("--timeout", type=float, default=240, help="seconds per process")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        emit_result(worker(args.worker))
        return 0
    if not torch.cuda.is_available():
        print("bench_tuning measures GPU autotuning: no CUDA device here, nothing to measure")
        return 0
    cache = tempfile.mkdtemp(prefix="bench_tuning_cache_")
    env = {**os.environ, "TRITON_CACHE_DIR": cache, "HF_FASTKERN_ROUTING": "kernel"}
    rows: list[dict] = []
    for run in ("cold", "cached"):
        cmd = [sys.executable, "-m", __spec__.name, "--worker", run]
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, env=env)
            got = worker_result(r.stdout)
            rows += got if got is not None else [dict(bench="tuning", run=run, error=(r.stderr or "")[-300:])]
        except subprocess.TimeoutExpired:
            rows.append(dict(bench="tuning", run=run, error=f"timed out after {args.timeout}s"))
        save(args.json, rows, {"method": __doc__.split("    python")[0].strip()})
    print_table(rows, COLS)
    print("environment:", environment())
    return 0


if __name__ == "__main__":
    sys.exit(main())
