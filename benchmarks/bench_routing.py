"""Measure the routing table (kernel vs stock PyTorch, hf_fastkern/kernels/routing.py) on this GPU (issue 21).

Every case runs the op's real entry point twice in one process, once with ``HF_FASTKERN_ROUTING=kernel`` and
once with ``HF_FASTKERN_ROUTING=stock`` (so what is timed is exactly what the routing switches between: for
attention ``fastkern_attention_forward`` taking our kernel or the SDPA/eager path unpatched transformers runs;
for norms, activations and RoPE the Triton entry or the PyTorch reference), timed back to back
(``harness.loop_ms``: calls launched without a sync or cache flush in between, median per-call wall time of
several loops, so launch-bound sizes count their host time as a step pays it; rows measured until 2026-12-07
(no ``timing`` field) used ``do_bench``'s per-call CUDA events, which hid it), training cases forward + backward.
``ratio = stock_ms / kernel_ms``.

Rules: per family (fixed keys, one swept length), the interval between two neighbouring grid points goes to the
kernel only when the kernel won at both ends (by ``--margin``), and a family's variants (batch sizes, q_len 1
and 16 for decoding) must all win; everything else, and everything outside the grid, is stock, except above the
grid of the bandwidth-bound families when their two largest points won (``OPEN_ABOVE``).

    python -m benchmarks.bench_routing --out hf_fastkern/kernels/routing/h100.json [--quick] [--json rows.json]
    python -m benchmarks.bench_routing --seed-from benchmarks/results/h100 --out hf_fastkern/kernels/routing/h100.json

Part ``qlora`` (only where bitsandbytes and PEFT import): op ``qlora_linear``, a PEFT ``lora.bnb.Linear4bit`` (NF4,
double quant, bf16 compute, r 16 fp32 adapters, bf16 autocast) at the Llama-3-8B projection shapes, the fused
QLoRA linear (:mod:`hf_fastkern.layers.fused_qlora`) against PEFT's own forward.

Part ``loss``: op ``fused_loss``, a patched causal LM's training loss: the fused linear cross-entropy (label check
included) against the model's own head + transformers' ``ForCausalLMLoss`` expression, swept over the fp32 logits
the stock loss would make (``logits_mib``). Timed alone, back to back, its label check's host sync waits only for
the loss's own work; inside a step it waits for the whole forward, so the whole-model guard
(``bench_guard.py``) is the arbiter of a rule that keeps the kernel at small sizes.

``--seed-from DIR`` builds a table from committed benchmark JSON instead (attention.json vs SDPA-cuDNN,
rms_norm/layer_norm/activations/rope.json vs torch eager), stating those files and their commands as provenance;
no GPU needed. ``--cpu-smoke``: a tiny grid on the CPU (interpreter), to check the script, not to route.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from hf_fastkern import apply_fast_kernels
from hf_fastkern.kernels import activations, layer_norm, rms_norm, rope, routing
from hf_fastkern.patches import attention as fk

from .harness import environment, loop_ms

MARGIN = 1.02  # the kernel must be this much faster (stock_ms / kernel_ms) to be chosen: noise is not a win


# ----------------------------------------------------------------------------------------------------------
# intervals -> rules


# Ops whose kernel-vs-stock ratio does not fall as tokens grow: the norms, activations and RoPE are
# bandwidth-bound (both paths stream the same tensors; stock also writes fp32 intermediates), and the QLoRA node
# runs the same GEMMs as PEFT minus elementwise passes that also scale with tokens. When the two largest grid
# points both won, the kernel keeps the range above the grid too. Without this a long-context step (262K-393K
# tokens) would fall off the grid onto the stock norms, slower and holding fp32 copies of [tokens, hidden].
# Attention stays bounded (its stock side, cuDNN, changes algorithm with length).
OPEN_ABOVE = ("rms_norm", "layer_norm", "glu", "gelu", "rope", "qlora_linear")
# Ops whose stock side holds memory that grows without bound: the stock loss materialises the [tokens, vocab]
# logits (fp32: 4 GiB at 8K tokens x 128K vocabulary, 190 GiB at 393K). Above their grid the kernel runs
# whatever the top points measured: being slower there is not the risk, running out of memory is.
KERNEL_ABOVE = ("fused_loss",)
# Ops whose smallest grid point speaks for everything below it: a smaller step of the fused loss is only more
# host-bound, so below the grid the first point's choice holds (not "outside the grid: stock").
BELOW_FROM_FIRST = ("fused_loss",)


def family_rules(op: str, fixed: dict[str, Any], sweep: str, points: list[tuple[int, float]], source: str,
                 margin: float = MARGIN) -> list[dict]:
    """Rules for one family: ``points`` [(sweep value, ratio)] sorted; [x_i, x_{i+1}] is kernel when both ends won.

    Interval rules overlap at their shared end: the first rule wins, and both give the same choice there only
    when the point won on both sides, so the order is: each point alone first, then the open intervals."""
    points = sorted(points)
    rules = []
    for x, r in points:
        rules.append({"match": {**fixed, sweep: [x, x]}, "choice": "kernel" if r >= margin else "stock",
                      "ratio": round(r, 3), "source": source})
    for (x0, r0), (x1, r1) in zip(points, points[1:]):
        win = min(r0, r1) >= margin
        rules.append({"match": {**fixed, sweep: [x0, x1]}, "choice": "kernel" if win else "stock",
                      "ratio": round(min(r0, r1), 3), "source": f"{source} (between grid points)"})
    if op in OPEN_ABOVE and len(points) >= 2 and min(points[-1][1], points[-2][1]) >= margin:
        (x0, r0), (x1, r1) = points[-2:]
        rules.append({"match": {**fixed, sweep: [x1, None]}, "choice": "kernel", "ratio": round(min(r0, r1), 3),
                      "source": f"{source} (above the grid: the top two points won)"})
    if op in BELOW_FROM_FIRST and points and points[0][0] > 0:
        x0, r0 = points[0]
        rules.append({"match": {**fixed, sweep: [0, x0]}, "choice": "kernel" if r0 >= margin else "stock",
                      "ratio": round(r0, 3), "source": f"{source} (below the grid: its smallest point's choice)"})
    if op in KERNEL_ABOVE and points:
        # the first rule that matches wins: the top point keeps its own measured rule; above it, the kernel
        rules.append({"match": {**fixed, sweep: [points[-1][0], None]}, "choice": "kernel", "ratio": None,
                      "source": f"{source} (above the grid: the stock side's memory grows without bound)"})
    return rules


def provenance(command: str, gpu: str, versions: dict, date: str, note: str = "") -> dict:
    out = {"command": command, "gpu": gpu, "versions": versions, "date": date}
    if note:
        out["note"] = note
    return out


def table_doc(cls: str, prov: dict, rules: dict[str, list[dict]]) -> dict:
    doc = {"schema": routing.SCHEMA, "gpu_class": cls, "provenance": prov, "ops": rules}
    routing.parse_table(doc, f"<{cls} table>")  # what we write, the package can read
    return doc


# ----------------------------------------------------------------------------------------------------------
# seeding from committed results


def _load(path: str) -> dict | None:
    return json.load(open(path)) if os.path.exists(path) else None


def seed_rules(src: str) -> tuple[dict[str, list[dict]], list[str], dict]:
    """Rules from committed results in ``src`` (attention.json, rms_norm.json, layer_norm.json, activations.json,
    rope.json)."""
    rules: dict[str, list[dict]] = {}
    used, env = [], {}
    att = _load(os.path.join(src, "attention.json"))
    if att:
        used.append(f"attention.json ({att.get('command')})")
        env = att.get("env", env)
        fam: dict[int, list[tuple[int, float]]] = {}
        for r in att["rows"]:
            # dense causal, q_len == kv_len, our kernel against SDPA's cuDNN backend (what SDPA runs on Hopper)
            if r.get("impl") == "fastkern" and r.get("fwdbwd_x_sdpa_cudnn") is not None:
                fam.setdefault(r["D"], []).append((r["S"], float(r["fwdbwd_x_sdpa_cudnn"])))
        out = []
        for d, pts in sorted(fam.items()):
            # several rows per S (H32 and GQA 32/8): the worst ratio counts
            worst: dict[int, float] = {}
            for s, x in pts:
                worst[s] = min(worst.get(s, x), x)
            out += family_rules("attention", {"kind": "dense", "head_dim": d, "causal": True}, "kv_len",
                                list(worst.items()), "attention.json fwd+bwd vs sdpa_cudnn")
        rules["attention"] = out
    for op, fname, dim in (("rms_norm", "rms_norm.json", "hidden"), ("layer_norm", "layer_norm.json", "hidden"),
                           ("glu", "activations.json", "intermediate"), ("rope", "rope.json", "head_dim")):
        doc = _load(os.path.join(src, fname))
        if not doc:
            continue
        used.append(f"{fname} ({doc.get('command')})")
        ms: dict[tuple, dict[str, float]] = {}
        for r in doc["rows"]:
            if r.get("impl") not in ("fastkern", "torch") or r.get("dtype") != "bf16":
                continue
            if op == "rope":  # q [B, H, S, D] and k [B, HK, S, D]: tokens B x S, per head_dim
                size, t, variant = r["D"], r["B"] * r["S"], (r["B"], r["S"])
            else:
                size, t, variant = r.get("H", r.get("I")), r["T"], None
            # several rows at one point (rope: B4 x 2048 and B1 x 8192) are variants: the worst ratio counts
            ms.setdefault((r["op"], r["mode"], size, t, variant), {})[r["impl"]] = float(r["ms"])
        fams: dict[tuple, dict[int, float]] = {}
        for (_op, mode, size, t, _variant), m in ms.items():
            if "fastkern" not in m or "torch" not in m:
                continue
            ratio = m["torch"] / m["fastkern"]
            key = (mode == "fwd+bwd", size)
            # glu: every activation measured at that point must win (swiglu, geglu); rope: every variant
            fams.setdefault(key, {})[t] = min(fams.get(key, {}).get(t, ratio), ratio)
        out = []
        for (grad, size), pts in sorted(fams.items()):
            out += family_rules(op, {"grad": grad, dim: size}, "tokens", list(pts.items()),
                                f"{fname} {'fwd+bwd' if grad else 'fwd'} vs torch eager")
        rules[op] = out
    return rules, used, env


# ----------------------------------------------------------------------------------------------------------
# rules from measured rows (several runs, each within the device's time limit)


def _family_of(row: dict) -> tuple[dict, str, int]:
    """(fixed match, sweep key, sweep value) of a measured row. Rows written before rows carried their family
    (attention only) are mapped the way ``attention_grid`` builds them; decoding rows always by their q_len
    (``DECODE_Q_LENS``)."""
    if row["op"] == "attention" and row["kind"] == "decode":
        q_lens = next((q for q in DECODE_Q_LENS if q[0] <= row["sq"] <= q[-1]), None)
        if q_lens is None:
            raise ValueError(f"decode row with q_len {row['sq']} outside {DECODE_Q_LENS}: {row}")
        return _decode_fixed(row["d"], q_lens), "kv_len", row["kv_len"]
    if "family" in row:
        fam = row["family"]
        return fam["fixed"], fam["sweep"], fam["x"]
    if row["op"] != "attention":
        raise ValueError(f"row without its family: {row}")
    fixed = {"kind": row["kind"], "head_dim": row["d"], "causal": True, "window": bool(row.get("window")),
             "softcap": bool(row.get("softcap")), "grad": bool(row["grad"])}
    return fixed, "kv_len", row["kv_len"]


# Decoding families by q_len: one token per step (plain generate(), where SDPA's flash/cuDNN decoding is already
# good) and 2-16 (speculative decoding, chunked cache fills, where transformers hands SDPA an explicit mask),
# each measured at its ends. Rows measured before the split (one q_len 1..16 family) are regrouped by q_len.
DECODE_Q_LENS = ((1,), (2, 16))


def _decode_fixed(d: int, q_lens: tuple[int, ...]) -> dict:
    return {"kind": "decode", "head_dim": d, "q_len": [q_lens[0], q_lens[-1]], "causal": True, "window": False,
            "softcap": False, "grad": False}


def rules_from_rows(rows: list[dict], source: str) -> dict[str, list[dict]]:
    """Rules per family from measured rows: a point's ratio is its worst variant's (out of memory counts as a
    loss, or as a kernel win for ``KERNEL_ABOVE`` ops); a case measured more than once (several runs) counts with
    its worst measurement."""
    fams: dict[tuple[str, str, str], dict[int, dict[str, float]]] = {}
    fixed_of: dict[tuple[str, str, str], dict] = {}
    for r in rows:
        fixed, sweep, x = _family_of(r)
        key = (r["op"], json.dumps(fixed, sort_keys=True), sweep)
        fixed_of[key] = fixed
        case = json.dumps({k: v for k, v in r.items() if k in ("b", "h", "hk", "d", "sq", "sk", "window",
                                                                "softcap", "t", "n", "v")}, sort_keys=True)
        oom_ratio = float("inf") if r["op"] in KERNEL_ABOVE else 0.0  # (as measure() counts it)
        ratio = oom_ratio if "error" in r else float(r["ratio"])
        cases = fams.setdefault(key, {}).setdefault(x, {})
        cases[case] = min(ratio, cases.get(case, ratio))
    rules: dict[str, list[dict]] = {}
    for (op, _, sweep), pts in fams.items():
        worst = [(x, min(cases.values())) for x, cases in pts.items()]
        rules.setdefault(op, []).extend(family_rules(op, fixed_of[(op, _, sweep)], sweep, worst, source))
    return rules


def merge_rules(first: dict[str, list[dict]], then: dict[str, list[dict]]) -> dict[str, list[dict]]:
    """``first``'s rules ahead of ``then``'s, per op (the first matching rule decides). An open range above
    ``first``'s grid (``OPEN_ABOVE``) is an extrapolation, not a measurement: where ``then`` measured a point of
    the same family above it, the range ends at that point when the point won (both ends won) and is dropped
    when it lost, so ``then``'s own rules decide from there."""
    out = {}
    for op in dict.fromkeys([*first, *then]):
        later = then.get(op, [])
        mine = []
        for r in first.get(op, []):
            rng = [(k, v) for k, v in r["match"].items() if isinstance(v, list) and v[1] is None]
            if rng:
                key, (lo, _) = rng[0]
                fixed = {k: v for k, v in r["match"].items() if k != key}
                # the seed's rules of the same family that start above this range's start
                kin = [t for t in later if isinstance(t["match"].get(key), list) and t["match"][key][0] is not None
                       and t["match"][key][0] > lo and {k: v for k, v in t["match"].items() if k != key} == fixed]
                if kin:
                    nxt = min(t["match"][key][0] for t in kin)
                    if not any(t["choice"] == "kernel" and t["match"][key] == [nxt, nxt] for t in kin):
                        continue  # a kernel interval needs both ends won: up to a lost point, nothing is vouched
                    r = {**r, "match": {**r["match"], key: [lo, nxt]}}
            mine.append(r)
        out[op] = mine + later
    return out


