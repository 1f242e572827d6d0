"""Render the README results table and the plots from committed benchmark JSON.

Reads every ``*.json`` in ``--results`` (default ``benchmarks/results/h100``) that has a ``rows`` list
(the format of ``benchmarks/common.save`` and ``hf-fastkern bench --json/--out-dir``), and writes:
  - markdown: a headline table (end to end, longest context, our speed-up per op) and one table per bench;
  - the README block between ``<!-- results:start -->`` and ``<!-- results:end -->`` (nothing else changes);
  - PNG plots (``--plots``, default ``<results>/plots``) when matplotlib is installed.
``--check`` writes nothing and exits 1 when the README block differs from what the JSON renders.
Numbers come only from the JSON; the output depends only on the JSON (files read in name order).

    python benchmarks/report.py                 # update README.md and the plots
    python benchmarks/report.py --check         # CI: is README.md up to date?
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


def render(docs: list[dict], plots_rel: str | None = None) -> str:
    """The markdown that goes between the README markers."""
    if not docs:
        return "No results yet: run `hf-fastkern bench all --out-dir benchmarks/results/h100` on a GPU, then " \
               "`python benchmarks/report.py`."
    rows = [dict(r, bench=r.get("bench") or os.path.splitext(d["file"])[0]) for d in docs for r in d["rows"]]
    env = next((d["env"] for d in docs if d.get("env", {}).get("gpu")), docs[0].get("env", {}))
    parts = [f"Generated by `python benchmarks/report.py` from `benchmarks/results/h100/*.json` "
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
    head = headline(_latest_longctx(rows, stamps))
    if head:
        parts.append(md_table(head, ["result", "value", "vs"], ["result", "hf_fastkern / peer", "ratio"]))
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
    return "\n\n".join(parts)


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
    ap.add_argument("--plots", help="folder for PNGs (default <results>/plots); 'none' to skip")
    ap.add_argument("--markdown", help="also write the rendered block to this file")
    ap.add_argument("--check", action="store_true", help="exit 1 if the README block is out of date; write nothing")
    args = ap.parse_args(argv)
    docs = load(args.results)
    plots_dir = None if args.plots == "none" else (args.plots or os.path.join(args.results, "plots"))
    plots_rel = None
    if plots_dir and docs:
        plots_rel = os.path.relpath(plots_dir, os.path.dirname(os.path.abspath(args.readme))).replace(os.sep, "/")
    block = render(docs, plots_rel)
    with open(args.readme) as f:
        text = f.read()
    new = replace_block(text, block)
    if args.check:
        if new != text:
            print(f"{args.readme} results block is out of date: run `python benchmarks/report.py`")
            return 1
        print(f"{args.readme} results block is up to date ({len(docs)} result files)")
        return 0
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(block + "\n")
    if new != text:
        with open(args.readme, "w") as f:
            f.write(new)
        print(f"updated {args.readme} from {len(docs)} result files")
    else:
        print(f"{args.readme} already up to date")
    if plots_dir and docs:
        made = write_plots(docs, plots_dir)
        print(f"wrote {len(made)} plot(s) to {plots_dir}" if made else "no plots (matplotlib missing?)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
