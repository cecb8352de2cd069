"""Run benchmarks: `python -m bench` (all) or `python -m bench failover`."""

from __future__ import annotations

import importlib
import sys

BENCHMARKS = ["failover", "events", "memory", "sentinel"]


def main() -> None:
    names = [a for a in sys.argv[1:] if not a.startswith("-")] or BENCHMARKS
    for name in names:
        if name not in BENCHMARKS:
            raise SystemExit(f"unknown benchmark {name!r}; known: {', '.join(BENCHMARKS)}")
        importlib.import_module(f"bench.{name}").main([])


if __name__ == "__main__":
    main()
