"""Ferrylink benchmarks: `python -m bench [name ...]` prints tables and writes bench/results/."""
