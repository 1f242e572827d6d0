"""Render the results from committed benchmark JSON: the README's headline table and docs/results.md.

Reads every ``*.json`` in ``--results`` (default ``benchmarks/results/h100``) that has a ``rows`` list (the
format of ``harness.save`` and ``hf-fastkern bench --json/--out-dir``), and writes:
  - the README block between ``<!-- results:start -->`` and ``<!-- results:end -->`` (nothing else changes):
    one headline table (end to end, LoRA 8B, long context, attention, the fused loss), each ratio against the
    peers measured in the same run, with the GPU named;
  - ``--results-md`` (default ``docs/results.md``), generated whole: the headline, our ratio per op, and every
    benchmark's full table with its plot;
  - PNG plots (``--plots``, default ``<results>/plots``) when matplotlib is installed.
``--check`` writes nothing and exits 1 when the README block or docs/results.md differs from what the JSON
renders. Numbers come only from the JSON; the output depends only on the JSON (files read in name order).

    python benchmarks/report.py                 # update README.md, docs/results.md and the plots
    python benchmarks/report.py --check         # CI: are they up to date?
"""
from __future__ import annotations

import argparse
import glob
import json
import math
import os
import re
import sys

START, END = "<!-- results:start -->", "<!-- results:end -->"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_RESULTS = os.path.join(ROOT, "benchmarks", "results", "h100")
DEFAULT_README = os.path.join(ROOT, "README.md")
DEFAULT_RESULTS_MD = os.path.join(ROOT, "docs", "results.md")


def load(results_dir: str) -> list[dict]:
    """Documents ``{"file", "env", "command", "rows", ...}`` from every JSON with rows, in file-name order."""
    docs = []
    for path in sorted(glob.glob(os.path.join(results_dir, "*.json"))):
        with open(path) as f:
            try:
                doc = json.load(f)
            except json.JSONDecodeError as e:
                raise SystemExit(f"{path}: not valid JSON ({e})") from e
        if isinstance(doc, dict) and isinstance(doc.get("rows"), list):
            doc["file"] = os.path.basename(path)
            docs.append(doc)
    return docs


def fmt(v) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if v != v:
            return "nan"
        if abs(v) >= 1000:
            return f"{v:,.0f}"
        return f"{v:.3g}" if abs(v) >= 0.01 or v == 0 else f"{v:.2e}"
    if isinstance(v, int):
        return f"{v:,}" if abs(v) >= 10000 else str(v)
    return str(v).replace("|", "\\|").replace("\n", " ")


def md_table(rows: list[dict], cols: list[str], headers: list[str] | None = None) -> str:
    headers = headers or cols
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for r in rows:
        out.append("| " + " | ".join(fmt(r.get(c)) for c in cols) + " |")
    return "\n".join(out)


def _columns(rows: list[dict]) -> list[str]:
    """The columns ``hf-fastkern bench`` prints for these rows (one list of hidden keys: cli._HIDDEN)."""
    if ROOT not in sys.path:  # run as a script from a source checkout, package not installed
        sys.path.insert(0, ROOT)
    from hf_fastkern.cli import table_columns
    return table_columns(rows)


# Op rows carry two timings (bench_rms_norm.time_impl): do_bench's ``ms`` and the profiler's kernel time
# ``gpu_ms``. Each kernel-time column goes right after its do_bench counterpart.
_BESIDE = {"gpu_ms": "ms", "host_ms": "gpu_ms", "GBps_gpu": "GBps", "vs_best_peer_gpu": "vs_best_peer"}


def _op_columns(cols: list[str]) -> list[str]:
    """``cols`` with each kernel-time column moved next to its do_bench column (when both are present)."""
    for col, after in _BESIDE.items():
        if col in cols and after in cols:
            cols.remove(col)
            cols.insert(cols.index(after) + 1, col)
    return cols


