"""GQA through SDPA on Hopper: native ``enable_gqa`` against K/V repeated to every query head (issue 12).

Why: in the 8B LoRA profile (H100, 2026-11-26) our attention class took 175 ms per 1 x 8192 step against HF + PEFT
+ sdpa's 152 with the same cuDNN kernels by name. ``hf_fastkern``'s dense path calls SDPA with ``enable_gqa``;
transformers may hand SDPA K/V already repeated (``repeat_kv``). This times both, causal, forward + backward,
per backend (cuDNN, flash), with the repeat and its backward (the sum over each group) included.

    python -m benchmarks.bench_gqa_sdpa [--json FILE]
"""
from __future__ import annotations

import argparse
import functools
import sys

import torch
import torch.nn.functional as F

from .harness import bench_ms, print_table, save

# (batch, q heads, kv heads, seq, head_dim): 8B LoRA shapes, then the 1.5B e2e shape
SHAPES = [(1, 32, 8, 8192, 128), (4, 32, 8, 2048, 128), (4, 32, 8, 2048, 64)]


def _repeat(t: torch.Tensor, n: int) -> torch.Tensor:
    b, h, s, d = t.shape
    return t[:, :, None].expand(b, h, n, s, d).reshape(b, h * n, s, d)


def _step(mode: str, q, k, v, dout) -> None:
    if mode == "enable_gqa":
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    else:
        n = q.shape[1] // k.shape[1]
        o = F.scaled_dot_product_attention(q, _repeat(k, n), _repeat(v, n), is_causal=True)
    o.backward(dout)


def rows() -> list[dict]:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    out = []
    for b, hq, hk, s, d in SHAPES:
        g = torch.Generator(device="cuda").manual_seed(0)
        # the layout the attention forward gives: [b, s, h, d] memory viewed as [b, h, s, d]
        q = torch.randn(b, s, hq, d, device="cuda", dtype=torch.bfloat16, generator=g).transpose(1, 2)
        k = torch.randn(b, s, hk, d, device="cuda", dtype=torch.bfloat16, generator=g).transpose(1, 2)
        v = torch.randn(b, s, hk, d, device="cuda", dtype=torch.bfloat16, generator=g).transpose(1, 2)
        q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
        dout = torch.randn(b, hq, s, d, device="cuda", dtype=torch.bfloat16, generator=g)
        flops = 4 * b * hq * s * s * d / 2 * 3.5  # causal fwd (2 matmuls) + bwd (2.5x)
        for name, backend in (("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION)):
            for mode in ("enable_gqa", "repeat_kv"):
                step = functools.partial(_step, mode, q, k, v, dout)
                try:
                    with sdpa_kernel([backend]):
                        ms = bench_ms(step, grad_to_none=[q, k, v])
                    err = None
                except RuntimeError as e:
                    ms, err = None, str(e).splitlines()[0][:100]
                out.append(dict(bench="gqa_sdpa", B=b, Hq=hq, Hk=hk, S=s, D=d, backend=name, mode=mode, ms=ms,
                                tflops=flops / ms / 1e9 if ms else None, error=err))
        # memory layouts (cuDNN, native GQA): q/k/v and the incoming gradient as [b, s, h, d] memory (what the
        # projections give; the fused RoPE keeps it) or contiguous [b, h, s, d] (what a copy would give)
        for q_l in ("bshd", "bhsd"):
            for kv_l in ("bshd", "bhsd"):
                for do_l in ("bshd", "bhsd"):
                    qq, kk, vv = (t.detach().contiguous().requires_grad_() if lay == "bhsd" else t
                                  for t, lay in ((q, q_l), (k, kv_l), (v, kv_l)))
                    dd = dout if do_l == "bhsd" else dout.transpose(1, 2).contiguous().transpose(1, 2)
                    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
                        ms = bench_ms(functools.partial(_step, "enable_gqa", qq, kk, vv, dd), grad_to_none=[qq, kk, vv])
                    out.append(dict(bench="gqa_sdpa_layout", B=b, Hq=hq, Hk=hk, S=s, D=d, backend="cudnn",
                                    mode=f"q {q_l}, kv {kv_l}, dout {do_l}", ms=ms, tflops=flops / ms / 1e9))
    for r in out:
        if r["mode"] == "repeat_kv" and r["ms"]:
            base = next((x for x in out if x["mode"] == "enable_gqa" and x["backend"] == r["backend"]
                         and (x["B"], x["S"], x["D"]) == (r["B"], r["S"], r["D"])), None)
            if base and base["ms"]:
                r["vs_enable_gqa"] = base["ms"] / r["ms"]
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA device: this script times SDPA's GPU backends and needs a GPU")
        return 0
    r = rows()
    print_table(r, ["B", "Hq", "Hk", "S", "D", "backend", "mode", "ms", "tflops", "vs_enable_gqa", "error"])
    save(args.json, r)
    return 0


if __name__ == "__main__":
    sys.exit(main())
