"""Attention benchmark: fastkern flash_attention vs SDPA flash, SDPA cuDNN and compiled flex_attention.

Run on the GPU:  python -m benchmarks.bench_attention --json $OUT/attention.json [--quick]

Rows (bf16): the four target shapes (32 heads, head_dim 128, causal; (B, S) = (8, 2K), (4, 4K), (2, 8K),
(1, 16K)), GQA 32/8 at (4, 4K), head_dim 64 at (4, 4K), sliding window 4096 at (1, 16K), and a varlen batch
of mixed lengths with the same 16K tokens as (4, 4K). Layout: [B, S, H, D] for fastkern, transposed views
([B, H, S, D] for the peers) of the same storage.

FLOPs: forward = 4 * D * H * (visible (query, key) pairs), i.e. 4*B*H*S^2*D/2 for causal (the
FlashAttention convention, also used by anchors/gpu_anchors.py); window and varlen count their exact
visible pairs. Forward + backward = 3.5x forward. Every implementation is gated on correctness: its forward
output is compared with fastkern's and with SDPA-math in fp32 on one (batch, head) slice; rows that fail
carry ``error`` and no timing. Timings: triton.testing.do_bench median (via benchmarks/harness.bench_ms).
Without a GPU: two tiny cases (S=64), fastkern's fallback path beside SDPA's math backend, wall clock.

``--parts decode`` (issue 22): KV-cache decoding, q_len 1 and 16 against caches of 4K, 32K and 128K keys, batch 1
and 16, GQA 32/8, head_dim 128: the split-KV kernel (``fastkern_decode``, kernels/decode_attention.py) and the
FlashAttention-2 kernel (``fastkern_fa2``) beside SDPA as transformers calls it (``sdpa``: no mask at q_len 1,
the bottom-right causal mask at q_len 16) and, at q_len 1, SDPA's flash and cuDNN backends. Forward only, no
gradients; ``GB_s`` = bytes of K and V read / time (the traffic a decoding step cannot avoid), ``x_<peer>`` =
peer ms / fastkern_decode ms; on a GPU ``kernel_ms`` and ``launches`` are the profiler's kernel time and launches
per call, so ``ms`` far above ``kernel_ms`` is host time. Same correctness gate (one head of the last batch row
against fp32).

    python -m benchmarks.bench_attention --parts decode --json $OUT/attention_decode.json

``--parts decode-configs``: the split kernel's launch configuration (``decode_attention.LAUNCH``: key block,
warps, stages, programs per SM) swept at one-token steps, GPU time from CUDA-graph replays beside SDPA's flash
and cuDNN backends timed the same way.
"""
from __future__ import annotations

import argparse
import math
import os

import torch
import torch.nn.functional as F

from hf_fastkern.kernels import reference
from hf_fastkern.kernels.attention import flash_attention, flash_attention_varlen

from . import harness
from .harness import add_ratios, bench_ms, peak_mib, print_table, save

H, D = 32, 128
TARGETS = [(8, 2048), (4, 4096), (2, 8192), (1, 16384)]
VARLEN_LENGTHS = [4096, 2048, 1024, 3072, 512, 5632]  # 16384 tokens, as dense (4, 4096)
# Correctness gate for a benchmark row: max |out - oracle| on one (batch, head) slice, bf16 outputs of
# unit-variance inputs. SDPA-flash's own error there is ~4e-3; 2e-2 catches any wrong mask or layout.
GATE = 2e-2


def _pairs(sq: int, sk: int, causal: bool, window: int | None) -> int:
    """Visible (query, key) pairs of one sequence, bottom-right causal; the S^2/2 convention for plain causal."""
    if not window:
        return sq * sk // 2 if causal else sq * sk
    # causal window: query i (position i + sk - sq) sees min(pos + 1, W) keys.
    off = sk - sq
    return sum(min(i + off + 1, window) for i in range(sq))


