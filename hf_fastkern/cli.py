"""hf-fastkern: benchmark, check and describe hf_fastkern on this machine.

    hf-fastkern bench [SECTION ...] [--quick] [--budget SECONDS] [--json FILE] [--out-dir DIR] [--plot FILE]
                      [--qlora] [--budget-gib GIB]   (the last two: the lora benchmark's own knobs)
    hf-fastkern info  [--json FILE]
    hf-fastkern check

bench runs the benchmarks of the registry (benchmarks/registry.py; sections ops, attention, ce, e2e, longctx,
lora, or all) in this process, every peer beside our kernels, and prints one table per benchmark with the
fraction of the measured device ceiling and the ratio to the best peer. Without a GPU every benchmark runs its
reference path at small sizes (or says in one line why it cannot), and GPU numbers need a GPU. The exit code is
1 when a benchmark fails. --budget SECONDS fits the whole run into that much wall time on a GPU, planned from
the benchmarks' own measured costs; the output and JSON say what was shortened.
info says, per op and dtype, which path a call takes here (Triton kernel, SDPA, PyTorch reference) and why.
check compares every kernel entry point with its reference at small sizes (on the CPU through the Triton
interpreter) and says when what it checked ran a fallback instead of the kernel.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import importlib
import inspect
import io
import json
import os
import platform
import signal
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass, field

from hf_fastkern.benchmarks import harness, registry
from hf_fastkern.kernels import cross_entropy as ce_kernels
from hf_fastkern.kernels import dispatch, routing

# section -> benchmark names, and the sections of "all": both from the registry (one line per benchmark)
SECTIONS = registry.sections()
ALL = registry.all_sections()
NO_GPU_NOTE = ("No CUDA GPU here: this is a short correctness-and-timing pass through the PyTorch fallback at "
               "small sizes. It proves the commands run; GPU numbers need a GPU.")
# columns never shown as "shape" columns in the tables
_METRIC_ORDER = ("ms", "fwd_ms", "fwdbwd_ms", "bwd_ms", "step_ms", "tok_per_s", "GBps", "TFLOPs", "frac_ceiling",
                 "mfu", "peak_MiB", "peak_GiB", "max_seq", "exact", "vs_best_peer", "vs_sdpa", "mem_vs_sdpa",
                 "vs_liger", "loss", "gate", "loss_rel_err", "grad_rel_err", "max_err", "error")
_HIDDEN = {"trials", "cannot_run_here", "patch_report", "attn_note", "flops_formula", "mfu_peak_TFLOPs", "note",
           "first_fail", "liger_ref", "variant", "best_peer", "mem_vs_best_peer", "model",
           "trainable_params", "command", "distributed_type", "wall_s", "loss0", "global_batch"}


# ----------------------------------------------------------------------------------------------------------
# benchmark modules


def load_bench(name: str):
    """(module, None) or (None, why): the benchmark ``name`` of the registry."""
    return registry.load(name)


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


# ----------------------------------------------------------------------------------------------------------
# time budget (`bench --budget SECONDS`): the whole run in one device call


@dataclass(frozen=True)
class Level:
    """One way to run a script: its expected seconds on one H100, the run() keyword arguments, and what it
    leaves out compared with the full run (None: nothing)."""
    est_s: float
    kwargs: dict = field(default_factory=dict)
    note: str | None = None


# Costs: a benchmark's full form costs what it took in the newest `bench all` JSON of this GPU class
# (registry.measured_costs: each section's wall seconds, recorded by this command), and the registry's est_s
# where no run measured it. The shortened forms scale from the full one: an op grid under a budget takes that
# budget or less (harness.Budget stops before a shape that would overrun it); a quick pass runs a share of the
# full form's cases.
OP_NAMES = SECTIONS["ops"]
OP_BUDGETS_S = (None, 50.0, 35.0, 25.0)  # levels of the op scripts' budget_s (None: the whole grid)
QUICK_SHARE = {"attention": 2 / 8, "cross_entropy": 1 / 3}  # quick pass: 2 of 8 cases / 1 of 3 shapes
QUICK_FLOOR_S = 20.0  # compile and autotuning of the first case, whatever the share
LONGCTX_FULL_S = 500.0  # bench_longctx.run's own default budget for all 6 variants
LONGCTX_MIN_S = 150.0  # what the plan keeps for the shortened search (about 3 trials per variant)
LONGCTX_SKIP_BELOW_S = 45.0  # less than this cannot finish one trial: the section is skipped, and says so
# the shortened search: our two modes (without / with checkpointing); the peers' numbers are the anchors
LONGCTX_SHORT_VARIANTS = ("fastkern", "fastkern_gc")
LONGCTX_TRIAL_TIMEOUT_S = 420.0
STARTUP_S = 15.0  # imports, environment record and the two ceiling measurements before the first script
RESERVE_S = 15.0  # kept back for the last JSON and plots
QUICK_NOTES = {
    "attention": "quick pass: the first 2 of 8 cases (causal, B=8 S=2K and B=4 S=4K); causal 8K/16K, GQA, d64, "
                 "window and varlen cases not run",
    "cross_entropy": "quick pass: the main shape (T=8192, H=4096, V=128256) only; T=4096/H=2048 and "
                     "T=16384/H=4096 not run",
}


def _full_cost(name: str, costs: dict[str, dict]) -> float:
    """Seconds of ``name``'s full form: measured when the last run ran it in full, else the registry's."""
    m = costs.get(name)
    if m and not m["settings"].get("quick") and m["settings"].get("budget_s") is None and name != "longctx":
        return m["secs"]
    return registry.BENCHMARKS[name].est_s


def plan_levels(costs: dict[str, dict] | None = None) -> dict[str, tuple[Level, ...]]:
    """name -> its forms, full first, each with its expected seconds (``costs``: registry.measured_costs)."""
    costs = costs or {}
    levels: dict[str, tuple[Level, ...]] = {
        n: tuple(Level(_full_cost(n, costs) if b is None else b + 5.0, {"budget_s": b}) for b in OP_BUDGETS_S)
        for n in OP_NAMES}
    for n, share in QUICK_SHARE.items():
        full = _full_cost(n, costs)
        levels[n] = (Level(full), Level(max(QUICK_FLOOR_S, share * full), {"quick": True}, QUICK_NOTES[n]))
    levels["e2e"] = (Level(_full_cost("e2e", costs)),)
    levels["longctx"] = (Level(LONGCTX_FULL_S), Level(LONGCTX_MIN_S))
    return levels


LEVELS = plan_levels()
# Cheapest first: what the plan gives up, in this order, until its estimate fits the budget.
DOWNGRADES = (("longctx", 1), ("ops", 1), ("attention", 1), ("ops", 2), ("cross_entropy", 1), ("ops", 3))


class BudgetPlan:
    """Shares of ``seconds`` of wall time for the scripts ``names`` (run in that order), on a GPU.

    Planning: every script starts at its full form; while the estimate (``STARTUP_S`` + the scripts' expected
    seconds + ``RESERVE_S``) exceeds the budget, the next step of ``DOWNGRADES`` applies (long-context search
    shortened to our variants, op grids cut to 50 s, attention quick, op grids to 35 s, CE quick, op grids to
    25 s). At run time (``settings``) each script gets its planned form unless the scripts before it ran long:
    then a script with a time knob gets less time, one with a quick form runs quick, and one that cannot fit at
    all is skipped. The long-context search (last in ``ALL``) gets whatever is left, up to its full 500 s: it
    is the one part whose result degrades gracefully (a lower bound, ``exact: false``).
    """

    def __init__(self, seconds: float, names: list[str], start: float | None = None, clock=None,
                 longctx_variants: tuple[str, ...] | None = None, costs: dict[str, dict] | None = None) -> None:
        self.levels = plan_levels(costs)
        self.seconds = float(seconds)
        self.names = list(names)
        self.clock = clock or _clock
        self.t0 = self.clock() if start is None else start
        self.longctx_variants = tuple(longctx_variants) if longctx_variants else None
        self.level = {n: 0 for n in self.names if n in self.levels}
        self.steps: list[str] = []
        for sec, lvl in DOWNGRADES:
            if self.planned_s() <= self.seconds:
                break
            hit = [n for n in (OP_NAMES if sec == "ops" else (sec,)) if n in self.level and lvl < len(self.levels[n])]
            for n in hit:
                self.level[n] = max(self.level[n], lvl)
            if hit:
                self.steps.append(f"{sec} -> level {lvl}")

    def est(self, name: str, level: int | None = None) -> float:
        if name not in self.levels:  # a benchmark with one form (lora): its cost, never shortened
            return registry.BENCHMARKS[name].est_s if name in registry.BENCHMARKS else 120.0
        return self.levels[name][self.level[name] if level is None else level].est_s

    def planned_s(self) -> float:
        return STARTUP_S + RESERVE_S + sum(self.est(n) for n in self.names)

    def left(self) -> float:
        return self.seconds - (self.clock() - self.t0)

    def describe(self) -> dict:
        return {"seconds": self.seconds, "planned_s": round(self.planned_s()), "fits": self.planned_s() <= self.seconds,
                "downgrades": self.steps,
                "plan": {n: {"est_s": self.est(n), **({"level": self.level[n]} if n in self.level else {})}
                         for n in self.names}}

    def settings(self, name: str) -> dict:
        """What the script ``name`` runs with now: ``kwargs`` for its run(), ``shortened`` (what it leaves
        out, or None), ``skip`` (why it does not run at all, or None), and the seconds ``left``."""
        left = self.left()
        later = self.names[self.names.index(name) + 1:]
        # what this script may use and still leave the later ones their planned time
        avail = left - RESERVE_S - sum(self.est(n) for n in later)
        out: dict = {"kwargs": {}, "shortened": None, "skip": None, "left_s": round(left, 1)}
        if name == "longctx":
            b = min(LONGCTX_FULL_S, avail)
            if b < LONGCTX_SKIP_BELOW_S:
                out["skip"] = f"{max(b, 0):.0f} s left for the search, less than one trial takes"
                return out
            full = self.level.get(name, 0) == 0 and b >= 0.8 * LONGCTX_FULL_S
            variants = self.longctx_variants or (None if full else LONGCTX_SHORT_VARIANTS)
            out["kwargs"] = {"budget_s": round(b), "trial_timeout": round(min(LONGCTX_TRIAL_TIMEOUT_S, b))}
            if variants:
                out["kwargs"]["variants"] = tuple(variants)
            parts = []
            if variants and not self.longctx_variants:
                parts.append(f"variants {','.join(variants)} only (full: all 6; the peers' ratios use the anchors)")
            if b < LONGCTX_FULL_S:
                parts.append(f"search budget {b:.0f} s (full: {LONGCTX_FULL_S:.0f} s): rows with exact=false give "
                             "max_seq as a lower bound")
            out["shortened"] = "; ".join(parts) or None
            return out
        if name not in self.levels:
            if self.est(name) > left - RESERVE_S:
                out["skip"] = f"{left:.0f} s left, expected ~{self.est(name):.0f} s"
            return out
        levels = self.levels[name]
        if name in OP_NAMES:
            b = levels[self.level[name]].kwargs["budget_s"]
            if b is None and avail >= levels[0].est_s:
                out["kwargs"] = {"budget_s": None}
                return out
            b = min(b if b is not None else float("inf"), avail - 5.0)
            if b < 10.0:
                out["skip"] = f"{max(avail, 0):.0f} s left for it after the later sections' shares"
                return out
            out["kwargs"] = {"budget_s": round(b)}
            return out  # 'shortened' is set after the run, from the shapes the grid left out
        lvl = self.level[name]
        while lvl + 1 < len(levels) and levels[lvl].est_s > avail:
            lvl += 1
        if 0.6 * levels[lvl].est_s > left - RESERVE_S:
            out["skip"] = f"{left:.0f} s left, expected ~{levels[lvl].est_s:.0f} s"
            return out
        out["kwargs"] = dict(levels[lvl].kwargs)
        out["shortened"] = levels[lvl].note
        return out


def _clock() -> float:
    return time.monotonic()


def _gpu_available() -> bool:
    import torch
    return torch.cuda.is_available()


def _gpu_free_gib() -> float | None:
    """Free GPU memory now (GiB): what the e2e/longctx subprocesses have beside this process."""
    try:
        import torch
        return round(torch.cuda.mem_get_info()[0] / 2**30, 1)
    except Exception:
        return None


def _accepted(fn, kwargs: dict) -> dict:
    """The items of ``kwargs`` that ``fn`` takes (scripts differ in their run() knobs)."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return {k: v for k, v in kwargs.items() if k == "quick"}
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return dict(kwargs)
    return {k: v for k, v in kwargs.items() if k in params}


