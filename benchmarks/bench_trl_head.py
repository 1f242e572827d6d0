"""TRL's fused LM head vs our fused linear cross-entropy, at the shapes of ``bench_cross_entropy.py`` (one process).

Why: ``SFTTrainer`` / ``DPOTrainer`` (TRL >= 1.16) always install ``trl.trainer.utils.add_fused_lm_head`` and
compute the loss through it (``model(..., fused_lm_head=True)``). In a run patched by ``hf_fastkern`` exactly
one fused head runs (TRL's; ``docs/trl.md``); this script measures whether ours would be faster.

Workload per shape (T tokens, hidden H, vocab V; bf16; every 7th label ignored, as bench_cross_entropy):
- ``trl_log_probs``: what ``add_fused_lm_head`` runs with ``outputs=("log_probs",)`` (DPO's policy minimum):
  the valid rows gathered (``hidden[mask]``, TRL's "compact" mode on Triton devices), then
  ``ChunkedLogProbFunction`` with TRL's chunk (32768), loss = ``-log_probs.sum() / n_valid``.
- ``trl_sft_outputs``: the same with ``outputs=("log_probs", "entropy", "is_top1")``, what ``SFTTrainer`` asks
  for (its ``entropy`` and ``mean_token_accuracy`` metrics).
- ``fastkern``: ``fused_linear_cross_entropy(h, w, y)`` (mean over valid tokens; our default chunk).
- ``fastkern_per_token``: ``reduction='none'`` summed and divided by n_valid: the per-token losses a
  TRL-compatible head would have to return as ``log_probs`` (its backward is the per-row-weighted one).
Rows: median ms forward and forward+backward (``do_bench``), TFLOP/s of fwd+bwd (``6*T*H*V``), peak extra MiB,
loss error relative to a chunked fp32 reference, gradient errors (d_hidden, d_weight, max abs relative to the
reference's max) at the main shape. Correctness gate: ``ok`` = loss within 1e-3 relative.
Without CUDA: a small shape (T=512, H=64, V=2048), wall-clock timings of the CPU paths (TRL's torch fallback,
our PyTorch reference): a smoke run, not a measurement.

    python -m benchmarks.bench_trl_head --json $OUT/trl_head.json
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from hf_fastkern.kernels.cross_entropy import fused_linear_cross_entropy

from .bench_cross_entropy import EXTRA, MAIN, measure_loss
from .harness import add_ratios, environment, print_table, save

CPU_SHAPE = (512, 64, 2048)
# trl.trainer.utils._CHUNKED_LOGPROB_CHUNK_SIZE in TRL 1.16 (vocab columns per tile)
TRL_CHUNK = 32768
SFT_OUTPUTS = ("log_probs", "entropy", "is_top1")
COLS = ["T", "H", "V", "impl", "fwd_ms", "fwdbwd_ms", "TFLOPs", "peak_MiB", "loss_rel_err", "grad_err_dh",
        "grad_err_dw", "vs_best_peer", "ok", "error"]


def _inputs(T: int, H: int, V: int, device: str, seed: int = 0):
    g = torch.Generator(device=device).manual_seed(seed)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    h = torch.randn(T, H, device=device, dtype=dtype, generator=g).requires_grad_()
    w = (torch.randn(V, H, device=device, dtype=dtype, generator=g) * 0.02).requires_grad_()
    y = torch.randint(0, V, (T,), device=device, generator=g)
    y[::7] = -100
    return h, w, y


def _reference(h, w, y, chunk: int = 2048):
    """fp32 mean loss and its gradients (d_hidden, d_weight), chunked over tokens."""
    valid = (y != -100).sum().float()
    wf = w.detach().float()
    total = torch.zeros((), device=h.device, dtype=torch.float64)
    dh = torch.empty(h.shape, device=h.device, dtype=torch.float32)
    dw = torch.zeros(w.shape, device=h.device, dtype=torch.float32)
    for s in range(0, h.shape[0], chunk):
        hc = h.detach()[s:s + chunk].float()
        z = (hc @ wf.t()).requires_grad_()
        loss = F.cross_entropy(z, y[s:s + chunk], ignore_index=-100, reduction="sum")
        (g,) = torch.autograd.grad(loss, z)
        total += loss.detach().double()
        g /= valid
        dh[s:s + chunk] = g @ wf
        dw += g.t() @ hc
    return (total / valid).item(), dh, dw


def _impls(h, w, y) -> dict:
    """name -> callable returning the mean loss (None, reason) where TRL is missing."""
    n_valid = (y != -100).sum()
    impls = {
        "fastkern": lambda: fused_linear_cross_entropy(h, w, y),
        "fastkern_per_token": lambda: fused_linear_cross_entropy(h, w, y, reduction="none").sum() / n_valid,
    }
    try:
        from trl.kernels import ChunkedLogProbFunction
    except Exception as e:  # TRL not installed: rows carry the reason
        for name in ("trl_log_probs", "trl_sft_outputs"):
            impls[name] = (None, f"trl not importable: {type(e).__name__}: {e}")
        return impls
    mask = y != -100

    def trl(outputs):
        def fn():
            # TRL's compact mode (Triton devices): only the valid rows are scored
            out = ChunkedLogProbFunction.apply(h[mask], w, None, y[mask], 1.0, TRL_CHUNK, None, 1.0, outputs)
            return -out[0].sum() / n_valid
        return fn

    impls["trl_log_probs"] = trl(("log_probs",))
    impls["trl_sft_outputs"] = trl(SFT_OUTPUTS)
    return impls


def run(quick: bool = False) -> list[dict]:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    shapes = [CPU_SHAPE] if device == "cpu" else [MAIN] if quick else [MAIN, *EXTRA]
    rows = []
    for T, H, V in shapes:
        h, w, y = _inputs(T, H, V, device)
        ref, dh, dw = _reference(h, w, y)
        grads = (dh, dw) if (T, H, V) in (MAIN, CPU_SHAPE) else None
        for name, fn in _impls(h, w, y).items():
            if isinstance(fn, tuple):
                rows.append({"bench": "trl_head", "T": T, "H": H, "V": V, "impl": name, "error": fn[1],
                             "ok": False})
            else:
                rows.append(measure_loss(name, fn, h, w, T, H, V, ref, grad_ref=grads, bench="trl_head",
                                         dtype=str(h.dtype).replace("torch.", ""), warmup=50, rep=200))
            print_table(rows[-1:], COLS)
        del h, w, y, dh, dw
        if device == "cuda":
            torch.cuda.empty_cache()
    add_ratios(rows, ["T", "H", "V"], metric="fwdbwd_ms")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", default=None, help="write rows + environment + command to this JSON file")
    ap.add_argument("--quick", action="store_true", help="main shape only (CUDA)")
    args = ap.parse_args()
    rows = run(quick=args.quick)
    print()
    print_table(rows, COLS)
    extra = None if torch.cuda.is_available() else {"note": "no GPU: CPU smoke run at a small shape"}
    save(args.json, rows, extra)
    print("environment:", environment())


if __name__ == "__main__":
    main()
