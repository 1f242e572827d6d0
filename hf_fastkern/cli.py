"""``hf-fastkern``: benchmark, check and describe hf_fastkern on this machine.

    hf-fastkern bench [ops|attention|ce|e2e|longctx|lora|all ...] [--quick] [--json FILE] [--out-dir DIR] [--plot FILE]
    hf-fastkern info  [--json FILE]
    hf-fastkern check

``bench`` runs the benchmark scripts of ``hf_fastkern.benchmarks`` in this process (e2e and longctx start one
subprocess per variant / trial), with every peer beside our kernels, and prints per-section tables with the
fraction of the measured device ceiling and the ratio to the best peer. Without a GPU it runs each script's
quick pass (small sizes, the PyTorch fallback path) plus a tiny Llama training step patched vs unpatched, and
says that GPU numbers need a GPU. ``info`` says, per op and dtype, which path (Triton kernel or reference) a
call takes here and why. ``check`` compares each kernel entry point with its reference at small sizes (on CPU
through the Triton interpreter).
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import importlib
import io
import json
import os
import platform
import subprocess
import sys
import time

SECTIONS = {
    "ops": ("rms_norm", "layer_norm", "activations"),
    "attention": ("attention",),
    "ce": ("cross_entropy",),
    "e2e": ("e2e",),
    "longctx": ("longctx",),
    # issue 12: LoRA fine-tuning of the Llama-3.1-8B shape (one subprocess per variant, ~2 minutes on an H100)
    "lora": ("lora",),
}
# what one would run on a GPU for "all": longctx is long (minutes per variant), so it is named explicitly
# (lora too: it builds an 8B model per variant)
ALL = ("ops", "attention", "ce", "e2e", "longctx")
NO_GPU_NOTE = ("No CUDA GPU here: this is a short correctness-and-timing pass through the PyTorch fallback at "
               "small sizes. It proves the commands run; GPU numbers need a GPU.")
# columns never shown as "shape" columns in the tables
_METRIC_ORDER = ("ms", "fwd_ms", "fwdbwd_ms", "bwd_ms", "step_ms", "tok_per_s", "GBps", "TFLOPs", "frac_ceiling",
                 "mfu", "peak_MiB", "peak_GiB", "max_seq", "exact", "vs_best_peer", "vs_sdpa", "mem_vs_sdpa",
                 "vs_liger", "loss", "gate", "loss_rel_err", "grad_rel_err", "max_err", "error")
_HIDDEN = {"trials", "patch_report", "attn_note", "flops_formula", "mfu_peak_TFLOPs", "note", "first_fail",
           "liger_ref", "variant", "best_peer", "mem_vs_best_peer", "model",
           "trainable_params", "command", "distributed_type", "wall_s", "loss0", "global_batch"}


# ----------------------------------------------------------------------------------------------------------
# benchmark modules


def load_bench(name: str):
    """Import ``bench_<name>``: the installed ``hf_fastkern.benchmarks`` or a source checkout's ``benchmarks``.

    Returns (module, None) or (None, why). A missing script is "not available"; an import error inside an
    existing script is reported as such (it is a bug, not an absence).
    """
    errors = []
    for pkg in ("hf_fastkern.benchmarks", "benchmarks"):
        modname = f"{pkg}.bench_{name}"
        try:
            return importlib.import_module(modname), None
        except ModuleNotFoundError as e:
            if e.name not in (modname, pkg, pkg.split(".")[0]):
                return None, f"import failed: {type(e).__name__}: {e}"
            errors.append(str(e))
        except Exception as e:
            return None, f"import failed: {type(e).__name__}: {str(e)[:200]}"
    return None, "not available (benchmarks/bench_%s.py is not there yet)" % name


def _throughput(row: dict) -> tuple[str, float] | None:
    """The row's headline throughput key and value: a *TFLOPs or *GBps key (fwd+bwd preferred)."""
    for unit in ("TFLOPs", "GBps"):
        keys = [k for k, v in row.items() if k.endswith(unit) and isinstance(v, (int, float))]
        if keys:
            keys.sort(key=lambda k: (k != unit, "bwd" not in k, k))
            return keys[0], float(row[keys[0]])
    return None