# ----------------------------------------------------------------------------------------------------------
# measuring on this device


class _Module(torch.nn.Module):
    def __init__(self, causal: bool = True):
        super().__init__()
        self.is_causal = causal


def _timed(fn: Callable[[], Any], grad: bool, leaves: list[torch.Tensor]) -> dict[str, float]:
    """stock and kernel medians of ``fn`` (forward, or forward + backward when ``grad``: through every output
    that requires grad, e.g. RoPE's q and k, not attention's None weights)."""
    # the output gradients, made at each path's first call (an allocation per call would be timed too)
    seeds: list[torch.Tensor] = []

    def run():
        y = fn()
        if grad:
            ys = [t for t in (y if isinstance(y, tuple) else (y,)) if isinstance(t, torch.Tensor) and t.requires_grad]
            if not seeds:
                seeds.extend(torch.ones_like(t) for t in ys)
            torch.autograd.backward(ys, seeds)
    out = {}
    saved = os.environ.get(routing.MODE_ENV)
    try:
        for path in (routing.STOCK, routing.KERNEL):
            seeds.clear()  # the two paths may return other dtypes
            os.environ[routing.MODE_ENV] = path
            ctx = torch.enable_grad() if grad else torch.no_grad()
            with ctx:
                out[path] = loop_ms(run, grad_to_none=leaves if grad else None)
    finally:
        if saved is None:
            os.environ.pop(routing.MODE_ENV, None)
        else:
            os.environ[routing.MODE_ENV] = saved
    return out


