"""Benchmarks of dcr-fast (run from the repository root: ``python -m bench.bench_<name>``)."""
