"""Benchmarks of every way to get per-sample gradient norms."""