def _attn_case(kind: str, b: int, h: int, hk: int, d: int, sq: int, sk: int, grad: bool, dev: str,
               window: int | None = None, softcap: float | None = None):
    dt = torch.bfloat16
    q = torch.randn(b, h, sq, d, device=dev, dtype=dt, requires_grad=grad)
    k = torch.randn(b, hk, sk, d, device=dev, dtype=dt, requires_grad=grad)
    v = torch.randn(b, hk, sk, d, device=dev, dtype=dt, requires_grad=grad)
    mask = None
    if kind == "padded":
        mask = torch.ones(b, sk, dtype=torch.bool, device=dev)
        for i in range(b):
            mask[i, : (i * sk) // (4 * b)] = False  # left padding, up to a quarter of the row
    elif kind == "packed":
        n_seq = 8
        mask = (torch.arange(sk, device=dev) * n_seq // sk).to(torch.int32)[None].expand(b, sk).contiguous()
    mod = _Module()
    kw = {}
    if window:
        kw["sliding_window"] = window
    if softcap:
        kw["softcap"] = softcap

    def fn():
        return fk.fastkern_attention_forward(mod, q, k, v, mask, scaling=d ** -0.5, **dict(kw))
    return fn, [q, k, v] if grad else []


def attention_grid(quick: bool, smoke: bool) -> list[dict]:
    """Families: (fixed match, sweep key, [(sweep value, [variant case kwargs])])."""
    fams = []
    dims = (64, 128, 256)
    hidden = 2048 if not smoke else 64
    tokens = 16384 if not smoke else 64
    seqs = (512, 2048, 8192) if quick else (256, 512, 1024, 2048, 4096, 8192, 16384)
    caches = (1024, 8192, 32768) if quick else (512, 2048, 8192, 32768, 131072)
    if smoke:
        dims, seqs, caches = (64,), (16, 32), (32, 64)
    for grad in (True, False):
        for d in dims:
            h = max(hidden // d, 1)
            hk = max(h // 4, 1)
            for kind in ("dense", "padded", "packed"):
                pts = [(s, [dict(kind=kind, b=max(tokens // s, 1), h=h, hk=hk, d=d, sq=s, sk=s)]) for s in seqs]
                fams.append(({"kind": kind, "head_dim": d, "causal": True, "window": False, "softcap": False,
                              "grad": grad}, "kv_len", pts))
            if d == 128 or smoke:
                w = 4096 if not smoke else 8
                pts = [(s, [dict(kind="dense", b=max(tokens // s, 1), h=h, hk=hk, d=d, sq=s, sk=s, window=w)])
                       for s in seqs if s > w]
                fams.append(({"kind": "dense", "head_dim": d, "causal": True, "window": True, "softcap": False,
                              "grad": grad}, "kv_len", pts))
            if d == 256 or smoke:  # Gemma 2's softcap comes with head_dim 256
                pts = [(s, [dict(kind="dense", b=max(tokens // s, 1), h=h, hk=hk, d=d, sq=s, sk=s, softcap=50.0)])
                       for s in seqs[:3]]
                fams.append(({"kind": "dense", "head_dim": d, "causal": True, "window": False, "softcap": True,
                              "grad": grad}, "kv_len", pts))
        if not grad:
            for d in dims:
                h = max(hidden // d, 1) * (2 if not smoke else 1)
                hk = max(h // 4, 1)
                for q_lens in DECODE_Q_LENS:
                    sqs = q_lens if not smoke else tuple(min(q, 4) for q in q_lens)
                    pts = [(c, [dict(kind="decode", b=b, h=h, hk=hk, d=d, sq=sq, sk=c)
                                for b in ((1, 16) if not smoke else (1,)) for sq in sqs])
                           for c in caches]
                    fams.append((_decode_fixed(d, q_lens), "kv_len", pts))
    return fams


def norm_grid(quick: bool, smoke: bool) -> list[tuple[str, dict, str, list]]:
    # from 1 token: a generate() decoding step at batch 1 calls every norm, activation and RoPE with one token
    toks = (1, 16, 128, 512, 2048, 8192, 32768) if not quick else (1, 16, 128, 1024, 8192)
    hiddens = (2048, 4096, 8192) if not quick else (2048, 4096)
    inters = (8192, 14336) if not quick else (8192,)
    head_dims = (64, 128, 256)  # Llama-3.2-1B, Llama-3-8B, Gemma / Pythia (rotary 64 of 256)
    if smoke:
        toks, hiddens, inters, head_dims = (4, 16), (64,), (128,), (16,)
    fams = []
    for grad in (True, False):
        for hd in hiddens:
            fams.append(("rms_norm", {"grad": grad, "hidden": hd}, "tokens", [(t, [dict(t=t, n=hd)]) for t in toks]))
            fams.append(("layer_norm", {"grad": grad, "hidden": hd}, "tokens",
                         [(t, [dict(t=t, n=hd)]) for t in toks]))
        for i in inters:
            fams.append(("glu", {"grad": grad, "intermediate": i}, "tokens", [(t, [dict(t=t, n=i)]) for t in toks]))
            # the plain GELU of GPT-2 / GPT-NeoX MLPs (intermediate = 4 x hidden)
            fams.append(("gelu", {"grad": grad, "features": i}, "tokens", [(t, [dict(t=t, n=i)]) for t in toks]))
        for d in head_dims:  # RoPE at Llama-3-8B's heads (32 q, 8 kv); tokens = batch x seq
            fams.append(("rope", {"grad": grad, "head_dim": d}, "tokens", [(t, [dict(t=t, n=d)]) for t in toks]))
    return fams


ROPE_HEADS = (32, 8)  # (q, kv) heads of the rope family's cases


def _norm_fn(op: str, t: int, n: int, grad: bool, dev: str):
    dt = torch.bfloat16
    if op == "rope":  # q/k as a Llama attention makes them: [1, seq, heads, d] viewed as [1, heads, seq, d]
        hq, hk = ROPE_HEADS
        q = torch.randn(1, t, hq, n, device=dev, dtype=dt, requires_grad=grad)
        k = torch.randn(1, t, hk, n, device=dev, dtype=dt, requires_grad=grad)
        ang = torch.arange(t, device=dev, dtype=torch.float32)[:, None] * torch.rand(n // 2, device=dev)
        ang = torch.cat([ang, ang], -1)[None]
        cos, sin = ang.cos().to(dt), ang.sin().to(dt)
        def fn():  # apply_rope reads HF_FASTKERN_ROUTING (stock: transformers' expression) like every routed op
            return rope.apply_rope(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
        return fn, [q, k] if grad else []
    if op == "gelu":
        x = torch.randn(t, n, device=dev, dtype=dt, requires_grad=grad)
        return (lambda: activations.gelu(x, "tanh")), [x] if grad else []
    if op == "glu":
        g = torch.randn(t, n, device=dev, dtype=dt, requires_grad=grad)
        u = torch.randn(t, n, device=dev, dtype=dt, requires_grad=grad)
        return (lambda: activations.swiglu(g, u)), [g, u] if grad else []
    x = torch.randn(t, n, device=dev, dtype=dt, requires_grad=grad)
    w = torch.ones(n, device=dev, dtype=dt, requires_grad=grad)
    if op == "rms_norm":
        return (lambda: rms_norm.rms_norm(x, w, 1e-6)), [x, w] if grad else []
    b = torch.zeros(n, device=dev, dtype=dt, requires_grad=grad)
    return (lambda: layer_norm.layer_norm(x, w, b, 1e-5)), [x, w, b] if grad else []


def qlora_grid(quick: bool, smoke: bool) -> list[tuple[str, dict, str, list]]:
    """Llama-3-8B projections (q/o 4096 -> 4096, gate/up 4096 -> 14336, down 14336 -> 4096) over token counts."""
    toks = (512, 2048, 8192, 16384) if not quick else (2048, 8192)
    shapes = ((4096, 4096), (4096, 14336), (14336, 4096)) if not quick else ((4096, 14336),)
    if smoke:
        toks, shapes = (4, 16), ((64, 96),)
    return [("qlora_linear", {"grad": grad, "in_features": i, "out_features": o}, "tokens",
             [(t, [dict(t=t, n=o)]) for t in toks]) for grad in (True, False) for i, o in shapes]


def qlora_layer(d_in: int, d_out: int, dev: str) -> torch.nn.Module:
    """A PEFT lora.bnb.Linear4bit over bitsandbytes' NF4 double-quant Linear4bit (bf16 compute), r 16 fp32
    adapters, bound to the fused QLoRA linear by apply_fast_kernels (the routing picks per call)."""
    import bitsandbytes as bnb
    import peft

    class One(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = bnb.nn.Linear4bit(d_in, d_out, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4",
                                          compress_statistics=True, device="meta")
            w = torch.randn(d_out, d_in, device=dev, dtype=torch.bfloat16) * 0.02
            self.proj.weight = bnb.nn.Params4bit(w, requires_grad=False, quant_type="nf4", compress_statistics=True,
                                                 module=self.proj).to(dev)
            self.is_loaded_in_4bit = True  # PEFT wraps Linear4bit in lora.bnb.Linear4bit only then

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.proj(x)

    m = peft.get_peft_model(One(), peft.LoraConfig(r=16, lora_alpha=32, target_modules=["proj"],
                                                   init_lora_weights="gaussian")).to(dev)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "lora_B" in n:
                p.normal_(0.0, 0.02)
    rep = apply_fast_kernels(m, attention=False, cross_entropy=False)
    if rep.count("lora_linear") != 1:
        raise RuntimeError(f"the QLoRA layer was not bound: {rep}")
    return m.train()


def _qlora_fn(layer: torch.nn.Module, t: int, d_in: int, grad: bool, dev: str):
    x = torch.randn(t, d_in, device=dev, dtype=torch.bfloat16, requires_grad=grad)

    def fn():
        with torch.autocast(dev, dtype=torch.bfloat16):
            return layer(x)
    return fn, ([x] + [p for p in layer.parameters() if p.requires_grad]) if grad else []


def qlora_available() -> str:
    """"" when the qlora part can run here, else why not."""
    missing = [m for m in ("bitsandbytes", "peft") if importlib.util.find_spec(m) is None]
    return f"{', '.join(missing)} not installed" if missing else ""


def loss_grid(quick: bool, smoke: bool) -> list[tuple[str, dict, str, list]]:
    """The training loss of a patched causal LM (op ``fused_loss``), swept over the fp32 logits the stock loss
    would make (MiB, the call site's key): (tokens, vocab, hidden) cases at a 32000 x 2048 head (TinyLlama-1.1B)
    and a 128256 x 4096 one (Llama-3-8B); cases with the same key form one point, the worse ratio deciding."""
    small, big = (32000, 2048), (128256, 4096)
    cases = [(128, *small), (512, *small), (128, *big), (2048, *small), (512, *big), (8192, *small), (2048, *big),
             (8192, *big)]
    if quick:
        cases = [c for c in cases if routing.logits_mib(c[0], c[1]) <= 1024]
    if smoke:
        cases = [(4, 96, 16), (64, 4096, 16)]  # 0 and 1 MiB
    pts: dict[int, list[dict]] = {}
    for t, v, h in cases:
        pts.setdefault(routing.logits_mib(t, v), []).append(dict(t=t, v=v, h=h))
    return [("fused_loss", {"grad": grad}, "logits_mib", sorted(pts.items())) for grad in (True, False)]


def _loss_fn(t: int, v: int, h: int, grad: bool, dev: str):
    """Stock: the model's own head and transformers' ForCausalLMLoss (bf16 logits, upcast to fp32, cross-entropy
    with ignore_index -100, the mean over valid tokens); kernel: the fused linear cross-entropy on the hidden
    state (label check included). HF_FASTKERN_ROUTING picks the side, as the patched forward's table would."""
    from hf_fastkern.kernels.cross_entropy import fused_linear_cross_entropy
    x = torch.randn(t, h, device=dev, dtype=torch.bfloat16, requires_grad=grad)
    w = (torch.randn(v, h, device=dev, dtype=torch.bfloat16) * 0.02).requires_grad_(grad)
    y = torch.randint(0, v, (t,), device=dev)
    y[-1] = -100  # the shifted labels' padding

    def fn():
        if routing.mode() == routing.STOCK:
            return F.cross_entropy(F.linear(x, w).float(), y, ignore_index=-100)
        return fused_linear_cross_entropy(x, w, y)
    return fn, [x, w] if grad else []


PARTS = ("attention-train", "attention-forward", "decode", "norms", "qlora", "loss")


def _part_of(op: str, fixed: dict) -> str:
    if op == "qlora_linear":
        return "qlora"
    if op == "fused_loss":
        return "loss"
    if op != "attention":
        return "norms"
    if fixed["kind"] == "decode":
        return "decode"
    return "attention-train" if fixed["grad"] else "attention-forward"


def measure(quick: bool, smoke: bool, log: Callable[[str], None] = print, parts: tuple[str, ...] = PARTS,
            flush: Callable[[list[dict]], None] | None = None) -> tuple[dict[str, list[dict]], list[dict]]:
    """Measure the grid's families in ``parts``; ``flush(rows)`` after each family (a time limit keeps them)."""
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    rows: list[dict] = []
    rules: dict[str, list[dict]] = {op: [] for op in routing.CASE_KEYS}
    src = "bench_routing.py, stock vs kernel in one process"

    def one(op: str, fixed: dict, sweep: str, pts: list, make: Callable[[dict], tuple]) -> None:
        if _part_of(op, fixed) not in parts:
            return
        found = []
        for x, variants in pts:
            worst = None
            for kw in variants:
                try:
                    fn, leaves = make(kw)
                    t = _timed(fn, fixed.get("grad", False), leaves)
                except torch.OutOfMemoryError:
                    torch.cuda.empty_cache()
                    rows.append({"op": op, **fixed, sweep: x, **kw, "error": "out of memory", "timing": "loop_ms",
                                 "family": {"fixed": fixed, "sweep": sweep, "x": x}})
                    # the side that runs out: the kernel's, except where the stock side holds the growing
                    # memory (the stock loss's logits), which the kernel never allocates
                    oom = float("inf") if op in KERNEL_ABOVE else 0.0
                    worst = oom if worst is None else min(worst, oom)
                    continue
                ratio = t[routing.STOCK] / t[routing.KERNEL]
                rows.append({"op": op, **{k: v for k, v in fixed.items() if not isinstance(v, list)}, sweep: x,
                             **kw, "stock_ms": t[routing.STOCK], "kernel_ms": t[routing.KERNEL],
                             "ratio": ratio, "timing": "loop_ms", "family": {"fixed": fixed, "sweep": sweep, "x": x}})
                log(f"{op} {fixed} {sweep}={x} {kw}: stock {t['stock']:.3f} ms, kernel {t['kernel']:.3f} ms, "
                    f"ratio {ratio:.2f}")
                worst = ratio if worst is None else min(worst, ratio)
            if worst is not None:
                found.append((x, worst))
        rules[op] += family_rules(op, fixed, sweep, found, src)
        if flush is not None:
            flush(rows)

    for fixed, sweep, pts in attention_grid(quick, smoke):
        grad = fixed["grad"]

        def make(kw, grad=grad):
            return _attn_case(grad=grad, dev=dev, **kw)
        one("attention", fixed, sweep, pts, make)
    for op, fixed, sweep, pts in norm_grid(quick, smoke):
        def make(kw, op=op, grad=fixed["grad"]):
            return _norm_fn(op, kw["t"], kw["n"], grad, dev)
        one(op, fixed, sweep, pts, make)
    for op, fixed, sweep, pts in loss_grid(quick, smoke):
        def make(kw, grad=fixed["grad"]):
            return _loss_fn(kw["t"], kw["v"], kw["h"], grad, dev)
        one(op, fixed, sweep, pts, make)
    why = qlora_available() if "qlora" in parts else ""
    if why:
        log(f"part qlora skipped: {why}")
    elif "qlora" in parts:
        layers: dict[tuple[int, int], torch.nn.Module] = {}
        for op, fixed, sweep, pts in qlora_grid(quick, smoke):
            shape = (fixed["in_features"], fixed["out_features"])
            if shape not in layers:
                layers.clear()  # one 4-bit layer (and its adapters) at a time
                layers[shape] = qlora_layer(*shape, dev)

            def make(kw, layer=layers[shape], d_in=shape[0], grad=fixed["grad"]):
                return _qlora_fn(layer, kw["t"], d_in, grad, dev)
            one(op, fixed, sweep, pts, make)
    rules = {op: r for op, r in rules.items() if r or op != "qlora_linear"}
    return rules, rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="routing table JSON to write")
    ap.add_argument("--json", help="also write every measured row here (rewritten after each family)")
    ap.add_argument("--quick", action="store_true", help="a smaller grid (~2 minutes on an H100)")
    ap.add_argument("--parts", default=",".join(PARTS),
                    help=f"comma-separated parts of the grid to measure: any of {', '.join(PARTS)}")
    ap.add_argument("--seed-from", help="build the table from committed results in this folder instead")
    ap.add_argument("--from-rows", help="comma-separated rows files (--json of earlier runs): their families' "
                                        "rules come first, ahead of --seed-from's")
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny grid on the CPU interpreter (checks the script)")
    ap.add_argument("--gpu-class", help="class name to write (default: this GPU's, or the seed's GPU)")
    args = ap.parse_args(argv)
    command = "python -m benchmarks.bench_routing " + " ".join(argv if argv is not None else sys.argv[1:])
    parts = tuple(p for p in args.parts.split(",") if p)
    bad = [p for p in parts if p not in PARTS]
    if bad:
        ap.error(f"unknown --parts {bad}; choose from {', '.join(PARTS)}")
    env = environment()
    versions = {k: env.get(k) for k in ("torch", "triton", "transformers")}
    if args.seed_from or args.from_rows:
        rules: dict[str, list[dict]] = {}
        notes, gpu, src_env = [], "unknown", {}
        if args.from_rows:
            pooled, names = [], []
            for path in args.from_rows.split(","):
                doc = json.load(open(path))
                src_env = doc.get("env", src_env)
                gpu = src_env.get("gpu", gpu)
                pooled += doc["rows"]
                names.append(os.path.basename(path))
                when = f" at {src_env['time_utc']}" if src_env.get("time_utc") else ""
                notes.append(f"measured by bench_routing.py on {src_env.get('gpu')}{when} "
                             f"(torch {src_env.get('torch')}, triton {src_env.get('triton')}): {path} "
                             f"({doc.get('command')}), {len(doc['rows'])} rows")
            # one pool: a case that several runs measured counts with its worst run
            rules = rules_from_rows(pooled, f"{', '.join(names)}: bench_routing.py, stock vs kernel")
        if args.seed_from:
            seeded, used, seed_env = seed_rules(args.seed_from)
            rules = merge_rules(rules, seeded)
            src_env = src_env or seed_env
            gpu = src_env.get("gpu", gpu)
            notes.append("after those, seeded from committed results not measured by bench_routing.py: "
                         + "; ".join(used) + ". Cases nothing here covers route to stock.")
        cls = args.gpu_class or routing.gpu_class_of_name(gpu)
        prov = provenance(command, gpu, {k: src_env.get(k) for k in ("torch", "triton", "transformers")},
                          src_env.get("time_utc", ""), " ".join(notes))
    else:
        if not torch.cuda.is_available() and not args.cpu_smoke:
            ap.error("measuring needs a CUDA GPU (or --cpu-smoke for a check of the script)")
        if args.cpu_smoke:
            os.environ.setdefault("TRITON_INTERPRET", "1")
        t0 = time.time()

        def flush(rows: list[dict]) -> None:
            if args.json:
                with open(args.json, "w") as f:
                    json.dump({"env": env, "command": command, "rows": rows}, f, indent=1)
        rules, rows = measure(args.quick, args.cpu_smoke, parts=parts, flush=flush)
        flush(rows)
        gpu = env.get("gpu", "cpu") if torch.cuda.is_available() else "cpu (smoke test, not a routing table)"
        cls = args.gpu_class or (routing.gpu_class(None) if torch.cuda.is_available() else "cpu-smoke")
        prov = provenance(command, gpu, versions, env["time_utc"], f"measured in {time.time() - t0:.0f} s")
    doc = table_doc(cls, prov, rules)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(doc, f, indent=1)
        f.write("\n")
    n = sum(len(v) for v in rules.values())
    k = sum(r["choice"] == "kernel" for v in rules.values() for r in v)
    print(f"wrote {args.out}: {n} rules ({k} kernel), GPU class {cls}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