def _skipped_shapes(mod) -> list | None:
    """The op scripts' list of shapes a budget left out (bench_rms_norm.SKIPPED, shared by the three)."""
    lst = getattr(mod, "SKIPPED", None)
    if lst is None and hasattr(mod, "Budget"):
        lst = getattr(sys.modules.get(getattr(mod.Budget, "__module__", ""), None), "SKIPPED", None)
    return lst if isinstance(lst, list) else None


def _status(rows: list[dict]) -> str:
    """One benchmark's outcome from its rows: ``ok`` (measured), ``not run here: why`` (it said in one line why
    it cannot run on this machine: harness.cannot_run_here), or a failure: our implementation failed its
    correctness gate or raised, or no row measured anything."""
    if rows and all(r.get("cannot_run_here") for r in rows):
        return f"not run here: {rows[0]['error']}"
    ours = [r for r in rows if r.get("impl") == "fastkern" and r.get("error")]
    if ours:
        return f"failed: fastkern: {ours[0]['error']}"
    if rows and not any(not r.get("error") for r in rows):
        return f"failed: no result: {rows[0]['error']}"
    return "ok"


def _succeeded(status: str) -> bool:
    """A section succeeded when it measured, was skipped by the budget, or said why it cannot run here."""
    return status in ("ok",) or status.startswith(("skipped", "not run here"))


