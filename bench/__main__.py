"""Run benchmarks: `python -m bench` (all), `python -m bench failover`, or one benchmark with
its options: `python -m bench edge --size-mib 512`."""

from __future__ import annotations

import importlib
import sys

BENCHMARKS = ["failover", "events", "memory", "sentinel", "edge"]


def main() -> None:
    # Names first, then options (passed to each named benchmark).
    args = sys.argv[1:]
    first_option = next((i for i, a in enumerate(args) if a.startswith("-")), len(args))
    names, options = args[:first_option], args[first_option:]
    for name in names or BENCHMARKS:
        if name not in BENCHMARKS:
            raise SystemExit(f"unknown benchmark {name!r}; known: {', '.join(BENCHMARKS)}")
        importlib.import_module(f"bench.{name}").main(options)


if __name__ == "__main__":
    main()