def add_ceiling_fraction(rows: list[dict], ceil: dict) -> None:
    """frac_ceiling = throughput / measured ceiling (copy bandwidth for GB/s, bf16 matmul rate for TFLOP/s)."""
    if not ceil:
        return
    for r in rows:
        t = _throughput(r)
        if t is None:
            continue
        key, val = t
        if key.endswith("GBps") and ceil.get("copy_TBps"):
            r["frac_ceiling"] = val / (ceil["copy_TBps"] * 1e3)
        elif key.endswith("TFLOPs") and ceil.get("bf16_mm_TFLOPs"):
            r["frac_ceiling"] = val / ceil["bf16_mm_TFLOPs"]


def table_columns(rows: list[dict]) -> list[str]:
    """bench, impl, the shape keys (first-seen order), then metrics in a fixed order, then other throughput keys."""
    seen: list[str] = []
    for r in rows:
        for k in r:
            if k not in seen:
                seen.append(k)
    head = [k for k in ("bench", "op", "impl") if k in seen]
    metrics = [k for k in _METRIC_ORDER if k in seen and k != "error"]
    extra_tp = [k for k in seen if (k.endswith("GBps") or k.endswith("TFLOPs")) and k not in metrics
                and k not in _HIDDEN]
    shape = [k for k in seen if k not in head and k not in metrics and k not in extra_tp and k not in _HIDDEN
             and k != "error" and not k.endswith("_formula") and not any(isinstance(r.get(k), (dict, list)) for r in rows)]
    return head + shape + metrics + extra_tp + (["error"] if "error" in seen else [])


def _progress(total: int, desc: str):
    try:
        from tqdm.auto import tqdm
        return tqdm(total=total, desc=desc, leave=False, file=sys.stderr)
    except Exception:
        return None


def run_bench(targets: list[str], quick: bool = False, json_path: str | None = None, out_dir: str | None = None,
              plot_path: str | None = None, command: str | None = None) -> dict:
    """Run the named sections; returns the JSON document it prints/saves."""
    import torch

    try:
        from hf_fastkern.benchmarks import common
    except ImportError:
        common = importlib.import_module("benchmarks.common")
    gpu = torch.cuda.is_available()
    if not gpu:
        print(NO_GPU_NOTE)
        quick = True
    names = []
    for t in targets:
        for n in (ALL if t == "all" else (t,)):
            names += [(n, b) for b in SECTIONS[n] if (n, b) not in names]
    env = common.environment()
    print(_env_line(env))
    ceil = common.ceilings() if gpu else {}
    if ceil:
        print(f"device ceilings (measured): copy {ceil['copy_TBps']:.2f} TB/s, bf16 matmul "
              f"{ceil['bf16_mm_TFLOPs']:.0f} TFLOP/s")
    doc: dict = {"env": env, "command": command or " ".join(["hf-fastkern"] + sys.argv[1:]),
                 "quick": quick, "ceilings": ceil, "sections": {}, "rows": []}
    bar = _progress(len(names), "hf-fastkern bench")
    for section, name in names:
        t0 = time.time()
        if gpu:
            # e2e/longctx run in subprocesses that need the whole GPU: give back what earlier scripts cached
            gc.collect()
            torch.cuda.empty_cache()
        mod, why = load_bench(name)
        if mod is None:
            rows = []
            status = why
        else:
            # On CPU the scripts' own progress tables only repeat the CLI's table, so they are held back (and
            # shown on failure); on a GPU they are the progress report of a long run, so they go through.
            captured = io.StringIO()
            try:
                with contextlib.redirect_stdout(captured) if not gpu else contextlib.nullcontext():
                    rows = list(mod.run(quick=quick))
                measured = [r for r in rows if not r.get("error")]
                status = "ok" if measured or not rows else f"no result: {rows[0]['error']}"
            except Exception as e:  # one broken script must not hide the others
                rows = []
                status = f"failed: {type(e).__name__}: {str(e)[:300]}"
                tail = captured.getvalue().strip().splitlines()[-5:]
                if tail:
                    status += "\n   last output: " + "\n   ".join(tail)
        for r in rows:
            r.setdefault("bench", name)
        add_ceiling_fraction(rows, ceil)
        doc["sections"][name] = {"section": section, "status": status, "secs": round(time.time() - t0, 1)}
        doc["rows"] += rows
        if bar is not None:
            bar.update(1)
            bar.clear()
        print(f"\n== {name} ({section}): {status}, {time.time() - t0:.1f}s")
        if rows:
            common.print_table(rows, table_columns(rows))
        if out_dir and rows:
            _write(os.path.join(out_dir, f"{name}.json"),
                   {"env": env, "command": doc["command"], "ceilings": ceil, "quick": quick, "rows": rows})
    if bar is not None:
        bar.close()
    if not gpu:
        print("\n" + NO_GPU_NOTE)
    if json_path:
        _write(json_path, doc)
    if plot_path:
        try:
            plot = _report_module().plot_rows
            made = plot(doc["rows"], plot_path)
            print(f"wrote {plot_path}" if made else "no plot: matplotlib is not installed or no rows to plot")
        except Exception as e:
            print(f"no plot: {type(e).__name__}: {e}")
    return doc


