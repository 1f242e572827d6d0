"""benchmarks/bench_lora.py (the GPU scenario; here its CPU smoke pass and bookkeeping)."""
from __future__ import annotations

import torch

from tests.tolerances import assert_close


def test_bench_lora_cpu_smoke(monkeypatch):
    monkeypatch.setenv("HF_FASTKERN_FORCE_REFERENCE", "1")
    from benchmarks import bench_lora

    rows = {r["impl"]: r for r in bench_lora.cpu_smoke()}
    assert set(rows) == {"sdpa", "fastkern", "fastkern_offload", "fastkern_auto"}
    assert not any("error" in r for r in rows.values()), rows
    # 1 GiB holds a 2-layer toy step: nothing recomputed, although the model has checkpointing enabled
    assert rows["fastkern_auto"]["checkpoint_plan"].startswith("auto: keep x2"), rows["fastkern_auto"]
    for v in ("fastkern", "fastkern_offload", "fastkern_auto"):
        assert_close(torch.tensor(rows[v]["loss"]), torch.tensor(rows["sdpa"]["loss"], dtype=torch.float64), None,
                     torch.float32, "output", f"bench_lora smoke {v}")


def test_bench_lora_ratios_and_gate():
    from benchmarks import bench_lora

    rows = [dict(bench="lora", impl=i, B=4, S=2048, tok_per_s=t, peak_GiB=m, loss0=l0)
            for i, t, m, l0 in [("sdpa", 6000, 30.0, 11.9), ("sdpa+liger", 7000, 20.0, 11.9),
                                ("fastkern", 9600, 15.0, 11.91), ("fastkern_offload", 8000, 12.0, 12.5)]]
    bench_lora.add_lora_ratios(rows)
    by = {r["impl"]: r for r in rows}
    assert by["fastkern"]["vs_sdpa"] == 1.6 and by["fastkern"]["mem_vs_sdpa"] == 0.5
    assert by["fastkern"]["vs_best_peer"] == 9600 / 7000 and by["fastkern"]["meets_target"]
    assert by["fastkern"]["gate"] == "ok" and by["fastkern_offload"]["gate"].startswith("FAIL")


def test_bench_lora_auto_budget():
    from benchmarks import bench_lora

    rows = [dict(impl="sdpa", peak_GiB=29.4), dict(impl="sdpa", peak_GiB=29.1), dict(impl="fastkern", peak_GiB=19.0)]
    assert bench_lora.auto_budget(rows, None) == 29.1
    assert bench_lora.auto_budget(rows, 40.0) == 40.0
    assert bench_lora.auto_budget([dict(impl="sdpa", error="oom")], None) is None
    assert bench_lora.parse_variant("fastkern_auto") == ("fastkern", False)


def test_bench_lora_longctx_uses_the_longctx_search():
    from benchmarks import bench_lora

    tried = []

    def fake_trial(variant, seq, timeout, tiny):
        tried.append(seq)
        return dict(ok=seq <= 300_000)

    seen = []
    orig = bench_lora._trial
    bench_lora._trial = fake_trial
    try:
        (row,) = bench_lora.longctx_rows(["fastkern_offload"], budget_s=60, on_rows=lambda rows: seen.append(rows))
    finally:
        bench_lora._trial = orig
    assert tried[0] == 262144 and row["max_seq"] <= 300_000 < row["first_fail"] and row["exact"], row
    # one save per trial, each with this scenario's row (not the 1.5B e2e anchors), the longest so far
    assert len(seen) == len(tried) and all(len(rows) == 1 for rows in seen)
    assert seen[0][0]["bench"] == "lora_longctx" and seen[0][0]["in_progress"] and seen[0][0]["max_seq"] == 262144
    assert "anchor" not in seen[0][0]  # fastkern_offload has no issue anchor; the e2e one (245,760) is dropped


def test_bench_lora_longctx_qlora_reaches_every_trial(monkeypatch):
    """--qlora --longctx: each trial subprocess is started with --qlora (its worker builds the 4-bit base), the
    rows say so, and the search starts where it is told (393,216 tokens, issue 23's target)."""
    import subprocess

    from benchmarks import bench_longctx, bench_lora

    cmds = []

    def fake_run(cmd, **kw):
        cmds.append(cmd)
        ok = int(cmd[cmd.index("--trial") + 2]) <= 400_000
        return subprocess.CompletedProcess(cmd, 0, stdout="ok" if ok else "oom", stderr="")

    monkeypatch.setattr(subprocess, "run", fake_run)
    monkeypatch.setattr(bench_longctx, "worker_result",
                        lambda stdout: dict(ok=True, peak_GiB=70.0, step_s=1.0) if stdout == "ok"
                        else dict(ok=False, oom=True))
    (row,) = bench_lora.longctx_rows(["fastkern_offload"], budget_s=30, start=393_216, qlora=True)
    assert cmds and all("--qlora" in c and c[c.index("--trial") + 1] == "fastkern_offload" for c in cmds)
    assert int(cmds[0][cmds[0].index("--trial") + 2]) == 393_216
    assert row["qlora"] is True and row["bench"] == "lora_longctx"
    built = {}
    monkeypatch.setattr(bench_lora, "build_model", lambda *a, **kw: built.update(kw) or (_ for _ in ()).throw(
        RuntimeError("stop after build")))
    monkeypatch.setattr(bench_lora.harness, "cap_gpu_memory", lambda: None)
    try:
        bench_lora.trial_worker("fastkern", 1024, tiny=True, qlora=True)
    except RuntimeError:
        pass
    assert built.get("qlora") is True and built.get("longctx") is True
