"""The benchmarks, one package: ``harness.py`` (timing, memory, environment record, correctness gate, JSON and
plot writing, peers' import), ``registry.py`` (every benchmark by name), ``bench_<name>.py`` (one per op, plus
e2e, longctx, lora, ...), ``report.py`` (README headline and docs/results.md from ``results/``).

Installed as ``hf_fastkern.benchmarks`` (see pyproject.toml), which ``hf-fastkern bench`` runs; from a source
checkout one benchmark runs alone as ``python -m benchmarks.bench_<name>``.
"""