def _flex():
    # Every case (shape, mask) recompiles flex_attention; past dynamo's default recompile limit (8) it
    # silently runs unfused (materializing [S, S]), which is not the peer we want to measure.
    import torch._dynamo
    for knob in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit",
                 "accumulated_cache_size_limit"):
        if hasattr(torch._dynamo.config, knob):
            setattr(torch._dynamo.config, knob, 256)
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
        return torch.compile(flex_attention), create_block_mask
    except Exception:  # torch without flex_attention
        return None, None


def _impls(case: dict, q, k, v):
    """name -> callable(q, k, v) in [B, S, H, D] (or packed for varlen) returning the same layout. On a CUDA
    GPU the peers are SDPA's flash and cuDNN backends and compiled flex_attention; on the CPU, SDPA's default
    (math) backend, the one peer that runs there (flex needs a compiler toolchain)."""
    gpu = q.is_cuda
    from torch.nn.attention import SDPBackend, sdpa_kernel
    causal, window, hk = case["causal"], case.get("window"), case["HK"]
    impls = {}
    if case.get("varlen"):
        cu, maxlen = case["cu"], max(case["lengths"])
        impls["fastkern"] = lambda q, k, v: flash_attention_varlen(q, k, v, cu, cu, maxlen, maxlen, causal=causal)
    else:
        impls["fastkern"] = lambda q, k, v: flash_attention(q, k, v, causal=causal, sliding_window=window)
    gqa = hk != case["H"]
    if not gpu and not case.get("varlen") and not window:
        impls["sdpa"] = lambda q, k, v: F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal,
            **({"enable_gqa": True} if hk != case["H"] else {})).transpose(1, 2)
    if gpu and not case.get("varlen") and not window:
        for name, be in (("sdpa_flash", SDPBackend.FLASH_ATTENTION), ("sdpa_cudnn", SDPBackend.CUDNN_ATTENTION)):
            def f(q, k, v, be=be):
                with sdpa_kernel(be):
                    kw = {"enable_gqa": True} if gqa else {}
                    o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                       is_causal=causal, **kw)
                return o.transpose(1, 2)
            impls[name] = f
    flex, create_block_mask = _flex() if gpu else (None, None)
    if flex is not None:
        if case.get("varlen"):
            doc = torch.repeat_interleave(torch.arange(len(case["lengths"]), device=q.device),
                                          torch.tensor(case["lengths"], device=q.device))
            mask_mod = lambda b, h, qi, ki: (doc[qi] == doc[ki]) & (qi >= ki)
            s = doc.numel()
        elif window:
            mask_mod = lambda b, h, qi, ki: (qi >= ki) & (qi - ki < window)
            s = case["S"]
        else:
            mask_mod = lambda b, h, qi, ki: qi >= ki
            s = case["S"]
        bm = create_block_mask(mask_mod, None, None, s, s, device=q.device)

        def fx(q, k, v):
            if q.dim() == 3:  # packed: one batch of all tokens
                q, k, v = q[None], k[None], v[None]
                return flex(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=bm,
                            enable_gqa=gqa).transpose(1, 2)[0]
            return flex(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=bm,
                        enable_gqa=gqa).transpose(1, 2)
        impls["flex_compiled"] = fx
    return impls