def headline(rows: list[dict]) -> list[dict]:
    """One line per result users ask about first: e2e variants, longest context, our ratio to the best peer."""
    out = []
    for r in rows:
        if r.get("bench") == "e2e" and r.get("tok_per_s"):
            out.append({"result": f"e2e Llama 1.5B B{r.get('B')}x{r.get('S')}: {r.get('impl')}",
                        "value": f"{fmt(r['tok_per_s'])} tok/s, {fmt(r.get('peak_GiB'))} GiB, MFU {fmt(r.get('mfu'))}",
                        "vs": _ratio_text(r)})
    for r in rows:
        if r.get("bench") == "longctx" and r.get("max_seq"):
            mode = "with" if r.get("grad_ckpt") else "without"
            out.append({"result": f"longest seq, B1, {mode} checkpointing: {r.get('variant', r.get('impl'))}",
                        "value": f"{fmt(r['max_seq'])} tokens" + ("" if r.get("exact", True) else " (lower bound)"),
                        "vs": f"{fmt(r['vs_liger'])}x Liger" if r.get("vs_liger") else ""})
    for r in rows:
        if r.get("bench") == "multi_gpu" and r.get("tok_per_s_per_gpu") and r.get("mode") != "single":
            out.append({"result": f"{r.get('mode')} x{r.get('nproc')} Llama 1.5B: {r.get('impl')}",
                        "value": f"{fmt(r['tok_per_s_per_gpu'])} tok/s/GPU, {fmt(r.get('peak_GiB'))} GiB/GPU, "
                                 f"scaling {fmt(r.get('scaling_eff'))}",
                        "vs": _ratio_text(r)})
    # ops: one line per (bench, op, mode, dtype): geometric mean of our ratio to the best peer over the shapes;
    # a second line on kernel time (vs_best_peer_gpu, bench_rms_norm.time_impl) where the rows carry it
    for ratio_key, what in (("vs_best_peer", ""), ("vs_best_peer_gpu", ", kernel time")):
        groups: dict[tuple, list[float]] = {}
        for r in rows:
            if (r.get("bench") not in ("e2e", "longctx", "multi_gpu") and r.get("impl") == "fastkern"
                    and r.get(ratio_key)):
                key = (r["bench"], r.get("op"), r.get("case"), r.get("mode") or r.get("pass"), r.get("dtype"))
                groups.setdefault(key, []).append(float(r[ratio_key]))
        for (bench, op, case, mode, dtype), ratios in groups.items():
            label = " ".join(str(x) for x in (bench, op if op != bench else None, case, mode, dtype) if x)
            gm = math.exp(sum(math.log(x) for x in ratios) / len(ratios))
            out.append({"result": f"{label} ({len(ratios)} shape{'s' if len(ratios) > 1 else ''}{what})",
                        "value": f"min {fmt(min(ratios))}x, max {fmt(max(ratios))}x",
                        "vs": f"{fmt(gm)}x best peer (geomean)"})
    return out


def _is_shape(k: str, v) -> bool:
    return (k in {"op", "mode", "dtype", "pass", "causal", "case"} or (len(k) <= 2 and k.isupper())) and not isinstance(v, float)


def _ratio_text(r: dict) -> str:
    parts = []
    if r.get("vs_sdpa") is not None and r.get("impl") != "sdpa":
        parts.append(f"{fmt(r['vs_sdpa'])}x sdpa tok/s")
    if r.get("mem_vs_sdpa") is not None and r.get("impl") != "sdpa":
        parts.append(f"{fmt(r['mem_vs_sdpa'])}x sdpa memory")
    return ", ".join(parts)


def _rows(docs: list[dict]) -> list[dict]:
    return [dict(r, bench=r.get("bench") or os.path.splitext(d["file"])[0]) for d in docs for r in d["rows"]]


def _env(docs: list[dict]) -> dict:
    return next((d["env"] for d in docs if d.get("env", {}).get("gpu")), docs[0].get("env", {}) if docs else {})


def _pick(rows: list[dict], bench: str, **match) -> dict | None:
    return next((r for r in rows if r["bench"] == bench and not r.get("error")
                 and all(r.get(k) == v for k, v in match.items())), None)


def _x(a, b) -> str:
    return f"{fmt(a / b)}x" if a and b else "–"


def _gmean(xs: list[float]) -> float | None:
    xs = [x for x in xs if x]
    return math.exp(sum(math.log(x) for x in xs) / len(xs)) if xs else None


def _vs_step(ours: dict, peer: dict) -> str:
    """A training-step row against a peer's: throughput ratio and peak-memory ratio."""
    return f"{_x(ours['tok_per_s'], peer['tok_per_s'])} tok/s, {_x(ours.get('peak_GiB'), peer.get('peak_GiB'))} memory"


