"""Longest trainable sequence at batch 1 for the ~1.5B Llama (see bench_e2e.py), per variant, with and without
gradient checkpointing.

Method (the same as /work/shared/anchors/gpu_anchors.py `longctx`, so results compare with the anchors): a
trial is ONE subprocess that builds the random-init model on the GPU (fp32 weights), runs one forward+backward
under bf16 autocast with labels = input_ids (no optimizer), and prints OK or OOM. The search doubles from a
start length until a trial fails, then bisects on multiples of 1024 until ``hi - lo <= max(1024, lo / 8)``;
the reported ``max_seq`` is the longest length that trained. ``--grow`` changes the doubling factor (1.25 for the expensive lengths).

Variants: ``sdpa``, ``sdpa+liger``, ``fastkern``; suffix ``_gc`` = gradient checkpointing (non-reentrant, as the
anchors), ``_chunk`` (fastkern) = ``apply_fast_kernels(mlp_chunk_tokens=16384)``,
``_gc_offload`` = the same checkpointing with the checkpointed layer inputs kept in pinned host memory
(``hf_fastkern.memory.offload.enable_activation_offload``, the mechanism behind ``apply_fast_kernels(offload_activations=True)``).

Time: one trial near the limit is one long step (a 250k-token causal step is ~3e16 attention FLOPs, about a
minute), so the search has a total ``--time-budget``; when it runs out, the row says ``exact: false`` and
``max_seq`` is a lower bound. ``--start auto`` starts each search at the anchors' result (peers) or at the
target, 1.5x Liger's anchor (fastkern), which saves most of the doubling trials.

With ``--json`` the file is rewritten after every finished trial (``partial: true`` until the last variant ends;
the row of a search still running says ``in_progress: true`` and holds the longest length that trained so far),
so a run that a time limit kills still leaves every trial it finished. SIGTERM ends the running trial too.

    python -m benchmarks.bench_longctx --variants fastkern,fastkern_gc --json results/h100/longctx.json
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable

import torch

from . import harness
from .bench_e2e import LLAMA_1B5, TINY, _forward_backward, build_model
from .harness import emit_result, print_table, save, worker_result

VARIANTS = ("sdpa", "sdpa+liger", "fastkern", "sdpa_gc", "sdpa+liger_gc", "fastkern_gc")
# /work/shared/anchors/anchors_h100.jsonl 'longctx' rows (H100 80GB, torch 2.11, transformers 5.17)
ANCHORS = {"sdpa": 18432, "sdpa+liger": 45056, "sdpa_gc": 36864, "sdpa+liger_gc": 245760}
TARGET_VS_LIGER = 1.5
COLS = ["bench", "impl", "grad_ckpt", "max_seq", "exact", "first_fail", "peak_GiB", "step_s", "anchor",
        "vs_liger", "trials", "secs", "error"]


MLP_CHUNK = 16384  # tokens per MLP chunk of the ``_chunk`` variants (apply_fast_kernels(mlp_chunk_tokens=...))


def split_chunk(v: str) -> tuple[str, int | None]:
    """'fastkern_gc_chunk_offload' -> ('fastkern_gc_offload', MLP_CHUNK): the MLP runs in token chunks, so a
    long sequence never holds [seq, intermediate] gate/up tensors for the whole sequence (fastkern only)."""
    if "_chunk" not in v:
        return v, None
    rest = v.replace("_chunk", "")
    if not rest.startswith("fastkern"):
        raise ValueError(f"{v}: _chunk is a fastkern option (apply_fast_kernels(mlp_chunk_tokens=...))")
    return rest, MLP_CHUNK


def parse_variant(v: str) -> tuple[str, bool, bool]:
    """'fastkern_gc_offload' -> ('fastkern', True, True); a '_chunk' flag is ignored here (split_chunk)."""
    v = split_chunk(v)[0]
    offload = v.endswith("_offload")
    base = v[: -len("_offload")] if offload else v
    gc = base.endswith("_gc")
    base = base[: -len("_gc")] if gc else base
    if offload and not gc:
        raise ValueError(f"{v}: _offload needs gradient checkpointing (_gc_offload)")
    return base, gc, offload


def auto_start(v: str) -> int:
    if v in ANCHORS:
        return ANCHORS[v]
    base, gc, _ = parse_variant(v)
    liger = ANCHORS["sdpa+liger_gc" if gc else "sdpa+liger"]
    return int(TARGET_VS_LIGER * liger) // 1024 * 1024


def trial_worker(variant: str, seq: int, tiny: bool) -> dict:
    """One forward+backward at batch 1, length ``seq``, in this process."""
    gpu_cap = harness.cap_gpu_memory()  # an 80 GB card emulated on a larger one
    base, gc, offload = parse_variant(variant)
    cfg = dict(TINY if tiny else LLAMA_1B5, max_position_embeddings=max(seq, 8192))
    model, _ = build_model(base, cfg, "cuda", gc, offload, mlp_chunk_tokens=split_chunk(variant)[1])
    ids = torch.randint(0, cfg["vocab_size"], (1, seq), device="cuda")
    try:
        t0 = time.perf_counter()
        _forward_backward(model, ids, "cuda")
        torch.cuda.synchronize()
        return dict(ok=True, peak_GiB=torch.cuda.max_memory_allocated() / 2**30, step_s=time.perf_counter() - t0,
                    gpu_cap_GiB=gpu_cap)
    except torch.OutOfMemoryError:
        return dict(ok=False, oom=True)
    except RuntimeError as e:
        # cuBLAS/cuDNN report a failed workspace allocation as a RuntimeError: that is the memory limit too.
        # Anything else (a kernel bug at a length never tried before) is an error the search must not hide.
        msg = str(e)
        if "out of memory" in msg or "ALLOC_FAILED" in msg:
            return dict(ok=False, oom=True, note=msg[:120])
        raise


def run_trial(module: str, variant: str, seq: int, timeout: float, tiny: bool, extra: tuple[str, ...] = ()) -> dict:
    """One long-context attempt as ``python -m module --trial VARIANT SEQ [extra...]`` in a fresh process (this
    file and bench_lora.py share it): the worker's result, or ok=False with oom / timeout / error."""
    cmd = [sys.executable, "-m", module, "--trial", variant, str(seq)] + (["--tiny"] if tiny else []) + list(extra)
    # A trial is one step in a fresh process: full autotuning of every kernel at a new length would dominate
    # it (a 50K-token trial hit a 110 s limit on 2026-11-25). The quick configs change speed, not memory.
    env = {**os.environ, "HF_FASTKERN_QUICK_TUNE": "1"}
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=max(timeout, 1), env=env)
    except subprocess.TimeoutExpired:
        return dict(ok=False, timeout=True)
    res = worker_result(r.stdout)
    if res is not None:
        return res
    err = r.stderr.strip().splitlines()[-2:]
    # an OOM raised outside the guarded step (e.g. building the model) is still an OOM
    oom = "OutOfMemoryError" in r.stderr or "out of memory" in r.stderr
    return dict(ok=False, oom=oom, error=None if oom else " | ".join(err)[-300:])