def _oracle_err(case: dict, out: torch.Tensor, q, k, v) -> float:
    """Max error of ``out`` on its last sequence/head against the fp32 reference (cheap slice)."""
    hk = case["HK"]
    g = case["H"] // hk
    if case.get("varlen"):
        cu = case["cu"].tolist()
        s0, s1 = cu[-2], cu[-1]
        qs, ks, vs, os_ = q[s0:s1][None], k[s0:s1][None], v[s0:s1][None], out[s0:s1][None]
    else:
        qs, ks, vs, os_ = q[-1:], k[-1:], v[-1:], out[-1:]
    h = case["H"] - 1
    ref = reference.attention(qs[:, :, h:h + 1].transpose(1, 2).float(), ks[:, :, h // g:h // g + 1].transpose(1, 2).float(),
                              vs[:, :, h // g:h // g + 1].transpose(1, 2).float(), causal=case["causal"],
                              sliding_window=case.get("window"))
    return (os_[:, :, h:h + 1].float() - ref.transpose(1, 2)).abs().max().item()


# CPU pass (no GPU): the reference path / Triton interpreter at a size that takes seconds
CPU_CASES = [dict(name="causal", B=1, S=64, H=4, HK=4, D=32, causal=True),
             dict(name="gqa4/2", B=1, S=64, H=4, HK=2, D=32, causal=True)]


def _cases(quick: bool, gpu: bool = True) -> list[dict]:
    if not gpu:
        return [dict(c) for c in CPU_CASES]
    cases = [dict(name="causal", B=b, S=s, H=H, HK=H, D=D, causal=True) for b, s in TARGETS]
    cases += [
        dict(name="gqa32/8", B=4, S=4096, H=H, HK=8, D=D, causal=True),
        dict(name="d64", B=4, S=4096, H=H, HK=H, D=64, causal=True),
        dict(name="window4096", B=1, S=16384, H=H, HK=H, D=D, causal=True, window=4096),
        dict(name="varlen", B=1, S=sum(VARLEN_LENGTHS), H=H, HK=H, D=D, causal=True, varlen=True,
             lengths=VARLEN_LENGTHS),
    ]
    return cases[:2] if quick else cases


# (B, q_len, cache) of the decode part; H=32, HK=8, D=128 (Llama-3-8B's attention)
DECODE_CASES = [(b, sq, c) for c in (4096, 32768, 131072) for b in (1, 16) for sq in (1, 16)]
CPU_DECODE_CASES = [(1, 1, 64), (2, 4, 48)]


def _decode_impls(q, k, v, sq: int, gpu: bool) -> dict:
    """name -> callable() returning [B, q_len, H, D]; q [B, H, q_len, D], k/v [B, HK, S, D] (cache layout)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from hf_fastkern.kernels.attention import flash_attention_heads_first
    from hf_fastkern.kernels.decode_attention import flash_decode_heads_first
    sk = k.shape[2]
    mask = None
    if sq > 1:  # bottom-right causal, as transformers' sdpa mask builds it for a cached step
        mask = (torch.arange(sk, device=q.device)[None, :]
                <= torch.arange(sq, device=q.device)[:, None] + (sk - sq))[None, None]
    impls = {"fastkern_decode": lambda: flash_decode_heads_first(q, k, v, causal=True),
             "fastkern_fa2": lambda: flash_attention_heads_first(q, k, v, True, None, None, None),
             "sdpa": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True
                                                           ).transpose(1, 2)}
    if gpu and sq == 1:
        for name, be in (("sdpa_flash", SDPBackend.FLASH_ATTENTION), ("sdpa_cudnn", SDPBackend.CUDNN_ATTENTION)):
            def f(be=be):
                with sdpa_kernel(be):
                    return F.scaled_dot_product_attention(q, k, v, enable_gqa=True).transpose(1, 2)
            impls[name] = f
    return impls


def run_decode(json_path: str | None = None, quick: bool = False) -> list[dict]:
    """The decode part (module docstring); rows saved after every case."""
    device = harness.device()
    gpu = device == "cuda"
    cases = DECODE_CASES if gpu else CPU_DECODE_CASES
    if quick:
        cases = cases[:4]
    hq, hk, d = (H, 8, D) if gpu else (4, 2, 32)
    rows = []
    for b, sq, sk in cases:
        torch.manual_seed(0)
        q = torch.randn(b, hq, sq, d, device=device, dtype=torch.bfloat16)
        k = torch.randn(b, hk, sk, d, device=device, dtype=torch.bfloat16)
        v = torch.randn(b, hk, sk, d, device=device, dtype=torch.bfloat16)
        kv_bytes = 2 * k.numel() * k.element_size()
        ref = reference.attention(q[-1:, -1:].float(), k[-1:, -1:].float(), v[-1:, -1:].float(),
                                  causal=True).transpose(1, 2)
        group = []
        for name, fn in _decode_impls(q, k, v, sq, gpu).items():
            row = dict(bench="attention_decode", impl=name, B=b, q_len=sq, S=sk, H=hq, HK=hk, D=d)
            try:
                with torch.no_grad():
                    out = fn()
                    err = (out[-1:, :, -1:].float() - ref).abs().max().item()
                    row["max_err_vs_fp32"] = err
                    if not math.isfinite(err) or err > GATE:
                        row["error"] = f"correctness gate failed: max error {err:.3g} > {GATE}"
                    else:
                        row["ms"] = bench_ms(fn)
                        row["GB_s"] = kv_bytes / row["ms"] / 1e6
                        if gpu:  # the GPU's own share: a call's ms far above it is host time (launch path)
                            table = harness.kernel_table(fn, [])
                            row["kernel_ms"] = sum(ms for _, ms, _ in table)
                            row["launches"] = sum(n for _, _, n in table)
            except Exception as e:  # a peer that does not take this case
                row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
            group.append(row)
            print(f"decode B={b} q={sq} S={sk} {name}: {row.get('ms', float('nan')):.4f} ms "
                  f"(kernels {row.get('kernel_ms', float('nan')):.4f} ms, {row.get('launches', 0):.0f} launches) "
                  f"{row.get('GB_s', 0):.0f} GB/s {row.get('error', '')}", flush=True)
        ours = next((r for r in group if r["impl"] == "fastkern_decode" and "ms" in r), None)
        if ours:
            for r in group:
                if r is not ours and "ms" in r:
                    ours[f"x_{r['impl']}"] = r["ms"] / ours["ms"]
        rows += group
        if gpu:
            del q, k, v
            torch.cuda.empty_cache()
        save(json_path, rows)
    return rows


# decode-configs: one-token steps (the case SDPA still wins), (B, cache, head_dim); GQA 4:1 as above
CONFIG_CASES = [(1, 4096, 128), (1, 32768, 128), (1, 131072, 128), (16, 4096, 128), (16, 32768, 128),
                (1, 32768, 64), (1, 131072, 64)]
CONFIG_GRID = [dict(block_n=bn, num_warps=w, num_stages=st, progs_per_sm=pp)
               for bn in (32, 64, 128) for w in (4, 8) for st in (2, 3, 4) for pp in (1, 2, 4)]


def _graph_us(fn) -> float:
    """GPU time per call in us from CUDA-graph replays (no host launch time in it)."""
    import triton.testing

    return triton.testing.do_bench_cudagraph(fn, rep=30) * 1e3


def run_decode_configs(json_path: str | None = None, quick: bool = False) -> list[dict]:
    """``--parts decode-configs``: the split kernel's launch configuration (decode_attention.LAUNCH) swept at
    one-token steps, GPU time per call from CUDA-graph replays beside SDPA's flash and cuDNN backends timed the
    same way; every config gated on correctness. Rows: one per (case, config); ``x_best_sdpa`` = the faster SDPA
    backend's time / ours."""
    if harness.device() != "cuda":
        return harness.cannot_run_here("attention_decode_configs", "needs a CUDA GPU (CUDA-graph timing)")
    rows = []
    grid = [c for c in CONFIG_GRID if c["num_stages"] == 2 and c["progs_per_sm"] == 2] if quick else CONFIG_GRID
    for b, sk, d in CONFIG_CASES[:3] if quick else CONFIG_CASES:
        rows += _decode_config_case(b, sk, d, grid)
        torch.cuda.empty_cache()
        save(json_path, rows)
    return rows


def _decode_config_case(b: int, sk: int, d: int, grid: list[dict]) -> list[dict]:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from hf_fastkern.kernels import decode_attention as dec

    torch.manual_seed(0)
    hq = 32 if d == 128 else 16
    q = torch.randn(b, hq, 1, d, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(b, hq // 4, sk, d, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    want = F.scaled_dot_product_attention(q, k, v, enable_gqa=True).transpose(1, 2).float()
    peers = {}
    for name, be in (("sdpa_flash", SDPBackend.FLASH_ATTENTION), ("sdpa_cudnn", SDPBackend.CUDNN_ATTENTION)):
        def f(be=be):
            with sdpa_kernel(be):
                return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        try:
            peers[name] = _graph_us(f)
        except Exception as e:  # a backend that does not take this shape
            print(f"decode-configs B={b} S={sk} D={d} {name}: {type(e).__name__}: {str(e)[:120]}")
    best_peer = min(peers.values()) if peers else float("nan")
    default = dict(dec.LAUNCH, block_n=dec.LAUNCH["block_n"] or dec._block_n(d))

    def ours():
        return dec.flash_decode_heads_first(q, k, v, causal=True)
    group = []
    for cfg in grid:
        row = dict(bench="attention_decode_configs", B=b, S=sk, H=hq, HK=hq // 4, D=d, q_len=1, **cfg,
                   default=cfg == default, **{f"{n}_us": t for n, t in peers.items()})
        saved = dict(dec.LAUNCH)
        dec.LAUNCH.update(cfg)
        try:
            err = (ours().float() - want).abs().max().item()
            if not math.isfinite(err) or err > GATE:
                row["error"] = f"correctness gate failed: max error {err:.3g} > {GATE}"
            else:
                row["us"] = _graph_us(ours)
                row["x_best_sdpa"] = best_peer / row["us"]
        except Exception as e:  # out of shared memory and the like
            row["error"] = f"{type(e).__name__}: {str(e)[:160]}"
        finally:
            dec.LAUNCH.clear()
            dec.LAUNCH.update(saved)
        group.append(row)
    ok = sorted((r for r in group if "us" in r), key=lambda r: r["us"])
    dflt = next((r["us"] for r in group if r["default"] and "us" in r), float("nan"))
    if ok:
        top = ok[0]
        print(f"decode-configs B={b} S={sk} D={d}: best {top['us']:.1f} us (bn {top['block_n']} w {top['num_warps']} "
              f"st {top['num_stages']} pp {top['progs_per_sm']}), default {dflt:.1f} us, SDPA {peers}", flush=True)
    return group


def _run_case(case: dict, device: str) -> list[dict]:
    b, s, hq, hk, d = case["B"], case["S"], case["H"], case["HK"], case["D"]
    torch.manual_seed(0)
    if case.get("varlen"):
        case["cu"] = torch.tensor([0] + torch.tensor(case["lengths"]).cumsum(0).tolist(), device=device,
                                  dtype=torch.int32)
        shape_q, shape_kv = (s, hq, d), (s, hk, d)
        pairs = sum(_pairs(n, n, True, None) for n in case["lengths"])
    else:
        shape_q, shape_kv = (b, s, hq, d), (b, s, hk, d)
        pairs = b * _pairs(s, s, case["causal"], case.get("window"))
    q = torch.randn(shape_q, device=device, dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(shape_kv, device=device, dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(shape_kv, device=device, dtype=torch.bfloat16, requires_grad=True)
    do = torch.randn(shape_q, device=device, dtype=torch.bfloat16)
    flops = 4.0 * d * hq * pairs
    rows = []
    for name, fn in _impls(case, q, k, v).items():
        row = dict(bench="attention", case=case["name"], impl=name, B=b, S=s, H=hq, HK=hk, D=d,
                   flops_formula="4*D*H*visible_pairs (causal: S^2/2); fwd+bwd = 3.5x")
        try:
            with torch.no_grad():
                out = fn(q, k, v)
            err = _oracle_err(case, out, q, k, v)
            row["max_err_vs_fp32"] = err
            if not math.isfinite(err) or err > GATE:
                row["error"] = f"correctness gate failed: max error {err:.3g} > {GATE}"
                rows.append(row)
                continue

            def fb(fn=fn):
                fn(q, k, v).backward(do)
            row["fwd_ms"] = bench_ms(lambda fn=fn: fn(q, k, v))
            row["fwdbwd_ms"] = bench_ms(fb, grad_to_none=[q, k, v])
            row["fwd_TFLOPs"] = flops / row["fwd_ms"] / 1e9
            row["fwdbwd_TFLOPs"] = 3.5 * flops / row["fwdbwd_ms"] / 1e9
            row["peak_MiB"] = peak_mib(fb)
        except Exception as e:  # a peer that does not support this case
            row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
        rows.append(row)
        print(f"{case['name']} B={b} S={s} {name}: fwd {row.get('fwd_TFLOPs', 0):.0f} "
              f"fwd+bwd {row.get('fwdbwd_TFLOPs', 0):.0f} TFLOP/s {row.get('error', '')}", flush=True)
    return rows


def run(quick: bool = False, json_path: str | None = None) -> list[dict]:
    """Benchmark every case; returns the rows (also printed). With ``json_path`` the rows so far are saved
    after every case, so a run cut short by a time limit still leaves its measurements. Without a GPU it runs
    the CPU cases (fastkern's fallback path beside SDPA's math backend)."""
    device = harness.device()
    rows = []
    for case in _cases(quick, device == "cuda"):
        rows += _run_case(case, device)
        if device == "cuda":
            torch.cuda.empty_cache()
        _ratios(rows)
        save(json_path, rows)
    return rows


def _ratios(rows: list[dict]) -> None:
    """Per case: fastkern speed-up over each peer (time ratio, > 1 = faster), forward and fwd+bwd."""
    add_ratios(rows, ["case", "B", "S"], metric="fwdbwd_ms")
    groups: dict = {}
    for r in rows:
        groups.setdefault((r["case"], r["B"], r["S"]), {})[r["impl"]] = r
    for g in groups.values():
        ours = g.get("fastkern")
        if not ours or "fwdbwd_ms" not in ours:
            continue
        for peer in ("sdpa_flash", "sdpa_cudnn", "flex_compiled"):
            p = g.get(peer)
            if p and "fwdbwd_ms" in p:
                ours[f"fwd_x_{peer}"] = p["fwd_ms"] / ours["fwd_ms"]
                ours[f"fwdbwd_x_{peer}"] = p["fwdbwd_ms"] / ours["fwdbwd_ms"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", default=None, help="write rows + environment here")
    ap.add_argument("--quick", action="store_true", help="two shapes only (decode: four cases)")
    ap.add_argument("--parts", default="dense",
                    help="comma-separated: dense (training shapes), decode, decode-configs (launch sweep)")
    args = ap.parse_args()
    parts = set(args.parts.split(","))
    if not parts <= {"dense", "decode", "decode-configs"}:
        ap.error(f"--parts takes dense, decode and/or decode-configs, got {args.parts!r}")
    if "decode-configs" in parts:
        if len(parts) > 1:
            ap.error("--parts decode-configs runs alone (its rows are one file)")
        rows = run_decode_configs(args.json, quick=args.quick)
        ok = [r for r in rows if "us" in r]
        print_table(sorted(ok, key=lambda r: (r["B"], r["S"], r["D"], r["us"])),
                    ["B", "S", "D", "block_n", "num_warps", "num_stages", "progs_per_sm", "us", "x_best_sdpa", "default"])
        return
    if "decode" in parts:
        json_decode = args.json
        if args.json and "dense" in parts:  # both parts: the decode rows go beside the dense file
            root, ext = os.path.splitext(args.json)
            json_decode = f"{root}_decode{ext or '.json'}"
        rows = run_decode(json_decode, quick=args.quick)
        print_table(rows, ["impl", "B", "q_len", "S", "ms", "GB_s", "x_sdpa", "x_sdpa_flash", "x_sdpa_cudnn",
                           "x_fastkern_fa2", "max_err_vs_fp32", "error"])
    if "dense" not in parts:
        return
    rows = run(quick=args.quick, json_path=args.json)
    print_table(rows, ["case", "impl", "B", "S", "HK", "D", "fwd_ms", "fwdbwd_ms", "fwd_TFLOPs", "fwdbwd_TFLOPs",
                       "fwdbwd_x_sdpa_flash", "fwdbwd_x_sdpa_cudnn", "fwdbwd_x_flex_compiled", "peak_MiB",
                       "max_err_vs_fp32", "error"])


if __name__ == "__main__":
    main()
