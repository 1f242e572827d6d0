"""Fused linear cross-entropy: hf_fastkern vs torch eager, torch.compile, Liger, Cut Cross-Entropy (one process).

Workload: mean CE of ``hidden @ W.T`` against labels (every 7th token ignored), bf16, forward alone and
forward + backward (grads of hidden and W). Rows: median ms (``triton.testing.do_bench``), TFLOP/s of
fwd+bwd (``6 * T * H * V``: three matmuls), peak extra MiB over the live inputs
(``torch.cuda.max_memory_allocated``; it includes the 1 GiB d_W every implementation must return), the
loss's relative error against a chunked fp32 reference, and for ours the gradient error against it.
Correctness gate: a row whose loss is off by more than 1e-3 relative is marked ``ok=False``.

    python -m benchmarks.bench_cross_entropy --json $OUT/cross_entropy.json
    python -m benchmarks.bench_cross_entropy --sweep-chunks 256,512,1024,2048 --quick

``--sweep-chunks`` adds our rows for each chunk size (tokens per chunk) at the main shape; the default chunk
is ``default_chunk`` (HF_FASTKERN_CE_CHUNK_MB=128 -> 512 tokens at vocab 128256).
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from hf_fastkern.kernels.cross_entropy import default_chunk, fused_linear_cross_entropy

from . import harness
from .harness import add_ratios, bench_ms, peak_mib, print_table, save

MAIN = (8192, 4096, 128256)
EXTRA = [(4096, 2048, 128256), (16384, 4096, 128256)]
# without a GPU: one tiny shape (odd sizes) through the fallback path, no chunk sweep, no torch.compile
CPU_SHAPE = (63, 64, 1000)
COLS = ["T", "H", "V", "impl", "chunk", "fwd_ms", "fwdbwd_ms", "TFLOPs", "peak_MiB", "loss_rel_err",
        "grad_err_dh", "grad_err_dw", "vs_best_peer", "ok", "error"]


def _inputs(T, H, V, seed=0):
    dev = harness.device()
    g = torch.Generator(device=dev).manual_seed(seed)
    h = torch.randn(T, H, device=dev, dtype=torch.bfloat16, generator=g).requires_grad_()
    w = (torch.randn(V, H, device=dev, dtype=torch.bfloat16, generator=g) * 0.02).requires_grad_()
    y = torch.randint(0, V, (T,), device=dev, generator=g)
    y[::7] = -100
    return h, w, y


@torch.no_grad()
def _fp32_reference(h, w, y, chunk=2048):
    """Mean CE with fp32 logits, chunked over tokens (fp32 [T, V] would not fit at 16K x 128K)."""
    total = torch.zeros((), device=h.device, dtype=torch.float64)
    wf = w.float()
    for s in range(0, h.shape[0], chunk):
        z = h[s:s + chunk].float() @ wf.t()
        total += F.cross_entropy(z, y[s:s + chunk], ignore_index=-100, reduction="sum").double()
    return (total / (y != -100).sum()).item()


def _peers(h, w, y, with_compile: bool):
    """name -> (callable returning the loss, chunk or None). Missing peers -> (None, reason)."""
    impls = {}
    impls["torch"] = (lambda: F.cross_entropy((h @ w.t()).float(), y, ignore_index=-100), None)
    if with_compile:
        comp = torch.compile(lambda h, w, y: F.cross_entropy((h @ w.t()).float(), y, ignore_index=-100))
        impls["compile"] = (lambda: comp(h, w, y), None)
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
        lig = LigerFusedLinearCrossEntropyLoss()
        impls["liger"] = (lambda: lig(w, h, y), None)
    except Exception as e:
        impls["liger"] = (None, f"liger-kernel not importable: {type(e).__name__}: {e}"[:200])
    try:
        from cut_cross_entropy import linear_cross_entropy as cce
        impls["cce"] = (lambda: cce(h, w, y), None)
    except Exception as e:
        impls["cce"] = (None, f"cut-cross-entropy not importable: {type(e).__name__}: {e}"[:200])
    return impls


def measure_loss(name, fn, h, w, T, H, V, ref, chunk=None, grad_ref=None, *, bench: str = "flce",
                 dtype: str = "bf16", warmup: int = 100, rep: int = 400) -> dict:
    """One row: ``fn()`` -> a scalar loss of ``h`` [T, H] and ``w`` [V, H], correctness-gated against ``ref`` (and
    the gradients ``grad_ref``), then its forward and fwd+bwd medians and peak memory. Shared with
    bench_trl_head."""
    row = {"bench": bench, "T": T, "H": H, "V": V, "impl": name, "chunk": chunk, "dtype": dtype,
           "flops_formula": "6*T*H*V (fwd+bwd)"}
    try:
        h.grad = w.grad = None
        loss = fn()
        row["loss_rel_err"] = abs(loss.item() - ref) / abs(ref)
        row["ok"] = row["loss_rel_err"] <= 1e-3
        if grad_ref is not None:
            loss.backward()
            dh_ref, dw_ref = grad_ref
            row["grad_err_dh"] = ((h.grad.float() - dh_ref).abs().max() / dh_ref.abs().max()).item()
            row["grad_err_dw"] = ((w.grad.float() - dw_ref).abs().max() / dw_ref.abs().max()).item()
        del loss
        h.grad = w.grad = None
        row["fwd_ms"] = bench_ms(fn, warmup=warmup, rep=rep)
        row["fwdbwd_ms"] = bench_ms(lambda: fn().backward(), grad_to_none=[h, w], warmup=warmup, rep=rep)
        row["TFLOPs"] = 6 * T * H * V / row["fwdbwd_ms"] / 1e9
        h.grad = w.grad = None
        row["peak_MiB"] = peak_mib(lambda: fn().backward())
        h.grad = w.grad = None
    except Exception as e:  # a peer that fails is a row with its error, never a crash of the whole run
        row["error"] = f"{type(e).__name__}: {e}"[:300]
        row["ok"] = False
        h.grad = w.grad = None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return row


def _grad_reference(h, w, y, chunk=2048):
    """fp32 gradients of the mean loss, chunked."""
    valid = (y != -100).sum().float()
    wf = w.detach().float()
    dh = torch.empty(h.shape, device=h.device, dtype=torch.float32)
    dw = torch.zeros(w.shape, device=h.device, dtype=torch.float32)
    for s in range(0, h.shape[0], chunk):
        hc = h.detach()[s:s + chunk].float()
        z = (hc @ wf.t()).requires_grad_()
        (g,) = torch.autograd.grad(F.cross_entropy(z, y[s:s + chunk], ignore_index=-100, reduction="sum"), z)
        g /= valid
        dh[s:s + chunk] = g @ wf
        dw += g.t() @ hc
        del z, g
    return dh, dw


def _run_shape(T: int, H: int, V: int, sweep_chunks: list[int] | None, peers: bool) -> list[dict]:
    rows = []
    main = (T, H, V) in (MAIN, CPU_SHAPE)
    h, w, y = _inputs(T, H, V)
    ref = _fp32_reference(h, w, y)
    grad_ref = _grad_reference(h, w, y) if main else None
    chunk = default_chunk(T, V, 2)
    rows.append(measure_loss("fastkern", lambda: fused_linear_cross_entropy(h, w, y), h, w, T, H, V, ref,
                         chunk=chunk, grad_ref=grad_ref))
    print_table(rows[-1:], COLS)
    grad_ref = None
    torch.cuda.empty_cache()
    for c in (sweep_chunks or []) if main else []:
        if c != chunk:
            rows.append(measure_loss("fastkern", lambda c=c: fused_linear_cross_entropy(h, w, y, chunk_size=c),
                                 h, w, T, H, V, ref, chunk=c))
            print_table(rows[-1:], COLS)
    if peers:
        for name, (fn, err) in _peers(h, w, y, with_compile=main and h.is_cuda).items():
            if fn is None:
                rows.append({"bench": "flce", "T": T, "H": H, "V": V, "impl": name, "error": err, "ok": False})
            else:
                rows.append(measure_loss(name, fn, h, w, T, H, V, ref))
            print_table(rows[-1:], COLS)
            torch.cuda.empty_cache()
    return rows


def run(quick: bool = False, sweep_chunks: list[int] | None = None, peers: bool = True) -> list[dict]:
    """All rows: the main shape (with the chunk sweep and torch.compile), then the extra shapes unless quick.
    Without a GPU: ``CPU_SHAPE`` only (our fallback path beside torch eager and any importable peer)."""
    rows = []
    gpu = harness.device() == "cuda"
    for T, H, V in ([MAIN] if quick else [MAIN] + EXTRA) if gpu else [CPU_SHAPE]:
        rows += _run_shape(T, H, V, sweep_chunks if gpu else None, peers)
        torch.cuda.empty_cache()
    add_ratios(rows, ["T", "H", "V"], metric="fwdbwd_ms")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", default=None, help="write rows + environment to this JSON file")
    ap.add_argument("--quick", action="store_true", help="main shape only")
    ap.add_argument("--sweep-chunks", default="256,1024,2048",
                    help="comma-separated chunk sizes (tokens) for extra fastkern rows at the main shape; '' = none")
    ap.add_argument("--no-peers", action="store_true", help="only our implementation")
    args = ap.parse_args()
    sweep = [int(c) for c in args.sweep_chunks.split(",") if c.strip()]
    rows = run(quick=args.quick, sweep_chunks=sweep, peers=not args.no_peers)
    print()
    print_table(rows, COLS)
    save(args.json, rows)


if __name__ == "__main__":
    main()