def headline_rows(rows: list[dict]) -> list[dict]:
    """The README's table: per result, ours and our ratio to each peer measured in the same run (speed ratios
    > 1 favour hf_fastkern; memory ratios < 1)."""
    out = []
    ours, sdpa, liger = (_pick(rows, "e2e", impl=i) for i in ("fastkern", "sdpa", "sdpa+liger"))
    if ours and sdpa:
        out.append({"what": f"train step, Llama 1.5B, B{ours.get('B')} x {ours.get('S')}",
                    "ours": f"{fmt(ours['tok_per_s'])} tok/s, {fmt(ours.get('peak_GiB'))} GiB",
                    "stock": f"{_vs_step(ours, sdpa)} (SDPA)",
                    "liger": _vs_step(ours, liger) if liger else "–"})
    for r in rows:
        if r["bench"] == "lora" and r.get("impl") == "fastkern" and r.get("tok_per_s") and not r.get("error"):
            base = _pick(rows, "lora", impl="sdpa", B=r.get("B"), S=r.get("S"))
            lig = _pick(rows, "lora", impl="sdpa+liger", B=r.get("B"), S=r.get("S"))
            if base:
                out.append({"what": f"LoRA Llama-3.1-8B, B{r.get('B')} x {r.get('S')}",
                            "ours": f"{fmt(r['tok_per_s'])} tok/s, {fmt(r.get('peak_GiB'))} GiB",
                            "stock": f"{_vs_step(r, base)} (HF + PEFT)",
                            "liger": _vs_step(r, lig) if lig else "–"})
    for r in rows:
        if r["bench"] == "longctx" and r.get("max_seq"):
            mode = "with checkpointing" + (" + offload" if "offload" in str(r.get("variant")) else "") \
                if r.get("grad_ckpt") else "no checkpointing"
            out.append({"what": f"longest sequence, 1.5B, B1, {mode}",
                        "ours": f"{fmt(r['max_seq'])} tokens" + ("" if r.get("exact", True) else " (lower bound)"),
                        "stock": "–",
                        "liger": f"{fmt(r['vs_liger'])}x (Liger's length: earlier run, bench_longctx.ANCHORS)"
                        if r.get("vs_liger") else "–"})
    att = [r for r in rows if r["bench"] == "attention" and r.get("impl") == "fastkern" and r.get("case") == "causal"]
    if att:
        ratio = {p: _gmean([r.get(f"fwdbwd_x_{p}") for r in att]) for p in ("sdpa_flash", "sdpa_cudnn",
                                                                              "flex_compiled")}
        out.append({"what": f"attention fwd+bwd, causal, d128 ({len(att)} shapes, geomean)",
                    "ours": f"{fmt(_gmean([r.get('fwdbwd_TFLOPs') for r in att]))} TFLOP/s",
                    "stock": f"{fmt(ratio['sdpa_flash'])}x SDPA-flash, {fmt(ratio['sdpa_cudnn'])}x SDPA-cuDNN, "
                             f"{fmt(ratio['flex_compiled'])}x flex",
                    "liger": "–"})
    flce = [r for r in rows if r["bench"] == "flce" and not r.get("error") and r.get("fwdbwd_ms")]
    if flce:
        t, h, v = flce[0]["T"], flce[0]["H"], flce[0]["V"]
        same = [r for r in flce if (r["T"], r["H"], r["V"]) == (t, h, v)]
        ours = same[0] if same[0].get("impl") == "fastkern" else None
        torch_, lig = (next((r for r in same if r.get("impl") == i), None) for i in ("torch", "liger"))
        if ours and torch_:
            out.append({"what": f"fused linear cross-entropy {t} x {h} x {fmt(v)}, fwd+bwd",
                        "ours": f"{fmt(ours['fwdbwd_ms'])} ms, {fmt(ours.get('peak_MiB'))} MiB",
                        "stock": f"{_x(torch_['fwdbwd_ms'], ours['fwdbwd_ms'])} speed, "
                                 f"{_x(ours.get('peak_MiB'), torch_.get('peak_MiB'))} memory (eager)",
                        "liger": (f"{_x(lig['fwdbwd_ms'], ours['fwdbwd_ms'])} speed, "
                                  f"{_x(ours.get('peak_MiB'), lig.get('peak_MiB'))} memory") if lig else "–"})
    return out


