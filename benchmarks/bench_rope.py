"""RoPE benchmark: fastkern apply_rope vs transformers' apply_rotary_pos_emb formula (eager), torch.compile of
that formula and Liger's liger_rotary_pos_emb, one process.

Run on the GPU:  python -m benchmarks.bench_rope --json $OUT/rope.json [--quick]

Rows: bf16, q [B, Hq, S, D] and k [B, Hk, S, D] as a Llama attention forward makes them (``view`` then
``transpose(1, 2)``: heads and positions interleaved in memory), cos/sin [1, S, D] without gradient (transformers
computes them under ``no_grad``). Shapes: the Llama-3-8B attention (Hq 32, Hk 8, D 128) at B x S = 4 x 2048 and
1 x 8192, and the 1.5B e2e model's (Hq 32, Hk 8, D 64) at 4 x 2048. Mode "fwd" (q_embed, k_embed) and "fwd+bwd"
(both backwards, dq and dk).
Bytes: fwd reads q and k and writes both results: 2*(Hq+Hk)*B*S*D*e; fwd+bwd adds the backward's read of the
two output gradients and write of dq, dk: (2+2)*(Hq+Hk)*B*S*D*e (e = element size; cos/sin traffic ignored).
Each implementation is gated on correctness first (outputs, dq, dk against the fp32 reference, the tolerance
rule of ``harness.bound``); a row that fails carries ``error`` and no timing. On a machine without a GPU the
quick pass runs eager and ours (the reference path, or the Triton interpreter) at a tiny size.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from hf_fastkern.kernels import reference
from hf_fastkern.kernels.rope import apply_rope

from . import harness
from .harness import (
    COLUMNS,
    Budget,
    compiled,
    finish,
    gate,
    op_main,
    peer_import,
    print_table,
    raise_compile_limits,
    time_impl,
)

# (B, S, Hq, Hk, D)
SHAPES = [(4, 2048, 32, 8, 128), (1, 8192, 32, 8, 128), (4, 2048, 32, 8, 64)]
QUICK = [(1, 16, 4, 2, 32)]


def _eager(q, k, cos, sin):
    # transformers' apply_rotary_pos_emb, op for op (the reference is that formula)
    return reference.rope(q, k, cos, sin)


def _impls(key, gpu: bool) -> dict[str, Callable | str]:
    impls: dict[str, Callable | str] = {"torch": _eager, "fastkern": apply_rope}
    if gpu:
        impls["compile"] = compiled(_eager, key)
        liger = peer_import("liger_kernel.transformers.rope:liger_rotary_pos_emb")
        impls["liger"] = liger if liger is not None else "liger_kernel is not installed"
    return impls


def _grads(fn: Callable, q, k, cos, sin, gq, gk) -> list[torch.Tensor]:
    """[q_embed, k_embed, dq, dk] of one forward + backward (fresh leaves for q and k)."""
    q, k = (t.detach().clone().requires_grad_() for t in (q, k))
    qo, ko = fn(q, k, cos, sin)
    # copies: an in-place backward (Liger's) overwrites the incoming gradient
    torch.autograd.backward((qo, ko), (gq.to(qo.dtype, copy=True), gk.to(ko.dtype, copy=True)))
    return [qo.detach(), ko.detach(), q.grad, k.grad]


def _qk(b: int, s: int, h: int, d: int, device: str, dtype: torch.dtype) -> torch.Tensor:
    # [B, S, H, D] viewed as [B, H, S, D]: the layout q/k reach apply_rotary_pos_emb in
    return torch.randn(b, s, h, d, device=device, dtype=dtype).transpose(1, 2)


def run(quick: bool = False, budget_s: float | None = None) -> list[dict]:
    device = harness.device()
    gpu = device == "cuda"
    dtype = torch.bfloat16
    raise_compile_limits()
    rows: list[dict] = []
    budget = Budget(budget_s)
    for b, s, hq, hk, d in QUICK if quick else SHAPES:
        if not budget.allows({"op": "rope", "B": b, "S": s, "Hq": hq, "Hk": hk, "D": d}):
            continue
        q, k = _qk(b, s, hq, d, device, dtype), _qk(b, s, hk, d, device, dtype)
        ang = torch.arange(s, device=device, dtype=torch.float32)[:, None] * torch.rand(d // 2, device=device)
        emb = torch.cat([ang, ang], dim=-1)[None]
        cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)
        gq, gk = torch.randn_like(q), torch.randn_like(k)
        oracle = _grads(reference.rope, q.float(), k.float(), cos.float(), sin.float(), gq.float(), gk.float())
        impls = _impls(d, gpu)
        results, failed = {}, {}
        for name, fn in impls.items():
            if isinstance(fn, str):
                failed[name] = fn
                continue
            try:
                results[name] = _grads(fn, q, k, cos, sin, gq, gk)
            except Exception as e:  # a peer that cannot run this shape is reported, not fatal
                failed[name] = f"{type(e).__name__}: {str(e)[:200]}"
        verdict = gate(results, oracle)
        del oracle, results
        n = (hq + hk) * b * s * d * q.element_size()
        q.requires_grad_()
        k.requires_grad_()
        for name, fn in impls.items():
            row = {"bench": "rope", "op": "rope", "impl": name, "dtype": "bf16", "B": b, "S": s, "H": hq,
                   "HK": hk, "D": d}
            if name in failed or not verdict[name][1]:
                why = failed.get(name) or f"failed correctness gate (max err {verdict[name][0]:.3g})"
                rows += [dict(row, mode=m, error=why) for m in ("fwd", "fwd+bwd")]
                continue
            args = (q, k, cos, sin)
            rows += time_impl(dict(row, max_err=verdict[name][0]), lambda fn=fn, a=args: fn(*a),
                              lambda fn=fn, a=args, g=(gq, gk): torch.autograd.backward(fn(*a), g),
                              [q, k], 2 * n, 4 * n, ("2*(H+HK)*B*S*D*e", "(2+2)*(H+HK)*B*S*D*e"))
            print_table(rows[-2:], COLUMNS)
        if gpu:
            torch.cuda.empty_cache()
    return finish(rows, ["op", "B", "S", "H", "HK", "D", "mode"])


if __name__ == "__main__":
    op_main(run, __doc__)
