"""Evaluation: benchmarks and conditions, generation, judges, metrics."""
