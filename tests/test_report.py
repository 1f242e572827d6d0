"""benchmarks/report.py: README headline block and docs/results.md rendered from JSON, --check, plots."""
import json

import pytest
from hf_fastkern.benchmarks import report

ENV = {"gpu": "NVIDIA H100 80GB HBM3", "torch": "2.11.0+cu130", "triton": "3.6.0", "transformers": "5.17.0",
       "liger_kernel": "0.8.5"}
E2E = [
    {"bench": "e2e", "impl": "sdpa", "B": 4, "S": 2048, "step_ms": 206.3, "tok_per_s": 39704.5, "mfu": 0.33,
     "peak_GiB": 49.23, "loss": 0.021},
    {"bench": "e2e", "impl": "sdpa+liger", "B": 4, "S": 2048, "step_ms": 196.8, "tok_per_s": 41626.5, "mfu": 0.345,
     "peak_GiB": 32.6, "loss": 0.021},
    {"bench": "e2e", "impl": "fastkern", "B": 4, "S": 2048, "step_ms": 160.0, "tok_per_s": 51200.0, "mfu": 0.42,
     "peak_GiB": 28.5, "loss": 0.021, "vs_sdpa": 1.2896, "mem_vs_sdpa": 0.5789, "vs_best_peer": 1.23},
]
LONGCTX = [
    {"bench": "longctx", "impl": "sdpa+liger", "variant": "sdpa+liger_gc", "grad_ckpt": True, "max_seq": 245760,
     "exact": True, "trials": [[245760, "ok"]]},
    {"bench": "longctx", "impl": "fastkern", "variant": "fastkern_gc", "grad_ckpt": True, "max_seq": 376832,
     "exact": False, "vs_liger": 1.5333},
]
OPS = [
    {"bench": "rms_norm", "op": "rms_norm", "impl": "liger", "T": 16384, "H": 4096, "mode": "fwd+bwd", "ms": 1.04,
     "GBps": 646.1, "bytes_formula": "(2+3)*T*H*e"},
    {"bench": "rms_norm", "op": "rms_norm", "impl": "fastkern", "T": 16384, "H": 4096, "mode": "fwd+bwd", "ms": 0.80,
     "GBps": 840.0, "bytes_formula": "(2+3)*T*H*e", "vs_best_peer": 1.3},
    {"bench": "rms_norm", "op": "rms_norm", "impl": "fastkern", "T": 4096, "H": 4096, "mode": "fwd+bwd", "ms": 0.25,
     "GBps": 671.0, "bytes_formula": "(2+3)*T*H*e", "vs_best_peer": 1.2},
]

EXPECTED_HEADLINE = """| result | hf_fastkern / peer | ratio |
|---|---|---|
| e2e Llama 1.5B B4x2048: sdpa | 39,704 tok/s, 49.2 GiB, MFU 0.33 |  |
| e2e Llama 1.5B B4x2048: sdpa+liger | 41,626 tok/s, 32.6 GiB, MFU 0.345 |  |
| e2e Llama 1.5B B4x2048: fastkern | 51,200 tok/s, 28.5 GiB, MFU 0.42 | 1.29x sdpa tok/s, 0.579x sdpa memory |
| longest seq, B1, with checkpointing: sdpa+liger_gc | 245,760 tokens |  |
| longest seq, B1, with checkpointing: fastkern_gc | 376,832 tokens (lower bound) | 1.53x Liger |
| rms_norm fwd+bwd (2 shapes) | min 1.2x, max 1.3x | 1.25x best peer (geomean) |"""

README = "# proj\n\nintro\n\n## Results\n<!-- results:start -->\nold text\n<!-- results:end -->\n\n## After\nkept\n"


@pytest.fixture
def results(tmp_path):
    d = tmp_path / "results"
    d.mkdir()
    for name, rows in (("e2e", E2E), ("longctx", LONGCTX), ("rms_norm", OPS)):
        (d / f"{name}.json").write_text(json.dumps({"env": ENV, "command": f"bench_{name}.py", "rows": rows}))
    # files that are not result documents are ignored
    (d / "notes.json").write_text(json.dumps({"hello": 1}))
    readme = tmp_path / "README.md"
    readme.write_text(README)
    return d, readme


def _args(d, readme, *more):
    """report.py's arguments for the temporary results, README and results page (docs/results.md beside it)."""
    return ["--results", str(d), "--readme", str(readme), "--results-md", str(readme.parent / "docs" / "results.md"),
            *more]