def _trial(variant: str, seq: int, timeout: float, tiny: bool) -> dict:
    return run_trial(__spec__.name, variant, seq, timeout, tiny)


def search(variant: str, start: int = 4096, cap: int = 1 << 20, budget_s: float = 600, trial_timeout: float = 420,
           tiny: bool = False, log=print, grow: float = 2.0, trial=None,
           on_trial: Callable[[dict], None] | None = None) -> dict:
    """Grow (x2 by default) then bisect (multiples of 1024, to 1/8 of the result) under a time budget.

    ``trial(variant, seq, timeout, tiny) -> {"ok": bool, "oom"/"timeout"/"error": ...}`` runs one attempt
    (default: this script's subprocess); bench_lora.py passes its own to search with the 8B LoRA model.
    ``on_trial(row)`` is called after every finished trial with the row as it stands (``in_progress: True``,
    ``exact: False``, ``max_seq`` the longest length that trained so far), so a caller can save it before the
    next trial, which may be the one a time limit kills.

    A step costs about S^2 at these lengths, so a smaller ``grow`` (1.25) keeps the trial above a passing start
    affordable; the first trial at ``start`` already answers "does it train at this length?".
    """
    t0 = time.time()
    lo, hi, best, trials = 0, None, {}, []
    row = dict(bench="longctx", impl=parse_variant(variant)[0], variant=variant, grad_ckpt=parse_variant(variant)[1],
               offload=parse_variant(variant)[2], mlp_chunk_tokens=split_chunk(variant)[1], B=1)

    def ok(seq: int) -> bool | None:
        left = budget_s - (time.time() - t0)
        if left <= 0:
            return None
        res = (trial or _trial)(variant, seq, min(trial_timeout, left), tiny)
        trials.append([seq, "ok" if res.get("ok") else ("timeout" if res.get("timeout") else "fail")])
        # the peak (and any memory cap) in the log too: a run killed by a time limit leaves only its log
        mem = f" peak {res['peak_GiB']:.1f} GiB" if isinstance(res.get("peak_GiB"), float) else ""
        mem += f" (cap {res['gpu_cap_GiB']} GiB)" if res.get("gpu_cap_GiB") else ""
        log(f"  {variant} S={seq}: {trials[-1][1]}{mem}" + (f" ({res['error']})" if res.get("error") else ""))
        if res.get("ok"):
            best.clear()
            best.update(res)
        if on_trial is not None:
            on_trial(_row_so_far(row, trials, best, t0, res.get("error")))
        if res.get("error"):
            raise RuntimeError(res["error"])
        if res.get("timeout"):
            return None
        return bool(res.get("ok"))

    try:
        s = max(1024, start // 1024 * 1024)
        r = ok(s)
        if r:
            lo = s
            while r and lo < cap:
                nxt = min(max(lo + 1024, int(lo * grow) // 1024 * 1024), cap)
                r = ok(nxt)
                if r:
                    lo = nxt
                elif r is False:
                    hi = nxt
        elif r is False:
            hi = s
            while r is False and hi > 1024:
                r = ok(hi // 2 // 1024 * 1024)
                if r:
                    lo = hi // 2 // 1024 * 1024
                elif r is False:
                    hi = hi // 2 // 1024 * 1024
        exact = hi is not None or lo >= cap
        while hi is not None and hi - lo > max(1024, lo // 8):
            mid = (lo + hi) // 2 // 1024 * 1024
            r = ok(mid)
            if r is None:
                exact = False
                break
            if r:
                lo = mid
            else:
                hi = mid
        if hi is None and lo < cap:
            exact = False
        row.update(max_seq=lo, exact=exact, first_fail=hi, trials=trials, **best)
    except RuntimeError as e:
        row.update(max_seq=lo or None, exact=False, trials=trials, error=str(e))
    row["secs"] = round(time.time() - t0)
    row.pop("ok", None)
    anchor = ANCHORS.get(variant)
    if anchor:
        row["anchor"] = anchor
    return row


def _row_so_far(row: dict, trials: list, best: dict, t0: float, error: str | None = None) -> dict:
    """The search's row from its finished trials alone (longest ok length, the shortest failure above it):
    what a run killed before the search ends can still report. Never exact: the search had not finished."""
    oks = [s for s, r in trials if r == "ok"]
    lo = max(oks) if oks else None
    fails = [s for s, r in trials if r == "fail" and (lo is None or s > lo)]
    out = dict(row, **{k: v for k, v in best.items() if k != "ok"})
    out.update(max_seq=lo, exact=False, first_fail=min(fails) if fails else None, trials=[list(t) for t in trials],
               in_progress=True, secs=round(time.time() - t0))
    if error:
        out["error"] = error
    if ANCHORS.get(row["variant"]):
        out["anchor"] = ANCHORS[row["variant"]]
    return out


def add_longctx_ratios(rows: list[dict]) -> None:
    """vs_liger: max_seq / Liger's (same run when measured, else the anchor) for the same checkpointing mode."""
    for r in rows:
        key = "sdpa+liger_gc" if r.get("grad_ckpt") else "sdpa+liger"
        same_run = [x for x in rows if x.get("variant") == key and x.get("max_seq")]
        liger = same_run[0]["max_seq"] if same_run else ANCHORS[key]
        if r.get("max_seq"):
            r["vs_liger"] = r["max_seq"] / liger
            r["liger_ref"] = "same run" if same_run else "anchor"
            if r.get("impl") == "fastkern":
                r["vs_best_peer"] = r["vs_liger"]


def save_progress(path: str | None, rows: list[dict], extra: dict | None = None) -> None:
    """Write ``rows`` (ratios added on copies) to ``path`` without printing: called after every trial."""
    if not path:
        return
    rows = [dict(r) for r in rows]
    add_longctx_ratios(rows)
    with contextlib.redirect_stdout(io.StringIO()):  # save() announces every write; once per trial is noise
        save(path, rows, {"anchors": ANCHORS, **(extra or {})})


def run(quick: bool = False, variants: tuple[str, ...] = VARIANTS, budget_s: float | None = None,
        progress=None, trial_timeout: float | None = None, json_path: str | None = None, start: str | int = "auto",
        cap: int = 1 << 20, tiny: bool = False, grow: float = 2.0, on_row: Callable[[dict], None] | None = None,
        log=print) -> list[dict]:
    """Rows per variant. Without CUDA: nothing can run out of GPU memory, so one row says so.

    The variants share ``budget_s`` (default 500 s, 240 quick): each gets an equal part of what is left when it
    starts, so time a fast search leaves goes to the later ones. ``trial_timeout`` caps one trial (default 420 s;
    a trial also never outlives its variant's share). With ``json_path`` the rows are saved after every finished
    trial (``partial: true`` until the last variant ends, the unfinished variant's row marked ``in_progress``), so
    a run killed by a time limit still leaves every trial it finished.
    """
    if not torch.cuda.is_available():
        return harness.cannot_run_here("longctx", "needs a CUDA GPU (the search runs until the GPU is full)")
    if quick:
        variants = tuple(v for v in variants if v.startswith("fastkern")) or variants
    for v in variants:
        parse_variant(v)  # a misspelt variant fails here, not after the others' minutes
    budget = budget_s if budget_s is not None else (240 if quick else 500)
    extra = {"time_budget_s": budget, "trial_timeout_s": trial_timeout or 420, "variants": list(variants)}
    rows: list[dict] = []
    t0 = time.time()
    for i, v in enumerate(variants):
        per = (budget - (time.time() - t0)) / (len(variants) - i)
        s = auto_start(v) if start == "auto" else int(start)

        def saved(partial: dict) -> None:
            save_progress(json_path, rows + [partial], dict(extra, partial=True))

        rows.append(search(v, start=s, cap=cap, budget_s=per, trial_timeout=trial_timeout or 420, tiny=tiny,
                           log=log, grow=grow, on_trial=saved))
        save_progress(json_path, rows, dict(extra, partial=i + 1 < len(variants)))
        if on_row is not None:
            on_row(rows[-1])
        if progress is not None:
            progress(v)
    add_longctx_ratios(rows)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--start", default="auto", help="'auto' (anchors/target) or a length to start the search at")
    ap.add_argument("--cap", type=int, default=1 << 20, help="stop doubling here")
    ap.add_argument("--time-budget", type=float, default=500, help="seconds for all variants together")
    ap.add_argument("--trial-timeout", type=float, default=420)
    ap.add_argument("--grow", type=float, default=2.0, help="factor between trials above a passing length")
    ap.add_argument("--tiny", action="store_true", help="2-layer model (harness smoke test)")
    ap.add_argument("--trial", nargs=2, metavar=("VARIANT", "SEQ"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.trial:
        res = trial_worker(args.trial[0], int(args.trial[1]), args.tiny)
        emit_result(res)
        return 0
    if not torch.cuda.is_available():
        print("no CUDA device: the longest-sequence search needs a GPU (nothing to measure here)")
        rows = run()
    else:
        # `timeout` sends SIGTERM: leave through SystemExit, so subprocess.run kills the running trial (it would
        # otherwise hold the GPU after we are gone); with --json the trials finished so far are already saved
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(124))
        rows = run(variants=tuple(args.variants.split(",")), budget_s=args.time_budget,
                   trial_timeout=args.trial_timeout, json_path=args.json, start=args.start, cap=args.cap,
                   tiny=args.tiny, grow=args.grow, on_row=lambda r: print_table([r], COLS))
    print_table(rows, COLS)
    if not torch.cuda.is_available():
        save(args.json, rows, {"anchors": ANCHORS})
    elif args.json:
        print(f"wrote {args.json} (saved after every trial; this is the final version)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
