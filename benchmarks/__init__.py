"""Benchmarks: the attention backends timed over a grid of shapes (``python bench.py``, docs/benchmark.md)."""
