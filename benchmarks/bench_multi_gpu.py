"""Multi-GPU training throughput: sdpa vs sdpa+Liger vs fastkern under Accelerate DDP and FSDP2, plus 1 GPU.

Drives ``examples/accelerate_multi_gpu.py`` (random-init Llama ~1.5B of bench_e2e.py, fp32 master weights, bf16
mixed precision, AdamW): for each implementation
  single  1 process (``python``), micro-batch B, gradient accumulation N: the same global batch N x B
  ddp     ``accelerate launch --config_file examples/accelerate_configs/ddp.yaml --num_processes N``
  fsdp2   ``accelerate launch --config_file examples/accelerate_configs/fsdp2.yaml --num_processes N``
          (full shard, bf16 mixed precision, activation checkpointing of every decoder layer)
Every run trains ``--steps`` optimizer steps (default 50) on the same tokens (they depend on the seed and the
step only); timing and peak memory cover the steps after ``--warmup``. Rows carry tokens/s per GPU, peak
``max_memory_allocated`` per GPU (max over ranks), the per-step global loss curve, and
  scaling_eff          tokens/s per GPU (N GPUs) / tokens/s of the 1-GPU run of the same implementation
                       (fsdp2 rows include the recompute of activation checkpointing, the 1-GPU run has none)
  loss_max_rel_diff    max over steps |loss_N - loss_1| / loss_1 against the 1-GPU run; gate 'ok' when
                       <= LOSS_REL_TOL (bf16 autocast, 50 AdamW steps: rounding differences of reduction order)
  loss0_rel_diff       first-step loss vs sdpa's (same weights, same tokens); gate <= GATE_LOSS0_REL
The 1-GPU runs of two implementations go side by side on two different GPUs (``--serial-single`` to not).
NCCL_NVLS_ENABLE=0 and TORCH_SYMM_MEM_DISABLE_MULTICAST=1 are set for every launch.

    python -m benchmarks.bench_multi_gpu --json benchmarks/results/h100x2/multi_gpu.json
Without CUDA: a tiny CPU smoke pass (gloo DDP through torch.distributed.run; FSDP2 needs GPUs), not numbers.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time

import torch

from .harness import print_table, save

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join(ROOT, "examples", "accelerate_multi_gpu.py")
CONFIGS = {m: os.path.join(ROOT, "examples", "accelerate_configs", f"{m}.yaml") for m in ("ddp", "fsdp2")}
IMPLS = ("sdpa", "sdpa+liger", "fastkern")
LOSS_REL_TOL = 0.02
GATE_LOSS0_REL = 0.01
COLS = ["bench", "impl", "mode", "nproc", "B", "S", "accum", "tok_per_s_per_gpu", "peak_GiB", "vs_sdpa",
        "mem_vs_sdpa", "scaling_eff", "loss_first", "loss_last", "loss_max_rel_diff", "gate", "wall_s", "error"]
METHOD = ("examples/accelerate_multi_gpu.py: random-init Llama 1.5B (hidden 2048, 16 layers, 32/8 heads, "
          "intermediate 8192, vocab 128256), fp32 weights, bf16 mixed precision, AdamW lr 3e-4; global batch "
          "N x B rows of S tokens per step (1 GPU: accumulation N); tokens/s per GPU and peak max_memory_allocated "
          "over the steps after warm-up; loss = mean over ranks of the per-rank mean loss per step")
ROWS: list[dict] = []


def _env() -> dict:
    env = {**os.environ, "NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
           "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("TRITON_INTERPRET", None)
    env.pop("HF_FASTKERN_FORCE_REFERENCE", None)
    return env


def _example_args(args: argparse.Namespace, impl: str, out: str) -> list[str]:
    a = [EXAMPLE, "--impl", impl, "--steps", str(args.steps), "--warmup", str(args.warmup),
         "--global-batch", str(args.nproc * args.batch), "--micro-batch", str(args.batch), "--seq", str(args.seq),
         "--json", out]
    return a + (["--tiny", "--cpu"] if args.tiny else ["--size", "1.5b"])


def _command(args: argparse.Namespace, impl: str, mode: str, out: str, port: int) -> list[str]:
    if mode == "single":
        return [sys.executable, *_example_args(args, impl, out)]
    if args.tiny:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                str(args.nproc), *_example_args(args, impl, out)]
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", CONFIGS[mode], "--num_processes",
            str(args.nproc), "--main_process_port", str(port), *_example_args(args, impl, out)]


def _start(args, impl: str, mode: str, workdir: str, port: int, gpu: int | None = None):
    out = os.path.join(workdir, f"{impl}_{mode}.json".replace("+", "_"))
    log = open(out[:-5] + ".log", "w")
    env = _env()
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = str(gpu)
    cmd = _command(args, impl, mode, out, port)
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    return dict(proc=proc, impl=impl, mode=mode, out=out, log=log, t0=time.perf_counter(), cmd=" ".join(cmd))


def _finish(job: dict, args: argparse.Namespace) -> dict:
    try:
        rc = job["proc"].wait(timeout=max(1.0, args.timeout - (time.perf_counter() - job["t0"])))
    except subprocess.TimeoutExpired:
        job["proc"].kill()
        rc = "timeout"
    job["log"].close()
    wall = time.perf_counter() - job["t0"]
    nproc = 1 if job["mode"] == "single" else args.nproc
    row = dict(bench="multi_gpu", impl=job["impl"], mode=job["mode"], nproc=nproc, B=args.batch, S=args.seq,
               global_batch=args.nproc * args.batch, wall_s=wall, command=job["cmd"])
    if rc == 0 and os.path.exists(job["out"]):
        with open(job["out"]) as f:
            r = json.load(f)
        peaks = r.get("peak_GiB_per_gpu")
        row.update(accum=r["accum"], grad_ckpt=r["grad_ckpt"], steps=r["steps"], warmup=r["warmup"],
                   tok_per_s_per_gpu=r["tok_per_s_per_gpu"], tok_per_s_total=r["tok_per_s_total"],
                   tok_per_s_per_process=r["tok_per_s_per_process"], peak_GiB=max(peaks) if peaks else None,
                   peak_GiB_per_gpu=peaks, losses=r["losses"], loss_first=r["losses"][0],
                   loss_last=r["losses"][-1], distributed_type=r["env"]["distributed_type"],
                   patch_report=r.get("patch_report"))
    else:
        with open(job["out"][:-5] + ".log") as f:
            row["error"] = failure_text(f.read(), rc)
    print(f"  {job['impl']:<11} {job['mode']:<6} {'error' if 'error' in row else 'ok'} ({wall:.0f} s)", flush=True)
    return row


# an exception line as Python prints it ("ValueError: ...", "torch.utils.checkpoint.CheckpointError: ..."),
# possibly behind torchrun's "[rank0]: " prefix or the example's "[rank 0] FAILED: " line
_EXC_LINE = re.compile(r"^(\[rank ?\d+\]:?\s*(FAILED:\s*)?)?([A-Za-z_][\w.]*\.)?[A-Za-z_]\w*(Error|Exception|Interrupt)\b:?")
TAIL_LINES = 30


def failure_text(log: str, rc) -> str:
    """The ``error`` of a failed launch: ``rc=..``, the first exception line of the log (the child's, which
    comes before the launcher's ChildFailedError), then its last TAIL_LINES non-empty lines.

    A time limit that kills the launcher leaves only the torchelastic summary at the end of the log, so the
    first exception line is what names the cause (issue 11 kept only the summary's last 3 lines).
    """
    lines = [ln.rstrip() for ln in log.splitlines() if ln.strip()]
    first = next((ln for ln in lines if _EXC_LINE.match(ln.strip())), None)
    head = f"rc={rc}: " + (first.strip() if first else "(no exception line in the log)")
    return head + "\n--- last lines of the log ---\n" + "\n".join(lines[-TAIL_LINES:])


def add_ratios(rows: list[dict]) -> None:
    """scaling_eff and loss agreement against the 1-GPU run of the same impl; vs_sdpa within each mode."""
    ok = [r for r in rows if r.get("tok_per_s_per_gpu")]
    single = {r["impl"]: r for r in ok if r["mode"] == "single"}
    sdpa = {r["mode"]: r for r in ok if r["impl"] == "sdpa"}
    for r in ok:
        gates = []
        one = single.get(r["impl"])
        if one and r["mode"] != "single":
            r["scaling_eff"] = r["tok_per_s_per_gpu"] / one["tok_per_s_per_gpu"]
            n = min(len(r["losses"]), len(one["losses"]))
            r["loss_max_rel_diff"] = max(abs(a - b) / abs(b) for a, b in zip(r["losses"][:n], one["losses"][:n]))
            gates.append("ok" if r["loss_max_rel_diff"] <= LOSS_REL_TOL else "FAIL: loss curve differs from 1 GPU")
        ref = sdpa.get(r["mode"])
        if ref:
            r["vs_sdpa"] = r["tok_per_s_per_gpu"] / ref["tok_per_s_per_gpu"]
            if r.get("peak_GiB") and ref.get("peak_GiB"):
                r["mem_vs_sdpa"] = r["peak_GiB"] / ref["peak_GiB"]
            r["loss0_rel_diff"] = abs(r["loss_first"] - ref["loss_first"]) / abs(ref["loss_first"])
            gates.append("ok" if r["loss0_rel_diff"] <= GATE_LOSS0_REL else "FAIL: first-step loss differs from sdpa")
        fails = [g for g in gates if g != "ok"]
        r["gate"] = "; ".join(fails) if fails else ("ok" if gates else None)


def _keep(row: dict, args: argparse.Namespace) -> None:
    """Record a finished launch and save the rows so far (a run cut by a time limit keeps them)."""
    ROWS.append(row)
    if args.json:
        add_ratios(ROWS)
        save(args.json, ROWS, {"method": METHOD, "partial": True})


def run(args: argparse.Namespace) -> list[dict]:
    impls = [i for i in args.impls.split(",") if i]
    modes = [m for m in args.modes.split(",") if m]
    if "sdpa+liger" in impls:
        try:
            import liger_kernel  # noqa: F401
        except Exception as e:
            impls.remove("sdpa+liger")
            ROWS.append(dict(bench="multi_gpu", impl="sdpa+liger", mode="all", error=f"liger_kernel not importable "
                             f"({type(e).__name__})"))
    if args.tiny:
        modes = [m for m in modes if m != "fsdp2"]
    workdir = tempfile.mkdtemp(prefix="bench_multi_gpu_")
    port = 29511
    # 1-GPU baselines: on separate GPUs side by side (each process sees one GPU)
    pending = list(impls) if not args.no_single else []
    width = 1 if (args.serial_single or args.tiny) else max(1, torch.cuda.device_count())
    while pending:
        jobs = [_start(args, impl, "single", workdir, port, None if args.tiny else g)
                for g, impl in enumerate(pending[:width])]
        pending = pending[width:]
        for job in jobs:
            _keep(_finish(job, args), args)
    for mode in modes:
        for impl in impls:
            port += 1
            _keep(_finish(_start(args, impl, mode, workdir, port), args), args)
    add_ratios(ROWS)
    return ROWS


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", help="write rows + environment here")
    ap.add_argument("--impls", default=",".join(IMPLS))
    ap.add_argument("--modes", default="ddp,fsdp2")
    ap.add_argument("--nproc", type=int, default=None, help="GPUs for the ddp/fsdp2 runs (default: all)")
    ap.add_argument("--batch", type=int, default=4, help="rows per GPU per forward (micro-batch)")
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--timeout", type=float, default=240, help="seconds per launch")
    ap.add_argument("--serial-single", action="store_true", help="1-GPU baselines one after the other")
    ap.add_argument("--no-single", action="store_true", help="skip the 1-GPU baselines")
    ap.add_argument("--tiny", action="store_true", help="tiny model on the CPU (gloo DDP): a smoke test")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if not torch.cuda.is_available() and not args.tiny:
        print("no CUDA device: tiny CPU smoke pass only (gloo DDP); GPU numbers need GPUs")
        args.tiny = True
    if args.tiny:
        args.batch, args.seq = min(args.batch, 2), 32 if args.seq == 2048 else args.seq
        args.steps = min(args.steps, 4)
        args.warmup = min(args.warmup, 1)
    args.nproc = args.nproc or (max(2, torch.cuda.device_count()) if torch.cuda.is_available() else 2)

    def _save_partial(signum, frame):
        # a time limit stopped the run: keep what finished
        add_ratios(ROWS)
        save(args.json, ROWS, {"method": METHOD, "partial": True, "stopped_by_signal": signum})
        sys.exit(128 + signum)

    signal.signal(signal.SIGTERM, _save_partial)
    rows = run(args)
    # the table shows the first line of an error (rc and the exception); the JSON row keeps the log's tail
    shown = [{k: (v.splitlines()[0] if k == "error" and isinstance(v, str) else v) for k, v in r.items() if k in COLS}
             for r in rows]
    print_table(shown, COLS)
    save(args.json, rows, {"method": METHOD, "loss_rel_tol": LOSS_REL_TOL, "gate_loss0_rel": GATE_LOSS0_REL})
    return 0


if __name__ == "__main__":
    sys.exit(main())