def run_bench(targets: list[str], quick: bool = False, json_path: str | None = None, out_dir: str | None = None,
              plot_path: str | None = None, command: str | None = None, budget_s: float | None = None,
              longctx_variants: tuple[str, ...] | None = None, started: float | None = None,
              knobs: dict[str, dict] | None = None) -> dict:
    """Run the named sections; returns the JSON document it prints/saves.

    ``knobs``: benchmark name -> extra keyword arguments for its ``run()`` (``{"lora": {"qlora": True,
    "budget_gib": 40.0}}`` from ``bench lora --qlora --budget-gib 40``); recorded in the section's settings.

    ``budget_s``: fit the run into that many seconds of wall time from ``started`` (default: now) on a GPU
    (``BudgetPlan``); None runs every script in full. The JSON is rewritten after every script, and, with
    ``out_dir``, each script's rows and plot go to ``<out_dir>/<name>.json`` / ``.png`` as soon as it ends, so
    a run stopped by a time limit keeps what it finished.
    """
    import torch

    t_start = _clock() if started is None else started
    gpu = _gpu_available()
    if not gpu:
        print(NO_GPU_NOTE)
        quick = True
    names = []
    for t in targets:
        for n in (ALL if t == "all" else (t,)):
            names += [(n, b) for b in SECTIONS[n] if (n, b) not in names]
    env = harness.environment()
    plan = None
    if budget_s is not None and gpu:
        plan = BudgetPlan(budget_s, [b for _, b in names], start=t_start, longctx_variants=longctx_variants,
                          costs=registry.measured_costs(env.get("gpu")))
    print(_env_line(env))
    ceil = harness.ceilings() if gpu else {}
    if ceil:
        print(f"device ceilings (measured): copy {ceil['copy_TBps']:.2f} TB/s, bf16 matmul "
              f"{ceil['bf16_mm_TFLOPs']:.0f} TFLOP/s")
    doc: dict = {"env": env, "command": command or " ".join(["hf-fastkern"] + sys.argv[1:]),
                 "quick": quick, "ceilings": ceil, "sections": {}, "rows": []}
    if budget_s is not None:
        doc["budget"] = plan.describe() if plan else {
            "seconds": budget_s, "note": "no GPU: every script runs its quick CPU pass; the budget applies on a GPU"}
        if plan:
            print(f"budget {budget_s:.0f} s: planned ~{plan.planned_s():.0f} s"
                  + (f" after shortening ({'; '.join(plan.steps)})" if plan.steps else " (nothing shortened)")
                  + ("" if doc["budget"]["fits"] else "; the estimate still exceeds the budget: later scripts "
                     "may be skipped"))
    shortened: dict[str, str] = {}
    failed: list[str] = []
    bar = _progress(len(names), "hf-fastkern bench")
    current = None
    try:
        for section, name in names:
            current = name
            t0 = time.time()
            if gpu:
                # e2e/longctx run in subprocesses that need the whole GPU: give back what earlier scripts cached
                gc.collect()
                torch.cuda.empty_cache()
            settings = plan.settings(name) if plan else {"kwargs": {}, "shortened": None, "skip": None}
            info_s: dict = {"section": section}
            if gpu:
                info_s["gpu_free_GiB"] = _gpu_free_gib()
            mod, why = (None, None) if settings["skip"] else load_bench(name)
            rows: list[dict] = []
            if settings["skip"]:
                status = f"skipped: {settings['skip']}"
                shortened[name] = status
            elif mod is None:
                status = f"failed: {why}"
            else:
                kwargs = {"quick": quick, **settings["kwargs"], **(knobs or {}).get(name, {})}
                if name == "longctx" and longctx_variants and "variants" not in kwargs:
                    kwargs["variants"] = tuple(longctx_variants)
                if out_dir and gpu:
                    # scripts that save as they go (attention per case, longctx per trial) do it into out_dir
                    kwargs["json_path"] = os.path.join(out_dir, f"{name}.json")
                kwargs = _accepted(mod.run, kwargs)
                info_s["settings"] = {k: (list(v) if isinstance(v, tuple) else v) for k, v in kwargs.items()
                                      if k != "json_path"}
                skipped = _skipped_shapes(mod)
                n_skipped = len(skipped) if skipped is not None else 0
                # On CPU the scripts' own progress tables only repeat the CLI's table, so they are held back (and
                # shown on failure); on a GPU they are the progress report of a long run, so they go through.
                captured = io.StringIO()
                try:
                    # warnings are held and printed under the section's header: written to stderr mid-run,
                    # they would overwrite the progress bar's line (and it theirs)
                    with warnings.catch_warnings(record=True) as caught, \
                            (contextlib.redirect_stdout(captured) if not gpu else contextlib.nullcontext()):
                        warnings.simplefilter("default")
                        rows = list(mod.run(**kwargs))
                    status = _status(rows)
                except Exception as e:  # one broken script must not hide the others
                    caught = []
                    rows = []
                    status = f"failed: {type(e).__name__}: {str(e)[:300]}"
                    tail = captured.getvalue().strip().splitlines()[-5:]
                    if tail:
                        status += "\n   last output: " + "\n   ".join(tail)
                if skipped is not None and len(skipped) > n_skipped:
                    info_s["skipped_shapes"] = [dict(x) for x in skipped[n_skipped:]]
                    settings["shortened"] = (f"shape grid cut by its {kwargs.get('budget_s')} s budget: "
                                             f"{len(info_s['skipped_shapes'])} shape(s) not run (skipped_shapes)")
                if settings["shortened"]:
                    shortened[name] = settings["shortened"]
            for r in rows:
                r.setdefault("bench", name)
            add_ceiling_fraction(rows, ceil)
            info_s.update(status=status, secs=round(time.time() - t0, 1), shortened=shortened.get(name))
            doc["sections"][name] = info_s
            doc["rows"] += rows
            if not _succeeded(status):
                failed.append(name)
            if bar is not None:
                bar.clear()
            print(f"\n== {name} ({section}): {status}, {time.time() - t0:.1f}s"
                  + (f"\n   SHORTENED: {shortened[name]}" if name in shortened and not settings["skip"] else ""))
            for w in dict.fromkeys(f"{w.category.__name__}: {w.message}" for w in (caught if mod else [])):
                print(f"   warning: {w}")
            if rows:
                harness.print_table(rows, table_columns(rows))
            sys.stdout.flush()
            if bar is not None:
                bar.update(1)
            if out_dir and rows:
                one = {"env": env, "command": doc["command"], "ceilings": ceil, "quick": quick, "rows": rows}
                for k in ("settings", "skipped_shapes", "shortened"):
                    if info_s.get(k):
                        one[k] = info_s[k]
                if "budget" in doc:
                    one["budget_s"] = budget_s
                _write(os.path.join(out_dir, f"{name}.json"), one)
                _plot(rows, os.path.join(out_dir, f"{name}.png"), None)
            if json_path:
                _write(json_path, dict(doc, partial=True), quiet=True)
        current = None
    except BaseException as e:  # a time limit's SIGTERM (SystemExit) or ^C: say where, keep what finished
        doc["stopped"] = f"{type(e).__name__} during {current}" if current else type(e).__name__
        raise
    finally:
        if bar is not None:
            bar.close()
        doc["secs"] = round(_clock() - t_start, 1)
        if "budget" in doc:
            doc["budget"].update(spent_s=doc["secs"], shortened=shortened)
        if json_path:
            _write(json_path, doc)
    doc["failed"] = failed
    if json_path:
        _write(json_path, doc, quiet=True)
    if not gpu:
        print("\n" + NO_GPU_NOTE)
    if failed:
        print(f"\nFAILED: {', '.join(failed)} (see the sections above)")
    if "budget" in doc and plan:
        print(f"\nbudget {budget_s:.0f} s, spent {doc['secs']:.0f} s. "
              + ("Nothing was shortened." if not shortened else "Shortened (also in the JSON's budget.shortened):"))
        for n, why in shortened.items():
            print(f"  {n}: {why}")
    if plot_path:
        _plot(doc["rows"], plot_path, None)
    return doc


