"""Reproducible measurements; results go to benchmarks/results/."""