def render_headline(docs: list[dict]) -> str:
    """The markdown between the README markers: one table, the GPU and versions named."""
    if not docs:
        return "No results yet: run `hf-fastkern bench all --out-dir benchmarks/results/h100` on a GPU, then " \
               "`python benchmarks/report.py`."
    rows = _rows(docs)
    stamps = [str(d.get("env", {}).get("time_utc", "")) for d in docs for _ in d["rows"]]
    env = _env(docs)
    head = (f"{env.get('gpu')}; torch {env.get('torch')}, triton {env.get('triton')}, transformers "
            f"{env.get('transformers')}. Each ratio is against the peer measured in the same run (speed > 1 and "
            "memory < 1 favour hf_fastkern). Generated by `benchmarks/report.py` from `benchmarks/results/`; "
            "every table: [docs/results.md](docs/results.md).")
    table = md_table(headline_rows(_latest_longctx(rows, stamps)), ["what", "ours", "stock", "liger"],
                     ["result", "hf_fastkern", "vs stock PyTorch / HF", "vs Liger Kernel"])
    return head + "\n\n" + table


def render(docs: list[dict], plots_rel: str | None = None, results_dir: str | None = None) -> str:
    """docs/results.md, whole: the headline, our ratio per op, every benchmark's table and plot."""
    if not docs:
        return "No results yet: run `hf-fastkern bench all --out-dir benchmarks/results/h100` on a GPU, then " \
               "`python benchmarks/report.py`."
    rows = [dict(r, bench=r.get("bench") or os.path.splitext(d["file"])[0]) for d in docs for r in d["rows"]]
    env = next((d["env"] for d in docs if d.get("env", {}).get("gpu")), docs[0].get("env", {}))
    parts = ["# Results\n\n<!-- Generated by benchmarks/report.py: edit the JSON or the script, not this file. -->",
             f"Generated by `python benchmarks/report.py` from `benchmarks/results/h100/*.json` "
             f"({', '.join(d['file'] for d in docs)}). "
             f"GPU: {env.get('gpu')}; torch {env.get('torch')}, triton {env.get('triton')}, "
             f"transformers {env.get('transformers')}, liger-kernel {env.get('liger_kernel')}. "
             "Medians of `triton.testing.do_bench`; e2e is wall clock over 10 steps; ratios > 1 favour hf_fastkern "
             "(memory ratios < 1)."
             + (" Op tables: `gpu_ms` is the CUDA kernel time of one call (torch.profiler), `ms` the do_bench "
                "median, which at ~0.1 ms also holds the host's time to issue the call."
                if any("gpu_ms" in r for r in rows) else "")]
    if any(d.get("quick") for d in docs) or not env.get("gpu"):
        parts.append("**Note: some files were produced by a quick or CPU run; they are not GPU performance numbers.**")
    stamps = [str(d.get("env", {}).get("time_utc", "")) for d in docs for _ in d["rows"]]  # one per row
    parts.append("## Headline\n\n" + md_table(headline_rows(_latest_longctx(rows, stamps)),
                                                ["what", "ours", "stock", "liger"],
                                                ["result", "hf_fastkern", "vs stock PyTorch / HF", "vs Liger Kernel"]))
    head = headline(_latest_longctx(rows, stamps))
    if head:
        parts.append("## Every result\n\n"
                     + md_table(head, ["result", "value", "vs"], ["result", "hf_fastkern / peer", "ratio"]))
    micro = render_micro(results_dir) if results_dir else []
    if micro:
        parts.append("## Whole-model runs\n\n" + "\n\n".join(micro))
    parts.append("## Per benchmark")
    benches: list[str] = []
    for r in rows:
        if r["bench"] not in benches:
            benches.append(r["bench"])
    for b in benches:
        brow = [r for r in rows if r["bench"] == b]
        cols = _op_columns([c for c in _columns(brow) if c != "bench"])
        formulas = sorted({f"{k}: `{v}`" for r in brow for k, v in r.items() if k.endswith("_formula") and v})
        note = ("\n\n" + "; ".join(formulas)) if formulas else ""
        parts.append(f"<details><summary>{b}</summary>\n\n" + md_table(brow, cols) + note + "\n\n</details>")
        if plots_rel:
            parts.append(f"![{b}]({plots_rel}/{_safe(b)}.png)")
    return "\n\n".join(parts) + "\n"


