"""`hf-fastkern bench|info` end to end in fallback mode, plus the benchmark helpers the CLI relies on."""
import json
import os
import subprocess
import sys

import pytest
import torch
from hf_fastkern.benchmarks import bench_e2e, bench_longctx, harness

from hf_fastkern import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cpu_env() -> dict:
    # what a user on a laptop has: no TRITON_INTERPRET (conftest sets it for this process only)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return env


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU path")
def test_bench_quick_subprocess_no_gpu(tmp_path):
    """The README's main command on a CPU machine: exits 0, says GPU numbers need a GPU, writes JSON + plot."""
    out = tmp_path / "bench.json"
    png = tmp_path / "bench.png"
    r = subprocess.run([sys.executable, "-m", "hf_fastkern.cli", "bench", "--quick", "--json", str(out),
                        "--plot", str(png)], capture_output=True, text=True, env=_cpu_env(), timeout=170, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "GPU numbers need a GPU" in r.stdout
    doc = json.loads(out.read_text())
    assert doc["env"]["torch"] == torch.__version__ and doc["env"]["gpu"] is None
    assert doc["command"].startswith("hf-fastkern bench --quick")
    assert set(doc["sections"]) == {"rms_norm", "layer_norm", "activations", "rope", "attention", "cross_entropy",
                                    "e2e", "longctx"}
    # every section runs its reference path at small sizes, or says in one line why it cannot (issue 20)
    for name, sec in doc["sections"].items():
        if name != "longctx":
            assert sec["status"] == "ok", (name, sec["status"])
    assert doc["sections"]["longctx"]["status"].startswith("not run here: needs a CUDA GPU")
    assert doc["failed"] == []
    benches = {r["bench"] for r in doc["rows"] if not r.get("error")}
    assert {"rms_norm", "layer_norm", "activations", "rope", "attention", "flce", "e2e"} <= benches
    # the e2e smoke step ran patched and unpatched on equal weights
    e2e = {r["impl"]: r for r in doc["rows"] if r["bench"] == "e2e"}
    assert e2e["sdpa"]["tok_per_s"] > 0
    assert "error" in e2e["fastkern"] or e2e["fastkern"]["loss_rel_err"] < 1e-3
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_bench_main_in_process(tmp_path, capsys):
    """main() in this process, with --out-dir: one JSON per benchmark. The cheapest section (rope) stands in for
    the rest; e2e's CPU step runs in test_bench_quick_subprocess_no_gpu (the README command) already."""
    out_dir = tmp_path / "results"
    assert cli.main(["bench", "ops", "longctx", "--quick", "--json", str(tmp_path / "b.json"),
                     "--out-dir", str(out_dir)]) == 0
    text = capsys.readouterr().out
    assert "== rope (ops)" in text and "== longctx (longctx)" in text
    doc = json.loads((tmp_path / "b.json").read_text())
    assert doc["command"].startswith("hf-fastkern bench ops longctx --quick")
    assert {r["impl"] for r in doc["rows"] if r["bench"] == "rope"} >= {"torch", "fastkern"}
    assert (out_dir / "rope.json").exists() and (out_dir / "rms_norm.json").exists()
    if not torch.cuda.is_available():
        assert "GPU numbers need a GPU" in text
        assert doc["sections"]["longctx"]["status"].startswith("not run here: needs a CUDA GPU")


def test_bench_rejects_unknown_target():
    with pytest.raises(SystemExit) as e:
        cli.main(["bench", "bogus"])
    assert e.value.code == 2


def test_info_main_and_subprocess(tmp_path, capsys):
    doc = cli.info(str(tmp_path / "info.json"))
    text = capsys.readouterr().out
    assert "op paths for tensors on" in text
    assert doc["env"]["fused loss label check"].startswith("sync (one host sync per call")
    ops = {(r["op"], r["dtype"]): r for r in doc["ops"]}
    assert set(d for _, d in ops) == {"bfloat16", "float16", "float32"}
    # attention has no fp32 kernel (DESIGN.md): it must name a reason whatever the device
    assert ops[("flash_attention", "float32")]["path"] == cli.REFERENCE and ops[("flash_attention", "float32")]["why"]
    # a model's fp32 attention falls back to SDPA, and info says SDPA, not the kernel (issue 20)
    assert ops[("model attention (fastkern)", "float32")]["path"] == cli.SDPA
    for r in doc["ops"]:
        assert r["why"]
        if r["op"] != "model attention (fastkern)":
            assert r["path"] in (cli.KERNEL, cli.INTERPRETED, cli.REFERENCE)
    # the integration line agrees with the op table for bf16
    bf16 = ops[("model attention (fastkern)", "bfloat16")]
    assert doc["integration"]["model attention, bf16"].startswith(bf16["path"])
    r = subprocess.run([sys.executable, "-m", "hf_fastkern.cli", "info"], capture_output=True, text=True,
                       env=_cpu_env(), timeout=120, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "transformers" in r.stdout and "rms_norm" in r.stdout
    if not torch.cuda.is_available():
        # without the interpreter a CPU tensor cannot run a Triton kernel, and info says so
        assert "Triton kernels need CUDA" in r.stdout


def test_load_bench_missing_and_present():
    mod, why = cli.load_bench("does_not_exist")
    assert mod is None and why.startswith("no benchmark named")
    mod, why = cli.load_bench("e2e")
    assert why is None and hasattr(mod, "run")


def test_ceiling_fraction_and_columns():
    rows = [{"bench": "x", "impl": "fastkern", "T": 8, "ms": 1.0, "fwdbwd_GBps": 1500.0, "fwd_GBps": 2000.0},
            {"bench": "y", "impl": "torch", "S": 4, "ms": 2.0, "TFLOPs": 400.0, "error": None}]
    cli.add_ceiling_fraction(rows, {"copy_TBps": 3.0, "bf16_mm_TFLOPs": 800.0})
    assert rows[0]["frac_ceiling"] == pytest.approx(0.5)  # fwd+bwd preferred, against copy bandwidth
    assert rows[1]["frac_ceiling"] == pytest.approx(0.5)  # against the bf16 matmul rate
    cols = cli.table_columns(rows)
    assert cols[:4] == ["bench", "impl", "T", "S"] and cols[-1] == "error"
    assert cols.index("ms") < cols.index("frac_ceiling")


def test_e2e_ratios():
    rows = [{"impl": "sdpa", "tok_per_s": 100.0, "peak_GiB": 50.0, "loss0": 11.80},
            {"impl": "sdpa+liger", "tok_per_s": 110.0, "peak_GiB": 30.0, "loss0": 11.0},
            {"impl": "fastkern", "tok_per_s": 132.0, "peak_GiB": 24.0, "loss0": 11.81}]
    bench_e2e.add_e2e_ratios(rows)
    ours = rows[2]
    assert ours["gate"] == "ok" and rows[1]["gate"].startswith("FAIL")
    assert ours["vs_sdpa"] == pytest.approx(1.32) and ours["mem_vs_sdpa"] == pytest.approx(0.48)
    assert ours["vs_best_peer"] == pytest.approx(1.2) and ours["best_peer"] == "sdpa+liger"
    assert ours["mem_vs_best_peer"] == pytest.approx(0.8)


@pytest.mark.parametrize("limit,start,grow", [(50_000, 4096, 2.0), (50_000, 67584, 2.0), (3_000, 8192, 2.0),
                                              (2_000_000, 4096, 2.0), (400_000, 368640, 1.25)],
                         ids=["double-up", "start-above", "start-above-small", "cap", "grow-1.25"])
def test_longctx_search_bisection(monkeypatch, limit, start, grow):
    """The search finds the limit to 1/8 (multiples of 1024) from below or above, without a GPU."""
    calls = []

    def fake_trial(variant, seq, timeout, tiny):
        calls.append(seq)
        return {"ok": True, "peak_GiB": seq / 1e4, "step_s": 0.1} if seq <= limit else {"ok": False, "oom": True}

    monkeypatch.setattr(bench_longctx, "_trial", fake_trial)
    row = bench_longctx.search("fastkern_gc", start=start, cap=1 << 20, budget_s=60, log=lambda *a: None, grow=grow)
    assert row["grad_ckpt"] is True and row["impl"] == "fastkern"
    assert all(s % 1024 == 0 for s in calls)
    best = min(limit, 1 << 20)
    assert row["max_seq"] <= best and row["exact"]
    assert best - row["max_seq"] <= max(1024, row["max_seq"] // 8)
    if row["max_seq"] < 1 << 20:
        assert row["first_fail"] > limit


def test_longctx_chunk_variants():
    """'_chunk' = fastkern's MLP in token chunks; parse_variant ignores it, split_chunk returns the chunk."""
    assert bench_longctx.split_chunk("fastkern_gc_chunk_offload") == ("fastkern_gc_offload", bench_longctx.MLP_CHUNK)
    assert bench_longctx.parse_variant("fastkern_gc_chunk") == ("fastkern", True, False)
    with pytest.raises(ValueError, match="fastkern option"):
        bench_longctx.split_chunk("sdpa_gc_chunk")


def test_longctx_budget_gives_lower_bound(monkeypatch):
    monkeypatch.setattr(bench_longctx, "_trial", lambda v, s, t, tiny: {"ok": True})
    row = bench_longctx.search("sdpa", start=4096, cap=1 << 20, budget_s=0.0, log=lambda *a: None)
    assert row["exact"] is False and not row.get("max_seq")
    assert bench_longctx.parse_variant("sdpa+liger_gc_offload") == ("sdpa+liger", True, True)
    with pytest.raises(ValueError):
        bench_longctx.parse_variant("fastkern_offload")
    assert bench_longctx.auto_start("fastkern_gc") == 368640  # 1.5 x Liger's anchor 245,760


@pytest.mark.gpu
def test_e2e_worker_harness_gpu(tmp_path):
    """On the device: every e2e variant's subprocess runs a tiny model end to end and reports its numbers."""
    out = tmp_path / "e2e.json"
    r = subprocess.run([sys.executable, "-m", "benchmarks.bench_e2e", "--tiny", "--batch", "2",
                        "--seq", "256", "--steps", "2", "--warmup", "1", "--json", str(out)],
                       capture_output=True, text=True, env=_cpu_env(), timeout=400, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = {x["impl"]: x for x in json.loads(out.read_text())["rows"]}
    for v in ("sdpa", "fastkern"):
        assert not rows[v].get("error"), rows[v]
        assert rows[v]["tok_per_s"] > 0 and rows[v]["peak_GiB"] > 0 and 0 < rows[v]["mfu"] < 1
    assert "patched attention" in rows["fastkern"]["patch_report"]
    assert rows["fastkern"]["gate"] == "ok", rows["fastkern"]
    assert rows["fastkern"]["vs_sdpa"] > 0


@pytest.mark.gpu
def test_longctx_trial_gpu():
    """On the device: one real trial per mode (tiny model) succeeds, and an absurd length reports OOM."""
    for variant in ("fastkern", "fastkern_gc", "fastkern_gc_offload", "sdpa"):
        res = bench_longctx._trial(variant, 4096, timeout=300, tiny=True)
        assert res.get("ok"), (variant, res)
    res = bench_longctx._trial("sdpa", 1 << 24, timeout=300, tiny=False)
    assert not res.get("ok") and res.get("oom"), res


# ----------------------------------------------------------------------------------------------------------
# `bench --budget`: one run that fits one device call (issue 7), checked with fake scripts and a fake clock

ALL_SCRIPTS = ["rms_norm", "layer_norm", "activations", "rope", "attention", "cross_entropy", "e2e", "longctx"]


def test_budget_plan_fits_and_shortens_in_order():
    big = cli.BudgetPlan(5000, ALL_SCRIPTS, clock=lambda: 0.0)
    assert big.steps == [] and big.describe()["fits"]
    plan = cli.BudgetPlan(500, ALL_SCRIPTS, clock=lambda: 0.0)
    d = plan.describe()
    assert d["fits"] and d["planned_s"] <= 500
    # the long-context search is given up to its minimum first, then the op grids, attention, CE
    assert plan.steps[0] == "longctx -> level 1" and plan.level["attention"] == 1
    assert plan.level["cross_entropy"] == 1 and plan.level["e2e"] == 0
    mid = cli.BudgetPlan(1000, ALL_SCRIPTS, clock=lambda: 0.0)
    assert mid.steps == ["longctx -> level 1"] and mid.level["attention"] == 0
    # without an overrun the first script gets its planned share, the quick form of attention is named
    assert plan.settings("rms_norm")["kwargs"] == {"budget_s": 25}
    att = plan.settings("attention")
    assert att["kwargs"] == {"quick": True} and "2 of 8 cases" in att["shortened"]
    lc = plan.settings("longctx")
    assert lc["kwargs"]["variants"] == cli.LONGCTX_SHORT_VARIANTS and lc["kwargs"]["budget_s"] == 500 - cli.RESERVE_S


class _FakeClock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


def _fake_scripts(clock, calls, secs):
    """Fake bench modules: each run() records its kwargs and advances the clock as the real one would take."""
    import types

    skipped: list = []

    def op(name):
        def run(quick=False, budget_s=None):
            calls[name] = dict(quick=quick, budget_s=budget_s)
            full = secs[name]
            clock.t += full if budget_s is None else min(full, budget_s)
            if budget_s is not None and budget_s < full:
                skipped.append({"op": name, "T": 65536})
            return [{"bench": name, "op": name, "impl": "fastkern", "T": 4096, "ms": 0.1, "GBps": 1000.0}]
        return types.SimpleNamespace(run=run, SKIPPED=skipped)

    def quickable(name, bench):
        def run(quick=False, json_path=None):
            calls[name] = dict(quick=quick, json_path=json_path)
            clock.t += secs[name][1 if quick else 0]
            return [{"bench": bench, "impl": "fastkern", "S": 2048, "fwdbwd_TFLOPs": 400.0}]
        return types.SimpleNamespace(run=run)

    def e2e_run(quick=False, variants=("sdpa",), progress=None):
        calls["e2e"] = dict(quick=quick)
        clock.t += secs["e2e"]
        return [{"bench": "e2e", "impl": "fastkern", "B": 4, "S": 2048, "tok_per_s": 45000.0}]

    def longctx_run(quick=False, variants=("sdpa",), budget_s=None, progress=None, trial_timeout=None,
                    json_path=None):
        calls["longctx"] = dict(variants=variants, budget_s=budget_s, trial_timeout=trial_timeout,
                                json_path=json_path)
        clock.t += budget_s or 500  # a search spends its whole budget
        return [{"bench": "longctx", "impl": "fastkern", "variant": v, "max_seq": 50176, "exact": False}
                for v in variants]

    mods = {n: op(n) for n in cli.OP_NAMES}
    mods.update(attention=quickable("attention", "attention"), cross_entropy=quickable("cross_entropy", "flce"),
                e2e=types.SimpleNamespace(run=e2e_run), longctx=types.SimpleNamespace(run=longctx_run))
    return mods


def _fake_gpu(monkeypatch, secs):
    clock = _FakeClock()
    calls: dict = {}
    mods = _fake_scripts(clock, calls, secs)
    monkeypatch.setattr(cli, "_clock", clock)
    monkeypatch.setattr(cli, "_gpu_available", lambda: True)
    monkeypatch.setattr(cli, "_gpu_free_gib", lambda: 79.0)
    monkeypatch.setattr(cli, "load_bench", lambda name: (mods[name], None))
    return clock, calls


EXPECTED = {"rms_norm": 80, "layer_norm": 110, "activations": 70, "rope": 40, "attention": (150, 50),
            "cross_entropy": (90, 45), "e2e": 120}


def test_bench_all_budget_fits_and_says_what_was_shortened(monkeypatch, tmp_path, capsys):
    clock, calls = _fake_gpu(monkeypatch, EXPECTED)
    out = tmp_path / "all.json"
    assert cli.main(["bench", "all", "--budget", "500", "--json", str(out), "--out-dir", str(tmp_path / "d")]) == 0
    text = capsys.readouterr().out
    doc = json.loads(out.read_text())
    assert "partial" not in doc and "stopped" not in doc
    assert doc["budget"]["seconds"] == 500 and doc["budget"]["spent_s"] <= 500
    assert clock.t - 1000.0 <= 500
    # every script ran, each with its share; the long-context search got what the others left
    assert set(doc["sections"]) == set(ALL_SCRIPTS)
    assert all(s["status"] == "ok" for s in doc["sections"].values())
    assert calls["rms_norm"]["budget_s"] == 25 and calls["attention"]["quick"] and calls["cross_entropy"]["quick"]
    assert calls["e2e"] == {"quick": False}
    assert calls["longctx"]["variants"] == cli.LONGCTX_SHORT_VARIANTS
    spent_before_longctx = 4 * 25 + 50 + 45 + 120
    assert calls["longctx"]["budget_s"] == pytest.approx(500 - spent_before_longctx - cli.RESERVE_S, abs=1)
    assert calls["longctx"]["json_path"] == str(tmp_path / "d" / "longctx.json")
    # nothing silently truncated: the JSON and the output name every shortened script and why
    short = doc["budget"]["shortened"]
    assert set(short) == {"rms_norm", "layer_norm", "activations", "rope", "attention", "cross_entropy", "longctx"}
    assert "skipped_shapes" in short["rms_norm"] and doc["sections"]["rms_norm"]["skipped_shapes"]
    assert "search budget" in short["longctx"] and "fastkern,fastkern_gc only" in short["longctx"]
    assert doc["sections"]["e2e"]["shortened"] is None
    assert text.count("SHORTENED:") == 7 and "Shortened (also in the JSON's budget.shortened)" in text
    # per-script JSON and plot in --out-dir
    for name in ALL_SCRIPTS:
        one = json.loads((tmp_path / "d" / f"{name}.json").read_text())
        assert one["budget_s"] == 500 and one["rows"]
        assert one.get("shortened") == short.get(name)
        assert (tmp_path / "d" / f"{name}.png").read_bytes()[:4] == b"\x89PNG"


def test_bench_budget_overrun_skips_what_cannot_fit(monkeypatch, tmp_path, capsys):
    """Attention takes 280 s instead of ~50: e2e no longer fits and is skipped, the search gets what is left."""
    clock, calls = _fake_gpu(monkeypatch, dict(EXPECTED, attention=(280, 280)))
    out = tmp_path / "all.json"
    cli.main(["bench", "all", "--budget", "500", "--json", str(out)])
    doc = json.loads(out.read_text())
    assert "e2e" not in calls and doc["sections"]["e2e"]["status"].startswith("skipped:")
    assert doc["budget"]["shortened"]["e2e"].startswith("skipped:")
    assert 0 < calls["longctx"]["budget_s"] <= 500 - (100 + 280 + 45) - cli.RESERVE_S + 1
    assert clock.t - 1000.0 <= 500


def test_bench_without_budget_keeps_full_runs(monkeypatch, tmp_path):
    _, calls = _fake_gpu(monkeypatch, EXPECTED)
    doc = cli.run_bench(["all"], json_path=str(tmp_path / "a.json"), longctx_variants=("fastkern_gc_offload",))
    assert "budget" not in doc
    assert calls["rms_norm"]["budget_s"] is None  # the whole grid, as before --budget existed
    assert calls["attention"]["quick"] is False and calls["cross_entropy"]["quick"] is False
    assert calls["longctx"]["budget_s"] is None and calls["longctx"]["variants"] == ("fastkern_gc_offload",)
    assert all(s["shortened"] is None for s in doc["sections"].values())


def test_bench_sigterm_keeps_finished_sections(monkeypatch, tmp_path):
    """A time limit's SIGTERM (SystemExit) in the middle: the JSON holds the scripts that finished."""
    _, calls = _fake_gpu(monkeypatch, EXPECTED)
    import types

    def killed(**kw):
        raise SystemExit(124)
    others = _fake_scripts(_FakeClock(), calls, EXPECTED)
    monkeypatch.setattr(cli, "load_bench", lambda name: (types.SimpleNamespace(run=killed) if name == "e2e"
                                                         else others[name], None))
    out = tmp_path / "all.json"
    with pytest.raises(SystemExit):
        cli.main(["bench", "all", "--budget", "500", "--json", str(out)])
    doc = json.loads(out.read_text())
    assert doc["stopped"] == "SystemExit during e2e"
    assert list(doc["sections"]) == ["rms_norm", "layer_norm", "activations", "rope", "attention", "cross_entropy"]


def test_bench_exit_code_says_a_section_failed(monkeypatch, capsys):
    """A benchmark that raises, or whose fastkern rows fail their correctness gate, makes `bench` exit 1 (and say
    which); one that says why it cannot run here does not (issue 20)."""
    import types

    def ok(quick=False):
        return [{"bench": "rms_norm", "impl": "fastkern", "T": 8, "ms": 0.1}]

    def raises(quick=False):
        raise RuntimeError("forced failure")

    def gate(quick=False):
        return [{"bench": "attention", "impl": "torch", "S": 8, "ms": 0.1},
                {"bench": "attention", "impl": "fastkern", "S": 8, "error": "failed correctness gate (max err 1)"}]

    def elsewhere(quick=False):
        return harness.cannot_run_here("longctx", "needs a CUDA GPU")

    mods = {"rms_norm": ok, "layer_norm": raises, "attention": gate, "longctx": elsewhere}
    monkeypatch.setattr(cli, "load_bench", lambda name: (types.SimpleNamespace(run=mods[name]), None))
    assert cli.main(["bench", "longctx", "--quick"]) == 0
    assert cli.main(["bench", "attention", "--quick"]) == 1
    assert "failed: fastkern: failed correctness gate" in capsys.readouterr().out
    monkeypatch.setattr(cli, "SECTIONS", {"ops": ("rms_norm", "layer_norm")})
    assert cli.main(["bench", "ops", "--quick"]) == 1
    out = capsys.readouterr().out
    assert "== layer_norm (ops): failed: RuntimeError: forced failure" in out and "FAILED: layer_norm" in out


def test_bench_lora_knobs_reach_its_run(monkeypatch, tmp_path):
    """`bench lora --qlora --budget-gib 40` hands bench_lora.run qlora=True, budget_gib=40.0 (recorded in the
    section's settings); without them run gets neither (its defaults)."""
    import types

    seen = []

    def run(quick=False, variants=("sdpa",), progress=None, budget_gib=None, qlora=False):
        seen.append(dict(budget_gib=budget_gib, qlora=qlora))
        return [{"bench": "lora", "impl": "sdpa", "B": 1, "S": 8, "step_ms": 1.0}]

    monkeypatch.setattr(cli, "load_bench", lambda name: (types.SimpleNamespace(run=run), None))
    out = tmp_path / "lora.json"
    assert cli.main(["bench", "lora", "--qlora", "--budget-gib", "40", "--json", str(out)]) == 0
    assert seen[-1] == dict(budget_gib=40.0, qlora=True)
    settings = json.loads(out.read_text())["sections"]["lora"]["settings"]
    assert settings["qlora"] is True and settings["budget_gib"] == 40.0
    assert cli.main(["bench", "lora", "--quick"]) == 0
    assert seen[-1] == dict(budget_gib=None, qlora=False)


@pytest.mark.parametrize("argv", [["bench", "ops", "--qlora"], ["bench", "lora", "--budget-gib", "0"]],
                         ids=["qlora_without_lora", "budget_not_positive"])
def test_bench_lora_knobs_rejected(argv):
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2


def test_bench_lora_run_takes_the_knobs():
    """The real bench_lora.run accepts what the CLI passes (cli._accepted would drop an unknown knob silently)."""
    import inspect

    from hf_fastkern.benchmarks import bench_lora

    params = inspect.signature(bench_lora.run).parameters
    assert "qlora" in params and "budget_gib" in params
    args = bench_lora._parser().parse_args(["--qlora", "--budget-gib", "12.5"])
    assert args.qlora is True and args.budget_gib == 12.5
