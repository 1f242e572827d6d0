"""benchmarks/bench_guard.py (issue 21's "never slower" guard): the grid covers every recipe architecture and the
issue's rows, and a CPU smoke run writes well-formed JSON with a ratio per case."""
from __future__ import annotations

import json
import os

import pytest

from benchmarks import bench_guard


def test_grid_covers_archs_and_issue_rows():
    cases = bench_guard.all_cases()
    names = {c.name for c in cases}
    assert len(names) == len(cases), "case names are unique"
    assert {c.arch for c in cases} == {"llama", "mistral", "qwen2", "qwen3", "gemma", "gpt2", "gpt_neox", "phi3"}
    assert {c.head_dim for c in cases} >= {64, 128, 256}
    assert {c.mode for c in cases} == {"train", "generate"}
    assert {c.autocast for c in cases} == {True, False} and {c.lora for c in cases} == {True, False}
    assert {c.batch for c in cases} >= {1, 16}
    issue = [c for c in cases if c.name.startswith("issue21-")]
    # Pythia-1B shape, generate() 32K prompt, small Llama steps, 8B LoRA without autocast
    assert any(c.arch == "gpt_neox" and c.head_dim == 256 and c.rotary_pct == 0.25 for c in issue)
    assert any(c.mode == "generate" and c.seq == 32768 and c.batch == 1 for c in issue)
    assert sum(c.hidden == 2048 and c.arch == "llama" for c in issue) == 3
    assert any(c.lora and not c.autocast and c.grad_ckpt and c.hidden == 4096 for c in issue)
    quick = bench_guard.quick_cases()
    assert {c.name for c in quick} <= names and {c.arch for c in quick} == {c.arch for c in cases}


def test_cpu_smoke_writes_ratios(tmp_path):
    out = tmp_path / "guard.json"
    names = "gpt_neox-toy-train,llama-toy-lora,llama-toy-generate"
    assert bench_guard.main(["--cpu-smoke", "--out", str(out), "--cases", names]) == 0
    doc = json.loads(out.read_text())
    assert doc["command"].startswith("python -m benchmarks.bench_guard --cpu-smoke")
    assert doc["env"]["torch"] and doc["gpu"] == "cpu"
    rows = doc["rows"]
    assert [r["name"] for r in rows] == names.split(",")
    for r in rows:
        assert "error" not in r, r
        assert r["sdpa_ms"] > 0 and r["fastkern_ms"] > 0
        assert abs(r["ratio"] - r["sdpa_ms"] / r["fastkern_ms"]) < 1e-9
        assert len(r["round_ratios"]) == r["rounds"] and all(x > 0 for x in r["round_ratios"])
        assert "patched" in r["patch_report"]
    assert doc["summary"]["measured"] == len(rows) and doc["summary"]["errors"] == 0


def test_variant_sides_and_parsing(tmp_path, monkeypatch):
    """--variant adds a patched side per round with its environment set only during that side (restored after),
    and its ratios are reported beside the default patched side's."""
    with pytest.raises(ValueError, match="NAME:VAR=VALUE"):
        bench_guard.parse_variant("fastkern:X=1")
    with pytest.raises(ValueError, match="is not VAR=VALUE"):
        bench_guard.parse_variant("a:X")
    with pytest.raises(ValueError, match="X is set twice"):
        bench_guard.parse_variant("a:X=1,X=2")
    v = bench_guard.parse_variant("async_check:HF_FASTKERN_LABEL_CHECK=async,HF_X=1")
    assert v.env == (("HF_FASTKERN_LABEL_CHECK", "async"), ("HF_X", "1"))
    monkeypatch.delenv("HF_FASTKERN_LABEL_CHECK", raising=False)
    out = tmp_path / "guard.json"
    assert bench_guard.main(["--cpu-smoke", "--out", str(out), "--cases", "llama-toy-train", "--rounds", "2",
                             "--variant", "async_check:HF_FASTKERN_LABEL_CHECK=async", "--sync-audit"]) == 0
    assert "HF_FASTKERN_LABEL_CHECK" not in os.environ
    row = json.loads(out.read_text())["rows"][0]
    var = row["variants"]["async_check"]
    assert var["env"] == {"HF_FASTKERN_LABEL_CHECK": "async"} and len(var["round_ratios"]) == 2
    assert abs(var["ratio"] - row["sdpa_ms"] / var["ms"]) < 1e-9
    assert abs(var["vs_fastkern"] - row["fastkern_ms"] / var["ms"]) < 1e-9
