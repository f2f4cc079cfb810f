"""Benchmark helpers: measurement and the environment stamp recorded next to every figure."""
