"""Benchmarks and random-weight models of real architectures (the study and export never import this)."""
