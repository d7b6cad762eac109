"""Benchmarks: run from the repository root as `python -m bench.<name>` (tables on stdout; see RESULTS.md)."""
