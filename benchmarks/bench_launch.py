"""Host time of one small launch: Triton's own launch path vs DirectLaunch vs the stock PyTorch op (issues 21, 22).

Why: a one-token decoding step or one-row norm does microseconds of GPU work, so what a call costs is its host
path. ``JITFunction.run`` binds and specializes every argument on every launch; DirectLaunch
(hf_fastkern/kernels/_triton_utils.py) replays the compiled kernel once a launch of the same specialization has
gone through Triton. This script times the same calls both ways in one process, beside the op PyTorch runs
unpatched (it sets ``HF_FASTKERN_DIRECT_LAUNCH=1`` for the direct side: replay is opt-in until measured).

Rows (bf16, batch 1, one token unless stated): the split-KV decoding call (Llama-3-8B heads: 32 query heads, 8 kv
heads, head_dim 128; caches 4K and 32K; the stock op is SDPA as transformers calls it for a one-token step), the
RMSNorm forward (hidden 4096; stock: LlamaRMSNorm's six ops), RoPE of q and k (stock: apply_rotary_pos_emb's
formula), SwiGLU's activation product (intermediate 14336; stock: ``silu(gate) * up``). Columns: ``us_triton``
and ``us_direct`` per call (``harness.loop_ms``: calls back to back, one synchronize per loop, the median loop:
the host-bound rate, which is what a small step sees), ``us_stock``, ``x_stock`` = us_stock / us_direct and
``saved_us`` = us_triton - us_direct. GPU only (host time without the GPU launch is in host_overhead.py).

    python -m benchmarks.bench_launch [--json launch.json]
"""
from __future__ import annotations

import argparse
import os

import torch
import torch.nn.functional as F

from .harness import cannot_run_here, environment, loop_ms, print_table, save

COLS = ["op", "shape", "us_triton", "us_direct", "us_stock", "x_stock", "saved_us", "direct_exact"]


def _cases(dev: str):
    from hf_fastkern.kernels import reference
    from hf_fastkern.kernels.activations import _glu_act_fwd_impl
    from hf_fastkern.kernels.decode_attention import flash_decode_heads_first
    from hf_fastkern.kernels.rms_norm import _rms_norm_fwd_impl
    from hf_fastkern.kernels.rope import _rope_pair

    bf = torch.bfloat16
    for cache in (4096, 32768):
        q = torch.randn(1, 32, 1, 128, device=dev, dtype=bf)
        k = torch.randn(1, 8, cache, 128, device=dev, dtype=bf)
        v = torch.randn_like(k)
        yield ("decode", f"B1 q1 cache {cache}", lambda q=q, k=k, v=v: flash_decode_heads_first(q, k, v),
               lambda q=q, k=k, v=v: F.scaled_dot_product_attention(q, k, v, enable_gqa=True).transpose(1, 2))
    x = torch.randn(1, 1, 4096, device=dev, dtype=bf)
    w = torch.randn(4096, device=dev, dtype=bf)

    def stock_norm():  # LlamaRMSNorm.forward
        h = x.to(torch.float32)
        var = h.pow(2).mean(-1, keepdim=True)
        return w * (h * torch.rsqrt(var + 1e-6)).to(bf)

    yield "rms_norm fwd", "1 x 4096", lambda: _rms_norm_fwd_impl(x, w, 1e-6, 0.0, True, False)[0], stock_norm
    qr = torch.randn(1, 1, 32, 128, device=dev, dtype=bf).transpose(1, 2)
    kr = torch.randn(1, 1, 8, 128, device=dev, dtype=bf).transpose(1, 2)
    cos = torch.randn(1, 1, 128, device=dev, dtype=bf)
    sin = torch.randn_like(cos)
    yield ("rope q+k", "1 token, 32/8 heads x 128", lambda: _rope_pair(qr, kr, cos, sin, False, bf),
           lambda: reference.rope(qr, kr, cos, sin))
    g = torch.randn(1, 1, 14336, device=dev, dtype=bf)
    u = torch.randn_like(g)
    yield "swiglu act", "1 x 14336", lambda: _glu_act_fwd_impl(g, u, 0), lambda: F.silu(g) * u


def _same(a, b) -> bool:
    if isinstance(a, tuple):
        return all(_same(x, y) for x, y in zip(a, b))
    return torch.equal(a, b)


def run(quick: bool = False) -> list[dict]:
    from hf_fastkern.kernels._triton_utils import DIRECT_LAUNCH, triton_launches

    if not torch.cuda.is_available():
        return cannot_run_here("launch", "needs a CUDA GPU: Triton's launch path is what is timed")
    if not DIRECT_LAUNCH:
        return cannot_run_here("launch", "this Triton's JITFunction.run has another launch form (DirectLaunch off)")
    rows = []
    switch = os.environ.get("HF_FASTKERN_DIRECT_LAUNCH")
    os.environ["HF_FASTKERN_DIRECT_LAUNCH"] = "1"  # opt-in until measured: this script is the measurement
    try:
        for op, shape, ours, stock in _cases("cuda"):
            rows.append(_row(op, shape, ours, stock, triton_launches))
            print_table(rows[-1:], COLS)
    finally:
        if switch is None:
            os.environ.pop("HF_FASTKERN_DIRECT_LAUNCH")
        else:
            os.environ["HF_FASTKERN_DIRECT_LAUNCH"] = switch
    return rows


def _row(op, shape, ours, stock, triton_launches) -> dict:
    with triton_launches():
        want = ours()
        us_triton = loop_ms(ours) * 1e3
    ours()  # the first launch of the key goes through Triton; the next one is a replay
    got = ours()
    us_direct = loop_ms(ours) * 1e3
    us_stock = loop_ms(stock) * 1e3
    return dict(op=op, shape=shape, us_triton=us_triton, us_direct=us_direct, us_stock=us_stock,
                x_stock=us_stock / us_direct, saved_us=us_triton - us_direct, direct_exact=_same(got, want))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json")
    args = ap.parse_args()
    rows = run()
    print_table(rows, COLS)
    save(args.json, rows, {"env": environment()})


if __name__ == "__main__":
    main()