def _report_module():
    for modname in ("hf_fastkern.benchmarks.report", "benchmarks.report"):
        try:
            return importlib.import_module(modname)
        except ModuleNotFoundError:
            continue
    raise ImportError("benchmarks/report.py not found")


def _write(path: str, doc: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(doc, f, indent=1, default=str)
    print(f"wrote {path}")


def _env_line(env: dict) -> str:
    keys = ("gpu", "python", "torch", "triton", "transformers", "liger_kernel", "cut_cross_entropy")
    return " | ".join(f"{k} {env.get(k)}" for k in keys if k in env)


# ----------------------------------------------------------------------------------------------------------
# info


# op -> (kernel module, dtypes its kernel takes); attention is bf16/fp16 only (fp32 falls back, DESIGN.md)
OPS = {
    "rms_norm": ("rms_norm", "all"),
    "layer_norm": ("layer_norm", "all"),
    "swiglu/geglu/gelu": ("activations", "all"),
    "attention": ("attention", "low"),
    "cross_entropy": ("cross_entropy", "all"),
}


def op_paths(device: str | None = None) -> list[dict]:
    """For each op and dtype: 'kernel' or 'reference', and why, for tensors on ``device`` (default: here)."""
    import torch

    from hf_fastkern.kernels import dispatch

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    rows = []
    for op, (modname, which) in OPS.items():
        import_err = ""
        try:
            mod = importlib.import_module(f"hf_fastkern.kernels.{modname}")
            placeholder = (mod.__doc__ or "").lstrip().upper().startswith("PLACEHOLDER")
        except Exception as e:
            mod, placeholder = None, False
            import_err = f"{type(e).__name__}: {e}"
        allowed = dispatch.LOW_PRECISION_DTYPES if which == "low" else dispatch.SUPPORTED_DTYPES
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            probe = torch.empty(8, device=device, dtype=dtype)
            ok, reason = dispatch.device_check([probe], allowed)
            if mod is None:
                ok, reason = False, f"module failed to import ({import_err})"
            elif placeholder and ok:
                ok, reason = False, "the Triton kernel is not in this build yet (placeholder entry point)"
            rows.append({"op": op, "dtype": str(dtype).replace("torch.", ""), "device": device,
                         "path": "triton kernel" if ok else "pytorch reference", "why": reason or "supported"})
    return rows


def info(json_path: str | None = None) -> dict:
    import torch

    try:
        from hf_fastkern.benchmarks.common import environment
    except ImportError:
        environment = importlib.import_module("benchmarks.common").environment
    import hf_fastkern

    env = environment()
    env["hf_fastkern"] = hf_fastkern.__version__
    env["platform"] = platform.platform()
    env["TRITON_INTERPRET"] = os.environ.get("TRITON_INTERPRET")
    env["HF_FASTKERN_FORCE_REFERENCE"] = os.environ.get("HF_FASTKERN_FORCE_REFERENCE")
    env["HF_FASTKERN_ATTENTION"] = os.environ.get("HF_FASTKERN_ATTENTION")
    if torch.cuda.is_available():
        env["capability"] = ".".join(map(str, torch.cuda.get_device_capability()))
    print("hf_fastkern environment")
    for k, v in env.items():
        print(f"  {k:<28} {v}")
    reg = registration()
    print("transformers integration")
    for k, v in reg.items():
        print(f"  {k:<28} {v}")
    paths = op_paths()
    print(f"op paths for tensors on '{paths[0]['device']}'")
    w = max(len(r["op"]) for r in paths)
    for r in paths:
        print(f"  {r['op']:<{w}}  {r['dtype']:<8}  {r['path']:<17}  {r['why']}")
    doc = {"env": env, "integration": reg, "ops": paths}
    if json_path:
        _write(json_path, doc)
    return doc


def registration() -> dict:
    """Is "fastkern" registered with transformers' attention and mask interfaces? Which peers are importable?"""
    out = {}
    try:
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
        out["attention 'fastkern'"] = "registered" if "fastkern" in ALL_ATTENTION_FUNCTIONS else "not registered"
    except Exception as e:
        out["attention 'fastkern'"] = f"unknown ({type(e).__name__})"
    try:
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
        out["mask 'fastkern'"] = "registered" if "fastkern" in ALL_MASK_ATTENTION_FUNCTIONS else "not registered"
    except Exception as e:
        out["mask 'fastkern'"] = f"unknown ({type(e).__name__})"
    try:
        from hf_fastkern.patches.attention import dense_backend_summary
        out["dense attention"] = dense_backend_summary()
    except Exception as e:
        out["dense attention"] = f"unknown ({type(e).__name__}: {e})"
    for peer in ("liger_kernel", "cut_cross_entropy", "matplotlib", "tqdm"):
        try:
            importlib.import_module(peer)
            out[f"peer {peer}"] = "importable"
        except Exception:
            out[f"peer {peer}"] = "not installed"
    return out


# ----------------------------------------------------------------------------------------------------------
# check


def _check_cases():
    """(name, kernel_fn, reference_fn, make_inputs(dtype, device)) at small, odd sizes."""
    import torch

    from hf_fastkern.kernels import activations, attention, cross_entropy, layer_norm, reference, rms_norm

    def x_w(dt, dev):
        return [torch.randn(37, 111, dtype=dt, device=dev), torch.randn(111, dtype=dt, device=dev)]

    def ln(dt, dev):
        return x_w(dt, dev) + [torch.randn(111, dtype=dt, device=dev)]

    def gu(dt, dev):
        return [torch.randn(37, 111, dtype=dt, device=dev), torch.randn(37, 111, dtype=dt, device=dev)]

    def qkv(dt, dev):
        return [torch.randn(2, 63, 4, 64, dtype=dt, device=dev), torch.randn(2, 63, 2, 64, dtype=dt, device=dev),
                torch.randn(2, 63, 2, 64, dtype=dt, device=dev)]

    def ce(dt, dev):
        y = torch.randint(0, 300, (37,), device=dev)
        y[::5] = -100
        return [torch.randn(37, 300, dtype=dt, device=dev), y]

    def flce(dt, dev):
        y = torch.randint(0, 300, (37,), device=dev)
        y[::5] = -100
        return [torch.randn(37, 64, dtype=dt, device=dev), torch.randn(300, 64, dtype=dt, device=dev) * 0.1, y]

    def attn_ref(q, k, v):
        return reference.attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True).transpose(1, 2)

    return [
        ("rms_norm", rms_norm.rms_norm, reference.rms_norm, x_w),
        ("layer_norm", layer_norm.layer_norm, lambda x, w, b: reference.layer_norm(x, w, b, 1e-5), ln),
        ("swiglu", activations.swiglu, reference.swiglu, gu),
        ("geglu", activations.geglu, reference.geglu, gu),
        ("gelu", activations.gelu, reference.gelu, lambda dt, dev: gu(dt, dev)[:1]),
        ("attention", lambda q, k, v: attention.flash_attention(q, k, v, causal=True), attn_ref, qkv),
        ("cross_entropy", cross_entropy.cross_entropy, reference.cross_entropy, ce),
        ("fused_linear_cross_entropy", cross_entropy.fused_linear_cross_entropy, reference.linear_cross_entropy, flce),
    ]


