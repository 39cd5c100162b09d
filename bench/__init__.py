"""Benchmarks: measurements run on demand and recorded under docs/, never timed assertions in tests."""
