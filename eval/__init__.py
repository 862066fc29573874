"""Evaluation: the embedded benchmark and models, the accuracy-vs-FLOPs harness, benchmarks, lmms-eval plugin."""