# Whole-model benchmarks kept under <results>/micro (one JSON per run, several runs a day): their newest file per
# pattern gets a short table on the results page, with the columns that answer its issue.
MICRO_TABLES = (
    ("guard: patched vs unpatched sdpa, same model and process (issue 21)", "guard_quick_2*.json",
     ["name", "mode", "batch", "seq", "sdpa_ms", "fastkern_ms", "ratio"]),
    ("SFT through TRL's SFTTrainer, 1.5B full fine-tune (issue 24)", "sft_1p5b_2*.json",
     ["impl", "real_tok_per_s", "vs_sdpa_padded", "vs_sdpa_liger_padded", "vs_sdpa_packed", "median_tok_per_s",
      "median_vs_sdpa_padded", "peak_GiB", "mem_vs_sdpa_padded"]),
    ("SFT through TRL's SFTTrainer, 8B LoRA (issue 24)", "sft_8b_lora_2*.json",
     ["impl", "layers", "real_tok_per_s", "vs_sdpa_padded", "vs_sdpa_liger_padded", "vs_sdpa_packed",
      "median_tok_per_s", "median_vs_sdpa_padded", "peak_GiB", "mem_vs_sdpa_padded"]),
)


def render_micro(results_dir: str) -> list[str]:
    """One section per MICRO_TABLES entry whose pattern matches a file in <results_dir>/micro: the newest run by
    its ``env.time_utc``. Rows that failed are listed under the table with their error."""
    out = []
    for title, pattern, cols in MICRO_TABLES:
        docs = []
        for path in glob.glob(os.path.join(results_dir, "micro", pattern)):
            with open(path) as f:
                docs.append((json.load(f), os.path.basename(path)))
        if not docs:
            continue
        doc, name = max(docs, key=lambda d: (str(d[0].get("env", {}).get("time_utc", "")), d[1]))
        env = doc.get("env", {})
        rows = [r for r in doc["rows"] if not r.get("error")]
        failed = "".join(f"\n- {r.get(cols[0])}: {r['error']}" for r in doc["rows"] if r.get("error"))
        out.append(f"### {title}\n\n`{doc.get('command')}` on {env.get('gpu')}, {env.get('time_utc')} "
                   f"(`micro/{name}`)\n\n" + md_table(rows, cols) + (f"\n\nFailed:{failed}" if failed else ""))
    return out


def _latest_longctx(rows: list[dict], stamps: list[str]) -> list[dict]:
    """``rows`` with each long-context variant's result only from its newest file (``stamps``: each row's
    ``env.time_utc``): a later search of one variant (say, after a memory saving) supersedes the older one in the
    headline; the per-bench tables below keep both."""
    def variant(r: dict) -> str:
        return r.get("variant", r.get("impl"))

    newest: dict[str, str] = {}
    for r, t in zip(rows, stamps):
        if r["bench"] == "longctx":
            newest[variant(r)] = max(newest.get(variant(r), ""), t)
    return [r for r, t in zip(rows, stamps) if r["bench"] != "longctx" or t == newest[variant(r)]]


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def replace_block(text: str, block: str) -> str:
    if START not in text or END not in text:
        raise SystemExit(f"README has no {START} ... {END} block")
    pre, rest = text.split(START, 1)
    _, post = rest.split(END, 1)
    return pre + START + "\n" + block.strip() + "\n" + END + post


# ----------------------------------------------------------------------------------------------------------
# plots


def _plot_metric(rows: list[dict]) -> tuple[str, str] | None:
    for key, label in (("tok_per_s", "tokens/s"), ("max_seq", "longest sequence (tokens)"), ("TFLOPs", "TFLOP/s"),
                       ("fwdbwd_TFLOPs", "fwd+bwd TFLOP/s"), ("GBps", "GB/s"), ("fwdbwd_GBps", "fwd+bwd GB/s"),
                       ("ms", "ms (lower is better)")):
        if any(isinstance(r.get(key), (int, float)) and not isinstance(r.get(key), bool) for r in rows):
            return key, label
    return None


