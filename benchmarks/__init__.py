"""Benchmark harnesses: speed (`tfanet bench`), accuracy, drift and serving load, and the machine they ran on.

Nothing in ``tfanet_core`` imports from here; results live in ``benchmarks/results/``.
"""
