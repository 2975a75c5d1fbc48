"""Benchmarks (speed, protocol evaluation); run from the repository root as ``python -m benchmarks.<name>``."""