def test_report_renders_readme_block(results, tmp_path):
    d, readme = results
    assert report.main(_args(d, readme, "--plots", "none")) == 0
    text = readme.read_text()
    # only the block between the markers changed
    assert text.startswith("# proj\n\nintro\n\n## Results\n<!-- results:start -->\n")
    assert text.endswith("<!-- results:end -->\n\n## After\nkept\n")
    assert "old text" not in text
    # the README holds the one headline table: ours, and ratios to the peers of the same run, the GPU named
    assert text.count("\n| result |") == 1 and "<details>" not in text
    assert "NVIDIA H100 80GB HBM3; torch 2.11.0+cu130, triton 3.6.0" in text
    assert ("| train step, Llama 1.5B, B4 x 2048 | 51,200 tok/s, 28.5 GiB | 1.29x tok/s, 0.579x memory (SDPA) | "
            "1.23x tok/s, 0.874x memory |") in text
    # the full tables go to docs/results.md
    text = (readme.parent / "docs" / "results.md").read_text()
    assert EXPECTED_HEADLINE in text
    assert "GPU: NVIDIA H100 80GB HBM3; torch 2.11.0+cu130, triton 3.6.0" in text
    # per-bench tables carry every row, without the bulky keys
    assert "<summary>e2e</summary>" in text and "<summary>longctx</summary>" in text
    assert "| rms_norm | rms_norm |" not in text  # "bench" is the table's title, not a column
    assert "| rms_norm | fastkern | 16,384 | 4096 | fwd+bwd | 0.8 | 840 | 1.3 |" in text
    assert "trials" not in text
    assert "bytes_formula: `(2+3)*T*H*e`" in text  # the formula travels with its table
    # idempotent: the README is now up to date
    assert report.main(_args(d, readme, "--plots", "none", "--check")) == 0


def test_report_check_detects_stale_readme(results):
    d, readme = results
    assert report.main(_args(d, readme, "--plots", "none", "--check")) == 1
    assert "old text" in readme.read_text()  # --check writes nothing
    assert not (readme.parent / "docs" / "results.md").exists()
    report.main(_args(d, readme, "--plots", "none"))
    rows = json.loads((d / "e2e.json").read_text())
    rows["rows"][2]["tok_per_s"] = 52000.0
    (d / "e2e.json").write_text(json.dumps(rows))
    assert report.main(_args(d, readme, "--plots", "none", "--check")) == 1


def test_report_check_detects_stale_results_page(results):
    d, readme = results
    report.main(_args(d, readme, "--plots", "none"))
    page = readme.parent / "docs" / "results.md"
    page.write_text(page.read_text().replace("51,200", "51,300"))
    assert report.main(_args(d, readme, "--plots", "none", "--check")) == 1


def test_report_without_markers_fails(results, tmp_path):
    d, _ = results
    bad = tmp_path / "BAD.md"
    bad.write_text("# no markers\n")
    with pytest.raises(SystemExit):
        report.main(_args(d, bad, "--plots", "none"))


def test_report_plots(results, tmp_path):
    pytest.importorskip("matplotlib")
    d, readme = results
    plots = tmp_path / "plots"
    assert report.main(_args(d, readme, "--plots", str(plots))) == 0
    for name in ("e2e", "longctx", "rms_norm"):
        png = plots / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        # the page lives in docs/: its image links go back up to the plots
        assert f"![{name}](../plots/{name}.png)" in (readme.parent / "docs" / "results.md").read_text()


def test_report_headline_takes_the_newest_longctx_search_per_variant(results):
    """A later search of one variant (a new file, a newer env.time_utc) replaces the older one in the headline;
    other variants of the older file stay, and the per-bench table keeps both rows."""
    d, _ = results
    old = json.loads((d / "longctx.json").read_text())
    old["env"] = dict(ENV, time_utc="2026-11-25T22:40:57Z")
    (d / "longctx.json").write_text(json.dumps(old))
    newer = {"bench": "longctx", "impl": "fastkern", "variant": "fastkern_gc", "grad_ckpt": True, "max_seq": 401408,
             "exact": True, "vs_liger": 1.6333}
    (d / "longctx_later.json").write_text(json.dumps({"env": dict(ENV, time_utc="2026-11-26T03:46:22Z"),
                                                      "command": "bench_longctx.py", "rows": [newer]}))
    text = report.render(report.load(str(d)))
    head = text.split("<details>")[0]
    assert "| longest seq, B1, with checkpointing: fastkern_gc | 401,408 tokens | 1.63x Liger |" in head
    assert "376,832" not in head and "sdpa+liger_gc | 245,760 tokens" in head
    assert "376,832" in text  # still in the longctx table


def test_micro_tables_take_the_newest_run_and_list_failures(tmp_path):
    """Whole-model runs under <results>/micro: the newest file by env.time_utc per pattern, the chosen columns,
    failed rows named under the table; other files in micro/ are ignored."""
    micro = tmp_path / "micro"
    micro.mkdir()

    def guard(name, when, ratio):
        rows = [{"name": "llama-B1x512", "mode": "train", "batch": 1, "seq": 512, "sdpa_ms": 8.0,
                 "fastkern_ms": 8.0 / ratio, "ratio": ratio, "patch_report": "many\nlines"},
                {"name": "gemma-B1x512", "error": "OOM"}]
        (micro / name).write_text(json.dumps({"env": dict(ENV, time_utc=when), "command": "bench_guard", "rows": rows}))
    guard("guard_quick_2026-12-08.json", "2026-12-01T00:00:00Z", 0.5)  # older run, later file name
    guard("guard_quick_2026-12-07.json", "2026-12-07T16:00:00Z", 1.25)
    guard("guard_quick_norm_rows_2026-12-09.json", "2026-12-09T00:00:00Z", 9.0)  # another pattern: ignored
    out = report.render_micro(str(tmp_path))
    assert len(out) == 1
    assert "micro/guard_quick_2026-12-07.json" in out[0] and "| 1.25 |" in out[0]
    assert "many" not in out[0] and "- gemma-B1x512: OOM" in out[0]
