"""Benchmark scripts; installed as ``hf_fastkern.benchmarks`` (see pyproject.toml)."""