def check() -> int:
    """Forward of every kernel entry point vs the fp64 reference, against PyTorch's same-dtype error."""
    import torch

    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        # Triton reads TRITON_INTERPRET when the kernels are defined (at import), so re-run in a fresh process
        env = dict(os.environ, TRITON_INTERPRET="1")
        return subprocess.call([sys.executable, "-m", "hf_fastkern.cli", "check"], env=env)
    try:
        from tests.tolerances import bound  # the one tolerance table, when run from a source checkout
    except Exception:
        bound = None
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dtypes = (torch.bfloat16, torch.float16, torch.float32) if dev == "cuda" else (torch.float32, torch.bfloat16)
    failures = 0
    print(f"checking kernels on {dev}" + (" (Triton interpreter)" if dev == "cpu" else ""))
    for name, fn, ref, make in _check_cases():
        for dt in dtypes:
            torch.manual_seed(0)
            xs = make(dt, dev)
            try:
                out = fn(*xs).float()
                oracle = ref(*[x.double() if x.is_floating_point() else x for x in xs])
                base = ref(*xs)
                err = (out.double() - oracle).abs().max().item()
                base_err = (base.double() - oracle).abs().max().item()
                lim = bound(oracle, base_err, dt, "output") if bound is not None else None
                ok = lim is None or err <= lim
                status = "ok" if ok else "FAIL"
                failures += not ok
                lim_s = f" bound {lim:.2e}" if lim is not None else ""
                print(f"  {name:<27} {str(dt)[6:]:<9} {status:<4} max err {err:.2e} "
                      f"(PyTorch same-dtype {base_err:.2e}){lim_s}")
            except Exception as e:
                failures += 1
                print(f"  {name:<27} {str(dt)[6:]:<9} ERROR {type(e).__name__}: {str(e)[:150]}")
    print("all checks passed" if not failures else f"{failures} check(s) failed")
    return 1 if failures else 0


