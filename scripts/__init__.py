"""Benchmark and measurement scripts: run as `python -m hwnas.scripts.NAME` from the repository root."""
