"""The benchmarks by name: what ``hf-fastkern bench`` can run, in which section, and what each costs.

Adding a benchmark is one line in ``BENCHMARKS``: ``"name": Bench("bench_name", "section", est_s=...)``, with
``benchmarks/bench_name.py`` defining ``run(quick: bool = False, **knobs) -> list[dict]`` (rows as
``harness`` documents them; ``quick`` is the small CPU-runnable pass) and, for ``python -m``, a ``__main__``
block. ``hf-fastkern bench <section>`` runs the section's benchmarks in registry order; ``all`` runs the
sections with ``in_all``.

``est_s`` is the benchmark's full-form cost on one H100 with a cold Triton cache, used by ``--budget`` only
when no measured cost is at hand: ``measured_costs`` reads the seconds each benchmark took in the newest
``bench_all.json`` the CLI wrote for this GPU class (``sections.<name>.secs`` with its ``settings``), so the
plan follows the benchmarks' own last measurement, not a hand-kept table.
"""
from __future__ import annotations

import glob
import importlib
import json
import os
from dataclasses import dataclass


@dataclass(frozen=True)
class Bench:
    module: str  # benchmarks/<module>.py
    section: str  # `hf-fastkern bench <section>`
    est_s: float  # full form on one H100 (cold cache), when no measured cost exists
    in_all: bool = True  # part of `hf-fastkern bench all`


BENCHMARKS: dict[str, Bench] = {
    "rms_norm": Bench("bench_rms_norm", "ops", 80.0),
    "layer_norm": Bench("bench_layer_norm", "ops", 110.0),
    "activations": Bench("bench_activations", "ops", 70.0),
    "rope": Bench("bench_rope", "ops", 40.0),
    "attention": Bench("bench_attention", "attention", 150.0),
    "cross_entropy": Bench("bench_cross_entropy", "ce", 90.0),
    "e2e": Bench("bench_e2e", "e2e", 120.0),
    "longctx": Bench("bench_longctx", "longctx", 500.0),
    # LoRA fine-tuning of the Llama-3.1-8B shape builds an 8B model per variant: named explicitly, not in `all`
    "lora": Bench("bench_lora", "lora", 240.0, in_all=False),
    # SFTTrainer padded / packed, HF / Liger / fastkern, one subprocess per variant (issue 24)
    "sft": Bench("bench_sft", "sft", 240.0, in_all=False),
    # never-slower guard (issue 21): every recipe architecture patched vs unpatched, one model per case
    "guard": Bench("bench_guard", "guard", 900.0, in_all=False),
    # host time per launch: Triton's launch path vs DirectLaunch vs the stock op (GPU only)
    "launch": Bench("bench_launch", "launch", 30.0, in_all=False),
}


def sections() -> dict[str, tuple[str, ...]]:
    """section -> benchmark names, in registry order."""
    out: dict[str, tuple[str, ...]] = {}
    for name, b in BENCHMARKS.items():
        out[b.section] = out.get(b.section, ()) + (name,)
    return out


def all_sections() -> tuple[str, ...]:
    """The sections `hf-fastkern bench all` runs (those holding a benchmark with ``in_all``)."""
    return tuple(dict.fromkeys(b.section for b in BENCHMARKS.values() if b.in_all))


def load(name: str):
    """(module, None), or (None, why) when the benchmark is not registered or fails to import (a bug: said)."""
    b = BENCHMARKS.get(name)
    if b is None:
        return None, f"no benchmark named {name!r} (benchmarks/registry.py lists them)"
    try:
        return importlib.import_module(f"{__package__}.{b.module}"), None
    except Exception as e:
        return None, f"import failed: {type(e).__name__}: {str(e)[:200]}"


RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def gpu_class(gpu_name: str | None) -> str | None:
    """'NVIDIA H100 80GB HBM3' -> 'h100' (the results folder of that card), None without a GPU."""
    if not gpu_name:
        return None
    for tag in ("h200", "h100", "a100", "l40s", "l4", "a10"):
        if tag in gpu_name.lower().replace(" ", ""):
            return tag
    return None


def measured_costs(gpu_name: str | None, results_dir: str = RESULTS_DIR) -> dict[str, dict]:
    """name -> {"secs", "settings"} from the newest ``bench_all*.json`` under ``results/<gpu class>/`` (the
    CLI's ``--json`` output, each section's wall seconds and the settings it ran with); {} when none."""
    cls = gpu_class(gpu_name)
    if cls is None:
        return {}
    best: tuple[str, dict] | None = None
    for path in glob.glob(os.path.join(results_dir, cls, "**", "bench_all*.json"), recursive=True):
        try:
            with open(path) as f:
                doc = json.load(f)
        except (OSError, json.JSONDecodeError):
            continue
        stamp = str(doc.get("env", {}).get("time_utc", ""))
        if isinstance(doc.get("sections"), dict) and (best is None or stamp > best[0]):
            best = (stamp, doc)
    if best is None:
        return {}
    return {n: {"secs": float(s["secs"]), "settings": s.get("settings", {})}
            for n, s in best[1]["sections"].items()
            if isinstance(s, dict) and s.get("secs") and str(s.get("status", "")).startswith("ok")}