def _axes_bars(ax, rows: list[dict], key: str, label: str, title: str) -> None:
    rows = [r for r in rows if isinstance(r.get(key), (int, float))]
    groups: list[str] = []
    impls: list[str] = []
    for r in rows:
        g = ", ".join(f"{k}={r[k]}" for k in r if _is_shape(k, r[k]) and k not in ("bench",))
        r["_group"] = g or r.get("bench", "")
        label_impl = str(r.get("variant") or r.get("impl"))
        r["_impl"] = label_impl
        if r["_group"] not in groups:
            groups.append(r["_group"])
        if label_impl not in impls:
            impls.append(label_impl)
    width = 0.8 / max(len(impls), 1)
    for j, impl in enumerate(impls):
        xs, ys = [], []
        for i, g in enumerate(groups):
            v = [r[key] for r in rows if r["_group"] == g and r["_impl"] == impl]
            if v:
                xs.append(i + j * width)
                ys.append(v[0])
        ax.bar(xs, ys, width=width, label=impl)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(groups))])
    ax.set_xticklabels(groups, rotation=20, ha="right", fontsize=7)
    ax.set_ylabel(label)
    ax.set_title(title)
    ax.legend(fontsize=7)


def plot_rows(rows: list[dict], path: str, title: str | None = None) -> bool:
    """One bar chart per bench in one PNG. Returns False when matplotlib is missing or nothing is plottable."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:
        return False
    benches: dict[str, list[dict]] = {}
    for r in rows:
        benches.setdefault(r.get("bench", "?"), []).append(dict(r))
    panels = [(b, rs, m) for b, rs in benches.items() if (m := _plot_metric(rs))]
    if not panels:
        return False
    fig, axes = plt.subplots(len(panels), 1, figsize=(10, 4.2 * len(panels)), squeeze=False)
    for ax, (b, rs, (key, label)) in zip(axes[:, 0], panels):
        _axes_bars(ax, rs, key, label, f"{title + ': ' if title else ''}{b}")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_plots(docs: list[dict], plots_dir: str) -> list[str]:
    rows = [dict(r, bench=r.get("bench") or os.path.splitext(d["file"])[0]) for d in docs for r in d["rows"]]
    made = []
    for b in dict.fromkeys(r["bench"] for r in rows):
        path = os.path.join(plots_dir, f"{_safe(b)}.png")
        if plot_rows([r for r in rows if r["bench"] == b], path):
            made.append(path)
    return made


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", default=DEFAULT_RESULTS, help="folder of benchmark JSON files")
    ap.add_argument("--readme", default=DEFAULT_README)
    ap.add_argument("--results-md", default=DEFAULT_RESULTS_MD, help="the generated full results page")
    ap.add_argument("--plots", help="folder for PNGs (default <results>/plots); 'none' to skip")
    ap.add_argument("--check", action="store_true", help="exit 1 if README.md or docs/results.md is out of date; "
                    "write nothing")
    args = ap.parse_args(argv)
    docs = load(args.results)
    plots_dir = None if args.plots == "none" else (args.plots or os.path.join(args.results, "plots"))
    plots_rel = None
    if plots_dir and docs:
        md_dir = os.path.dirname(os.path.abspath(args.results_md))
        plots_rel = os.path.relpath(plots_dir, md_dir).replace(os.sep, "/")
    page = render(docs, plots_rel, args.results)
    with open(args.readme) as f:
        text = f.read()
    new = replace_block(text, render_headline(docs))
    old_page = open(args.results_md).read() if os.path.exists(args.results_md) else None
    if args.check:
        stale = [p for p, ok in ((args.readme, new == text), (args.results_md, page == old_page)) if not ok]
        if stale:
            print(f"out of date: {', '.join(stale)}: run `python benchmarks/report.py`")
            return 1
        print(f"{args.readme} and {args.results_md} are up to date ({len(docs)} result files)")
        return 0
    for path, old, content in ((args.readme, text, new), (args.results_md, old_page, page)):
        if content != old:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            with open(path, "w") as f:
                f.write(content)
            print(f"updated {path} from {len(docs)} result files")
        else:
            print(f"{path} already up to date")
    if plots_dir and docs:
        made = write_plots(docs, plots_dir)
        print(f"wrote {len(made)} plot(s) to {plots_dir}" if made else "no plots (matplotlib missing?)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
