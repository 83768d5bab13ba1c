"""Benchmarks for pgws: a load generator, baselines and a runner (`python -m bench.run`)."""
