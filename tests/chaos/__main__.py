"""`python -m tests.chaos`: see the package docstring."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ferrylink.contracts import CLUSTER_MODES
from tests.chaos.suite import Options, run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.chaos", description=__doc__)
    parser.add_argument("--long", action="store_true", help="several rounds, random order")
    parser.add_argument("--rounds", type=int, default=0, help="rounds (default 1, long 3)")
    parser.add_argument("--mode", choices=[m for m in CLUSTER_MODES if m != "passive_legacy"],
                        default="active_active")  # fmt: skip
    parser.add_argument("--report", type=Path, default=Path("tests/chaos/results/report.json"))
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: random)")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args(argv)
    options = Options(long=args.long, mode=args.mode, rounds=args.rounds, seed=args.seed,
                      workdir=args.workdir, keep=args.keep)  # fmt: skip
    report = run(options, args.report, log=lambda line: print(line, flush=True))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