def _plot(rows: list[dict], path: str, title: str | None) -> None:
    try:
        made = _report_module().plot_rows(rows, path, title)
        print(f"wrote {path}" if made else f"no plot {path}: matplotlib is not installed or no rows to plot")
    except Exception as e:
        print(f"no plot {path}: {type(e).__name__}: {e}")


def _report_module():
    for modname in ("hf_fastkern.benchmarks.report", "benchmarks.report"):
        try:
            return importlib.import_module(modname)
        except ModuleNotFoundError:
            continue
    raise ImportError("benchmarks/report.py not found")


def _write(path: str, doc: dict, quiet: bool = False) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    # write then rename: a run killed mid-write leaves the previous complete file, never half a JSON
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1, default=str)
    os.replace(tmp, path)
    if not quiet:
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
    "flash_attention": ("attention", "low"),
    "rope": ("rope", "all"),
    "cross_entropy": ("cross_entropy", "all"),
}
# the path names info and check print
KERNEL, INTERPRETED, REFERENCE, SDPA = "Triton kernel", "Triton kernel (interpreter)", "PyTorch reference", "SDPA"


def _kernel_path(device: str) -> str:
    return INTERPRETED if device == "cpu" else KERNEL


def model_attention_path(device: str, dtype) -> tuple[str, str]:
    """(path, why) of a model's attention under ``attn_implementation="fastkern"`` for ``dtype`` on ``device``:
    the kernel where dispatch allows it (with the dense-case routing of HF_FASTKERN_ATTENTION), else SDPA."""
    import torch

    from hf_fastkern.patches.attention import dense_backend_summary

    ok, why = dispatch.device_check([torch.empty(1, device=device, dtype=dtype)], dispatch.LOW_PRECISION_DTYPES)
    if not ok:
        return SDPA, f"falls back to SDPA (eager with softcap): {why}"
    summary = dense_backend_summary(device)
    if "SDPA" in summary.split(";")[0] and "Triton kernel for every" not in summary:
        return f"{SDPA} (plain dense) / {_kernel_path(device)} (the rest)", summary
    return _kernel_path(device), summary


