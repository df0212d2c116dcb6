"""Benchmarks of the learners, the input pipeline, extraction and serving (scripts/benchmark.py)."""
