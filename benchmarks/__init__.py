"""Speed benchmarks, run from a clone's root (``python -m benchmarks.bench_prefill``; not installed)."""