def op_paths(device: str | None = None) -> list[dict]:
    """For each op and dtype: the path a call takes for tensors on ``device`` (default: here), and why."""
    import torch

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    rows = []
    for op, (modname, which) in OPS.items():
        import_err = ""
        try:
            mod = importlib.import_module(f"hf_fastkern.kernels.{modname}")
        except Exception as e:
            mod, import_err = None, f"{type(e).__name__}: {e}"
        allowed = dispatch.LOW_PRECISION_DTYPES if which == "low" else dispatch.SUPPORTED_DTYPES
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            probe = torch.empty(8, device=device, dtype=dtype)
            ok, reason = dispatch.device_check([probe], allowed)
            if mod is None:
                ok, reason = False, f"module failed to import ({import_err})"
            rows.append({"op": op, "dtype": str(dtype).replace("torch.", ""), "device": device,
                         "path": _kernel_path(device) if ok else REFERENCE, "why": reason or "supported"})
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        path, why = model_attention_path(device, dtype)
        rows.append({"op": "model attention (fastkern)", "dtype": str(dtype).replace("torch.", ""),
                     "device": device, "path": path, "why": why})
    return rows


def _label_check_line() -> str:
    """How the fused loss checks its labels here (docs/cross_entropy.md)."""
    try:
        mode = ce_kernels.label_check_mode()
    except ValueError as e:
        return f"{e} (every fused-loss call raises this)"
    if os.environ.get("HF_FASTKERN_SKIP_LABEL_CHECK") == "1":
        return "skipped (HF_FASTKERN_SKIP_LABEL_CHECK=1: a bad label gives a NaN loss)"
    if mode == "async":
        return ("async (no host sync in the step; a bad batch: NaN loss, zero gradients, ValueError at its "
                "backward or at most two calls later; torch.compile skips the check)")
    return "sync (one host sync per call; HF_FASTKERN_LABEL_CHECK=async avoids it)"


