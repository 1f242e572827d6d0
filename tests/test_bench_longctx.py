"""bench_longctx saves its JSON after every finished trial, so a run killed by a time limit keeps its trials."""
import json
import sys

import pytest
import torch
from hf_fastkern.benchmarks import bench_longctx

LIMITS = {"fastkern": 50_000, "fastkern_gc": 240_000}


class _Killed(BaseException):
    """What `timeout`'s SIGTERM becomes in the real run (SystemExit): not an Exception the search catches."""


@pytest.fixture
def fake_gpu(monkeypatch):
    # run() needs CUDA to search at all; the trials are fakes, and the saved environment must not ask the GPU
    common = sys.modules[bench_longctx.save.__module__]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(common, "environment", lambda: {"gpu": "fake"})


def _fake_trial(calls, kill_at=None):
    def trial(variant, seq, timeout, tiny):
        calls.append((variant, seq))
        if len(calls) == kill_at:
            raise _Killed()
        ok = seq <= LIMITS[variant]
        return {"ok": True, "peak_GiB": seq / 1e4, "step_s": 1.0} if ok else {"ok": False, "oom": True}
    return trial


def test_longctx_saves_after_every_trial_and_survives_a_kill(fake_gpu, monkeypatch, tmp_path):
    path = tmp_path / "longctx.json"
    kill_at = len(_complete_run(monkeypatch)) - 1  # the second-to-last trial of an uninterrupted run
    calls: list = []
    seen: list = []
    real_save = bench_longctx.save_progress

    def spy(p, rows, extra=None):
        real_save(p, rows, extra)
        seen.append(json.loads(path.read_text()))
    monkeypatch.setattr(bench_longctx, "save_progress", spy)
    monkeypatch.setattr(bench_longctx, "_trial", _fake_trial(calls, kill_at=kill_at))
    with pytest.raises(_Killed):
        bench_longctx.run(variants=("fastkern", "fastkern_gc"), budget_s=600, json_path=str(path), log=lambda *a: None)
    # one save per finished trial (plus one per finished variant): the file never lags more than one trial
    n_trials = len(calls) - 1
    assert sum(1 for d in seen if d["rows"] and d["rows"][-1].get("in_progress")) == n_trials
    doc = json.loads(path.read_text())
    assert doc["partial"] is True and doc["variants"] == ["fastkern", "fastkern_gc"]
    assert doc["time_budget_s"] == 600 and doc["anchors"] == bench_longctx.ANCHORS
    first, second = doc["rows"]
    # the finished variant: its final row; the one the kill interrupted: every trial it finished
    assert first["variant"] == "fastkern" and first["exact"] and not first.get("in_progress")
    assert first["max_seq"] <= LIMITS["fastkern"] < first["first_fail"]
    assert second["in_progress"] and second["exact"] is False
    done = [s for v, s in calls[:-1] if v == "fastkern_gc"]
    assert [t[0] for t in second["trials"]] == done
    oks = [s for s in done if s <= LIMITS["fastkern_gc"]]
    assert second["max_seq"] == (max(oks) if oks else None)
    if second["max_seq"]:
        assert second["vs_liger"] == pytest.approx(second["max_seq"] / bench_longctx.ANCHORS["sdpa+liger_gc"])


def _complete_run(monkeypatch) -> list:
    """The trials of an uninterrupted run of both variants."""
    calls: list = []
    monkeypatch.setattr(bench_longctx, "_trial", _fake_trial(calls))
    bench_longctx.run(variants=("fastkern", "fastkern_gc"), budget_s=600, log=lambda *a: None)
    assert len([c for c in calls if c[0] == "fastkern_gc"]) >= 3  # the kill lands inside the second search
    return calls


def test_longctx_run_final_json_and_trial_timeout(fake_gpu, monkeypatch, tmp_path):
    timeouts = []

    def trial(variant, seq, timeout, tiny):
        timeouts.append(timeout)
        return {"ok": seq <= LIMITS[variant]}
    monkeypatch.setattr(bench_longctx, "_trial", trial)
    path = tmp_path / "l.json"
    rows = bench_longctx.run(variants=("fastkern",), budget_s=300, trial_timeout=90, json_path=str(path),
                             log=lambda *a: None)
    doc = json.loads(path.read_text())
    assert doc["partial"] is False and doc["trial_timeout_s"] == 90
    assert [r["max_seq"] for r in doc["rows"]] == [r["max_seq"] for r in rows]
    assert not any(r.get("in_progress") for r in doc["rows"])
    assert max(timeouts) <= 90


def test_longctx_search_error_row_is_saved_before_raising(monkeypatch):
    """A trial that crashes (not an OOM) ends the search with error; on_trial saw that trial first."""
    seen = []
    monkeypatch.setattr(bench_longctx, "_trial", lambda v, s, t, tiny: {"ok": False, "error": "boom"})
    row = bench_longctx.search("fastkern", start=8192, budget_s=60, log=lambda *a: None, on_trial=seen.append)
    assert row["error"] == "boom" and seen and seen[-1]["error"] == "boom" and seen[-1]["trials"] == [[8192, "fail"]]


def test_cap_gpu_memory_emulates_a_smaller_card(monkeypatch):
    """HF_FASTKERN_BENCH_GPU_GIB limits the allocator to that many GiB of a larger card (an H100 80 GB on an
    H200); unset, or at least the card's size, it changes nothing."""
    import types

    import torch
    from hf_fastkern.benchmarks import harness as common

    got = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: types.SimpleNamespace(total_memory=140 * 2**30))
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction", lambda f: got.append(f))
    monkeypatch.delenv(common.GPU_CAP_ENV, raising=False)
    assert common.cap_gpu_memory() is None and not got
    monkeypatch.setenv(common.GPU_CAP_ENV, "200")
    assert common.cap_gpu_memory() is None and not got
    monkeypatch.setenv(common.GPU_CAP_ENV, "70")
    assert common.cap_gpu_memory() == 70.0 and got == [0.5]
