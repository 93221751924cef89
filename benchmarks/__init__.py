"""Benchmarks of the sketch stage, its baselines, the reduce stage and scaling.

Run `python -m benchmarks.run --help`. Timings live in docs/benchmarks.md and
docs/benchmarks.json; tests only check that the benchmarks still run.
"""