def info(json_path: str | None = None) -> dict:
    import torch

    import hf_fastkern

    env = harness.environment()
    env["hf_fastkern"] = hf_fastkern.__version__
    env["platform"] = platform.platform()
    env["TRITON_INTERPRET"] = os.environ.get("TRITON_INTERPRET")
    env["HF_FASTKERN_FORCE_REFERENCE"] = os.environ.get("HF_FASTKERN_FORCE_REFERENCE")
    env["HF_FASTKERN_ATTENTION"] = os.environ.get("HF_FASTKERN_ATTENTION")
    env["fused loss label check"] = _label_check_line()
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
    wp = max(len(r["path"]) for r in paths)
    for r in paths:
        print(f"  {r['op']:<{w}}  {r['dtype']:<8}  {r['path']:<{wp}}  {r['why']}")
    routing.print_routing()
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
        import torch
        dev = "cuda" if torch.cuda.is_available() else "cpu"
        path, why = model_attention_path(dev, torch.bfloat16)
        out["model attention, bf16"] = f"{path}: {why}"
    except Exception as e:
        out["model attention, bf16"] = f"unknown ({type(e).__name__}: {e})"
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

    from hf_fastkern.kernels import (
        activations,
        attention,
        cross_entropy,
        layer_norm,
        reference,
        rms_norm,
        rope,
    )

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

    def qk_rope(dt, dev):  # q, k as the attention forward gives them ([b, s, h, d] transposed), cos, sin
        ang = torch.randn(1, 63, 32, device=dev)
        emb = torch.cat([ang, ang], dim=-1)
        return qkv(dt, dev)[:2] + [emb.cos().to(dt), emb.sin().to(dt)]

    def rope_fn(apply):
        return lambda q, k, c, s: torch.cat(apply(q.transpose(1, 2), k.transpose(1, 2), c, s), dim=1)

    def attn_ref(q, k, v):
        return reference.attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True).transpose(1, 2)

    return [
        ("rms_norm", rms_norm.rms_norm, reference.rms_norm, x_w),
        ("layer_norm", layer_norm.layer_norm, lambda x, w, b: reference.layer_norm(x, w, b, 1e-5), ln),
        ("swiglu", activations.swiglu, reference.swiglu, gu),
        ("geglu", activations.geglu, reference.geglu, gu),
        ("gelu", activations.gelu, reference.gelu, lambda dt, dev: gu(dt, dev)[:1]),
        ("attention", lambda q, k, v: attention.flash_attention(q, k, v, causal=True), attn_ref, qkv),
        ("rope", rope_fn(rope.apply_rope), rope_fn(reference.rope), qk_rope),
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
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dtypes = (torch.bfloat16, torch.float16, torch.float32) if dev == "cuda" else (torch.float32, torch.bfloat16)
    failures = fallbacks = 0
    print(f"checking kernels on {dev}" + (" (Triton interpreter)" if dev == "cpu" else ""))
    for name, fn, ref, make in _check_cases():
        for dt in dtypes:
            torch.manual_seed(0)
            xs = make(dt, dev)
            try:
                # each fallback reason warns once per process: forget them, so this call's fallback is seen
                dispatch.reset_warnings()
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always", dispatch.FastKernFallbackWarning)
                    out = fn(*xs).float()
                fell_back = [str(w.message) for w in caught if issubclass(w.category, dispatch.FastKernFallbackWarning)]
                oracle = ref(*[x.double() if x.is_floating_point() else x for x in xs])
                base = ref(*xs)
                err = (out.double() - oracle).abs().max().item()
                base_err = (base.double() - oracle).abs().max().item()
                lim = harness.bound(oracle, base_err, dt, "output")
                ok = err <= lim
                failures += not ok
                path = f"{REFERENCE} fallback: {fell_back[0]}" if fell_back else _kernel_path(dev)
                fallbacks += bool(fell_back)
                print(f"  {name:<27} {str(dt)[6:]:<9} {'ok' if ok else 'FAIL':<4} max err {err:.2e} "
                      f"(PyTorch same-dtype {base_err:.2e}) bound {lim:.2e}  [{path}]")
            except Exception as e:
                failures += 1
                print(f"  {name:<27} {str(dt)[6:]:<9} ERROR {type(e).__name__}: {str(e)[:150]}")
    print("all checks passed" if not failures else f"{failures} check(s) failed")
    if fallbacks:
        print(f"{fallbacks} of these checked a fallback, not the Triton kernel (the reason is in brackets)")
    return 1 if failures else 0


# ----------------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="hf-fastkern", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("bench", help="benchmarks beside the peers (tables, JSON, plot)")
    b.add_argument("targets", nargs="*", default=["all"], metavar="TARGET",
                   help=" | ".join([*SECTIONS, "all"]) + " (default: all = " + ", ".join(ALL) + ")")
    b.add_argument("--quick", action="store_true", help="small sizes, fewer repetitions")
    b.add_argument("--json", help="write every row + environment + command to this file")
    b.add_argument("--out-dir", help="also write one <bench>.json per script here (e.g. benchmarks/results/h100)")
    b.add_argument("--plot", help="write a PNG plot (matplotlib) of every row here (with --out-dir, each script "
                   "also gets <out-dir>/<name>.png)")
    b.add_argument("--budget", type=float, metavar="SECONDS",
                   help="fit the whole run into this many seconds of wall time on a GPU: scripts get shares, the "
                   "long-context search what is left; the output and JSON (budget.shortened) say what was cut")
    b.add_argument("--longctx-variants", metavar="V1,V2",
                   help="long-context variants to search (default: all 6; under a tight --budget: "
                   + ",".join(LONGCTX_SHORT_VARIANTS) + ")")
    b.add_argument("--qlora", action="store_true",
                   help="lora: a 4-bit NF4 double-quant base (bitsandbytes) in every variant, baseline HF + PEFT + "
                   "bitsandbytes (benchmarks/bench_lora.py --qlora)")
    b.add_argument("--budget-gib", type=float, metavar="GIB",
                   help="lora: the memory budget of the fastkern_auto variant (checkpoint='auto'; added to the "
                   "variants), whose rows say what the checkpoint planner chose (benchmarks/bench_lora.py "
                   "--budget-gib)")
    i = sub.add_parser("info", help="environment, device, and which path each op takes here")
    i.add_argument("--json")
    sub.add_parser("check", help="quick correctness check of every kernel against its reference")
    return ap


def lora_knobs(args: argparse.Namespace) -> dict:
    """The lora benchmark's knobs given on the command line (bench_lora.run's keyword arguments)."""
    if args.budget_gib is not None and args.budget_gib <= 0:
        build_parser().error("--budget-gib must be a positive number of GiB")
    out: dict = {}
    if args.qlora:
        out["qlora"] = True
    if args.budget_gib is not None:
        out["budget_gib"] = args.budget_gib
    return out


def main(argv: list[str] | None = None) -> int:
    started = _clock()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.cmd == "bench":
        bad = [t for t in args.targets if t not in SECTIONS and t != "all"]
        if bad:
            build_parser().error(f"unknown bench target(s) {bad}: choose from {', '.join(SECTIONS)}, all")
        if args.budget is not None and args.budget <= 0:
            build_parser().error("--budget must be a positive number of seconds")
        variants = tuple(v for v in (args.longctx_variants or "").split(",") if v) or None
        knobs = lora_knobs(args)
        if knobs and "lora" not in args.targets:
            build_parser().error("--qlora and --budget-gib are knobs of the lora benchmark: `hf-fastkern bench lora`")
        # `timeout` sends SIGTERM: turn it into SystemExit so the JSON of the finished scripts is written and a
        # running trial subprocess is killed with us (subprocess.run kills its child on any exception)
        prev = _sigterm_to_exit()
        try:
            doc = run_bench(args.targets, quick=args.quick, json_path=args.json, out_dir=args.out_dir,
                      plot_path=args.plot, command=" ".join(["hf-fastkern"] + argv), budget_s=args.budget,
                      longctx_variants=variants, started=started, knobs={"lora": knobs} if knobs else None)
        finally:
            if prev is not None:
                signal.signal(signal.SIGTERM, prev)
        return 1 if doc["failed"] else 0
    if args.cmd == "info":
        info(args.json)
        return 0
    if args.cmd == "check":
        return check()
    return 2


def _sigterm_to_exit():
    """Make SIGTERM raise SystemExit(124) (as `timeout` reports); returns the previous handler, or None when
    this is not the main thread (signal handlers can only be set there)."""
    try:
        return signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(124))
    except ValueError:
        return None


if __name__ == "__main__":
    sys.exit(main())