# ----------------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="hf-fastkern", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("bench", help="benchmarks beside the peers (tables, JSON, plot)")
    b.add_argument("targets", nargs="*", default=["all"], metavar="TARGET",
                   help="ops | attention | ce | e2e | longctx | lora | all (default: all)")
    b.add_argument("--quick", action="store_true", help="small sizes, fewer repetitions")
    b.add_argument("--json", help="write every row + environment + command to this file")
    b.add_argument("--out-dir", help="also write one <bench>.json per script here (e.g. benchmarks/results/h100)")
    b.add_argument("--plot", help="write a PNG plot (matplotlib) here")
    i = sub.add_parser("info", help="environment, device, and which path each op takes here")
    i.add_argument("--json")
    sub.add_parser("check", help="quick correctness check of every kernel against its reference")
    return ap


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.cmd == "bench":
        bad = [t for t in args.targets if t not in SECTIONS and t != "all"]
        if bad:
            build_parser().error(f"unknown bench target(s) {bad}: choose from {', '.join(SECTIONS)}, all")
        run_bench(args.targets, quick=args.quick, json_path=args.json, out_dir=args.out_dir, plot_path=args.plot,
                  command=" ".join(["hf-fastkern"] + argv))
        return 0
    if args.cmd == "info":
        info(args.json)
        return 0
    if args.cmd == "check":
        return check()
    return 2


if __name__ == "__main__":
    sys.exit(main())
