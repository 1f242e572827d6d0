"""``benchmarks/bench_sft.py``'s data and ratios (the GPU run itself is the lead's; a CPU smoke of the whole
harness is ``python benchmarks/bench_sft.py`` without a GPU)."""
from __future__ import annotations

import statistics

from benchmarks.bench_sft import LENGTHS, add_sft_ratios, synthetic_sft


def test_synthetic_sft_is_seeded_and_lognormal():
    a = synthetic_sft(2000, 128256, **LENGTHS, seed=0)
    # every variant's process builds the same rows from the seed
    assert synthetic_sft(50, 1000, **LENGTHS) == synthetic_sft(50, 1000, **LENGTHS) != synthetic_sft(
        50, 1000, **LENGTHS, seed=1)
    lengths = [len(r["input_ids"]) for r in a]
    assert min(lengths) >= LENGTHS["lo"] and max(lengths) == LENGTHS["hi"]
    # the documented shape: median near 500, about 1% of rows at the 4096 cap
    assert 450 <= statistics.median(lengths) <= 550
    assert 0.002 <= sum(n == LENGTHS["hi"] for n in lengths) / len(lengths) <= 0.03
    for r in a[:50]:
        n_prompt = sum(lbl == -100 for lbl in r["labels"])
        assert len(r["labels"]) == len(r["input_ids"]) and 0 < n_prompt < len(r["labels"])
        assert r["labels"][n_prompt:] == r["input_ids"][n_prompt:]


def test_ratios_and_gate():
    rows = [dict(impl="sdpa_padded", real_tok_per_s=100.0, peak_GiB=10.0, loss0=2.0),
            dict(impl="sdpa_packed", real_tok_per_s=150.0, peak_GiB=8.0, loss0=2.0),
            dict(impl="fastkern_padding_free", real_tok_per_s=300.0, peak_GiB=6.0, loss0=2.1),
            dict(impl="sdpa_liger_padded", error="liger_kernel not importable")]
    add_sft_ratios(rows)
    fk = rows[2]
    assert fk["vs_sdpa_padded"] == 3.0 and fk["vs_sdpa_packed"] == 2.0 and fk["mem_vs_sdpa_padded"] == 0.6
    assert fk["gate"] is False and rows[1]["gate"] is True
    assert "vs_sdpa_liger_padded" not in fk
