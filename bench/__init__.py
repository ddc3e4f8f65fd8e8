"""Benchmarks of the LoopLM kernels and models (pytest-benchmark suites) and their report (bench.report)."""
