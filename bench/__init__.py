"""Benchmarks: ``python -m bench.throughput`` (the engine with full tracking against bare
Dramatiq, side by side) and ``python -m bench.lookup`` (store lookups as the jobs table grows).
See README.md, "Performance"."""
